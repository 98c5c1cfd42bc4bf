"""Fashion-MNIST (Zalando product photos) as ImageFolder trees, for the real-photo benchmarks.

The idx files come from Debian's ``dataset-fashion-mnist`` (``apt-get install -y dataset-fashion-mnist``;
``dpkg -L dataset-fashion-mnist`` lists them; the default folder below is where it puts them).

    python benchmarks/fashion_mnist.py OUT --per-class 500 --test 2000    # the small protocol
    python benchmarks/fashion_mnist.py OUT                                 # the full 60k / 10k protocol

writes ``OUT/train/<label>/*.png`` (the first ``per-class`` training photos of each class, in file
order) and ``OUT/test/<label>/*.png`` (the first ``test`` test photos); ``sorter train OUT`` then
carves its validation and calibration splits out of ``train/`` and never sees ``test/``.
"""

from __future__ import annotations

import argparse
import gzip
import struct
from pathlib import Path

import cv2
import numpy as np

SOURCE = Path("/usr/share/datasets/fashion-mnist")
LABELS = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    _, kind, dims = struct.unpack(">HBB", data[:4])
    if kind != 0x08:
        raise ValueError(f"{path}: not an idx file of unsigned bytes")
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(split: str, source: Path = SOURCE) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(source / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz")
    return images, labels


def write_tree(out: Path, images: np.ndarray, labels: np.ndarray, per_class: int | None, total: int | None) -> int:
    counts = {i: 0 for i in range(len(LABELS))}
    written = 0
    for n, (image, label) in enumerate(zip(images, labels, strict=True)):
        if total is not None and written >= total:
            break
        label = int(label)
        if per_class is not None and counts[label] >= per_class:
            continue
        folder = out / LABELS[label]
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{n:05d}.png"), image)
        counts[label] += 1
        written += 1
    return written


def make(out: Path, per_class: int | None = None, test: int | None = None, source: Path = SOURCE) -> dict[str, int]:
    if not (source / "train-images-idx3-ubyte.gz").is_file():
        raise SystemExit(f"no Fashion-MNIST idx files in {source}: apt-get install -y dataset-fashion-mnist")
    x, y = load("train", source)
    xt, yt = load("test", source)
    return {
        "train": write_tree(out / "train", x, y, per_class, None),
        "test": write_tree(out / "test", xt, yt, None, test),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-class", type=int, default=None, help="training photos per class (default: all 6,000)")
    ap.add_argument("--test", type=int, default=None, help="test photos (default: all 10,000)")
    ap.add_argument("--source", type=Path, default=SOURCE)
    args = ap.parse_args()
    counts = make(args.out, args.per_class, args.test, args.source)
    print(f"{args.out}: {counts['train']} training and {counts['test']} test photos")


if __name__ == "__main__":
    main()
