"""Logs an operator can pipe through ``jq``: librdkafka's own lines as JSON events (rate-limited), the cause
of an unreachable broker, worker context on every line, and flags that refuse what they do not know."""

from __future__ import annotations

import io
import json
import logging
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from sorter import logs
from sorter.errors import ConfigError
from sorter.logs import configure_logging
from sorter.settings import load_settings
from sorter.stream.cache import MemoryCache
from sorter.stream.kafka import BrokerUnreachable, ClientLogs, wait_for_broker
from tests.failures import failure_message
from tests.fakes import NOW_MS, FakeCluster, photo
from tests.test_loop import TOPIC, new_worker, pipeline, settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_logging(monkeypatch):
    """Tests here reconfigure structlog; the tests after them get the configuration back."""
    saved = structlog.get_config()
    monkeypatch.setattr(logs, "_format", logs._format)  # the format a later configure_logging keeps
    yield
    structlog.configure(**saved)


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens once the socket is closed: refused


def json_lines(text: str) -> list[dict]:
    """Every non-empty line as JSON; fails naming the first line that is not."""
    out = []
    for line in text.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pytest.fail(f"not a JSON line: {line[:300]!r}")
    return out


# -- librdkafka's own log lines ---------------------------------------------------------------------------


def client_logger(handler: ClientLogs) -> logging.Logger:
    logger = logging.Logger("test.kafka.client", logging.DEBUG)
    logger.addHandler(handler)
    return logger


def test_client_log_lines_become_events_and_repeats_are_counted_not_printed():
    """confluent-kafka calls ``logger.log(level, "%s [%s] %s", facility, client, message)``; librdkafka
    repeats a failing connect every backoff with a different "(after Nms ...)" tail."""
    now = [0.0]
    logger = client_logger(ClientLogs(every_s=30, clock=lambda: now[0]))
    refused = "[thrd:127.0.0.1:1/bootstrap]: 127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: " \
        "Connection refused (after {}ms in state CONNECT)"  # fmt: skip
    with capture_logs() as events:
        for i in range(5):  # within the window: one line
            logger.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#producer-1", refused.format(i))
            now[0] += 1
        logger.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-2", refused.format(0))  # another client
        logger.log(logging.WARNING, "%s [%s] %s", "CONFWARN", "rdkafka#producer-1", "property ignored")
        now[0] += 30
        logger.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#producer-1", refused.format(9))
    assert [(e["client"], e["facility"], e["log_level"], e["suppressed"]) for e in events] == [
        ("rdkafka#producer-1", "FAIL", "error", 0),
        ("rdkafka#consumer-2", "FAIL", "error", 0),
        ("rdkafka#producer-1", "CONFWARN", "warning", 0),
        ("rdkafka#producer-1", "FAIL", "error", 4),  # the 4 repeats held back in the window
    ]
    assert {e["event"] for e in events} == {"kafka.client_log"}
    assert events[0]["message"] == refused.format(0).split("]: ", 1)[1]  # librdkafka's thread name left out


CLIENTS = """
import sys, time
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient
from sorter import logs
from sorter.logs import configure_logging
from sorter.settings import load_settings
from sorter.stream.kafka import admin_config, consumer_config, producer_config, transactional_producer_config

configure_logging("info")
k = load_settings(kafka={"bootstrap_servers": sys.argv[1]}).kafka
consumer = Consumer(consumer_config(k))
consumer.subscribe(["^frames\\\\..+"])
producer = Producer(producer_config(k))
producer.produce("sort.commands", b"x")
transactional = Producer(transactional_producer_config(k, "t-1"))
admin = AdminClient(admin_config(k))
deadline = time.monotonic() + 3
while time.monotonic() < deadline:
    consumer.consume(1, 0.1)
    producer.poll(0.1)
    transactional.poll(0)
    admin.poll(0)
consumer.close()
"""


def test_kafka_clients_built_from_the_configs_write_only_json_lines():
    """An unreachable broker: every client (consumer, producer, transactional producer, admin) says so as
    ``kafka.client_log`` events on stdout; no raw ``%3|...|FAIL|`` line on stderr to break ``jq``."""
    proc = subprocess.run(
        [sys.executable, "-c", CLIENTS, closed_port()], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "%3|" not in proc.stderr and proc.stderr.strip() == "", proc.stderr[:1000]
    events = json_lines(proc.stdout + proc.stderr)
    logs = [e for e in events if e["event"] == "kafka.client_log"]
    clients = {e["client"].split("-")[0] for e in logs}
    assert clients == {"rdkafka#consumer", "rdkafka#producer"}, clients
    assert any("Connection refused" in e["message"] and e["level"] == "error" for e in logs)
    per_line = [(e["client"], e["facility"], e["message"].split(" (after")[0]) for e in logs]
    assert len(per_line) == len(set(per_line)), "a repeated line was not held back"


def test_an_unreachable_broker_is_reported_with_its_cause(capfd):
    bootstrap = closed_port()
    k = load_settings(kafka={"bootstrap_servers": bootstrap}).kafka
    with capture_logs() as events, pytest.raises(BrokerUnreachable) as raised:
        wait_for_broker(k, timeout_s=2.5)
    assert "Connection refused" in str(raised.value) and bootstrap in str(raised.value)
    unreachable = [e for e in events if e["event"] == "kafka.unreachable"]
    assert unreachable and all("Connection refused" in e["cause"] for e in unreachable)
    assert "%3|" not in capfd.readouterr().err


def test_sorter_run_against_an_unreachable_broker_prints_json_and_one_error_line(tmp_path):
    """The worker's start-up path end to end: model loaded, broker waited for, given up on. stdout is
    JSON only; stderr is the one ``error:`` line, naming the cause."""
    from sorter.bench import BenchConfig, make_checkpoint

    checkpoint = make_checkpoint(BenchConfig(backbone="mobilenet_v2", image_size=32), tmp_path)
    routes = tmp_path / "routes.yaml"
    routes.write_text("default_chute: C-99\nreview_chute: REVIEW\n")
    config = tmp_path / "sorter.yaml"
    config.write_text(
        textwrap.dedent(f"""\
        kafka: {{bootstrap_servers: "{closed_port()}", startup_timeout_s: 2}}
        redis: {{enabled: false}}
        model: {{checkpoint: "{checkpoint}", device: cpu}}
        observe: {{enabled: false}}
        routes: "{routes}"
        worker_id: w-9
        """)
    )
    proc = subprocess.run(
        [sys.executable, "-m", "sorter", "run", "--config", str(config)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    events = json_lines(proc.stdout)
    assert "kafka.unreachable" in {e["event"] for e in events}
    assert "%3|" not in proc.stderr
    message = failure_message(proc)
    assert message.startswith("no Kafka broker answered") and "Connection refused" in message


# -- context on every line ----------------------------------------------------------------------------------


def test_every_worker_line_says_which_worker_and_model_and_items_say_where_they_came_from(restore_logging):
    """worker_id and model_version are bound once (contextvars) and reach the lines of every thread the
    worker hands work to; ``item.routed`` names the camera and the source offset; a frame answered from
    the cache leaves an ``item.cache_hit`` line (debug)."""
    configure_logging("debug")
    cluster = FakeCluster()
    cluster.create(TOPIC)
    for i, (item, camera) in enumerate([("a", "cam-1"), ("b", "cam-1"), ("a", "cam-2")]):
        headers = [
            ("item-id", item.encode()),
            ("captured-at", str(NOW_MS + i).encode()),
            ("camera-id", camera.encode()),
        ]
        cluster.append(TOPIC, photo(0, 0.9), item.encode(), headers)
    w = new_worker(cluster, settings(batch={"max_size": 2, "overlap": False}), pipeline(cache=MemoryCache()))
    w.consumer.schedule(("assign", [(TOPIC, 0)]))
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as events:
        w.run(idle_exit_s=0.3)
    assert events and all(e.get("worker_id") == "w-1" for e in events), [e for e in events if "worker_id" not in e]
    assert all(e.get("model_version") == w.pipeline.model.model_version for e in events)
    assert {e["event"] for e in events} >= {"worker.started", "item.routed", "batch.done", "worker.stopped"}
    routed = [e for e in events if e["event"] == "item.routed"]
    assert [(e["item_id"], e["camera_id"], e["topic"], e["partition"], e["offset"]) for e in routed] == [
        ("a", "cam-1", TOPIC, 0, 0),
        ("b", "cam-1", TOPIC, 0, 1),
    ]
    hits = [e for e in events if e["event"] == "item.cache_hit"]
    assert [(e["log_level"], e["item_id"], e["camera_id"], e["offset"], e["new_pass"]) for e in hits] == [
        ("debug", "a", "cam-2", 2, False),  # same station, same pass: no second command
    ]


# -- flags ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, named", [(["--log-format", "yaml"], "yaml"), (["--log-level", "verbose"], "verbose")])
def test_an_unknown_log_format_or_level_is_one_line_and_exit_2(flags, named, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sorter", *flags, "synth", str(tmp_path / "out"), "--classes", "1"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert proc.stderr.startswith("error: ")  # the logging flags themselves were wrong: plain text
    assert repr(named) in failure_message(proc)
    assert not (tmp_path / "out").exists()


def test_configure_logging_refuses_unknown_values_with_a_config_error(restore_logging):
    with pytest.raises(ConfigError, match="json, console"):
        configure_logging("info", "yaml")
    with pytest.raises(ConfigError, match="debug, info, warning, error"):
        configure_logging("verbose")


def test_console_output_has_no_colour_codes_when_not_a_terminal(restore_logging):
    out = io.StringIO()
    configure_logging("info", "console", stream=out)
    log = structlog.get_logger("t")
    log.info("item.routed", item_id="a")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("worker.crashed")
    assert "item.routed" in out.getvalue() and "boom" in out.getvalue()
    assert "\x1b[" not in out.getvalue()


def test_a_later_configure_keeps_the_format_the_flag_chose(restore_logging):
    """``sorter --log-format console run``: ``run`` sets the level from its settings; the format stays."""
    out = io.StringIO()
    configure_logging("info", "console", stream=out)
    configure_logging("debug", stream=out)
    structlog.get_logger("t").debug("worker.started")
    assert "worker.started" in out.getvalue() and not out.getvalue().lstrip().startswith("{")


def test_every_tool_client_is_built_from_the_kafka_settings_with_the_json_logger():
    """record, replay, simulate, bench and the demo view: the user's SASL/TLS settings apply to them, what
    the tool requires wins, its defaults give way, and librdkafka's lines go through the same JSON events."""
    from sorter.stream.kafka import CLIENT_LOGGER, kafka_config

    s = load_settings(
        kafka={
            "bootstrap_servers": "b:9092",
            "client": {"security_protocol": "SASL_SSL", "auto_offset_reset": "latest", "linger_ms": "9"},
        }
    )
    config = kafka_config(s.kafka, {"linger.ms": 5}, required={"auto.offset.reset": "earliest", "group.id": "g"})
    assert config["bootstrap.servers"] == "b:9092" and config["security.protocol"] == "SASL_SSL"
    assert config["auto.offset.reset"] == "earliest" and config["group.id"] == "g"  # record --from earliest
    assert config["linger.ms"] == "9" and config["logger"] is CLIENT_LOGGER  # a tool default gives way
