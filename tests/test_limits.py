"""Limits come from the pod (cgroup quota, CPU affinity, memory limit), not from the node it runs on."""

from __future__ import annotations

from pathlib import Path

import pytest

from sorter import limits
from sorter.errors import ConfigError
from sorter.settings import load_settings


def cgroup_v2(root: Path, cpu_max: str | None = None, memory_max: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpu memory\n")
    if cpu_max is not None:
        (root / "cpu.max").write_text(cpu_max + "\n")
    if memory_max is not None:
        (root / "memory.max").write_text(memory_max + "\n")
    return root


def cgroup_v1(root: Path, quota: int, period: int, memory: int) -> Path:
    (root / "cpu").mkdir(parents=True)
    (root / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    (root / "memory").mkdir()
    (root / "memory" / "memory.limit_in_bytes").write_text(f"{memory}\n")
    return root


def test_cpu_quota_of_the_pod_wins_over_the_node(tmp_path):
    root = cgroup_v2(tmp_path, cpu_max="150000 100000")
    assert limits.cpu_limit(root, affinity=64) == 1.5
    assert limits.decode_threads_for(limits.cpu_limit(root, affinity=64)) == 2


def test_cpu_affinity_wins_when_there_is_no_quota(tmp_path):
    root = cgroup_v2(tmp_path, cpu_max="max 100000")
    assert limits.cpu_limit(root, affinity=3) == 3
    assert limits.decode_threads_for(64) == 8  # never more than 8 decoders


def test_cgroup_v1_quota_and_memory(tmp_path):
    root = cgroup_v1(tmp_path, quota=50_000, period=100_000, memory=2 * 2**30)
    assert limits.cpu_limit(root, affinity=16) == 0.5
    assert limits.decode_threads_for(0.5) == 1
    assert limits.memory_limit(root, meminfo=None) == 2 * 2**30


def test_memory_limit_of_the_pod_or_the_machine(tmp_path):
    assert limits.memory_limit(cgroup_v2(tmp_path / "a", memory_max=str(3 * 2**30))) == 3 * 2**30
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384000 kB\nMemFree: 1 kB\n")
    assert limits.memory_limit(cgroup_v2(tmp_path / "b", memory_max="max"), meminfo=meminfo) == 16384000 * 1024


def test_default_decode_threads_follow_the_pod(monkeypatch, tmp_path):
    monkeypatch.setattr(limits, "CGROUP_ROOT", cgroup_v2(tmp_path, cpu_max="200000 100000"))
    assert load_settings().batch.decode_threads == 2


def test_frames_in_flight_that_cannot_fit_the_pod_stop_start_up_saying_what_to_change():
    s = load_settings(batch={"max_size": 32, "max_payload_bytes": 20_000_000, "overlap": True})
    with pytest.raises(ConfigError) as err:
        limits.check_memory(s, limit_bytes=1 * 2**30, used_bytes=600 * 2**20)
    message = str(err.value)
    assert "SORTER_BATCH__MAX_PAYLOAD_BYTES" in message and "SORTER_BATCH__MAX_SIZE" in message
    assert "memory" in message
    limits.check_memory(s, limit_bytes=8 * 2**30, used_bytes=600 * 2**20)  # fits: no error
