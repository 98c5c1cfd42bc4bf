"""The real worker under the int8 soak's shape, with a model that only sleeps (not a test): a paced camera
(150 frames/s, three single-partition topics, ~25 KB JPEG photos, linger 0, the headers a camera sends),
the local Tansu broker and redis-server, and a model that takes ``ms_per_frame`` of sleep per frame (no
CPU), so a backlog builds as it does behind a model that cannot keep up. Prints frames routed and the
worst lag (captured-at -> delivered) every 10 s.

    .venv/bin/python benchmarks/probes/worker_paced.py 420 9 [STATS.jsonl]

The consumer's fetch.wait.max.ms is ``PROBE_FETCH_WAIT_MS`` (default 10, the bench's), and ``PROBE_CLIENT``
(JSON) adds librdkafka settings, e.g. ``PROBE_CLIENT='{"fetch.queue.backoff.ms": 10}'``. With a third
argument, librdkafka's statistics of the worker's consumer (every 5 s: per partition its fetch state,
offsets and prefetch queue; per broker its requests in flight) are appended there.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
from confluent_kafka import Producer

from sorter.logs import configure_logging
from sorter.services import redis_server, tansu_broker
from sorter.settings import KafkaSettings, load_settings
from sorter.stream.cache import RedisDecisionCache
from sorter.stream.inference import Prediction
from sorter.stream.kafka import ensure_topics, kafka_config
from sorter.stream.observe import Health
from sorter.stream.pipeline import Decoder, Pipeline
from sorter.stream.routing import RoutingTable
from sorter.stream.worker import Worker

RATE, STATIONS = 150.0, ("s0", "s1", "s2")


class SleepModel:
    input_size = 64
    model_version = "sleep-1"

    def __init__(self, ms_per_frame: float) -> None:
        self.s_per_frame = ms_per_frame / 1000

    def predict(self, images):
        time.sleep(self.s_per_frame * len(images))
        return [Prediction(0, "box", "SKU-0", 0.9) for _ in images]


def photos(n: int = 16) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        img = cv2.GaussianBlur(rng.integers(0, 255, (480, 640, 3), np.uint8), (9, 9), 0)
        out.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 70])[1].tobytes())
    return out


def camera(bootstrap: str, prefix: str, seconds: float, rate: float = RATE) -> None:
    p = Producer(kafka_config(KafkaSettings(bootstrap_servers=bootstrap), {"linger.ms": 0}))
    shots = photos()
    started, i = time.perf_counter(), 0
    while (due := started + i / rate) - started < seconds:
        if due > time.perf_counter():
            time.sleep(due - time.perf_counter())
        station, item = STATIONS[i % len(STATIONS)], f"{prefix}-{i}"
        headers = [
            ("item-id", item.encode()),
            ("station-id", station.encode()),
            ("camera-id", b"cam-1"),
            ("captured-at", str(time.time_ns() // 1_000_000).encode()),
        ]
        p.produce(f"{prefix}.frames.{station}", shots[i % len(shots)], item.encode(), headers=headers)
        p.poll(0)
        i += 1
    print(f"camera produced {i} (photo {len(shots[0])} bytes) undelivered {p.flush(60)}", flush=True)


def keep_stats(path: Path) -> None:
    """Every statistics report of the consumer, reduced to what says where fetching stands."""
    seen = Health.on_stats

    def on_stats(self, raw: str) -> None:
        seen(self, raw)
        s = json.loads(raw)
        if s.get("type") != "consumer":
            return
        parts = {
            f"{topic}[{pid}]": {k: p.get(k) for k in PARTITION_KEYS}
            for topic, t in s.get("topics", {}).items()
            for pid, p in t.get("partitions", {}).items()
            if pid != "-1"
        }
        brokers = {
            name: {k: b.get(k) for k in BROKER_KEYS}
            for name, b in s.get("brokers", {}).items()
            if b.get("nodeid", -1) >= 0
        }
        out = {"ts": s.get("ts"), "replyq": s.get("replyq"), "msg_cnt": s.get("msg_cnt"), "partitions": parts}
        with path.open("a") as f:
            f.write(json.dumps(out | {"brokers": brokers, "cgrp": s.get("cgrp")}) + "\n")

    Health.on_stats = on_stats


PARTITION_KEYS = ("fetch_state", "fetchq_cnt", "fetchq_size", "next_offset", "app_offset", "committed_offset",
                  "hi_offset", "consumer_lag", "rxmsgs", "rxbytes", "msgs")  # fmt: skip
BROKER_KEYS = ("state", "outbuf_cnt", "waitresp_cnt", "tx", "rx", "rxerrs", "rxpartial", "req", "rtt")


def probe_settings(bootstrap: str, redis_port: int, work: Path, prefix: str, fetch_wait_ms: int,
                   client: dict | None = None):  # fmt: skip
    """The worker's settings for a probe: three station topics under ``prefix`` (created here), no metrics."""
    routes = work / f"{prefix}.yaml"
    routes.write_text("default_chute: C-99\nreview_chute: REVIEW\nmin_confidence: 0.5\nroutes: {}\n")
    settings = load_settings(
        kafka={
            "bootstrap_servers": bootstrap,
            "group_id": f"{prefix}-group",
            "frames_pattern": rf"^{prefix}\.frames\..+",
            "topic_prefix": f"{prefix}.frames.",
            "commands_topic": f"{prefix}.commands",
            "dlq_topic": f"{prefix}.dlq",
            "session_timeout_ms": 6000,
            "fetch_wait_max_ms": fetch_wait_ms,
            "client": client or {},
            "metadata_refresh_ms": 1000,
        },
        redis={"url": f"redis://127.0.0.1:{redis_port}/0", "key_prefix": f"{prefix}:"},
        model={"checkpoint": work / "none.pt"},
        batch={"max_size": 32, "decode_threads": 2},
        observe={"enabled": False, "stats_interval_ms": 5000},
        routes=routes,
        worker_id=f"{prefix}-worker",
    )
    ensure_topics(settings.kafka, {f"{prefix}.frames.{s}": 1 for s in STATIONS})
    ensure_topics(settings.kafka, {settings.kafka.commands_topic: 1, settings.kafka.dlq_topic: 1})
    return settings


def probe_pipeline(settings, table: RoutingTable, ms_per_frame: float) -> Pipeline:
    """The worker's pipeline with the sleeping model, the probe's Redis and two decode threads."""
    cache = RedisDecisionCache(settings.redis.url.get_secret_value(), key_prefix=settings.redis.key_prefix, ttl_s=600)
    return Pipeline(SleepModel(ms_per_frame), table, cache, Decoder(2, 40_000_000), worker_id="w")


def main(seconds: float, ms_per_frame: float, stats: Path | None = None) -> None:
    configure_logging(os.environ.get("PROBE_LOG_LEVEL", "warning"))
    if stats is not None:
        keep_stats(stats)
    work = Path(tempfile.mkdtemp())
    broker = tansu_broker(workdir=work).start()
    redis = redis_server(workdir=work).start()
    bootstrap = f"127.0.0.1:{broker.port}"
    prefix = f"wp{uuid.uuid4().hex[:4]}"
    fetch_wait_ms = int(os.environ.get("PROBE_FETCH_WAIT_MS", "10"))
    settings = probe_settings(
        bootstrap, redis.port, work, prefix, fetch_wait_ms, json.loads(os.environ.get("PROBE_CLIENT", "{}"))
    )
    table = RoutingTable(default_chute="C-99", review_chute="REVIEW", min_confidence=0.5, routes={})
    pipeline = probe_pipeline(settings, table, ms_per_frame)
    routed, lags = [0], defaultdict(list)  # station -> lags (s) since the last report

    def on_batch(result) -> None:
        routed[0] += result.frames
        for c in result.commands:
            if c.captured_at and result.times.delivered:
                lags[c.station_id].append((result.times.delivered - c.captured_at) / 1000)

    worker = Worker(settings, pipeline, on_batch=on_batch)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    while not worker.assigned:
        time.sleep(0.05)
    proc = mp.get_context("spawn").Process(target=camera, args=(bootstrap, prefix, seconds))
    proc.start()
    started, reported = time.time(), 0
    try:
        while proc.is_alive() or time.time() - started < seconds + 30:
            time.sleep(0.5)
            if time.time() - started >= reported + 10:
                reported += 10
                worst = {s: max(lags.pop(s, []), default=float("nan")) for s in STATIONS}
                each = " ".join(f"{s} {v:6.1f}" for s, v in worst.items())
                print(f"t={reported:4d}s routed {routed[0]:6d} max lag (s) {each}", flush=True)
    finally:
        worker.stop_event.set()
        thread.join(30)
        broker.stop()
        redis.stop()


if __name__ == "__main__":
    main(
        float(sys.argv[1]) if len(sys.argv) > 1 else 420.0,
        float(sys.argv[2]) if len(sys.argv) > 2 else 9.0,
        Path(sys.argv[3]) if len(sys.argv) > 3 else None,
    )
