"""Scrape a running worker: counters move, readiness waits for partitions, liveness flips on a stall."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

import pytest

from sorter.stream.app import build_worker
from sorter.stream.kafka import ensure_topics
from tests.integration.conftest import produce
from tests.integration.test_worker import frames_for, photos

pytestmark = pytest.mark.integration


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text: str, name: str, **labels) -> float:
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"{name} {labels} not in /metrics"
    return total


def wait_until(check, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_metrics_move_readiness_follows_assignment_and_liveness_follows_progress(settings_for, namespace, bootstrap):
    settings = settings_for(
        observe={"port": 0, "host": "127.0.0.1", "stats_interval_ms": 300, "liveness_timeout_s": 1.5},
        batch={"max_size": 8, "max_wait_ms": 5},
    )
    topic = f"{namespace}-frames.dock-1"
    ensure_topics(settings.kafka, {topic: 1})
    worker = build_worker(settings)
    process, stall = worker.pipeline.process, threading.Event()

    def maybe_stalled(raws, *rest):
        if stall.is_set():
            time.sleep(4)  # the model hangs for longer than the liveness limit
        return process(raws, *rest)

    worker.pipeline.process = maybe_stalled
    thread = threading.Thread(target=worker.run, kwargs={"idle_exit_s": 120}, daemon=True)
    thread.start()
    wait_until(lambda: worker.server is not None, 30, "the HTTP server")
    port = worker.server.port

    status, body = get(port, "/readyz")
    assert status == 503 and "no partitions assigned" in body  # not ready before the group assigns partitions
    assert get(port, "/livez")[0] == 200
    wait_until(lambda: get(port, "/readyz")[0] == 200, 60, "readiness")

    produce(bootstrap, topic, frames_for([f"{namespace}-{i}" for i in range(8)], photos(8, seed=1), "dock-1"))
    wait_until(lambda: worker.stats.commands >= 8, 60, "8 commands")
    text = get(port, "/metrics")[1]
    assert metric(text, "sorter_frames_consumed_total", topic=topic) == 8
    assert metric(text, "sorter_commands_total", station="dock-1") == 8
    assert metric(text, "sorter_end_to_end_latency_seconds_count") == 8
    assert metric(text, "sorter_cache_lookups_total", result="miss") == 8
    assert metric(text, "sorter_model_info", version="it-1", backbone="mobilenet_v2") == 1
    assert metric(text, "sorter_assigned_partitions") == 1 and metric(text, "sorter_broker_up") == 1
    assert metric(text, "sorter_batches_total") >= 1
    assert metric(text, "sorter_frames_dead_lettered_total", station="dock-1", reason="corrupt_image") == 0
    assert metric(text, "sorter_progress_age_seconds") < 60

    stall.set()
    produce(bootstrap, topic, frames_for([f"{namespace}-s{i}" for i in range(4)], photos(4, seed=2), "dock-1"))
    wait_until(lambda: get(port, "/livez")[0] == 503, 30, "liveness to fail during the stall")
    assert "no progress for" in get(port, "/livez")[1]
    stall.clear()
    wait_until(lambda: worker.stats.frames >= 12, 60, "the stalled batch to finish")
    wait_until(lambda: get(port, "/livez")[0] == 200, 10, "liveness to recover")
    worker.stop_event.set()
    thread.join(30)
    assert worker.stats.commands == 12
