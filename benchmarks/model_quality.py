"""Model-quality benchmark (not a test): what pretraining, the attention head and the recipe buy, in one run.

One synthetic catalogue (train / val / held-out test, different seeds), several training variants, each
scored on the same held-out photos. By default the catalogue is the hard one (`sorter synth --hard`:
fine-grained product families, poses, neighbours, clutter, glare), because the plain one saturates at
1.000 and cannot rank recipes. Writes ``RESULTS/model_quality.json``, ``.md`` and ``.png``.

    .venv/bin/python benchmarks/model_quality.py               # about 25 minutes on 2 CPU cores
    .venv/bin/python benchmarks/model_quality.py --quick       # a smoke run, about a minute
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from sorter.data.synth import write_dataset
from sorter.logs import configure_logging
from sorter.progress import progress_bar
from sorter.train.evaluate import evaluate_folder
from sorter.train.trainer import OLD_RECIPE, TrainConfig, train

VARIANTS = {
    "mobilenet_v2 pretrained + attention (defaults)": {"backbone": "mobilenet_v2"},
    "mobilenet_v2 pretrained, no attention": {"backbone": "mobilenet_v2", "attention": False},
    "mobilenet_v2 pretrained, recipe before #14": {"backbone": "mobilenet_v2", **OLD_RECIPE},
    "mobilenet_v2 random init + attention": {"backbone": "mobilenet_v2", "pretrained": False},
    "resnet18 random init + attention": {"backbone": "resnet18", "pretrained": False},
}
DEFAULT_VARIANTS = list(VARIANTS)[:4]  # resnet18 from random weights takes 3x as long: ask for it


def samples(folder: Path, out: Path, classes: int = 6, per_class: int = 5) -> None:
    """A contact sheet of the catalogue (a row per class): look at what the models are asked to tell apart."""
    import cv2
    import numpy as np

    rows = []
    for label in sorted(p.name for p in folder.iterdir() if p.is_dir())[:classes]:
        photos = sorted((folder / label).glob("*.jpg"))[:per_class]
        row = np.hstack([cv2.resize(cv2.imread(str(p)), (256, 192)) for p in photos])
        cv2.putText(row, label, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
        rows.append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), np.vstack(rows), [cv2.IMWRITE_JPEG_QUALITY, 80])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--train-per-class", type=int, default=80)
    parser.add_argument("--val-per-class", type=int, default=30)
    parser.add_argument("--test-per-class", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's schedule from the data size")
    parser.add_argument("--easy", action="store_true", help="the plain catalogue (saturates at 1.000)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = parser.parse_args()
    if args.quick:
        args.classes, args.train_per_class, args.val_per_class, args.test_per_class = 4, 12, 6, 6
        args.epochs, args.image_size = 2, 64
        args.variants = args.variants[:2]
    configure_logging("warning")
    work = Path(tempfile.mkdtemp(prefix="sorter-bench-"))
    try:
        splits = {"train": args.train_per_class, "val": args.val_per_class, "test": args.test_per_class}
        with progress_bar(args.classes * sum(splits.values()), "rendering 640x480 photos") as advance:
            for seed, (split, n) in enumerate(splits.items()):
                write_dataset(work / "data" / split, args.classes, n, seed=seed, progress=advance, hard=not args.easy)
        samples(work / "data" / "test", args.results / "model_quality.samples.jpg")
        rows = []
        for name in args.variants:
            config = TrainConfig(
                **{"epochs": args.epochs, "image_size": args.image_size, "device": args.device, "seed": 0}
                | VARIANTS[name]
            )
            print(f"\n== {name}", flush=True)
            started = time.perf_counter()
            result = train(work / "data", work / f"{len(rows)}.pt", config)
            seconds = time.perf_counter() - started
            test = evaluate_folder(work / "data" / "test", work / f"{len(rows)}.pt", device=args.device).evaluation
            rows.append(
                {
                    "variant": name,
                    **VARIANTS[name],
                    "test_accuracy": test.accuracy,
                    "test_macro_f1": test.macro_f1,
                    "test_ece": test.ece,
                    "val_accuracy": result.evaluation.accuracy,
                    "epochs_run": len(result.history),
                    "train_seconds": seconds,
                    "precision": result.meta.train_config["precision"],
                }
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__,
        },
        "setup": {k: v for k, v in vars(args).items() if k not in ("results", "variants")},
        "results": rows,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "model_quality.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"{'plain' if args.easy else 'hard'} catalogue, {args.classes} classes, "
        f"{args.train_per_class}/{args.val_per_class}/{args.test_per_class} photos per "
        f"class (train/val/test), {args.image_size} px, {args.epochs or 'scheduled'} epochs, "
        f"{report['machine']['cuda'] or str(report['machine']['threads']) + ' CPU threads'}",
        "",
        "| variant | test accuracy | macro-F1 | ECE | epochs | train time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['variant']} | {r['test_accuracy']:.3f} | {r['test_macro_f1']:.3f} | {r['test_ece']:.3f} | "
        f"{r['epochs_run']} | {r['train_seconds']:.0f} |"
        for r in rows
    ]
    (args.results / "model_quality.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    fig, (ax_acc, ax_time) = plt.subplots(1, 2, figsize=(12, 0.6 * len(rows) + 2))
    names = [r["variant"] for r in rows]
    ax_acc.barh(names, [r["test_accuracy"] for r in rows], color="tab:green")
    ax_acc.set_xlim(0, 1)
    ax_acc.axvline(0.95, color="grey", ls="--", lw=1)
    ax_acc.set_title("held-out test accuracy")
    ax_time.barh(names, [r["train_seconds"] for r in rows], color="tab:orange")
    ax_time.set_title("training time (s)")
    ax_time.set_yticks([])
    for ax, key, fmt in ((ax_acc, "test_accuracy", "{:.3f}"), (ax_time, "train_seconds", "{:.0f}")):
        for i, r in enumerate(rows):
            ax.text(r[key], i, " " + fmt.format(r[key]), va="center", fontsize=8)
    ax_acc.invert_yaxis()
    ax_time.invert_yaxis()
    fig.tight_layout()
    fig.savefig(args.results / "model_quality.png", dpi=110)


if __name__ == "__main__":
    main()
