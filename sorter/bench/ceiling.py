"""Stage 1: decode + preprocess + model in a tight in-process loop, serial and overlapped."""

from __future__ import annotations

import time
from pathlib import Path

from sorter.bench.inputs import BenchConfig, Frames, decode_threads_for
from sorter.progress import make_progress


def ceiling(cfg: BenchConfig, frames: Frames, checkpoint: Path) -> dict:
    from sorter.stream.inference import Classifier
    from sorter.stream.pipeline import Decoder

    model = Classifier(checkpoint, device=cfg.device, precision=cfg.precision, compile=cfg.compile,
                       max_batch=max(cfg.batch_sizes))  # fmt: skip
    decoder = Decoder(decode_threads_for(cfg), 40_000_000)
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
        "precision": model.precision,
        "channels_last": model.runtime.channels_last,
        "compiled": model.buckets is not None,
        "compile_s": round(model.compile_s, 1),
    }
