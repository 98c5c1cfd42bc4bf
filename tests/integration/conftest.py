"""Real services for integration tests, never mocks.

- ``SORTER_TEST_BOOTSTRAP`` / ``SORTER_TEST_REDIS_URL`` point the suite at existing services;
- else, when a Docker engine answers, testcontainers starts Apache Kafka (KRaft) and Redis;
- else the suite starts the local Tansu broker and redis-server itself (what CI does).

Every test gets its own topics, consumer group and Redis key prefix, so tests never see each other's data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from sorter.services import redis_server, tansu_broker
from sorter.settings import Settings, load_settings
from sorter.train.trainer import TrainConfig, train

pytestmark = pytest.mark.integration


def _docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def bootstrap(tmp_path_factory) -> Iterator[str]:
    if os.environ.get("SORTER_TEST_BOOTSTRAP"):
        yield os.environ["SORTER_TEST_BOOTSTRAP"]
    elif _docker_available():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("confluentinc/cp-kafka:7.6.1").with_kraft() as kafka:
            yield kafka.get_bootstrap_server()
    else:
        broker = tansu_broker(workdir=tmp_path_factory.mktemp("broker")).start()
        yield f"127.0.0.1:{broker.port}"
        broker.stop()


@dataclass
class RedisHandle:
    url: str
    service: object | None  # LocalService when we started it (so a test can stop and restart it)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    if os.environ.get("SORTER_TEST_REDIS_URL"):
        yield os.environ["SORTER_TEST_REDIS_URL"]
    elif _docker_available():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7-alpine") as r:
            yield f"redis://{r.get_container_host_ip()}:{r.get_exposed_port(6379)}/0"
    else:
        server = redis_server(workdir=tmp_path_factory.mktemp("redis")).start()
        yield f"redis://127.0.0.1:{server.port}/0"
        server.stop()


@pytest.fixture
def own_redis(tmp_path) -> Iterator[RedisHandle]:
    """A Redis only this test uses, which the test may stop and start again."""
    server = redis_server(workdir=tmp_path).start()
    yield RedisHandle(f"redis://127.0.0.1:{server.port}/0", server)
    server.stop()


@pytest.fixture(scope="session")
def checkpoint(synth_tree, tmp_path_factory) -> Path:
    """A small real model trained on the synthetic products (4 classes)."""
    out = tmp_path_factory.mktemp("model") / "model.pt"
    train(
        synth_tree,
        out,
        TrainConfig(
            backbone="mobilenet_v2", epochs=4, image_size=96, device="cpu", precision="fp32", model_version="it-1"
        ),
    )
    return out


@pytest.fixture
def routes(tmp_path, synth_tree) -> Path:
    import json

    skus = json.loads((synth_tree / "skus.json").read_text())
    path = tmp_path / "routes.yaml"
    lines = ["default_chute: C-99", "review_chute: REVIEW", "min_confidence: 0.5", "routes:"]
    lines += [f"  {sku}: C-{i:02d}" for i, sku in enumerate(sorted(skus.values()))]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def settings_for(bootstrap, redis_url, checkpoint, routes, namespace):
    def make(**overrides) -> Settings:
        base = {
            "kafka": {
                "bootstrap_servers": bootstrap,
                "group_id": f"{namespace}-group",
                "frames_pattern": rf"^{namespace}-frames\..+",
                "topic_prefix": f"{namespace}-frames.",
                "commands_topic": f"{namespace}-commands",
                "dlq_topic": f"{namespace}-dlq",
                "control_topic": f"{namespace}-control",
                "session_timeout_ms": 6000,
                "fetch_wait_max_ms": 20,
                "metadata_refresh_ms": 1000,
            },
            "redis": {"url": redis_url, "key_prefix": f"{namespace}:"},
            "model": {"checkpoint": checkpoint, "device": "cpu"},
            "batch": {"max_size": 16, "max_wait_ms": 20},
            "observe": {"port": 0, "host": "127.0.0.1", "stats_interval_ms": 500},
            "routes": routes,
            "worker_id": f"{namespace}-worker",
        }
        for key, value in overrides.items():
            base[key] = base[key] | value if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        return load_settings(**base)

    return make


def write_config(settings: Settings, path: Path) -> Path:
    """The settings as a YAML file for a `sorter run --config` subprocess (secrets included: test-only)."""
    import yaml

    data = settings.model_dump(mode="json")
    data["redis"]["url"] = settings.redis.url.get_secret_value()
    data["kafka"]["client"] = settings.kafka.client_config()
    path.write_text(yaml.safe_dump(data))
    return path


def produce(bootstrap: str, topic: str, frames: list[tuple[str, bytes, dict[str, str]]]) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for key, value, headers in frames:
        p.produce(topic, value=value, key=key.encode(), headers=list(headers.items()))
    assert p.flush(30) == 0


def consume_all(bootstrap: str, topic: str, expect: int, timeout: float = 60.0) -> list:
    """Every message of ``topic`` (waits until ``expect`` have arrived, or ``timeout``)."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "fetch.wait.max.ms": 20,
        }
    )
    c.subscribe([topic])
    out, deadline = [], time.monotonic() + timeout
    try:
        while len(out) < expect and time.monotonic() < deadline:
            for m in c.consume(500, 0.5):
                if m.error() is None:
                    out.append(m)
        # a short grace period to catch any extra (duplicate) messages
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            out += [m for m in c.consume(500, 0.2) if m.error() is None]
    finally:
        c.close()
    return out


def broker_hides_aborted_transactions(bootstrap: str) -> bool:
    """Probe: does a read_committed reader skip what an aborted transaction wrote? (Kafka: yes.)"""
    topic = f"txn-probe-{uuid.uuid4().hex[:8]}"
    p = Producer({"bootstrap.servers": bootstrap, "transactional.id": topic})
    p.init_transactions(30)
    p.begin_transaction()
    p.produce(topic, b"aborted")
    p.flush(30)
    p.abort_transaction(30)
    p.begin_transaction()
    p.produce(topic, b"committed")
    p.commit_transaction(30)
    seen = [m.value() for m in consume_all(bootstrap, topic, expect=1, timeout=30)]
    return seen == [b"committed"]
