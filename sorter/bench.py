"""``sorter bench``: where the time goes, against the compute ceiling, the naive loop and the broker.

One run, one machine, the same frames (640x480 JPEGs from the synthetic generator, cycled from a pool
of distinct photos) and the same checkpoint (random weights unless ``--checkpoint``: speed does not
depend on them):

1. **ceiling**: decode (thread pool) + preprocess + model in a tight in-process loop, at each batch
   size, serial and with the next batch decoding while this one is in the model; the best is what no
   worker on this hardware can beat;
2. **end to end**: the real worker (in this process) against the local broker and Redis: frames
   pre-loaded, then drained (throughput, and latency that is mostly queueing), then a paced run at 70%
   of that throughput from another process, for latency under load (``captured-at`` to command
   delivered) and, with ``--paced-seconds 600``, memory over time;
3. **naive**: one message at a time, full-size decode, fp32, batch of one, synchronous produce and
   commit, what a first version from the design sketch would do;
4. **broker**: consume and produce the same messages with no model: what the broker and client cost.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import platform
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from sorter.logs import get_logger
from sorter.progress import make_progress

log = get_logger("sorter.bench")

STATIONS = ("s1", "s2", "s3")


@dataclass
class BenchConfig:
    backbone: str = "resnet18"
    image_size: int = 224
    frames: int = 600
    checkpoint: Path | None = None
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    overlap: bool = True
    delivery: str = "at-least-once"
    batch_sizes: tuple[int, ...] = (8, 16, 32)
    max_wait_ms: int = 20
    naive_frames: int = 100
    paced_seconds: float = 20.0
    paced_fraction: float = 0.7
    decode_threads: int | None = None
    bootstrap: str | None = None
    redis_url: str | None = None
    pool: int = 48  # distinct photos, cycled
    out: Path | None = None


@dataclass
class Frames:
    photos: list[bytes]

    def item(self, i: int) -> bytes:
        return self.photos[i % len(self.photos)]


def make_frames(n_distinct: int, seed: int = 7) -> Frames:
    from sorter.data.synth import catalog, render

    designs = catalog(10)
    rng = np.random.default_rng(seed)
    photos = []
    with make_progress(transient=True) as bar:
        task = bar.add_task("rendering 640x480 photos", total=n_distinct, info="")
        for i in range(n_distinct):
            photos.append(render(designs[i % len(designs)], rng, size=(640, 480)))
            bar.advance(task)
    return Frames(photos)


def make_checkpoint(cfg: BenchConfig, folder: Path) -> Path:
    if cfg.checkpoint is not None:
        return cfg.checkpoint
    from sorter.data.synth import catalog
    from sorter.model.backbones import IMAGENET_MEAN, IMAGENET_STD
    from sorter.model.checkpoint import ModelMeta, save_checkpoint
    from sorter.model.classifier import build_classifier

    designs = catalog(10)
    model, _ = build_classifier(cfg.backbone, len(designs), pretrained=False)
    meta = ModelMeta(
        backbone=cfg.backbone,
        classes=[d.label for d in designs],
        skus=[d.sku for d in designs],
        image_size=cfg.image_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        model_version=f"bench-{cfg.backbone}-{cfg.image_size}",
    )
    path = folder / "bench.pt"
    save_checkpoint(path, model, meta)
    return path


def _threads(cfg: BenchConfig) -> int:
    return cfg.decode_threads or max(1, min(8, os.cpu_count() or 1))


# -- 1. the compute ceiling ------------------------------------------------------------------------
def ceiling(cfg: BenchConfig, frames: Frames, checkpoint: Path) -> dict:
    from sorter.stream.inference import Classifier
    from sorter.stream.pipeline import Decoder

    model = Classifier(checkpoint, device=cfg.device, precision=cfg.precision, compile=cfg.compile,
                       max_batch=max(cfg.batch_sizes))  # fmt: skip
    decoder = Decoder(_threads(cfg), 40_000_000)
    size = model.input_size
    n = cfg.frames
    rows = []
    with make_progress(transient=True) as bar:
        task = bar.add_task("ceiling", total=len(cfg.batch_sizes) * 2, info="")
        for batch in cfg.batch_sizes:
            model.predict(decoder.decode([frames.item(i) for i in range(batch)], size))  # warm-up
            for overlapped in (False, True):
                decode_s = infer_s = 0.0
                started = time.perf_counter()
                pending = None
                for lo in range(0, n, batch):
                    payloads = [frames.item(i) for i in range(lo, min(n, lo + batch))]
                    t = time.perf_counter()
                    if overlapped:
                        nxt = [decoder.submit(p, size) for p in payloads]
                        images = [f.result() for f in pending] if pending is not None else None
                        pending = nxt
                    else:
                        images = decoder.decode(payloads, size)
                    decode_s += time.perf_counter() - t
                    if images is not None:
                        t = time.perf_counter()
                        model.predict(images)
                        infer_s += time.perf_counter() - t
                if pending is not None:
                    t = time.perf_counter()
                    model.predict([f.result() for f in pending])
                    infer_s += time.perf_counter() - t
                seconds = time.perf_counter() - started
                rows.append(
                    {
                        "batch": batch,
                        "overlap": overlapped,
                        "fps": round(n / seconds, 2),
                        "decode_ms_per_frame": round(decode_s * 1000 / n, 3),
                        "infer_ms_per_frame": round(infer_s * 1000 / n, 3),
                    }
                )
                bar.advance(task)
    # decode alone, one thread: the per-photo cost at the model's input size
    one = Decoder(1, 40_000_000)
    t = time.perf_counter()
    one.decode([frames.item(i) for i in range(100)], size)
    decode_one_ms = (time.perf_counter() - t) * 10
    one.close()
    decoder.close()
    best = max(rows, key=lambda r: r["fps"])
    return {
        "fps": best["fps"],
        "batch": best["batch"],
        "overlap": best["overlap"],
        "rows": rows,
        "decode_ms_one_thread": round(decode_one_ms, 3),
        "device": str(model.runtime.device),
        "precision": model.runtime.precision,
        "channels_last": model.runtime.channels_last,
        "compiled": model.buckets is not None,
        "compile_s": round(model.compile_s, 1),
    }


# -- 2. end to end ---------------------------------------------------------------------------------
def _headers(item: str, station: str) -> list[tuple[str, bytes]]:
    return [
        ("item-id", item.encode()),
        ("station-id", station.encode()),
        ("camera-id", b"cam-1"),
        ("captured-at", str(time.time_ns() // 1_000_000).encode()),
    ]


def _preload(bootstrap: str, prefix: str, frames: Frames, n: int) -> None:
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "batch.num.messages": 200})
    for i in range(n):
        station = STATIONS[i % len(STATIONS)]
        item = f"{prefix}-{i}"
        p.produce(f"{prefix}.frames.{station}", frames.item(i), item.encode(), headers=_headers(item, station))
        if i % 100 == 0:
            p.poll(0)
    p.flush(60)


def _paced_producer(bootstrap: str, prefix: str, photos: list[bytes], rate: float, seconds: float, q) -> None:
    """Runs in its own process: publishes at ``rate`` frames/s with captured-at stamped at send time."""
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    started = time.perf_counter()
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
        p.produce(f"{prefix}.frames.{station}", photos[i % len(photos)], item.encode(), headers=_headers(item, station))
        p.poll(0)
        i += 1
    p.flush(60)
    q.put(i)


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
            "max_wait_ms": cfg.max_wait_ms,
            "decode_threads": _threads(cfg),
            "overlap": cfg.overlap,
        },
        observe={"enabled": False},
        routes=routes,
        worker_id=f"{prefix}-worker",
    )


@dataclass
class Recorder:
    """Collects what each finished batch says (in the worker's thread)."""

    latencies_ms: list[float] = field(default_factory=list)
    delivered: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, frames)
    decode_s: float = 0.0
    infer_s: float = 0.0
    frames: int = 0

    def __call__(self, result) -> None:
        now = time.time_ns() // 1_000_000
        self.delivered.append((time.perf_counter(), result.frames))
        self.decode_s += result.decode_s
        self.infer_s += result.infer_s
        self.frames += result.frames
        for c in result.commands:
            if c.captured_at:
                self.latencies_ms.append(now - c.captured_at)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    a = np.array(values)
    return {f"p{q}_ms": round(float(np.percentile(a, q)), 1) for q in (50, 95, 99)}


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
    sent = q.get(timeout=30)
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
        "seconds": cfg.paced_seconds,
        "latency": _percentiles(recorder.latencies_ms),
        "rss_mb": {
            "start": round(rss[0][1], 1) if rss else None,
            "end": round(rss[-1][1], 1) if rss else None,
            "second_half_range": round(max(half) - min(half), 1) if half else None,
            "slope_mb_per_min": round(float(slope), 2),
        },
        "rss_series": [(round(t, 1), round(m, 1)) for t, m in rss],
    }


# -- 3. the naive loop -----------------------------------------------------------------------------
def naive(cfg: BenchConfig, frames: Frames, checkpoint: Path, bootstrap: str) -> dict:
    from confluent_kafka import Consumer, Producer

    from sorter.model.checkpoint import load_checkpoint
    from sorter.settings import KafkaSettings
    from sorter.stream.kafka import ensure_topics

    prefix = f"naive{uuid.uuid4().hex[:6]}"
    topic = f"{prefix}.frames.s1"
    ensure_topics(KafkaSettings(bootstrap_servers=bootstrap), {topic: 1, f"{prefix}.commands": 1})
    _preload_one(bootstrap, topic, frames, cfg.naive_frames)
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    model, meta = load_checkpoint(checkpoint, device)
    mean = torch.tensor(meta.mean).view(1, 3, 1, 1)
    std = torch.tensor(meta.std).view(1, 3, 1, 1)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{prefix}-group",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "fetch.wait.max.ms": 10,
        }
    )
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    consumer.subscribe([topic])
    times: list[float] = []
    with make_progress(transient=True) as bar:
        task = bar.add_task("naive loop", total=cfg.naive_frames, info="")
        while len(times) < cfg.naive_frames:
            m = consumer.poll(1.0)
            if m is None or m.error():
                continue
            rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(m.value(), np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            rgb = cv2.resize(rgb, (meta.image_size, meta.image_size), interpolation=cv2.INTER_AREA)
            x = (torch.from_numpy(rgb).permute(2, 0, 1).float().unsqueeze(0) / 255 - mean) / std
            with torch.no_grad():
                probs = torch.softmax(model(x.to(device)), dim=1)[0]
            conf, idx = probs.max(0)
            command = {"item_id": m.key().decode(), "label": meta.classes[int(idx)], "confidence": float(conf)}
            producer.produce(f"{prefix}.commands", json.dumps(command).encode(), m.key())
            producer.flush(10)
            consumer.commit(message=m, asynchronous=False)
            times.append(time.perf_counter())
            bar.advance(task)
    consumer.close()
    del producer  # destroyed now: no reconnect attempts after the broker stops
    fps = (len(times) - 1) / (times[-1] - times[0])
    return {"fps": round(fps, 2), "frames": len(times)}


def _preload_one(bootstrap: str, topic: str, frames: Frames, n: int) -> None:
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for i in range(n):
        item = f"{topic}-{i}"
        p.produce(topic, frames.item(i), item.encode(), headers=_headers(item, "s1"))
    p.flush(60)


# -- 4. the broker alone ---------------------------------------------------------------------------
def broker_only(cfg: BenchConfig, frames: Frames, bootstrap: str) -> dict:
    from confluent_kafka import Consumer, TopicPartition

    from sorter.settings import KafkaSettings
    from sorter.stream.kafka import CheckedProducer, ensure_topics

    prefix = f"broker{uuid.uuid4().hex[:6]}"
    topic = f"{prefix}.frames.s1"
    ensure_topics(KafkaSettings(bootstrap_servers=bootstrap), {topic: 1, f"{prefix}.commands": 1})
    _preload_one(bootstrap, topic, frames, cfg.frames)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{prefix}-group",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "fetch.wait.max.ms": 10,
        }
    )
    producer = CheckedProducer({"bootstrap.servers": bootstrap, "linger.ms": 2, "enable.idempotence": True})
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


# -- the whole run ---------------------------------------------------------------------------------
def machine() -> dict:
    cpu = "?"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def run(cfg: BenchConfig) -> dict:
    from sorter.services import redis_server, tansu_broker

    work = Path(tempfile.mkdtemp(prefix="sorter-bench-"))
    services = []
    bootstrap, redis_url = cfg.bootstrap, cfg.redis_url
    if bootstrap is None:
        broker = tansu_broker(workdir=work).start()
        services.append(broker)
        bootstrap = f"127.0.0.1:{broker.port}"
    if redis_url is None:
        redis_ = redis_server(workdir=work).start()
        services.append(redis_)
        redis_url = f"redis://127.0.0.1:{redis_.port}/0"
    try:
        frames = make_frames(cfg.pool)
        checkpoint = make_checkpoint(cfg, work)
        log.info("bench.stage", stage="ceiling")
        ceil = ceiling(cfg, frames, checkpoint)
        log.info("bench.stage", stage="e2e", batch=ceil["batch"])
        end = e2e(cfg, frames, checkpoint, bootstrap, redis_url, ceil["batch"])
        rate = cfg.paced_fraction * end["fps"]
        log.info("bench.stage", stage="paced", rate=round(rate, 1))
        pace = paced(cfg, frames, checkpoint, bootstrap, redis_url, ceil["batch"], rate)
        log.info("bench.stage", stage="naive")
        slow = naive(cfg, frames, checkpoint, bootstrap)
        log.info("bench.stage", stage="broker")
        bro = broker_only(cfg, frames, bootstrap)
    finally:
        for s in services:
            s.stop()
    result = {
        "machine": machine(),
        "config": {
            "backbone": cfg.backbone,
            "image_size": cfg.image_size,
            "frames": cfg.frames,
            "photo": "640x480 JPEG",
            "compile": cfg.compile,
            "overlap": cfg.overlap,
            "delivery": cfg.delivery,
            "max_wait_ms": cfg.max_wait_ms,
            "decode_threads": _threads(cfg),
        },
        "ceiling": ceil,
        "e2e": end,
        "paced": pace,
        "naive": slow,
        "broker": bro,
        "ceiling_fps": ceil["fps"],
        "e2e_fps": end["fps"],
        "naive_fps": slow["fps"],
        "broker_fps": bro["fps"],
        "e2e_over_ceiling": round(end["fps"] / ceil["fps"], 3),
        "e2e_over_naive": round(end["fps"] / slow["fps"], 2),
        "p99_ms_at_70pct": pace["latency"]["p99_ms"],
    }
    return result


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    names = ["naive\nloop", "end to end\n(worker)", "compute\nceiling", "broker\nonly"]
    values = [result["naive_fps"], result["e2e_fps"], result["ceiling_fps"], result["broker_fps"]]
    bars = a.bar(names, values, color=["#bbb", "#2a7", "#357", "#a85"])
    a.set_yscale("log")
    a.set_ylabel("frames/s (log)")
    a.bar_label(bars, fmt="%.0f")
    a.set_title(
        f"{result['config']['backbone']} {result['config']['image_size']} px, {result['machine']['gpu'] or 'CPU'}"
    )
    e = result["e2e"]
    stages = {"decode wait": e["decode_wait_ms_per_frame"], "model": e["infer_ms_per_frame"],
              "broker, cache, routing": e["other_ms_per_frame"] or 0}  # fmt: skip
    b.barh(list(stages), list(stages.values()), color=["#8ac", "#357", "#a85"])
    b.set_xlabel("ms per frame (end to end, drained)")
    b.set_title("where the time goes")
    lat = result["paced"]["latency"]
    c.bar(["p50", "p95", "p99"], [lat["p50_ms"] or 0, lat["p95_ms"] or 0, lat["p99_ms"] or 0], color="#2a7")
    c.axhline(100, color="#c33", ls="--", lw=1, label="target p99 100 ms")
    c.set_ylabel("ms, captured-at to command delivered")
    c.set_title(f"latency at 70% load ({result['paced']['rate']:.0f} frames/s)")
    c.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_lines(r: dict) -> list[str]:
    e, p, m, c = r["e2e"], r["paced"], r["machine"], r["ceiling"]
    lat, rss = p["latency"], p["rss_mb"]
    return [
        f"machine: {m['cpu']} x{m['cores']}, GPU {m['gpu']}, torch {m['torch']}",
        f"model: {r['config']['backbone']} {r['config']['image_size']} px on {c['device']} "
        f"({c['precision']}, channels_last {c['channels_last']}, compiled {c['compiled']})",
        f"ceiling   {r['ceiling_fps']:8.1f} frames/s (batch {c['batch']}, overlap {c['overlap']})",
        f"e2e       {r['e2e_fps']:8.1f} frames/s = {r['e2e_over_ceiling']:.0%} of ceiling, "
        f"{r['e2e_over_naive']:.1f}x naive (mean batch {e['mean_batch']})",
        f"naive     {r['naive_fps']:8.1f} frames/s",
        f"broker    {r['broker_fps']:8.1f} frames/s (no model)",
        f"per frame: decode wait {e['decode_wait_ms_per_frame']} ms, model {e['infer_ms_per_frame']} ms, "
        f"rest {e['other_ms_per_frame']} ms",
        f"paced at {p['rate']} frames/s: latency p50 {lat['p50_ms']} p95 {lat['p95_ms']} p99 {lat['p99_ms']} ms; "
        f"RSS {rss['start']} -> {rss['end']} MB ({rss['slope_mb_per_min']} MB/min)",
    ]
