"""What a shadow model costs the live line (issue #13, part 2), not a test: the real worker (``sorter bench``'s
paced stage: three single-partition station topics, 640x480 JPEG photos, the local Tansu broker and Redis) at the
same paced rates without and with a candidate of the same architecture beside it (``shadow.checkpoint``).

On a CPU pod the candidate takes the same cores as the live model: what is measured is the live latency (p50/p99,
captured-at to command delivered) and how much of the traffic the candidate could take (the rest is skipped, by
design, so the live line never waits for it). Rates are shares of the live model's ceiling, measured first.

    .venv/bin/python benchmarks/shadow_cost.py --out benchmarks/results/shadow/cpu-resnet18-224.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from sorter.bench.ceiling import ceiling
from sorter.bench.inputs import BenchConfig, make_checkpoint, make_frames
from sorter.bench.report import machine
from sorter.bench.streaming import paced
from sorter.logs import configure_logging
from sorter.model.checkpoint import load_checkpoint, save_checkpoint
from sorter.services import redis_server, tansu_broker


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--shares", default="0.3,0.6", help="paced rates as shares of the live model's ceiling")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    configure_logging("warning")
    work = Path(tempfile.mkdtemp(prefix="shadow-cost-"))
    cfg = BenchConfig(backbone=args.backbone, image_size=args.image_size, device=args.device,
                      precision=args.precision, paced_seconds=args.seconds, batch_sizes=(16,), frames=256)  # fmt: skip
    frames = make_frames(cfg.pool)
    live = make_checkpoint(cfg, work, frames)
    model, meta = load_checkpoint(live)
    candidate = work / "candidate.pt"
    save_checkpoint(candidate, model, meta.model_copy(update={"model_version": f"{meta.model_version}-candidate"}))
    alone = ceiling(cfg, frames, live)
    top = alone["fps"]
    broker, redis = tansu_broker(workdir=work).start(), redis_server(workdir=work).start()
    runs = []
    try:
        for share in (float(s) for s in args.shares.split(",")):
            for shadowed in (False, True):
                run_cfg = BenchConfig(**{**cfg.__dict__, "shadow_checkpoint": candidate if shadowed else None})
                r = paced(run_cfg, frames, live, f"127.0.0.1:{broker.port}", f"redis://127.0.0.1:{redis.port}/0",
                          16, share * top)  # fmt: skip
                r.pop("rss_series", None)
                runs.append({"share_of_ceiling": share, "shadow": shadowed} | r)
                s, lat = r["shadow"] or {}, r["latency"]
                took = f", candidate: {s['commands']} commands, {s['skipped_frames']} frames skipped" if s else ""
                print(f"{share:.0%} of ceiling ({r['rate']} frames/s), shadow {'on ' if shadowed else 'off'}: "
                      f"routed {r['routed']}/{r['sent']}, p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms{took}",
                      flush=True)  # fmt: skip
    finally:
        broker.stop()
        redis.stop()
    result = {"machine": machine(), "backbone": args.backbone, "image_size": args.image_size,
              "precision": alone["precision"], "ceiling_frames_per_s": round(top, 1), "seconds": args.seconds,
              "runs": runs}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
