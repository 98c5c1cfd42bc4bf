"""Unknown products (issue #12, part 1), not a test: train on 8 of 10 classes at today's defaults, then
score the held-out test photos of the 8 (known) against all photos of the other 2 (unknown).

    python benchmarks/unknown_products.py real /tmp/fm500 --hold-out bag,ankle-boot --image-size 64 \\
        --out benchmarks/results/unknown/fashion-mnist-8of10.json
    python benchmarks/unknown_products.py synthetic --image-size 96 \\
        --out benchmarks/results/unknown/synthetic-8of10.json

``real``: an ImageFolder tree with train/ and test/ (``benchmarks/fashion_mnist.py`` writes one); the
held-out classes' training photos are not used. ``synthetic``: the hard catalogue (fine-grained classes,
clutter, glare), 80 training and 40 test photos per class, the last two designs held out. For every
score (model/ood.py) it reports AUROC and, at the threshold the training fitted on its calibration split
(known photos only, for 2% false review), the share of unknown photos sent to review and of known ones.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from sorter.bench.report import machine
from sorter.data.folder import Sample, images_under, scan
from sorter.data.synth import catalog, write_dataset
from sorter.logs import configure_logging
from sorter.model.ood import SCORES, at_threshold, auroc, ood_scores
from sorter.model.serving import load_for_serving
from sorter.progress import progress_bar
from sorter.train.evaluate import decoded_loader, predict_logits
from sorter.train.metrics import evaluate_predictions
from sorter.train.trainer import TrainConfig, train


def real_tree(data: Path, hold_out: list[str], work: Path) -> Path:
    for split in ("train", "test"):
        for folder in sorted((data / split).iterdir()):
            if folder.is_dir() and folder.name not in hold_out:
                (work / split).mkdir(parents=True, exist_ok=True)
                (work / split / folder.name).symlink_to(folder.resolve())
    for name in hold_out:
        (work / "unknown").mkdir(parents=True, exist_ok=True)
        (work / "unknown" / name).symlink_to((data / "test" / name).resolve())
    return work


def synthetic_tree(work: Path, classes: int = 10, held: int = 2, train_n: int = 80, test_n: int = 40) -> Path:
    gen = work / "gen"
    with progress_bar(classes * (train_n + test_n), "rendering 640x480 photos") as advance:
        write_dataset(gen / "train", classes, train_n, seed=0, progress=advance, hard=True)
        write_dataset(gen / "test", classes, test_n, seed=2, progress=advance, hard=True)
    unknown = [d.label for d in catalog(classes, True)[-held:]]
    tree = real_tree(gen, unknown, work / "tree")
    (tree / "train" / "skus.json").write_text((gen / "train" / "skus.json").read_text())
    return tree


def measure(tree: Path, out: Path, config: TrainConfig) -> dict:
    started = time.perf_counter()
    result = train(tree, out, config)
    seconds = time.perf_counter() - started
    served = load_for_serving(out, device=config.device)
    meta = served.meta
    classes, known = scan(tree / "test", meta.classes)
    unknown = [Sample(p, 0) for p in images_under(tree / "unknown")]
    logits = {}
    for name, samples in (("known", known), ("unknown", unknown)):
        loader = decoded_loader(samples, meta.image_size, 64, f"scoring {name}")
        logits[name], labels = predict_logits(served.model, loader, served.runtime, served.normalizer)
        if name == "known":
            accuracy = evaluate_predictions(logits[name].softmax(1).numpy(), labels.numpy(), classes).accuracy
    scores = {}
    for s in SCORES:
        k, u = ood_scores(logits["known"], s).numpy(), ood_scores(logits["unknown"], s).numpy()
        threshold = meta.metrics[f"ood_threshold_{s}"]
        scores[s] = {"auroc": round(auroc(k, u), 4), "threshold": round(threshold, 4)} | {
            name: round(v, 4) for name, v in at_threshold(k, u, threshold).items()
        }
    return {
        "known_classes": meta.classes,
        "unknown_classes": sorted(p.name for p in (tree / "unknown").iterdir()),
        "known_test_photos": len(known),
        "unknown_photos": len(unknown),
        "known_test_accuracy": round(accuracy, 4),
        "fitted_on": meta.ood.fitted_on if meta.ood else None,
        "fitted_photos": meta.ood.photos if meta.ood else None,
        "default_score": meta.ood.score if meta.ood else None,
        "train_seconds": round(seconds, 1),
        "precision": result.meta.train_config["precision"],
        "scores": scores,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=("real", "synthetic"))
    ap.add_argument("data", type=Path, nargs="?", help="real: a tree with train/ and test/")
    ap.add_argument("--hold-out", default="bag,ankle-boot", help="real: the unknown classes")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    configure_logging("warning")
    work = Path(tempfile.mkdtemp(prefix="sorter-unknown-"))
    if args.kind == "real":
        tree = real_tree(args.data, args.hold_out.split(","), work / "tree")
    else:
        tree = synthetic_tree(work)
    config = TrainConfig(backbone=args.backbone, image_size=args.image_size, seed=args.seed)
    result = {"kind": args.kind, "machine": machine(), "image_size": args.image_size, "backbone": args.backbone,
              "seed": args.seed} | measure(tree, work / "model.pt", config)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.kind}: known {result['known_classes']}, unknown {result['unknown_classes']}; known test accuracy "
          f"{result['known_test_accuracy']}; {result['train_seconds']} s ({result['precision']})")  # fmt: skip
    for s, r in result["scores"].items():
        print(f"  {s:10s} AUROC {r['auroc']:.3f}  at its calibration threshold: unknown caught "
              f"{100 * r['unknown_caught']:.1f}%, known reviewed {100 * r['known_reviewed']:.1f}%")  # fmt: skip


if __name__ == "__main__":
    main()
