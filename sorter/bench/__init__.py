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
4. **broker**: consume and produce the same messages with no model: what the broker and client cost;
5. **quix** (with ``--quix-python``): the same model in a Quix Streams application, one message at a
   time as its API invites, with every item checked for exactly one command.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from sorter.bench.ceiling import ceiling
from sorter.bench.inputs import BenchConfig, Frames, decode_threads_for, make_checkpoint, make_frames
from sorter.bench.quix import quix
from sorter.bench.report import machine, plot, save, summary_lines
from sorter.bench.streaming import broker_only, e2e, naive, paced
from sorter.logs import get_logger
from sorter.settings import BatchSettings

log = get_logger("sorter.bench")

__all__ = ["BenchConfig", "Frames", "make_checkpoint", "make_frames", "plot", "run", "save", "summary_lines"]


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
        checkpoint = make_checkpoint(cfg, work, frames)
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
        qx = None
        if cfg.quix_python is not None:
            log.info("bench.stage", stage="quix")
            qx = quix(cfg, frames, checkpoint, bootstrap)
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
            "max_wait_ms": BatchSettings().max_wait_ms if cfg.max_wait_ms is None else cfg.max_wait_ms,
            "latency_budget_ms": cfg.latency_budget_ms,
            "paced_fraction": cfg.paced_fraction,
            "decode_threads": decode_threads_for(cfg),
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
        "p99_ms_paced": pace["latency"]["p99_ms"],
        **({"p99_ms_at_70pct": pace["latency"]["p99_ms"]} if cfg.paced_fraction == 0.7 else {}),
    }
    if qx is not None:
        result["quix"] = qx
        result["quix_fps"] = qx.get("fps")
        if qx.get("fps"):
            result["e2e_over_quix"] = round(end["fps"] / qx["fps"], 2)
    return result
