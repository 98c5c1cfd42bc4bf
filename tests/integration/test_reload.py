"""Hot reload through the real broker, worker process and checkpoints: under steady traffic a corrupt
checkpoint renamed over the model path is refused while the old model serves on, then a new one is served
from one batch on; every item gets one command, and the commands' model version changes once, in order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import pytest
from confluent_kafka import Producer

from sorter.data.synth import catalog, render
from sorter.model.checkpoint import load_checkpoint, save_checkpoint
from sorter.stream.kafka import ensure_topics
from tests.figures import report
from tests.integration.conftest import consume_all, write_config

pytestmark = pytest.mark.integration


def _events(log_path) -> list[dict]:
    return [json.loads(line) for line in log_path.read_text(errors="replace").splitlines() if line.startswith("{")]


def _wait_for(log_path, event: str, proc, seconds: float = 120) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        found = [e for e in _events(log_path) if e["event"] == event]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no {event} in {seconds} s: {log_path.read_text()[-3000:]}")


def test_a_new_checkpoint_is_served_under_traffic_without_a_restart_and_a_corrupt_one_is_refused(
    settings_for, namespace, bootstrap, checkpoint, tmp_path
):
    path = tmp_path / "model.pt"  # the path the pods mount
    path.write_bytes(checkpoint.read_bytes())
    model, meta = load_checkpoint(checkpoint)
    save_checkpoint(tmp_path / "next.pt", model, meta.model_copy(update={"model_version": "it-2"}))
    settings = settings_for(model={"checkpoint": path, "device": "cpu", "reload_poll_s": 0.5},
                            batch={"max_size": 8, "max_wait_ms": 5})  # fmt: skip
    topic = f"{settings.kafka.topic_prefix}dock-1"
    ensure_topics(settings.kafka, {topic: 1})
    config = write_config(settings, tmp_path / "sorter.yaml")
    log_path = tmp_path / "worker.log"
    rng = np.random.default_rng(3)
    designs = catalog(4)
    photos = [render(designs[i % 4], rng, size=(160, 120)) for i in range(40)]
    n, rate = 300, 20.0  # 15 s of steady traffic
    with log_path.open("w") as out:
        argv = [sys.executable, "-m", "sorter", "run", "--config", str(config), "--idle-exit", "4"]
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        try:
            _wait_for(log_path, "worker.assigned", proc)

            def camera() -> None:
                p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
                started = time.monotonic()
                for i in range(n):
                    time.sleep(max(0.0, started + i / rate - time.monotonic()))
                    headers = [("item-id", f"{namespace}-{i}".encode()),
                               ("captured-at", str(time.time_ns() // 1_000_000).encode())]  # fmt: skip
                    p.produce(topic, photos[i % len(photos)], f"{namespace}-{i}".encode(), headers=headers)
                    p.poll(0)
                p.flush(30)

            sender = threading.Thread(target=camera)
            sender.start()
            time.sleep(3)
            (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 1000)
            os.replace(tmp_path / "garbage.pt", path)  # a bad model job: refused, the old model serves on
            refused = _wait_for(log_path, "model.reload_refused", proc, 30)
            time.sleep(2)
            os.replace(tmp_path / "next.pt", path)  # the good one, as a volume update or a model job renames it
            _wait_for(log_path, "model.reloaded", proc, 60)
            sender.join(60)
            assert proc.wait(120) == 0, log_path.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()

    commands = [json.loads(m.value()) for m in consume_all(bootstrap, settings.kafka.commands_topic, expect=n)]
    counts = Counter(c["item_id"] for c in commands)
    assert len(counts) == n and sum(counts.values()) == n  # none lost, none twice, no restart
    versions = [c["model_version"] for c in sorted(commands, key=lambda c: c["source"]["offset"])]
    switch = versions.index("it-2")
    assert switch > 0 and set(versions[:switch]) == {"it-1"} and set(versions[switch:]) == {"it-2"}
    events = _events(log_path)
    assert "not a torch file" in refused["error"]  # said why, in one line
    last_routed = max(i for i, e in enumerate(events) if e["event"] == "item.routed")
    assert sum(e["event"] == "worker.started" for e in events) == 1  # one process
    assert not any(e["event"] in ("worker.revoked", "worker.lost") for e in events[:last_routed])  # no rebalance
    batches = [e for e in events if e["event"] == "batch.done"]
    assert batches
    swapped_at = next(e for e in events if e["event"] == "model.reloaded")["timestamp"]
    routed = [e for e in events if e["event"] == "item.routed"]
    near = [e["latency_ms"] for e in routed if abs(_ts(e["timestamp"]) - _ts(swapped_at)) <= 2.0]
    steady = [e["latency_ms"] for e in routed if _ts(e["timestamp"]) - _ts(swapped_at) < -4.0]
    report(
        "hot reload under steady traffic (20 frames/s)",
        items=n, commands=len(commands), lost=0, duplicates=0, switch_at_item=switch,
        p99_steady_ms=round(float(np.percentile(steady, 99)), 1) if steady else None,
        p99_within_2s_of_swap_ms=round(float(np.percentile(near, 99)), 1) if near else None,
    )  # fmt: skip


def _ts(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_the_control_topic_loads_the_model_it_names_and_refuses_a_version_the_file_does_not_hold(
    settings_for, namespace, bootstrap, checkpoint, tmp_path
):
    """Every pod reads the control topic (no group); a message naming a file and its version is served, a
    message whose version the file does not hold is refused, junk is ignored; traffic flows throughout."""
    model, meta = load_checkpoint(checkpoint)
    save_checkpoint(tmp_path / "m2.pt", model, meta.model_copy(update={"model_version": "it-2"}))
    settings = settings_for(model={"checkpoint": checkpoint, "device": "cpu", "reload_poll_s": 0},
                            kafka={"control_topic": f"{namespace}-control"},
                            batch={"max_size": 8, "max_wait_ms": 5})  # fmt: skip
    topic = f"{settings.kafka.topic_prefix}dock-1"
    ensure_topics(settings.kafka, {topic: 1, settings.kafka.control_topic: 1})
    control = Producer({"bootstrap.servers": bootstrap})
    control.produce(settings.kafka.control_topic, b"{not json")  # before the pod starts: read at start too
    control.flush(10)
    config = write_config(settings, tmp_path / "sorter.yaml")
    log_path = tmp_path / "worker.log"
    rng = np.random.default_rng(5)
    photos = [render(d, rng, size=(160, 120)) for d in catalog(4)]
    n = 120
    with log_path.open("w") as out:
        argv = [sys.executable, "-m", "sorter", "run", "--config", str(config), "--idle-exit", "4"]
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        try:
            _wait_for(log_path, "worker.assigned", proc)
            _wait_for(log_path, "control.ignored", proc, 30)
            p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
            for i in range(n):
                if i == 30:
                    control.produce(
                        settings.kafka.control_topic,
                        json.dumps(
                            {"action": "load", "checkpoint": str(tmp_path / "m2.pt"), "version": "it-9"}
                        ).encode(),
                    )
                    control.flush(10)
                    _wait_for(log_path, "model.reload_refused", proc, 60)
                if i == 60:
                    control.produce(
                        settings.kafka.control_topic,
                        json.dumps(
                            {"action": "load", "checkpoint": str(tmp_path / "m2.pt"), "version": "it-2"}
                        ).encode(),
                    )
                    control.flush(10)
                    _wait_for(log_path, "model.reloaded", proc, 60)
                headers = [("item-id", f"{namespace}-{i}".encode()),
                           ("captured-at", str(time.time_ns() // 1_000_000).encode())]  # fmt: skip
                p.produce(topic, photos[i % 4], f"{namespace}-{i}".encode(), headers=headers)
                p.poll(0)
                time.sleep(0.05)
            p.flush(30)
            assert proc.wait(120) == 0, log_path.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    commands = [json.loads(m.value()) for m in consume_all(bootstrap, settings.kafka.commands_topic, expect=n)]
    assert len({c["item_id"] for c in commands}) == n == len(commands)
    versions = [c["model_version"] for c in sorted(commands, key=lambda c: c["source"]["offset"])]
    switch = versions.index("it-2")
    assert 30 < switch <= 61 and set(versions[:switch]) == {"it-1"} and set(versions[switch:]) == {"it-2"}
    refused = next(e for e in _events(log_path) if e["event"] == "model.reload_refused")
    assert "asked for model it-9" in refused["error"] and "holds it-2" in refused["error"]
    report("control topic: load by name and version", items=n, commands=len(commands), switch_at_item=switch)


def test_a_pod_reads_the_control_topics_history_to_its_end_and_acts_on_the_last_request_only(
    settings_for, namespace, bootstrap
):
    """A new pod on a control topic with a long history (sorter creates it kept forever) asks for one load:
    the latest, a rollback included, not each of the history's in turn; then requests published live."""
    from confluent_kafka import Consumer

    from sorter.stream.control import ControlReader

    settings = settings_for()
    name = settings.kafka.control_topic
    ensure_topics(settings.kafka, {name: 1}, configs={name: {"retention.ms": "-1", "retention.bytes": "-1"}})
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for i in range(150):
        p.produce(name, json.dumps({"action": "load", "checkpoint": f"/models/v{i}.pt", "version": f"v{i}"}).encode())
    p.produce(name, json.dumps({"action": "load", "checkpoint": "/models/v7.pt", "version": "v7"}).encode())  # back
    p.flush(10)
    config = {"group.id": f"{namespace}.control", "enable.auto.commit": False, "enable.partition.eof": True}
    consumer = Consumer({"bootstrap.servers": bootstrap} | config)
    reader = ControlReader(consumer, name)
    try:
        asked, deadline = [], time.monotonic() + 20
        while time.monotonic() < deadline and not asked:
            if (r := reader.poll()) is not None:
                asked.append(r.version)
            time.sleep(0.01)
        assert asked == ["v7"]
        p.produce(name, json.dumps({"action": "load", "checkpoint": "/models/v8.pt", "version": "v8"}).encode())
        p.flush(10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(asked) < 2:
            if (r := reader.poll()) is not None:
                asked.append(r.version)
            time.sleep(0.01)
        assert asked == ["v7", "v8"]
    finally:
        reader.close()
