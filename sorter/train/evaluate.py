"""Run a classifier over a dataset and score it (shared by validation during training and `sorter evaluate`).

`sorter evaluate` scores only photos the model has not seen: a checkpoint lists (by content digest) every
photo that trained it, picked its epoch or fitted its temperature, and those are skipped unless asked
for. So `sorter evaluate DATA` after `sorter train DATA` scores exactly the held-out test split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from sorter.data.folder import DecodedImages, Sample, images_under, photo_digest, scan
from sorter.errors import DatasetError
from sorter.model.checkpoint import ModelMeta
from sorter.model.classifier import AttentionClassifier
from sorter.model.ood import SCORES, OodMeta, at_threshold, auroc, ood_scores
from sorter.model.preprocess import Normalizer
from sorter.model.runtime import Runtime
from sorter.model.serving import load_for_serving
from sorter.progress import progress_bar
from sorter.train.metrics import Evaluation, evaluate_predictions


@torch.inference_mode()
def predict_logits(
    model: AttentionClassifier, loader: DataLoader, runtime: Runtime, normalizer: Normalizer
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits ``(n, classes)`` (divided by the model's temperature) and true labels ``(n,)``."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for images, targets in loader:
        with runtime.autocast():
            out = model(normalizer(images, nhwc=False))
        logits.append(out.float().cpu())
        labels.append(targets)
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


@torch.inference_mode()
def gate_spread(
    model: AttentionClassifier, loader: DataLoader, runtime: Runtime, normalizer: Normalizer
) -> dict[str, float]:
    """How much the attention gate separates places within a photo: the mean over photos of its span
    (max - min of A over the photo) and of its standard deviation; 0 for a model without the head."""
    if model.attention is None:
        return {"gate_span": 0.0, "gate_std": 0.0}
    was_training = model.training
    model.eval()
    spans, stds = [], []
    for images, _ in loader:
        with runtime.autocast():
            _, a = model.forward_with_attention(normalizer(images, nhwc=False))
        a = a.float().flatten(1)
        spans.append(a.max(dim=1).values - a.min(dim=1).values)
        stds.append(a.std(dim=1) if a.shape[1] > 1 else torch.zeros(a.shape[0]))
    model.train(was_training)
    return {"gate_span": float(torch.cat(spans).mean()), "gate_std": float(torch.cat(stds).mean())}


def predict(
    model: AttentionClassifier, loader: DataLoader, runtime: Runtime, normalizer: Normalizer
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities ``(n, classes)`` and true labels ``(n,)``."""
    logits, labels = predict_logits(model, loader, runtime, normalizer)
    return torch.softmax(logits, dim=1).numpy(), labels.numpy()


def evaluation_root(data_dir: Path) -> Path:
    """``DATA/test`` when the tree has one, else the folder itself (never ``DATA/val``: it tuned the model)."""
    if (data_dir / "test").is_dir():
        return data_dir / "test"
    if (data_dir / "train").is_dir():
        raise DatasetError(
            f"{data_dir} has train/ but no test/: nothing in it is held out. Score a folder of photos the model "
            f"never saw (e.g. {data_dir}/test/<label>/*), or {data_dir}/val with --include-seen (optimistic)"
        )
    return data_dir


@dataclass
class FolderScore:
    evaluation: Evaluation
    classes: list[str]
    root: Path
    probs: np.ndarray
    labels: np.ndarray
    skipped_seen: int  # photos left out because they trained or tuned the model
    precision: str = "fp32"  # what scored them: the worker's choice on this machine (int8, fp32, bf16, ...)
    unknown: dict | None = None  # with --unknown: how the checkpoint's unknown-product score separates them


def evaluate_folder(
    data_dir: Path,
    checkpoint: Path,
    *,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 64,
    include_seen: bool = False,
    unknown: Path | None = None,
) -> FolderScore:
    """``unknown``: a folder of photos of products the model was not trained on (any layout): reports how
    well the unknown-product score separates them from the known test photos (README, "Unknown products")."""
    served = load_for_serving(checkpoint, device=device, precision=precision)  # as the worker serves it
    meta = served.meta
    root = evaluation_root(data_dir)
    classes, samples, skipped = unseen_samples(root, meta, include_seen)
    others = unknown_photos(unknown, meta, samples) if unknown is not None else []
    loader = decoded_loader(samples, meta.image_size, batch_size, f"decoding {root.name}")
    logits, labels = predict_logits(served.model, loader, served.runtime, served.normalizer)
    probs = torch.softmax(logits, dim=1).numpy()
    evaluation = evaluate_predictions(probs, labels.numpy(), classes)
    separation = None
    if unknown is not None:
        other = decoded_loader(others, meta.image_size, batch_size, f"decoding {unknown.name}")
        unknown_logits, _ = predict_logits(served.model, other, served.runtime, served.normalizer)
        separation = unknown_separation(logits, unknown_logits, meta.ood)
    return FolderScore(evaluation, classes, root, probs, labels.numpy(), skipped, served.precision, separation)


def unknown_photos(folder: Path, meta: ModelMeta, known: list[Sample]) -> list[Sample]:
    """The photos under ``folder``, refused (before anything is scored) if there are none, or if any of
    them trained or tuned the model or is among the known photos being scored: not unknown products."""
    photos = images_under(folder)
    if not photos:
        raise DatasetError(f"--unknown {folder}: no photos in it")
    digests = {photo_digest(p): p for p in photos}
    seen = digests.keys() & set(meta.seen)
    scored = digests.keys() & {photo_digest(s.path) for s in known}
    if seen or scored:
        example = digests[next(iter(seen or scored))]
        raise DatasetError(
            f"--unknown {folder}: {len(seen)} of its photos trained or tuned this model and {len(scored)} are "
            f"among the known photos scored (e.g. {example}): give it photos of products the model was not "
            "trained on"
        )
    return [Sample(p, 0) for p in photos]


def unknown_separation(known: torch.Tensor, unknown: torch.Tensor, fitted: OodMeta | None) -> dict:
    """AUROC of every score, and what the checkpoint's threshold (if it has one) does to both sets."""
    out: dict = {"known_photos": len(known), "unknown_photos": len(unknown)}
    out["auroc"] = {s: round(auroc(ood_scores(known, s).numpy(), ood_scores(unknown, s).numpy()), 4) for s in SCORES}
    if fitted is not None:
        shares = at_threshold(
            ood_scores(known, fitted.score).numpy(), ood_scores(unknown, fitted.score).numpy(), fitted.threshold
        )
        out["fitted"] = fitted.model_dump() | {name: round(v, 4) for name, v in shares.items()}
    return out


def unseen_samples(root: Path, meta: ModelMeta, include_seen: bool = False) -> tuple[list[str], list[Sample], int]:
    """The classes and photos under ``root`` that ``meta``'s model never trained or tuned on (all of
    them with ``include_seen``), and how many were left out."""
    classes, samples = scan(root, meta.classes)
    if not meta.seen or include_seen:
        return classes, samples, 0
    seen = set(meta.seen)
    unseen = [s for s in samples if photo_digest(s.path) not in seen]
    if not unseen:
        raise DatasetError(
            f"all {len(samples)} photos in {root} trained or tuned this model (its train, validation or "
            "calibration split): scoring them would overstate its accuracy. Score photos it never saw, or "
            "pass --include-seen to score them anyway"
        )
    return classes, unseen, len(samples) - len(unseen)


def decoded_loader(samples: list[Sample], size: int, batch_size: int, label: str) -> DataLoader:
    with progress_bar(len(samples), label) as advance:
        dataset = DecodedImages(samples, size, progress=advance)
    return DataLoader(dataset, batch_size=batch_size)
