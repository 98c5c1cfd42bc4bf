"""Health from librdkafka statistics, and the metrics a batch moves (no broker needed)."""

import ast
import json
import re
import time
from pathlib import Path

from prometheus_client import generate_latest

import sorter
from sorter.stream.accounting import WorkerStats
from sorter.stream.contracts import CommandSource, RawFrame, RoutingCommand, Source
from sorter.stream.observe import DEAD_LETTER_REASONS, MAX_LABEL_CHARS, Health, Metrics, WorkerCollector
from sorter.stream.pipeline import BatchResult, DeadLetter
from sorter.stream.timeline import BatchTimes


def stats(state: str, lag: int) -> str:
    return json.dumps(
        {
            "brokers": {
                "127.0.0.1:9092/bootstrap": {"state": "UP", "nodeid": -1},  # the bootstrap entry does not count
                "127.0.0.1:9092/1": {"state": state, "nodeid": 1},
            },
            "topics": {
                "frames.dock-1": {
                    "partitions": {"0": {"consumer_lag": lag}, "1": {"consumer_lag": -1}, "-1": {"consumer_lag": 0}}
                }
            },
        }
    )


def test_broker_state_and_lag_come_from_statistics():
    h = Health()
    h.on_stats(stats("UP", 42))
    assert h.broker_up and h.lag == {("frames.dock-1", 0): 42}  # unknown lag (-1) and the UA partition skipped
    h.on_stats(stats("DOWN", 7))
    assert not h.broker_up
    h.on_stats("not json")
    assert not h.broker_up and h.seen_stats


def sample(name: str, labels: dict, text: str) -> float:
    for line in text.splitlines():
        named = line.startswith((name + "{", name + " "))
        if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not exported")


def test_a_batch_moves_the_counters_and_histograms():
    m = Metrics()
    src = CommandSource(topic="frames.dock-1", partition=0, offset=5)
    command = RoutingCommand(
        item_id="i1",
        station_id="dock-1",
        sku="SKU-1",
        label="box",
        confidence=0.9,
        chute="C-01",
        reason="classified",
        model_version="v1",
        captured_at=1_000,
        decided_at=1_100,
        source=src,
        worker_id="w",
    )
    raw = RawFrame(Source("frames.dock-1", 0, 6), b"i2", b"", ())
    result = BatchResult(
        commands=[command],
        dead_letters=[DeadLetter(raw, "empty_payload", "FrameError", "no bytes")],
        cache_hits=1,
        frames=3,
        classified=1,
        decode_s=0.002,
        infer_s=0.03,
        times=BatchTimes(delivered=1_180),
    )
    m.observe_batch(result, {"frames.dock-1": 3}, seconds=0.05)
    text = generate_latest(m.registry).decode()
    assert sample("sorter_frames_consumed_total", {"topic": "frames.dock-1"}, text) == 3
    assert sample("sorter_frames_dead_lettered_total", {"reason": "empty_payload", "station": "dock-1"}, text) == 1
    assert sample("sorter_cache_lookups_total", {"result": "hit"}, text) == 1
    assert sample("sorter_cache_lookups_total", {"result": "miss"}, text) == 1
    assert sample("sorter_commands_total", {"chute": "C-01", "reason": "classified", "station": "dock-1"}, text) == 1
    assert sample("sorter_end_to_end_latency_seconds_bucket", {"le": "0.2"}, text) == 1  # 180 ms
    assert sample("sorter_end_to_end_latency_seconds_bucket", {"le": "0.15"}, text) == 0
    assert sample("sorter_batch_frames_sum", {}, text) == 3


def routed(station: str, chute: str = "C-01", reason: str = "classified") -> RoutingCommand:
    return RoutingCommand(
        item_id=f"{station}-1",
        station_id=station,
        sku="SKU-1",
        label="box",
        confidence=0.9,
        chute=chute,
        reason=reason,
        model_version="v1",
        captured_at=None,
        decided_at=1_100,
        source=CommandSource(topic=f"frames.{station}", partition=0, offset=1),
        worker_id="w",
    )


def dead(topic: str, reason: str = "corrupt_image", headers=(), header_error: str | None = None) -> DeadLetter:
    raw = RawFrame(Source(topic, 0, 1), b"k", b"x", tuple(headers), header_error=header_error)
    return DeadLetter(raw, reason, "FrameDecodeError", "broken")


def scrape(m: Metrics) -> str:
    return generate_latest(m.registry).decode()


def test_commands_and_dead_letters_carry_the_station():
    m = Metrics(topic_prefix="staging.frames.")
    result = BatchResult(
        commands=[routed("dock-1"), routed("dock-1", "REVIEW", "low_confidence"), routed("dock-2")],
        dead_letters=[
            dead("staging.frames.dock-3", headers=[("station-id", b"dock-4")]),  # the header wins
            dead("staging.frames.dock-3", "bad_header", headers=[("station-id", b"\xff\xfe")]),  # unreadable
            dead("staging.frames.dock-3", "bad_station_id", headers=[("station-id", b"no spaces allowed")]),
            dead("staging.frames.dock-3", "bad_header", header_error="header name is not UTF-8"),
            dead("elsewhere", "missing_station_id"),  # neither header nor a topic that names a station
            dead("staging.frames.", "missing_station_id"),  # the prefix alone names none
        ],
        frames=9,
    )
    result.times.delivered = 2_000
    m.observe_batch(result, {"staging.frames.dock-1": 2, "staging.frames.dock-3": 4}, seconds=0.1)
    text = scrape(m)
    assert sample("sorter_commands_total", {"station": "dock-1", "reason": "classified"}, text) == 1
    assert sample("sorter_commands_total", {"station": "dock-1", "reason": "low_confidence"}, text) == 1
    assert sample("sorter_commands_total", {"station": "dock-2", "chute": "C-01"}, text) == 1
    dead_lettered = "sorter_frames_dead_lettered_total"
    assert sample(dead_lettered, {"station": "dock-4", "reason": "corrupt_image"}, text) == 1
    assert sample(dead_lettered, {"station": "dock-3", "reason": "bad_header"}, text) == 2
    assert sample(dead_lettered, {"station": "dock-3", "reason": "bad_station_id"}, text) == 1
    assert sample(dead_lettered, {"station": "unknown", "reason": "missing_station_id"}, text) == 2


def test_station_labels_stay_bounded():
    m = Metrics(max_stations=3)
    long_id = "dock-" + "9" * 120  # a valid id (up to 128 characters), cut for the label
    stations = ["a", "b", long_id, "d", "e"]
    m.observe_batch(BatchResult(commands=[routed(s) for s in stations], frames=5), {}, 0.1)
    text = scrape(m)
    labels = set(re.findall(r'^sorter_commands_total\{.*station="([^"]*)"', text, re.M))
    assert labels == {"a", "b", long_id[:MAX_LABEL_CHARS], "other"}
    assert sample("sorter_commands_total", {"station": "other"}, text) == 2


class FakeWorker:
    """What WorkerCollector reads of a worker (WorkerView), without Kafka."""

    def __init__(self) -> None:
        self.stats, self.health, self.metrics = WorkerStats(), Health(), Metrics()
        self.last_progress = time.monotonic()
        self.assigned = {("frames.dock-1", 0)}
        self.stopping, self.blocked_s, self.cache_up, self.cache_errors = False, None, True, 0


def exported_series() -> dict[str, set[str]]:
    """Every sample name a worker exports -> its label names, scraped from a registry in which every family
    has a sample: a batch with a command and a dead letter, a loaded model, lag from statistics."""
    worker = FakeWorker()
    worker.health.on_stats(stats("UP", 3))
    worker.metrics.model_info.labels("resnet18", "v1", "3", "224", "cpu", "fp32").set(1)
    batch = BatchResult(commands=[routed("dock-1")], dead_letters=[dead("frames.dock-1")], frames=2, classified=1)
    worker.metrics.observe_batch(batch, {"frames.dock-1": 2}, 0.1)
    worker.metrics.enable_shadow()  # exported when a shadow model or a canary runs
    worker.metrics.enable_canary()
    worker.metrics.shadow_compared.labels("dock-1", "C-1", "same").inc()
    worker.metrics.shadow_commands.labels("dock-1", "classified").inc()
    worker.metrics.registry.register(WorkerCollector(worker))
    series: dict[str, set[str]] = {}
    for family in worker.metrics.registry.collect():
        assert family.samples, family.name
        for s in family.samples:
            series.setdefault(s.name, set()).update(s.labels)
    return series


def families(worker: FakeWorker) -> dict[str, str]:
    """Every metric family a worker exports (name as exported, without _total) -> its type."""
    worker.metrics.registry.register(WorkerCollector(worker))
    return {f.name: f.type for f in worker.metrics.registry.collect()}


def test_metric_names_end_with_their_unit():
    exported = families(FakeWorker())
    assert exported == {
        "sorter_frames_consumed": "counter",
        "sorter_frames_decoded": "counter",
        "sorter_frames_dead_lettered": "counter",
        "sorter_fused_items": "counter",
        "sorter_model_reloads": "counter",
        "sorter_fusion_held_frames": "gauge",
        "sorter_cache_lookups": "counter",
        "sorter_commands": "counter",
        "sorter_late_frames": "counter",
        "sorter_batches": "counter",
        "sorter_batch_frames": "histogram",
        "sorter_decode_seconds": "histogram",
        "sorter_inference_seconds": "histogram",
        "sorter_batch_seconds": "histogram",
        "sorter_end_to_end_latency_seconds": "histogram",
        "sorter_item_stage_seconds": "histogram",
        "sorter_kafka_errors": "counter",
        "sorter_fetch_stalls": "counter",
        "sorter_stalled_partitions": "gauge",
        "sorter_model_info": "gauge",
        "sorter_consumer_lag_messages": "gauge",
        "sorter_assigned_partitions": "gauge",
        "sorter_progress_age_seconds": "gauge",
        "sorter_broker_up": "gauge",
        "sorter_cache_up": "gauge",
        "sorter_redis_errors": "counter",
        "sorter_producer_restarts": "counter",
        "sorter_delivery_blocked_seconds": "gauge",
        "sorter_delivery_retries": "counter",
        "sorter_frames_dropped_on_revoke": "counter",
        "sorter_batches_unfinished": "counter",
        "sorter_slow_batches": "counter",
    }
    for name, kind in exported.items():  # counters get _total from the client; the rest end in their unit
        if kind != "counter":
            assert name.endswith(("_seconds", "_frames", "_messages", "_partitions", "_up", "_info")), name


def test_error_counters_exist_at_zero_before_the_first_error():
    """rate() and increase() see a series' first sample as its start: a counter born at 1 hides the first
    error. So the error series are there at 0 from start-up (dead letters: of station "unknown"), and a
    station's dead-letter series from its first frame on."""
    worker = FakeWorker()
    families(worker)
    text = scrape(worker.metrics)
    for client in ("consumer", "producer"):
        assert sample("sorter_kafka_errors_total", {"client": client}, text) == 0
    names = ("sorter_redis_errors_total", "sorter_producer_restarts_total", "sorter_slow_batches_total")
    for name in (*names, "sorter_fetch_stalls_total"):
        assert sample(name, {}, text) == 0
    stations = set(re.findall(r'^sorter_frames_dead_lettered_total\{.*station="([^"]*)"', text, re.M))
    assert stations == {"unknown"}  # no station seen yet
    worker.metrics.observe_batch(BatchResult(frames=1), {"frames.dock-7": 1}, 0.1)
    text = scrape(worker.metrics)
    for reason in DEAD_LETTER_REASONS:
        assert sample("sorter_frames_dead_lettered_total", {"station": "dock-7", "reason": reason}, text) == 0


def test_every_dead_letter_reason_in_the_code_is_initialised():
    """The reasons raised anywhere in sorter/ (FrameError(reason, ...), FrameDecodeError(..., reason)) are
    the ones DEAD_LETTER_REASONS starts at 0: a new reason must be added there too."""
    raised = {"undecodable"}  # FrameDecodeError's default
    for path in Path(sorter.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            args = {"FrameError": node.args[:1], "FrameDecodeError": node.args[1:2]}.get(node.func.id, [])
            args += [k.value for k in node.keywords if k.arg == "reason"] if node.func.id.startswith("Frame") else []
            raised |= {a.value for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    assert raised == set(DEAD_LETTER_REASONS)
