"""Late frames after an outage (issue #12, part 3), not a test: how long until fresh items are decided
within the scan-to-divert budget again, with and without ``decision_deadline_ms``.

A paced camera (three single-partition station topics, ~25 KB photos, the headers a camera sends) runs at
70% of the worker's capacity; the worker is down for the first ``outage`` seconds, so a backlog builds on
the broker; then it starts and the camera goes on. The model only sleeps (``ms_per_frame`` a frame, no
CPU: the worker's capacity is 1000 / ms_per_frame frames/s whatever else runs), so what is measured is
the policy, not the machine. Run once with the deadline and once without, same broker, one after the
other; prints and writes (JSON): per second after the worker started, p99 latency (captured-at to
delivered) of items decided by the model, and the late commands.

    .venv/bin/python benchmarks/late_backlog.py --outage 60 --live 180 --deadline-ms 1000 \\
        --out benchmarks/results/late/late-backlog.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
from probes.worker_paced import camera, probe_pipeline, probe_settings

from sorter.bench.report import machine
from sorter.logs import configure_logging
from sorter.services import redis_server, tansu_broker
from sorter.stream.routing import RoutingTable
from sorter.stream.worker import Worker


def one_run(bootstrap: str, redis_port: int, work: Path, args, deadline_ms: int | None) -> dict:
    prefix = f"late{uuid.uuid4().hex[:4]}"
    # the default fetch wait: the bench's 10 ms meets Tansu's fetch limit on a backlog (README, "Fetch stalls")
    settings = probe_settings(bootstrap, redis_port, work, prefix, fetch_wait_ms=50)
    late = {"decision_deadline_ms": deadline_ms, "late_chute": "RECIRC"} if deadline_ms else {}
    table = RoutingTable(default_chute="C-99", review_chute="REVIEW", min_confidence=0.5, routes={}, **late)
    pipeline = probe_pipeline(settings, table, args.ms_per_frame)
    commands: list[tuple[int, int, str]] = []  # delivered ms, captured-at ms, reason

    def on_batch(result) -> None:
        for c in result.commands:
            commands.append((result.times.delivered, c.captured_at, c.reason))

    rate = args.load * 1000 / args.ms_per_frame
    proc = mp.get_context("spawn").Process(target=camera, args=(bootstrap, prefix, args.outage + args.live, rate))
    proc.start()
    print(f"{'deadline ' + str(deadline_ms) + ' ms' if deadline_ms else 'no deadline'}: camera at {rate:.0f} "
          f"frames/s, worker down for {args.outage:.0f} s", flush=True)  # fmt: skip
    time.sleep(args.outage)
    worker = Worker(settings, pipeline, on_batch=on_batch)
    started_ms = time.time() * 1000
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    proc.join()
    time.sleep(10)  # what the camera sent last
    worker.stop_event.set()
    thread.join(30)
    return summarise(commands, started_ms, deadline_ms or args.deadline_ms, args, deadline_ms, rate)


def summarise(commands, started_ms: float, budget_ms: int, args, deadline_ms, rate) -> dict:
    by_second: dict[int, list[float]] = defaultdict(list)
    late_by_second: dict[int, int] = defaultdict(int)
    for delivered, captured, reason in commands:
        second = int((delivered - started_ms) // 1000)
        if reason == "late":
            late_by_second[second] += 1
        else:
            by_second[second].append(delivered - captured)
    seconds = range(0, int(args.live))
    p99 = {s: float(np.percentile(by_second[s], 99)) if by_second[s] else None for s in seconds}
    over = [s for s in seconds if p99[s] is None or p99[s] > budget_ms]
    back = (over[-1] + 1) if over else 0  # from this second on, every second's p99 is within the budget
    late = sum(late_by_second.values())
    result = {
        "deadline_ms": deadline_ms,
        "budget_ms": budget_ms,
        "rate": round(rate, 1),
        "capacity": round(1000 / args.ms_per_frame, 1),
        "outage_s": args.outage,
        "live_s": args.live,
        "commands": len(commands),
        "late_commands": late,
        "last_late_s": max(late_by_second, default=None),
        "seconds_until_p99_within_budget": back if back < len(seconds) else None,
        "p99_ms_by_second": p99,
        "late_by_second": dict(late_by_second),
    }
    back_at = result["seconds_until_p99_within_budget"]
    print(f"  commands {len(commands)}, late {late} (last at {result['last_late_s']} s); p99 of classified "
          f"items within {budget_ms} ms from second {back_at} after start", flush=True)  # fmt: skip
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--outage", type=float, default=60.0, help="seconds the worker is down while the camera runs")
    ap.add_argument("--live", type=float, default=180.0, help="seconds of camera after the worker starts")
    ap.add_argument("--load", type=float, default=0.7, help="camera rate as a share of the worker's capacity")
    ap.add_argument("--ms-per-frame", type=float, default=10.0, help="the sleeping model's time per frame")
    ap.add_argument("--deadline-ms", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/late/late-backlog.json"))
    args = ap.parse_args()
    configure_logging("warning")
    work = Path(tempfile.mkdtemp())
    broker, redis = tansu_broker(workdir=work).start(), redis_server(workdir=work).start()
    try:
        runs = [one_run(f"127.0.0.1:{broker.port}", redis.port, work, args, d) for d in (args.deadline_ms, None)]
    finally:
        broker.stop()
        redis.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "runs": runs}, indent=1) + "\n")
    plot(runs, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and its plot")


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.2))
    for run, colour in zip(runs, ("#2a7", "#c33"), strict=False):
        xs = [int(s) for s, v in run["p99_ms_by_second"].items() if v is not None]
        ys = [run["p99_ms_by_second"][s] / 1000 for s in run["p99_ms_by_second"] if run["p99_ms_by_second"][s]]
        name = "no deadline"
        if run["deadline_ms"]:
            name = f"deadline {run['deadline_ms']} ms ({run['late_commands']} late)"
        ax.plot(xs, ys, color=colour, label=f"{name}: p99 of classified items")
    ax.axhline(runs[0]["budget_ms"] / 1000, color="#555", ls="--", lw=1, label="budget")
    ax.set_yscale("log")
    ax.set_xlabel("seconds after the worker started (it was down for the outage)")
    ax.set_ylabel("p99 latency per second (s, log)")
    ax.set_title(f"{runs[0]['outage_s']:.0f} s outage at {runs[0]['rate']:.0f} frames/s "
                 f"({runs[0]['rate'] / runs[0]['capacity']:.0%} of capacity)")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
