"""Multi-camera fusion through the real broker, worker process and model: an item's views arrive paced, in
different batches, and decide once; an item still waiting for views when the worker is killed is decided
after the restart, and nothing decided before the kill is repeated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
from confluent_kafka import Producer

from sorter.data.synth import catalog, render
from sorter.stream.kafka import ensure_topics
from tests.figures import report
from tests.integration.conftest import consume_all, write_config

pytestmark = pytest.mark.integration


def _routes_with_fusion(routes, tmp_path, window_ms: int):
    path = tmp_path / f"routes-{window_ms}.yaml"
    path.write_text(routes.read_text() + f"fusion: {{window_ms: {window_ms}, views: 3}}\n")
    return path


def _lines(log_path) -> list[dict]:
    return [json.loads(line) for line in log_path.read_text(errors="replace").splitlines() if line.startswith("{")]


def _routed(log_path) -> int:
    return sum(e["event"] == "item.routed" for e in _lines(log_path))


def test_views_in_different_batches_decide_once_and_an_item_open_at_a_kill_is_decided_after_restart(
    settings_for, namespace, bootstrap, routes, tmp_path
):
    n = 12  # items with all three views; then one whose third camera never sends
    settings = settings_for(batch={"max_size": 8, "max_wait_ms": 5})
    topic = f"{settings.kafka.topic_prefix}tunnel-1"
    ensure_topics(settings.kafka, {topic: 1})  # a station topic as cameras have it: one partition
    first_cfg = write_config(
        settings.model_copy(update={"routes": _routes_with_fusion(routes, tmp_path, 60_000)}), tmp_path / "a.yaml"
    )
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    first_log = tmp_path / "first.log"
    with first_log.open("w") as out:
        argv = [sys.executable, "-m", "sorter", "run", "--config", str(first_cfg)]
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 120
            while not any(e["event"] == "worker.assigned" for e in _lines(first_log)) and time.monotonic() < deadline:
                assert proc.poll() is None, first_log.read_text()[-3000:]
                time.sleep(0.1)
            rng = np.random.default_rng(7)
            designs = catalog(4)
            producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
            plan = [(f"{namespace}-{i}", designs[i % 4], 3) for i in range(n)] + [(f"{namespace}-open", designs[0], 2)]
            for item, design, cameras in plan:  # paced as a tunnel: views ~40 ms apart, items 150 ms apart
                for camera in range(cameras):
                    headers = [
                        ("item-id", item.encode()),
                        ("camera-id", f"cam-{camera + 1}".encode()),
                        ("captured-at", str(time.time_ns() // 1_000_000).encode()),
                    ]
                    producer.produce(topic, render(design, rng, size=(160, 120)), item.encode(), headers=headers)
                    producer.flush(10)
                    time.sleep(0.04)
                time.sleep(0.15)
            while _routed(first_log) < n and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(2.0)  # the last complete item's batch committed; the open one waits (window 60 s)
            assert _routed(first_log) == n, first_log.read_text()[-3000:]
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
    batches = [e for e in _lines(first_log) if e["event"] == "batch.done"]
    assert max(e["fusion_held_frames"] for e in batches) >= 1
    assert any(e["fused"] and e["frames"] < 3 for e in batches)  # decided by a batch without all its views

    second_cfg = write_config(
        settings.model_copy(update={"routes": _routes_with_fusion(routes, tmp_path, 300)}), tmp_path / "b.yaml"
    )
    second_log = tmp_path / "second.log"
    with second_log.open("w") as out:
        argv = [sys.executable, "-m", "sorter", "run", "--config", str(second_cfg), "--idle-exit", "5"]
        rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=240).returncode
    assert rc == 0, second_log.read_text()[-3000:]

    commands = [json.loads(m.value()) for m in consume_all(bootstrap, settings.kafka.commands_topic, expect=n + 1)]
    counts = Counter(c["item_id"] for c in commands)
    assert set(counts) == {item for item, _, _ in plan} and sum(counts.values()) == n + 1  # none lost, none twice
    views = {c["item_id"]: (c["views"], c["cameras"]) for c in commands}
    assert all(views[item] == (3, ["cam-1", "cam-2", "cam-3"]) for item, _, cameras in plan if cameras == 3)
    assert views[f"{namespace}-open"] == (2, ["cam-1", "cam-2"])
    assert _routed(second_log) == 1  # only the open item: the views read again of decided items are cache hits
    report("fusion across batches and a SIGKILL", items=n + 1, commands=len(commands), duplicates=0, lost=0)
