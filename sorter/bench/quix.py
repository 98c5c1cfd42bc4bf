"""Stage 5: the same model in a Quix Streams application (``quix_app``), what a team might write instead
of sorter, on the same broker and photos as the naive loop; every item must get exactly one command.

Quix Streams runs in its own process and virtual environment (``--quix-python``): it pins an older
confluent-kafka than sorter uses, so it is a benchmark extra (``bench-quix``), never a runtime
dependency. Its throughput is taken where a diverter would see it: commands arriving on the commands
topic, first to last.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import sorter
from sorter.bench.inputs import BenchConfig, Frames
from sorter.bench.streaming import _preload_one, _reader
from sorter.progress import make_progress
from sorter.settings import KafkaSettings

STARTUP_S = 120.0  # model load, Quix's topic checks, the group join: before the first command
STALL_S = 30.0  # no new command for this long once they flow: the application is stuck


def _versions(python: str) -> str:
    probe = "import quixstreams, confluent_kafka; print(quixstreams.__version__, confluent_kafka.__version__)"
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{python} cannot import quixstreams: {done.stderr.strip().splitlines()[-1:]}")
    quix, client = done.stdout.split()
    return f"quixstreams {quix}, confluent-kafka {client}"


def quix(cfg: BenchConfig, frames: Frames, checkpoint: Path, bootstrap: str) -> dict:
    """Throughput and correctness of the Quix Streams application over ``cfg.naive_frames`` frames."""
    from sorter.stream.kafka import ensure_topics

    python = str(cfg.quix_python)
    try:
        versions = _versions(python)
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}
    prefix = f"quix{uuid.uuid4().hex[:6]}"
    topic, out = f"{prefix}.frames.s1", f"{prefix}.commands"
    ensure_topics(KafkaSettings(bootstrap_servers=bootstrap), {topic: 1, out: 1})
    _preload_one(bootstrap, topic, frames, cfg.naive_frames)
    root = str(Path(sorter.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    command = [python, "-m", "sorter.bench.quix_app", "--broker", bootstrap, "--group", f"{prefix}-app",
               "--frames", topic, "--commands", out, "--checkpoint", str(checkpoint),
               "--device", cfg.device]  # fmt: skip
    reader = _reader(bootstrap, f"{prefix}-check")
    reader.subscribe([out])
    seen: dict[str, int] = {}
    times: list[float] = []
    first_at: float | None = None
    with tempfile.TemporaryFile() as stderr, make_progress(transient=True) as bar:
        task = bar.add_task("Quix Streams application", total=cfg.naive_frames, info="")
        app = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        started = last = time.monotonic()
        try:
            while len(seen) < cfg.naive_frames and app.poll() is None:
                if time.monotonic() - last > (STALL_S if times else STARTUP_S):
                    break
                m = reader.poll(0.5)
                if m is None or m.error():
                    continue
                item = m.key().decode() if m.key() else ""
                seen[item] = seen.get(item, 0) + 1
                times.append(time.perf_counter())
                last = time.monotonic()
                first_at = first_at or last
                bar.update(task, completed=len(seen))
        finally:
            app.terminate()
            try:
                app.wait(20)
            except subprocess.TimeoutExpired:
                app.kill()
                app.wait()
            reader.close()
        stderr.seek(0)
        tail = stderr.read().decode(errors="replace").strip().splitlines()[-5:]
    expected = {f"{topic}-{i}" for i in range(cfg.naive_frames)}
    result = {
        "versions": versions,
        "frames": cfg.naive_frames,
        "commands": len(times),
        "missing": len(expected - set(seen)),
        "duplicates": sum(n - 1 for n in seen.values()),
        "unexpected": len(set(seen) - expected),
        "startup_s": round(first_at - started, 1) if first_at else None,
        "fps": round((len(times) - 1) / (times[-1] - times[0]), 2) if len(times) > 1 else None,
    }
    if result["missing"]:
        result["error"] = f"{result['missing']} of {cfg.naive_frames} items got no command; stderr: {tail}"
    return result
