"""What multi-camera fusion costs in latency (issue #12, part 2), not a test: items photographed by a
tunnel's cameras, decided from the first view (no fusion: later views are cache hits) or from all views
(``fusion: {window_ms, views}``), through the real worker, the local Tansu broker and Redis.

A paced tunnel (one single-partition station topic, ~25 KB photos) sends ``items_per_s`` items, each
photographed by ``views`` cameras 5-40 ms apart (as ``sorter simulate`` spaces them); a share of items
(``missing``) loses one camera's photo, so their window closes without it. The model only sleeps
(``ms_per_frame`` a frame, no CPU), so what is measured is the policy, not the machine. Latency of an item:
its first view's captured-at to its command delivered. Run once without and once with fusion, same broker.

    .venv/bin/python benchmarks/fusion_latency.py --seconds 60 --out benchmarks/results/fusion/latency.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from confluent_kafka import Producer
from probes.worker_paced import photos, probe_pipeline, probe_settings

from sorter.bench.report import machine
from sorter.logs import configure_logging
from sorter.services import redis_server, tansu_broker
from sorter.settings import KafkaSettings
from sorter.stream.kafka import ensure_topics, kafka_config
from sorter.stream.routing import Fusion, RoutingTable
from sorter.stream.worker import Worker

STATION = "tunnel-1"


def tunnel(bootstrap: str, prefix: str, seconds: float, items_per_s: float, views: int, missing: float) -> None:
    p = Producer(kafka_config(KafkaSettings(bootstrap_servers=bootstrap), {"linger.ms": 0}))
    shots, rng = photos(), np.random.default_rng(0)
    started, i = time.perf_counter(), 0
    while (due := started + i / items_per_s) - started < seconds:
        if due > time.perf_counter():
            time.sleep(due - time.perf_counter())
        item = f"{prefix}-{i}"
        skip = int(rng.integers(views)) if rng.random() < missing else -1
        for camera in range(views):
            if camera:
                time.sleep(rng.uniform(0.005, 0.04))
            if camera == skip:
                continue
            headers = [("item-id", item.encode()), ("station-id", STATION.encode()),
                       ("camera-id", f"cam-{camera + 1}".encode()),
                       ("captured-at", str(time.time_ns() // 1_000_000).encode())]  # fmt: skip
            p.produce(f"{prefix}.frames.{STATION}", shots[(i + camera) % len(shots)], item.encode(), headers=headers)
            p.poll(0)
        i += 1
    p.flush(60)


def one_run(bootstrap: str, redis_port: int, work: Path, args, fusion: Fusion | None) -> dict:
    prefix = f"fl{uuid.uuid4().hex[:4]}"
    settings = probe_settings(bootstrap, redis_port, work, prefix, fetch_wait_ms=10)
    ensure_topics(settings.kafka, {f"{prefix}.frames.{STATION}": 1})  # a tunnel's topic: one partition
    table = RoutingTable(default_chute="C-99", review_chute="REVIEW", min_confidence=0.5, routes={}, fusion=fusion)
    pipeline = probe_pipeline(settings, table, args.ms_per_frame)
    commands: list[tuple[str, int, int | None]] = []  # item, latency ms, views

    def on_batch(result) -> None:
        for c in result.commands:
            commands.append((c.item_id, result.times.delivered - c.captured_at, c.views))

    worker = Worker(settings, pipeline, on_batch=on_batch)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    time.sleep(5)  # joined the group
    proc = mp.get_context("spawn").Process(
        target=tunnel, args=(bootstrap, prefix, args.seconds, args.items_per_s, args.views, args.missing)
    )
    proc.start()
    proc.join()
    time.sleep(3)  # the last windows close, the last commands go out
    worker.stop_event.set()
    thread.join(60)
    latencies = np.array([ms for _, ms, _ in commands], float)
    items = {item for item, _, _ in commands}
    return {
        "fusion": fusion.model_dump() if fusion else None,
        "items_sent": int(np.ceil(args.seconds * args.items_per_s)),
        "items_routed": len(items),
        "commands": len(commands),
        "latency_ms": {q: round(float(np.percentile(latencies, int(q[1:]))), 1) for q in ("p50", "p90", "p99")},
        "latency_max_ms": round(float(latencies.max()), 1),
        "views": {
            str(v): sum(1 for _, _, n in commands if n == v) for v in sorted({n for _, _, n in commands}, key=str)
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--items-per-s", type=float, default=10)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--missing", type=float, default=0.1, help="share of items one camera's photo is lost for")
    ap.add_argument("--window-ms", type=int, default=150)
    ap.add_argument("--ms-per-frame", type=float, default=5)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    configure_logging("warning")
    work = Path(tempfile.mkdtemp())
    broker = tansu_broker(workdir=work).start()
    redis = redis_server(workdir=work).start()
    try:
        bootstrap = f"127.0.0.1:{broker.port}"
        runs = {
            "first view decides": one_run(bootstrap, redis.port, work, args, None),
            "fused": one_run(bootstrap, redis.port, work, args, Fusion(window_ms=args.window_ms, views=args.views)),
        }
    finally:
        broker.stop()
        redis.stop()
    result = {"machine": machine(), "args": {k: v for k, v in vars(args).items() if k != "out"}, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, r in runs.items():
        print(f"{name}: {r['items_routed']} items, {r['commands']} commands, latency p50 {r['latency_ms']['p50']} "
              f"p99 {r['latency_ms']['p99']} max {r['latency_max_ms']} ms, views {r['views']}")  # fmt: skip


if __name__ == "__main__":
    main()
