"""What this process may use: CPUs and memory of the pod (cgroup v2 or v1, CPU affinity), not of the node.

``os.cpu_count()`` and ``/proc/meminfo`` describe the machine; a Kubernetes pod with ``cpu: 2`` on a
64-core node that sized its thread pools from them would run 64 threads on 2 CPUs' worth of quota. Read
the quota (``cpu.max`` / ``cpu.cfs_quota_us``), the affinity mask and the memory limit (``memory.max`` /
``memory.limit_in_bytes``) instead, and fall back to the machine's figures only where there is no limit.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from sorter.errors import ConfigError

CGROUP_ROOT = Path("/sys/fs/cgroup")
MEMINFO = Path("/proc/meminfo")
UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63
MAX_DECODE_THREADS = 8
CONSUMER_QUEUE_BYTES = 64 * 2**20  # librdkafka's queued.max.messages.kbytes default: prefetched frames


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_limit(root: Path | None = None, affinity: int | None = None) -> float:
    """CPUs this process may use: the smaller of its affinity mask and its cgroup's CPU quota."""
    root = root or CGROUP_ROOT
    cpus = float(affinity if affinity is not None else _affinity())
    quota = None
    v2 = _read(root / "cpu.max")
    if v2:  # "max 100000" or "150000 100000"
        q, _, period = v2.partition(" ")
        if q != "max" and period:
            quota = int(q) / int(period)
    else:
        q, period = _read(root / "cpu" / "cpu.cfs_quota_us"), _read(root / "cpu" / "cpu.cfs_period_us")
        if q and period and int(q) > 0:
            quota = int(q) / int(period)
    return min(cpus, quota) if quota else cpus


def memory_limit(root: Path | None = None, meminfo: Path | None = MEMINFO) -> int | None:
    """Bytes this process may use: its cgroup's memory limit, else the machine's memory (None: unknown)."""
    root = root or CGROUP_ROOT
    for path in (root / "memory.max", root / "memory" / "memory.limit_in_bytes"):
        value = _read(path)
        if value and value != "max" and int(value) < UNLIMITED:
            return int(value)
    text = _read(meminfo) if meminfo is not None else None
    for line in (text or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None


def decode_threads_for(cpus: float) -> int:
    return max(1, min(MAX_DECODE_THREADS, math.ceil(cpus)))


def default_decode_threads() -> int:
    return decode_threads_for(cpu_limit())


def rss_bytes() -> int:
    for line in (_read(Path("/proc/self/status")) or "").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def check_memory(settings, limit_bytes: int | None = None, used_bytes: int | None = None) -> dict[str, int]:
    """Stop start-up when the frames the worker may hold at once cannot fit the memory left to the pod.

    Held at once, at worst: every frame of the batches in flight at ``batch.max_payload_bytes`` (two
    batches with ``batch.overlap``: one in the model, the next being collected), each decoder's largest
    photo as pixels (``batch.max_pixels`` x 3 bytes), and librdkafka's prefetch queue. Returns the figures.
    """
    b = settings.batch
    limit = memory_limit() if limit_bytes is None else limit_bytes
    used = rss_bytes() if used_bytes is None else used_bytes
    frames = b.max_size * (2 if b.overlap else 1)
    need = frames * b.max_payload_bytes + b.decode_threads * b.max_pixels * 3 + CONSUMER_QUEUE_BYTES
    figures = {"frames_in_flight": frames, "need_bytes": need, "limit_bytes": limit or 0, "used_bytes": used}
    if limit is None:
        return figures
    left = limit - used
    if need > left:
        mib = 2**20
        raise ConfigError(
            f"the frames the worker may hold at once need up to {need / mib:,.0f} MiB ({frames} frames in flight "
            f"x batch.max_payload_bytes {b.max_payload_bytes / mib:,.1f} MiB, plus {b.decode_threads} decoders "
            f"x batch.max_pixels and the consumer's prefetch) but only {left / mib:,.0f} MiB of the pod's memory "
            f"limit of {limit / mib:,.0f} MiB is left after the model: lower SORTER_BATCH__MAX_PAYLOAD_BYTES "
            f"(cameras rarely send over 5 MB) or SORTER_BATCH__MAX_SIZE, or raise the pod's memory limit"
        )
    return figures
