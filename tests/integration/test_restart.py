"""Stop the worker process mid-stream (SIGKILL, SIGTERM), start it again: every item still gets its command."""

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

from sorter.data.synth import catalog, render
from sorter.stream.kafka import ensure_topics
from tests.integration.conftest import consume_all, produce, write_config

pytestmark = pytest.mark.integration


def _routed(log_path) -> int:
    return sum('"item.routed"' in line for line in log_path.read_text(errors="replace").splitlines())


def _backlog(settings, namespace, bootstrap, n: int) -> list[str]:
    topic = f"{namespace}-frames.dock-1"
    ensure_topics(settings.kafka, {topic: 2})
    rng = np.random.default_rng(4)
    designs = catalog(4)
    items = [f"{namespace}-{i}" for i in range(n)]
    produce(
        bootstrap, topic, [(item, render(designs[i % 4], rng, size=(160, 120)), {}) for i, item in enumerate(items)]
    )
    return items


def _stop_midway(argv, env, log_path, sig: signal.Signals) -> tuple[int, int, float]:
    """Start the worker, send ``sig`` once 40 items are routed; (routed then, exit code, seconds to exit)."""
    with log_path.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while _routed(log_path) < 40 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        routed_at_signal = _routed(log_path)
        signalled = time.monotonic()
        proc.send_signal(sig)
        rc = proc.wait(60)
    return routed_at_signal, rc, time.monotonic() - signalled


def _argv(settings, tmp_path) -> tuple[list[str], dict[str, str]]:
    config = write_config(settings, tmp_path / "sorter.yaml")
    argv = [sys.executable, "-m", "sorter", "run", "--config", str(config), "--idle-exit", "8"]
    return argv, os.environ | {"PYTHONUNBUFFERED": "1"}


def _restart(argv, env, log_path) -> None:
    with log_path.open("w") as out:
        rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=240).returncode
    assert rc == 0, log_path.read_text()[-3000:]


def test_worker_killed_and_restarted_mid_stream_routes_every_item(settings_for, namespace, bootstrap, tmp_path):
    n = 240
    settings = settings_for(batch={"max_size": 8, "max_wait_ms": 5})
    items = _backlog(settings, namespace, bootstrap, n)
    argv, env = _argv(settings, tmp_path)
    routed_before_kill, _, _ = _stop_midway(argv, env, tmp_path / "first.log", signal.SIGKILL)
    assert 0 < routed_before_kill < n, (tmp_path / "first.log").read_text()[-3000:]
    _restart(argv, env, tmp_path / "second.log")

    commands = [json.loads(m.value()) for m in consume_all(bootstrap, settings.kafka.commands_topic, expect=n)]
    counts = Counter(c["item_id"] for c in commands)
    assert set(counts) == set(items)  # nothing lost
    duplicates = sum(counts.values()) - n
    # at-least-once: only frames in flight at the kill (routed, not yet committed) can repeat
    assert duplicates <= 2 * settings.batch.max_size
    print(f"items={n} routed_before_kill={routed_before_kill} commands={len(commands)} duplicates={duplicates}")


def test_sigterm_drains_the_batch_in_hand_commits_and_exits_within_the_deadline(
    settings_for, namespace, bootstrap, tmp_path
):
    """What Kubernetes does on every rolling update: a graceful stop repeats nothing and loses nothing."""
    n = 240
    settings = settings_for(batch={"max_size": 8, "max_wait_ms": 5})
    items = _backlog(settings, namespace, bootstrap, n)
    argv, env = _argv(settings, tmp_path)
    first = tmp_path / "first.log"
    routed_at_signal, rc, seconds = _stop_midway(argv, env, first, signal.SIGTERM)
    text = first.read_text()
    assert rc == 0, text[-3000:]
    assert seconds < settings.shutdown_deadline_s
    events = [json.loads(line)["event"] for line in text.splitlines() if line.startswith("{")]
    assert "worker.stopping" in events and events[-1] == "worker.stopped"
    routed_first = _routed(first)
    assert 0 < routed_at_signal <= routed_first < n
    _restart(argv, env, tmp_path / "second.log")

    commands = [json.loads(m.value()) for m in consume_all(bootstrap, settings.kafka.commands_topic, expect=n)]
    counts = Counter(c["item_id"] for c in commands)
    assert set(counts) == set(items)
    assert sum(counts.values()) == n  # everything routed before the stop was committed: no repeats
    assert _routed(tmp_path / "second.log") == n - routed_first
    print(f"items={n} routed_first={routed_first} stop_s={seconds:.2f} commands={len(commands)} duplicates=0")
