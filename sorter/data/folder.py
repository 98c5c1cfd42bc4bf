"""ImageFolder trees of product photos: discovery, splits, SKU mapping, fingerprint, decoded tensors.

Layout accepted (any image size, RGB or grayscale; grayscale becomes 3 channels)::

    DATA/<label>/*.jpg                  -> stratified train / validation / calibration / test splits
    DATA/train/<label>/* [DATA/val/<label>/*] [DATA/test/<label>/*]   -> used as given
    DATA/skus.json (optional)           -> {"<label>": "<sku id>"}; a label without one is its own SKU

Four splits, each with one job, none used for another's: ``train`` learns; ``val`` picks the epoch (early
stopping); ``calib`` fits the temperature (a calibration fitted on the data that picked the epoch is
optimistic); ``test`` is held out and only scored. A flat tree gives ``test_fraction`` of every class to
test and ``val_fraction`` to validation + calibration (half each); ``DATA/test`` is used as the test split
when present (``DATA/val``, when present, is split into validation and calibration).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from sorter.errors import DatasetError, FrameDecodeError
from sorter.model.preprocess import load_for_model

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass(frozen=True)
class Splits:
    classes: list[str]
    train: list[Sample]
    val: list[Sample]  # early stopping
    calib: list[Sample]  # temperature
    test: list[Sample]  # held out: scored, never tuned on
    root: Path

    @property
    def seen(self) -> list[Sample]:
        """Every photo that shaped the model (trained, picked the epoch or fitted the temperature)."""
        return self.train + self.val + self.calib


def _label_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def images_under(folder: Path) -> list[Path]:
    """Every photo under ``folder``, in any layout (no labels), following linked folders."""
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder")
    found = (Path(d) / f for d, _, files in os.walk(folder, followlinks=True) for f in files)
    return sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES)


def scan(root: Path, classes: Sequence[str] | None = None) -> tuple[list[str], list[Sample]]:
    """Classes (sorted folder names, or the given list) and their samples under ``root``."""
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder of class sub-folders")
    found = {d.name: _images(d) for d in _label_dirs(root)}
    found = {k: v for k, v in found.items() if v}
    if classes is None:
        classes = sorted(found)
        if len(classes) < 2:
            raise DatasetError(
                f"{root} needs at least 2 class folders with images (found {len(classes)}); "
                f"the layout is {root}/<label>/<image files>"
            )
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DatasetError(f"{root} has folders for labels the model does not know: {unknown}")
    index = {c: i for i, c in enumerate(classes)}
    samples = [Sample(p, index[c]) for c in classes for p in found.get(c, [])]
    return list(classes), samples


def stratified_split(samples: Sequence[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        by_class[s.label].append(s)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        items = by_class[label][:]
        rng.shuffle(items)
        n_val = max(1, round(len(items) * val_fraction)) if len(items) > 1 else 0
        val += items[:n_val]
        train += items[n_val:]
    return train, val


MIN_PER_CLASS_FOR_TEST = 10  # fewer photos in a class: nothing held out (train says there is no test split)


def load_splits(root: Path, val_fraction: float = 0.2, seed: int = 0, test_fraction: float = 0.1) -> Splits:
    if (root / "train").is_dir():
        classes, pool = scan(root / "train")
        test = scan(root / "test", classes)[1] if (root / "test").is_dir() else []
        if (root / "val").is_dir():
            tuning = scan(root / "val", classes)[1]
            train = pool
        else:
            train, tuning = stratified_split(pool, val_fraction, seed)
    else:
        classes, samples = scan(root)
        smallest = min(sum(s.label == i for s in samples) for i in range(len(classes)))
        hold = test_fraction > 0 and smallest >= MIN_PER_CLASS_FOR_TEST
        rest, test = stratified_split(samples, test_fraction, seed + 1) if hold else (samples, [])
        train, tuning = stratified_split(rest, val_fraction, seed)
    if not tuning:
        raise DatasetError(f"{root}: no validation images (each class needs at least 2 images)")
    val, calib = stratified_split(tuning, 0.5, seed + 2)  # half to early stopping, half to the temperature
    return Splits(classes, train, val, calib, test, root)


def read_skus(root: Path, classes: Sequence[str]) -> list[str]:
    path = root / "skus.json"
    if not path.is_file():
        return list(classes)
    try:
        mapping = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise DatasetError(f'{path} must map each label to a SKU id string: {{"label": "SKU-1"}}')
    return [mapping.get(c, c) for c in classes]


def photo_digest(path: Path) -> str:
    """A photo's identity by content (not name): the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def fingerprint(root: Path, samples: Sequence[Sample]) -> str:
    """SHA-256 over every sample's relative path, label and content: which data made this model."""
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: str(s.path)):
        h.update(f"{s.path.relative_to(root)}|{s.label}|{photo_digest(s.path)}|".encode())
    return h.hexdigest()


class DecodedImages(Dataset):
    """Samples decoded once to ``uint8`` ``(3, size, size)`` tensors, kept in memory when they fit.

    Small product datasets fit easily (1,000 photos at 224 px are 150 MB), and decoding once instead
    of every epoch is what makes CPU training bearable. Larger sets decode on the fly.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        size: int,
        *,
        transform: Callable | None = None,
        max_cache_bytes: int = 4 << 30,
        progress: Callable[[], None] | None = None,
    ) -> None:
        self.samples = list(samples)
        self.size = size
        self.transform = transform
        self.labels = torch.tensor([s.label for s in self.samples], dtype=torch.long)
        self.cache: torch.Tensor | None = None
        if len(self.samples) * 3 * size * size <= max_cache_bytes:
            self.cache = torch.empty((len(self.samples), 3, size, size), dtype=torch.uint8)
            for i, s in enumerate(self.samples):
                self.cache[i] = self._decode(s)
                if progress is not None:
                    progress()

    def _decode(self, sample: Sample) -> torch.Tensor:
        try:
            rgb = load_for_model(sample.path.read_bytes(), self.size)
        except FrameDecodeError as exc:
            raise DatasetError(f"{sample.path}: {exc}") from exc
        return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.cache[i] if self.cache is not None else self._decode(self.samples[i])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])
