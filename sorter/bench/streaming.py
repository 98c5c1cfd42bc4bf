"""Stages 2-4 against a broker: the real worker (drained, then paced from another process), the
naive one-message-at-a-time loop, and the broker alone."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sorter.bench.inputs import STATIONS, BenchConfig, Frames, decode_threads_for
from sorter.progress import make_progress
from sorter.settings import KafkaSettings
from sorter.stream.kafka import kafka_config
from sorter.stream.timeline import STAGES


def _headers(item: str, station: str) -> list[tuple[str, bytes]]:
    return [
        ("item-id", item.encode()),
        ("station-id", station.encode()),
        ("camera-id", b"cam-1"),
        ("captured-at", str(time.time_ns() // 1_000_000).encode()),
    ]


def _preload(bootstrap: str, prefix: str, frames: Frames, n: int) -> None:
    from confluent_kafka import Producer

    p = Producer(kafka_config(KafkaSettings(bootstrap_servers=bootstrap), {"linger.ms": 5, "batch.num.messages": 200}))
    for i in range(n):
        station = STATIONS[i % len(STATIONS)]
        item = f"{prefix}-{i}"
        p.produce(f"{prefix}.frames.{station}", frames.item(i), item.encode(), headers=_headers(item, station))
        if i % 100 == 0:
            p.poll(0)
    p.flush(60)


def _paced_producer(bootstrap: str, prefix: str, photos: list[bytes], rate: float, seconds: float, q) -> None:
    """Runs in its own process: publishes at ``rate`` frames/s with captured-at stamped at send time, and
    reports what the broker acknowledged (a frame produced is not a frame the worker can read)."""
    from confluent_kafka import Producer

    p = Producer(kafka_config(KafkaSettings(bootstrap_servers=bootstrap), {"linger.ms": 0}))
    started = time.perf_counter()
    acked: list[float] = []  # seconds after the start of each acknowledgement (the last one matters)
    failed: list[tuple[float, str]] = []

    def delivered(err, _msg) -> None:
        if err:
            failed.append((time.perf_counter() - started, str(err)))
        else:
            acked.append(time.perf_counter() - started)

    i = 0
    while True:
        due = started + i / rate
        now = time.perf_counter()
        if due - started >= seconds:
            break
        if due > now:
            time.sleep(due - now)
        station = STATIONS[i % len(STATIONS)]
        item = f"{prefix}-{i}"
        p.produce(
            f"{prefix}.frames.{station}",
            photos[i % len(photos)],
            item.encode(),
            headers=_headers(item, station),
            on_delivery=delivered,
        )
        p.poll(0)
        i += 1
    undelivered = p.flush(60)
    q.put({
        "produced": i,
        "acked": len(acked),
        "last_ack_s": round(acked[-1], 1) if acked else None,
        "failed": len(failed),
        "first_failure": failed[0] if failed else None,
        "undelivered": undelivered,
    })  # fmt: skip


def _settings(cfg: BenchConfig, bootstrap: str, redis_url: str, checkpoint: Path, prefix: str, batch: int):
    from sorter.settings import load_settings

    routes = checkpoint.parent / "routes.yaml"
    if not routes.exists():
        routes.write_text("default_chute: C-99\nreview_chute: REVIEW\nmin_confidence: 0.5\nroutes: {}\n")
    return load_settings(
        kafka={
            "bootstrap_servers": bootstrap,
            "group_id": f"{prefix}-group",
            "frames_pattern": rf"^{prefix}\.frames\..+",
            "topic_prefix": f"{prefix}.frames.",
            "commands_topic": f"{prefix}.commands",
            "dlq_topic": f"{prefix}.dlq",
            "session_timeout_ms": 6000,
            "fetch_wait_max_ms": 10,
            "metadata_refresh_ms": 1000,
            "delivery": cfg.delivery,
        },
        redis={"url": redis_url, "key_prefix": f"{prefix}:"},
        model={"checkpoint": checkpoint, "device": cfg.device, "precision": cfg.precision, "compile": cfg.compile},
        batch={
            "max_size": batch,
            "decode_threads": decode_threads_for(cfg),
            "overlap": cfg.overlap,
            "latency_budget_ms": cfg.latency_budget_ms,
        }
        | ({"max_wait_ms": cfg.max_wait_ms} if cfg.max_wait_ms is not None else {}),
        observe={"enabled": False},
        shadow={"checkpoint": cfg.shadow_checkpoint, "topic": f"{prefix}.shadow"} if cfg.shadow_checkpoint else None,
        routes=routes,
        worker_id=f"{prefix}-worker",
    )


@dataclass
class Recorder:
    """Collects what each finished batch says (in the worker's thread)."""

    latencies_ms: list[float] = field(default_factory=list)  # captured-at -> delivered (the broker's ack)
    stages_ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    delivered: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, frames)
    decode_s: float = 0.0
    infer_s: float = 0.0
    frames: int = 0

    def __call__(self, result) -> None:
        self.delivered.append((time.perf_counter(), result.frames))
        self.decode_s += result.decode_s
        self.infer_s += result.infer_s
        self.frames += result.frames
        t = result.times
        for c in result.commands:
            if c.captured_at and t.delivered:
                self.latencies_ms.append(t.delivered - c.captured_at)
            for stage, ms in t.stages(c.captured_at, c.source.key).items():
                self.stages_ms[stage].append(ms)

    def breakdown(self) -> dict[str, dict[str, float]]:
        """Per stage (timeline.py): p50/p95/p99 and the mean, in ms, over every routed item."""
        return {stage: _percentiles(self.stages_ms[stage]) for stage in STAGES if self.stages_ms.get(stage)}


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None}
    a = np.array(values)
    out = {f"p{q}_ms": round(float(np.percentile(a, q)), 2) for q in (50, 95, 99)}
    return out | {"mean_ms": round(float(a.mean()), 2)}


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def e2e(cfg: BenchConfig, frames: Frames, checkpoint: Path, bootstrap: str, redis_url: str, batch: int) -> dict:
    from sorter.stream.app import build_worker
    from sorter.stream.kafka import ensure_topics

    prefix = f"bench{uuid.uuid4().hex[:6]}"
    settings = _settings(cfg, bootstrap, redis_url, checkpoint, prefix, batch)
    ensure_topics(settings.kafka, {f"{prefix}.frames.{s}": 1 for s in STATIONS})
    _preload(bootstrap, prefix, frames, cfg.frames)
    recorder = Recorder()
    worker = build_worker(settings, on_batch=recorder)
    with make_progress(transient=True) as bar:
        task = bar.add_task("end to end (drain)", total=cfg.frames, info="")
        watcher = threading.Thread(target=_watch, args=(bar, task, recorder, cfg.frames), daemon=True)
        watcher.start()
        worker.run(max_frames=cfg.frames, idle_exit_s=60)
    first_t, first_n = recorder.delivered[0]
    last_t = recorder.delivered[-1][0]
    fps = (recorder.frames - first_n) / (last_t - first_t) if last_t > first_t else float("nan")
    n = max(1, recorder.frames)
    drained = {
        "fps": round(fps, 2),
        "frames": recorder.frames,
        "batches": len(recorder.delivered),
        "mean_batch": round(recorder.frames / max(1, len(recorder.delivered)), 1),
        "decode_wait_ms_per_frame": round(recorder.decode_s * 1000 / n, 3),
        "infer_ms_per_frame": round(recorder.infer_s * 1000 / n, 3),
        "other_ms_per_frame": round(max(0.0, 1000 / fps - (recorder.decode_s + recorder.infer_s) * 1000 / n), 3)
        if fps == fps and fps > 0
        else None,
        "latency": _percentiles(recorder.latencies_ms),
        "latency_breakdown": recorder.breakdown(),
    }
    return drained


def _watch(bar, task, recorder: Recorder, total: int) -> None:
    while recorder.frames < total:
        bar.update(task, completed=recorder.frames)
        time.sleep(0.2)
    bar.update(task, completed=total)


def paced(cfg: BenchConfig, frames: Frames, checkpoint: Path, bootstrap: str, redis_url: str, batch: int,
          rate: float) -> dict:  # fmt: skip
    from sorter.stream.app import build_worker
    from sorter.stream.kafka import ensure_topics

    prefix = f"bench{uuid.uuid4().hex[:6]}"
    settings = _settings(cfg, bootstrap, redis_url, checkpoint, prefix, batch)
    ensure_topics(settings.kafka, {f"{prefix}.frames.{s}": 1 for s in STATIONS})
    recorder = Recorder()
    worker = build_worker(settings, on_batch=recorder)
    thread = threading.Thread(target=worker.run, daemon=True)  # stopped below, once all are routed
    thread.start()
    while not worker.assigned:  # measure latency, not the group join
        time.sleep(0.05)
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    producer = ctx.Process(
        target=_paced_producer, args=(bootstrap, prefix, frames.photos, rate, cfg.paced_seconds, q), daemon=True
    )
    rss: list[tuple[float, float]] = []
    started = time.perf_counter()
    producer.start()
    with make_progress(transient=True) as bar:
        task = bar.add_task(f"paced at {rate:.1f} frames/s", total=round(cfg.paced_seconds), info="")
        while producer.is_alive():
            elapsed = time.perf_counter() - started
            bar.update(task, completed=min(round(elapsed), round(cfg.paced_seconds)), info=f"RSS {_rss_mb():.0f} MB")
            if not rss or elapsed - rss[-1][0] >= 5:
                rss.append((elapsed, _rss_mb()))
            time.sleep(0.2)
    camera = q.get(timeout=90)
    sent = camera["acked"]
    deadline = time.perf_counter() + 60
    while recorder.frames < sent and time.perf_counter() < deadline:
        time.sleep(0.05)
    worker.stop_event.set()
    thread.join(30)
    half = [m for t, m in rss if t >= cfg.paced_seconds / 2]
    slope = np.polyfit([t for t, _ in rss], [m for _, m in rss], 1)[0] * 60 if len(rss) >= 3 else float("nan")
    return {
        "rate": round(rate, 2),
        "sent": sent,
        "routed": recorder.frames,
        "camera": camera,  # produced, acknowledged by the broker, failed, left undelivered
        "last_routed_s": round(recorder.delivered[-1][0] - started, 1) if recorder.delivered else None,
        "seconds": cfg.paced_seconds,
        "latency": _percentiles(recorder.latencies_ms),
        "latency_breakdown": recorder.breakdown(),
        "rss_mb": {
            "start": round(rss[0][1], 1) if rss else None,
            "end": round(rss[-1][1], 1) if rss else None,
            "second_half_range": round(max(half) - min(half), 1) if half else None,
            "slope_mb_per_min": round(float(slope), 2),
        },
        "rss_series": [(round(t, 1), round(m, 1)) for t, m in rss],
        "shadow": _shadow(worker),
    }


def _shadow(worker) -> dict | None:
    """What the candidate model did beside the live one (shadow.py), when there was one."""
    s = worker.shadow
    if s is None:
        return None
    per_batch = [v for m in worker.metrics.shadow_batch_s.collect() for v in m.samples if v.name.endswith("_sum")]
    return {"batches": s.batches, "commands": s.commands, "skipped_frames": s.skipped_frames, "errors": s.errors,
            "seconds": round(per_batch[0].value, 2) if per_batch else None}  # fmt: skip


# -- 3. the naive loop -----------------------------------------------------------------------------
def naive(cfg: BenchConfig, frames: Frames, checkpoint: Path, bootstrap: str) -> dict:
    from confluent_kafka import Producer

    from sorter.bench.one_at_a_time import OnePhoto
    from sorter.stream.kafka import ensure_topics

    prefix = f"naive{uuid.uuid4().hex[:6]}"
    topic = f"{prefix}.frames.s1"
    ensure_topics(KafkaSettings(bootstrap_servers=bootstrap), {topic: 1, f"{prefix}.commands": 1})
    _preload_one(bootstrap, topic, frames, cfg.naive_frames)
    classify = OnePhoto(checkpoint, cfg.device)
    consumer = _reader(bootstrap, f"{prefix}-group")
    producer = Producer(kafka_config(KafkaSettings(bootstrap_servers=bootstrap), {"linger.ms": 0}))
    consumer.subscribe([topic])
    times: list[float] = []
    with make_progress(transient=True) as bar:
        task = bar.add_task("naive loop", total=cfg.naive_frames, info="")
        while len(times) < cfg.naive_frames:
            m = consumer.poll(1.0)
            if m is None or m.error():
                continue
            label, conf = classify(m.value())
            command = {"item_id": m.key().decode(), "label": label, "confidence": conf}
            producer.produce(f"{prefix}.commands", json.dumps(command).encode(), m.key())
            producer.flush(10)
            consumer.commit(message=m, asynchronous=False)
            times.append(time.perf_counter())
            bar.advance(task)
    consumer.close()
    del producer  # destroyed now: no reconnect attempts after the broker stops
    fps = (len(times) - 1) / (times[-1] - times[0])
    return {"fps": round(fps, 2), "frames": len(times)}


def _reader(bootstrap: str, group: str):
    """A consumer that starts at the beginning and commits only when told (naive loop, broker alone)."""
    from confluent_kafka import Consumer

    return Consumer(
        kafka_config(
            KafkaSettings(bootstrap_servers=bootstrap),
            {
                "group.id": group,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "session.timeout.ms": 6000,
                "fetch.wait.max.ms": 10,
            },
        )
    )


def _preload_one(bootstrap: str, topic: str, frames: Frames, n: int) -> None:
    from confluent_kafka import Producer

    p = Producer(kafka_config(KafkaSettings(bootstrap_servers=bootstrap), {"linger.ms": 5}))
    for i in range(n):
        item = f"{topic}-{i}"
        p.produce(topic, frames.item(i), item.encode(), headers=_headers(item, "s1"))
    p.flush(60)


# -- 4. the broker alone ---------------------------------------------------------------------------
def broker_only(cfg: BenchConfig, frames: Frames, bootstrap: str) -> dict:
    from confluent_kafka import TopicPartition

    from sorter.stream.delivery import CheckedProducer
    from sorter.stream.kafka import ensure_topics

    prefix = f"broker{uuid.uuid4().hex[:6]}"
    topic = f"{prefix}.frames.s1"
    ensure_topics(KafkaSettings(bootstrap_servers=bootstrap), {topic: 1, f"{prefix}.commands": 1})
    _preload_one(bootstrap, topic, frames, cfg.frames)
    consumer = _reader(bootstrap, f"{prefix}-group")
    producer = CheckedProducer(
        kafka_config(KafkaSettings(bootstrap_servers=bootstrap), {"linger.ms": 2, "enable.idempotence": True})
    )
    consumer.subscribe([topic])
    done, first = 0, None
    while done < cfg.frames:
        batch = [m for m in consumer.consume(32, 1.0) if m.error() is None]
        if not batch:
            continue
        first = first or time.perf_counter()
        for m in batch:
            producer.produce(f"{prefix}.commands", b'{"item_id": "%s"}' % m.key(), b"s1")
        producer.flush(30)
        consumer.commit(offsets=[TopicPartition(topic, 0, batch[-1].offset() + 1)], asynchronous=False)
        done += len(batch)
    seconds = time.perf_counter() - first
    consumer.close()
    producer.close()
    return {"fps": round(done / seconds, 1), "frames": done}
