"""Shadow model through the real broker and the real worker process: a candidate checkpoint decides every item
on its own topic, after the live commands, and its decisions are the ones a direct replay of the candidate makes
on the same frames; the live commands are the live model's, one per item."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import torch
from confluent_kafka import Producer

from sorter.data.synth import catalog, render
from sorter.model.checkpoint import load_checkpoint, save_checkpoint
from sorter.stream.kafka import ensure_topics
from tests.figures import report
from tests.integration.conftest import consume_all, write_config
from tests.integration.test_traffic import record_all

pytestmark = pytest.mark.integration


def _events(log_path) -> list[dict]:
    return [json.loads(line) for line in log_path.read_text(errors="replace").splitlines() if line.startswith("{")]


def _run_worker(config, log_path, bootstrap: str, ticks, photos, every_s: float) -> None:
    """``sorter run --config`` until idle: once it holds its partitions, each tick's frames (topic, item id,
    station) go out together, one tick every ``every_s``; it must exit cleanly."""
    with log_path.open("w") as out:
        argv = [sys.executable, "-m", "sorter", "run", "--config", str(config), "--idle-exit", "4"]
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.monotonic() + 120
            while not any(e["event"] == "worker.assigned" for e in _events(log_path)):
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.1)
            p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
            for i, tick in enumerate(ticks):
                for topic, item, station in tick:
                    headers = [("item-id", item.encode()), ("station-id", station.encode()),
                               ("captured-at", str(time.time_ns() // 1_000_000).encode())]  # fmt: skip
                    p.produce(topic, photos[i % len(photos)], item.encode(), headers=headers)
                p.poll(0)
                time.sleep(every_s)
            p.flush(30)
            assert proc.wait(120) == 0, log_path.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()


def _candidate(checkpoint, path):
    """The live model with two classes' outputs swapped: it disagrees, by design, on the items of those two."""
    model, meta = load_checkpoint(checkpoint)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        linear.weight[[0, 1]] = linear.weight[[1, 0]].clone()
        linear.bias[[0, 1]] = linear.bias[[1, 0]].clone()
    save_checkpoint(path, model, meta.model_copy(update={"model_version": "it-candidate"}))
    return path


def test_shadow_decisions_on_their_own_topic_match_a_direct_replay_of_the_candidate(
    settings_for, namespace, bootstrap, checkpoint, routes, tmp_path
):
    candidate = _candidate(checkpoint, tmp_path / "candidate.pt")
    settings = settings_for(shadow={"checkpoint": candidate, "topic": f"{namespace}-shadow"},
                            model={"precision": "fp32"},  # bf16 results depend on the batch's size
                            batch={"max_size": 8, "max_wait_ms": 5})  # fmt: skip
    topic = f"{settings.kafka.topic_prefix}dock-1"
    ensure_topics(settings.kafka, {topic: 1})
    config = write_config(settings, tmp_path / "sorter.yaml")
    log_path = tmp_path / "worker.log"
    rng = np.random.default_rng(11)
    designs = catalog(4)
    photos = [render(designs[i % 4], rng, size=(160, 120)) for i in range(24)]
    n = 80
    ticks = [[(topic, f"{namespace}-{i}", "dock-1")] for i in range(n)]
    _run_worker(config, log_path, bootstrap, ticks, photos, every_s=0.04)  # steady traffic, 25 items/s

    live = [json.loads(m.value()) for m in consume_all(bootstrap, settings.kafka.commands_topic, expect=n)]
    shadow = [json.loads(m.value()) for m in consume_all(bootstrap, f"{namespace}-shadow", expect=n)]
    assert Counter(c["item_id"] for c in live) == Counter(f"{namespace}-{i}" for i in range(n))  # one each
    assert {(c["model_version"], c["shadow"]) for c in live} == {("it-1", False)}
    assert Counter(c["item_id"] for c in shadow) == Counter(f"{namespace}-{i}" for i in range(n))
    assert {(c["model_version"], c["shadow"]) for c in shadow} == {("it-candidate", True)}

    # the candidate alone, in-process, on the same frames: the same decision for every item
    recording = tmp_path / "frames.sorterrec"
    record_all(bootstrap, topic, recording)
    replayed = tmp_path / "candidate.jsonl"
    argv = [sys.executable, "-m", "sorter", "replay", str(recording), "--direct", "--checkpoint", str(candidate),
            "--routes", str(routes), "--out", str(replayed)]  # fmt: skip
    env = os.environ | {"SORTER_CONFIG": "", "SORTER_MODEL__PRECISION": "fp32", "SORTER_MODEL__DEVICE": "cpu"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    direct = {c["item_id"]: c for c in map(json.loads, replayed.read_text().splitlines())}
    assert len(direct) == n
    for c in shadow:
        d = direct[c["item_id"]]
        assert (c["chute"], c["label"], c["reason"]) == (d["chute"], d["label"], d["reason"]), c["item_id"]
        assert abs(c["confidence"] - d["confidence"]) < 1e-3
    by_item = {c["item_id"]: c for c in live}
    differ = sum(by_item[c["item_id"]]["chute"] != c["chute"] for c in shadow)
    assert 0 < differ < n  # two of four classes swapped: the candidate disagrees on some items, not all
    argv = [sys.executable, "-m", "sorter", "diff", "--shadow", "--config", str(config), "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # the two topics read from the broker, item by item
    assert (summary["common"], summary["changed"], summary["model_versions_b"]) == (n, differ, ["it-candidate"])
    stopped = next(e for e in _events(log_path) if e["event"] == "shadow.stopped")
    assert stopped["commands"] == n and stopped["skipped_frames"] == 0 and stopped["errors"] == 0
    report("shadow model vs a direct replay of the candidate", items=n, shadow_commands=len(shadow),
           same_as_direct_replay=n, chute_disagreements_with_live=differ)  # fmt: skip


def test_a_canary_that_disagrees_with_the_live_model_rolls_back_by_itself(
    settings_for, namespace, bootstrap, checkpoint, tmp_path
):
    """dock-2 is the canary: the candidate (two classes swapped) decides there, the live model decides the same
    items on the side; once 20 compared items agree under 90% it rolls back, and the live model decides dock-2
    again. dock-1 never sees the candidate; every item gets one command."""
    candidate = _candidate(checkpoint, tmp_path / "candidate.pt")
    canary = {"checkpoint": candidate, "stations": ["dock-2"], "window": 20}
    settings = settings_for(canary=canary, shadow={"topic": f"{namespace}-shadow"},
                            batch={"max_size": 8, "max_wait_ms": 5})  # fmt: skip
    topics = {s: f"{settings.kafka.topic_prefix}{s}" for s in ("dock-1", "dock-2")}
    ensure_topics(settings.kafka, dict.fromkeys(topics.values(), 1))
    config = write_config(settings, tmp_path / "sorter.yaml")
    log_path = tmp_path / "worker.log"
    rng = np.random.default_rng(12)
    designs = catalog(4)
    photos = [render(designs[i % 4], rng, size=(160, 120)) for i in range(24)]
    n = 90  # per station
    ticks = [[(topic, f"{namespace}-{station}-{i}", station) for station, topic in topics.items()] for i in range(n)]
    _run_worker(config, log_path, bootstrap, ticks, photos, every_s=0.08)  # steady traffic, 2 x 12.5 items/s
    commands = [json.loads(m.value()) for m in consume_all(bootstrap, settings.kafka.commands_topic, expect=2 * n)]
    assert Counter(c["item_id"] for c in commands) == Counter(f"{namespace}-{s}-{i}" for s in topics for i in range(n))
    by_station = {s: [c["model_version"] for c in sorted(commands, key=lambda c: c["source"]["offset"])
                      if c["station_id"] == s] for s in topics}  # fmt: skip
    assert set(by_station["dock-1"]) == {"it-1"}
    dock2 = by_station["dock-2"]
    switch = dock2.index("it-1")
    assert switch >= 20 and set(dock2[:switch]) == {"it-candidate"} and set(dock2[switch:]) == {"it-1"}
    assert switch < n - 10  # rolled back while the line ran, and stayed back
    rolled = [e for e in _events(log_path) if e["event"] == "canary.rolled_back"]
    assert len(rolled) == 1 and "chute agreement" in rolled[0]["why"], rolled
    report("canary rolled back by itself", items_per_station=n, canary_items_by_candidate=switch,
           why=rolled[0]["why"])  # fmt: skip
