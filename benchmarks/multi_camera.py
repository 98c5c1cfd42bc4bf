"""Several cameras, one decision (issue #12, part 2), not a test: how much does fusing an item's views
lower the error against deciding from one view, and against today's rule (the most confident view)?

    python benchmarks/multi_camera.py synthetic --views 4 --out benchmarks/results/fusion/synthetic.json
    python benchmarks/multi_camera.py real /tmp/fm500 --views 4 --image-size 64 \\
        --out benchmarks/results/fusion/fashion-mnist.json

``synthetic``: a model trained at today's defaults on the hard catalogue (fine-grained classes, poses,
neighbours, clutter, glare; 80 photos per class, 96 px); each test item is one product that ``--views``
cameras photograph, each rendering its own pose, occlusion, glare and lighting (the simulator's
``--camera-poses``). ``real``: an ImageFolder tree with train/ and test/ (``benchmarks/fashion_mnist.py``),
a model trained at today's defaults on train/; each test photo is one item, and each camera sees it through
its own occlusion (a guard bar or a neighbour over 15-35% of it, half the time), lighting (gain, gamma,
colour cast), a small shift and rotation (10 degrees), blur and sensor noise: the photo is real, the differences
between cameras are simulated. ``--checkpoint`` scores a model already trained instead.

Every view goes through the worker's own path (``load_for_model``, ``Classifier.predict``) and the
decisions through ``fusion.fuse``. Reported, per number of cameras k = 1..views: the error of one view
alone (the mean over the item's views), of the most confident of the k views, of the fused k views (the
worker's rule: mean log-probability) and of the product rule (sum of log-probabilities); ECE of each; the
share of items under ``min_confidence`` (0.8), which go to review, and the error of those routed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from sorter.bench.report import machine
from sorter.data.folder import scan
from sorter.data.synth import catalog, render, write_dataset
from sorter.logs import configure_logging
from sorter.model.preprocess import load_for_model
from sorter.progress import progress_bar
from sorter.stream.fusion import fuse
from sorter.stream.inference import Classifier
from sorter.train.metrics import expected_calibration_error
from sorter.train.trainer import TrainConfig, train

MIN_CONFIDENCE = 0.8


def camera_view(photo: np.ndarray, rng: np.random.Generator) -> bytes:
    """One camera's look at a real product photo (RGB uint8): its own occlusion, light, angle and noise."""
    h, w = photo.shape[:2]
    img = photo.astype(np.float32)
    angle, dx, dy = rng.uniform(-10, 10), rng.uniform(-0.05, 0.05) * w, rng.uniform(-0.05, 0.05) * h
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, rng.uniform(0.92, 1.08))
    m[:, 2] += (dx, dy)
    img = cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REPLICATE)
    if rng.random() < 0.5:  # a guard bar or a neighbouring parcel over part of the item
        area = rng.uniform(0.15, 0.35) * w * h
        bw = int(np.clip(rng.uniform(0.3, 1.0) * w, 4, w))
        bh = int(np.clip(area / bw, 4, h))
        x, y = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        img[y : y + bh, x : x + bw] = rng.uniform(30, 200, 3)
    cast = np.array([1 + rng.uniform(-0.06, 0.06), 1.0, 1 + rng.uniform(-0.06, 0.06)], np.float32)
    img = 255 * (np.clip(img * rng.uniform(0.8, 1.2) * cast, 0, 255) / 255) ** rng.uniform(0.85, 1.2)
    if rng.random() < 0.5:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.4, 0.8))
    img += rng.standard_normal(img.shape).astype(np.float32) * rng.uniform(1, 5)
    rgb = np.clip(img, 0, 255).astype(np.uint8)
    return cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def synthetic_items(views: int, per_class: int, seed: int, classes: list[str]) -> list[tuple[int, list[bytes]]]:
    designs = catalog(10, hard=True)
    if sorted(d.label for d in designs) != sorted(classes):
        raise SystemExit("the model was not trained on the hard catalogue's 10 classes")
    rng = np.random.default_rng(seed)
    items = []
    with progress_bar(len(designs) * per_class, "rendering items") as advance:
        for design in designs:
            for _ in range(per_class):
                photos = [render(design, rng, hard=True, others=designs) for _ in range(views)]
                items.append((classes.index(design.label), photos))
                advance()
    return items


def real_items(tree: Path, views: int, per_class: int, seed: int, classes: list[str]):
    _, samples = scan(tree / "test", classes)
    rng = np.random.default_rng(seed)
    taken: dict[int, int] = {}
    items = []
    for s in samples:
        if taken.get(s.label, 0) >= per_class:
            continue
        taken[s.label] = taken.get(s.label, 0) + 1
        photo = cv2.cvtColor(cv2.imread(str(s.path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        items.append((s.label, [camera_view(photo, rng) for _ in range(views)], s.path.read_bytes()))
    return items


def clean_error(model: Classifier, items) -> float:
    """The same items' original photos, as the test set has them (no camera differences): for reference."""
    preds = model.predict([load_for_model(original, model.input_size) for _, _, original in items])
    return round(float(np.mean([p.index != label for p, (label, _, _) in zip(preds, items, strict=True)])), 4)


def _product(predictions) -> tuple[int, float]:
    """The alternative to the worker's rule: the sum of log-probabilities (right for independent views)."""
    total = np.sum([p.log_probs for p in predictions], axis=0)
    probs = np.exp(total - np.logaddexp.reduce(total))
    return int(np.argmax(probs)), float(probs.max())


def measure(model: Classifier, items, views: int) -> dict:
    predictions = []
    with progress_bar(len(items), "classifying views") as advance:
        for _, photos, *_ in items:
            predictions.append(model.predict([load_for_model(p, model.input_size) for p in photos]))
            advance()
    labels = np.array([item[0] for item in items])
    out = {}
    for k in range(1, views + 1):
        single = [(p.index, p.confidence) for preds in predictions for p in preds[:k]]
        single_labels = np.repeat(labels, k)
        best = [max(preds[:k], key=lambda p: p.confidence) for preds in predictions]
        fused = [fuse(preds[:k], ood_threshold=None, names=model.names) for preds in predictions]
        product = [_product(preds[:k]) for preds in predictions]
        rows = {
            "one view": (np.array([i for i, _ in single]), np.array([c for _, c in single]), single_labels),
            "most confident view": (np.array([p.index for p in best]), np.array([p.confidence for p in best]), labels),
            "fused": (np.array([f.index for f in fused]), np.array([f.confidence for f in fused]), labels),
            "sum of log-probabilities": (np.array([i for i, _ in product]), np.array([c for _, c in product]), labels),
        }
        out[str(k)] = {
            name: {
                "error": round(float((index != truth).mean()), 4),
                "ece": round(expected_calibration_error(conf, (index == truth).astype(float)), 4),
                "to_review": round(float((conf < MIN_CONFIDENCE).mean()), 4),
                "routed_error": round(float((index != truth)[conf >= MIN_CONFIDENCE].mean()), 4)
                if (conf >= MIN_CONFIDENCE).any()
                else None,
            }
            for name, (index, conf, truth) in rows.items()
        }
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(int(k) for k in result["by_cameras"])
    rows = result["by_cameras"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"one view": "o--", "most confident view": "s-", "fused": "D-", "sum of log-probabilities": "x:"}
    for name, style in styles.items():
        left.plot(ks, [100 * rows[str(k)][name]["error"] for k in ks], style, label=name)
        right.plot(ks, [100 * (rows[str(k)][name]["routed_error"] or 0) for k in ks], style, label=name)
    if result.get("original_photo_error") is not None:
        left.axhline(100 * result["original_photo_error"], color="grey", lw=0.8, label="the original photo, alone")
    left.set_title("error of the decision", fontsize=10)
    right.set_title(
        f"error of the items routed (confidence >= {result['min_confidence']}); the rest: review", fontsize=10
    )
    for ax in (left, right):
        ax.set_xlabel("cameras per item")
        ax.set_ylabel("%")
        ax.set_xticks(ks)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(f"{result['kind']}: {result['items']} items, {result['image_size']} px, {result['machine']['cpu']}",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=("real", "synthetic"))
    ap.add_argument("data", type=Path, nargs="?", help="real: a tree with train/ and test/")
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--items-per-class", type=int, default=40)
    ap.add_argument("--image-size", type=int, default=None, help="default: 96 synthetic, 64 real")
    ap.add_argument("--checkpoint", type=Path, help="score this model instead of training one")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    configure_logging("warning")
    size = args.image_size or (96 if args.kind == "synthetic" else 64)
    work = Path(tempfile.mkdtemp(prefix="sorter-fusion-"))
    checkpoint, seconds = args.checkpoint, None
    if checkpoint is None:
        tree = args.data
        if args.kind == "synthetic":
            tree = work / "synth"
            with progress_bar(10 * 80, "rendering training photos") as advance:
                write_dataset(tree / "train", 10, 80, seed=args.seed, progress=advance, hard=True)
        checkpoint = work / "model.pt"
        started = time.perf_counter()
        train(tree, checkpoint, TrainConfig(backbone="mobilenet_v2", image_size=size, seed=args.seed))
        seconds = round(time.perf_counter() - started, 1)
    model = Classifier(checkpoint, device="cpu")
    if args.kind == "synthetic":
        items = synthetic_items(args.views, args.items_per_class, args.seed + 1000, list(model.info.classes))
    else:
        items = real_items(args.data, args.views, args.items_per_class, args.seed, list(model.info.classes))
    result = {
        "kind": args.kind,
        "machine": machine(),
        "image_size": model.input_size,
        "items": len(items),
        "views": args.views,
        "min_confidence": MIN_CONFIDENCE,
        "train_seconds": seconds,
        "precision": model.precision,
        "by_cameras": measure(model, items, args.views),
        "original_photo_error": clean_error(model, items) if args.kind == "real" else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    for k, rows in result["by_cameras"].items():
        print(f"{k} camera(s): " + "; ".join(
            f"{name} error {100 * r['error']:.1f}% ECE {r['ece']:.3f} review {100 * r['to_review']:.0f}%"
            for name, r in rows.items()))  # fmt: skip


if __name__ == "__main__":
    main()
