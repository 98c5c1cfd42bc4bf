"""Real-photo benchmark: the training recipe and its switches on Fashion-MNIST (Zalando product photos).

    python benchmarks/fashion_mnist.py /tmp/fm500 --per-class 500 --test 2000      # once
    python benchmarks/real_photos.py /tmp/fm500 --image-size 64 --seeds 0,1,2 \
        --variants default,no-attention,mean-pool --out benchmarks/results/real-photos-500-64.json

Each variant is the default `TrainConfig` with a few fields changed (VARIANTS below); each run trains on
DATA/train (validation and calibration carved from it) and is scored on DATA/test, which it never sees.
Prints one line per run and a table of mean +- sd over seeds; the JSON keeps every run. Not a test: a
run takes minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from sorter.bench.report import machine
from sorter.logs import configure_logging
from sorter.train.trainer import OLD_RECIPE, TrainConfig, train

VARIANTS: dict[str, dict] = {
    "default": {},
    "no-attention": {"attention": False},
    "mean-pool": {"pool": "mean"},
    "random-init": {"pretrained": False},
    "random-init-bn-frozen": {"pretrained": False, "bn": "frozen"},  # what "random-init" was before bn "auto"
    "no-ema": {"ema": 0.0},
    "bn-train": {"bn": "train"},
    "augment-none": {"augment": "none"},
    "augment-belt": {"augment": "belt"},
    "augment-any-angle": {"augment": "belt-any-angle"},
    "erase": {"augment": "light-erase"},
    "cutmix": {"mix": "cutmix"},
    "mixup": {"mix": "mixup"},
    "mix-both": {"mix": "both"},
    "erase-cutmix": {"augment": "light-erase", "mix": "cutmix"},
    "erase-mix-both": {"augment": "light-erase", "mix": "both"},
    "mix-both-val10": {"mix": "both", "val_fraction": 0.1},
    "val10": {"val_fraction": 0.1},
    # measured before they became the defaults (mix auto -> both, 35 x sqrt(photos) steps = 18 epochs here)
    "mix-both-18ep": {"mix": "both", "epochs": 18},
    "mix-both-val10-18ep": {"mix": "both", "val_fraction": 0.1, "epochs": 18},
    "defaults-before-mixing": {"mix": "none", "epochs": 12},  # the defaults until mixing: 23 x sqrt(photos)
    "wd-0.05": {"weight_decay": 0.05},
    "old-recipe": OLD_RECIPE,
}


def run(data: Path, out: Path, variant: str, seed: int, image_size: int, backbone: str) -> dict:
    cfg = TrainConfig(backbone=backbone, image_size=image_size, seed=seed, **VARIANTS[variant])
    started = time.perf_counter()
    result = train(data, out, cfg)
    seconds = time.perf_counter() - started
    m = result.meta.metrics
    return {
        "variant": variant,
        "seed": seed,
        "test_accuracy": m.get("test_accuracy"),
        "test_ece": m.get("test_ece"),
        "val_accuracy": m["val_accuracy"],
        "calib_ece_before": m["calib_ece_uncalibrated"],
        "calib_ece_after": m["calib_ece"],
        "temperature": m["temperature"],
        "gate_span": m["gate_span"],
        "epochs": len(result.history),
        "precision": result.meta.train_config["precision"],
        "seconds": round(seconds, 1),
        "history": [(h["phase"], round(h["train_accuracy"], 4), round(h["val_accuracy"], 4)) for h in result.history],
    }


def table(runs: list[dict]) -> list[str]:
    lines = ["| variant | test accuracy | test ECE | gate span | train time (s) | seeds |", "|---|---|---|---|---|---|"]
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == variant]

        def ms(key: str, digits: int = 3, rs: list[dict] = rs) -> str:
            values = [r[key] for r in rs if r[key] is not None]
            if len(values) > 1:
                return f"{statistics.mean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f}"
            return f"{values[0]:.{digits}f}" if values else "-"

        lines.append(f"| {variant} | {ms('test_accuracy')} | {ms('test_ece')} | {ms('gate_span', 2)} | "
                     f"{ms('seconds', 0)} | {len(rs)} |")  # fmt: skip
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, help="ImageFolder tree with train/ and test/")
    ap.add_argument("--variants", default="default,no-attention")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/real-photos.json"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/sorter-real-photos"))
    args = ap.parse_args()
    configure_logging("warning")
    args.work.mkdir(parents=True, exist_ok=True)
    runs = json.loads(args.out.read_text())["runs"] if args.out.is_file() else []
    for variant in args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            r = run(args.data, args.work / f"{variant}-{seed}.pt", variant, seed, args.image_size, args.backbone)
            print(json.dumps({k: v for k, v in r.items() if k != "history"}), flush=True)
            runs.append(r)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"data": str(args.data), "image_size": args.image_size,
                                            "backbone": args.backbone, "machine": machine(), "runs": runs},
                                           indent=1) + "\n")  # fmt: skip
    print("\n".join(table(runs)))


if __name__ == "__main__":
    main()
