"""Run a classifier over a dataset and score it (shared by validation during training and `sorter evaluate`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from sorter.data.folder import DecodedImages, scan
from sorter.model.checkpoint import load_checkpoint
from sorter.model.classifier import AttentionClassifier
from sorter.model.preprocess import Normalizer
from sorter.model.runtime import Runtime, make_runtime
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


def predict(
    model: AttentionClassifier, loader: DataLoader, runtime: Runtime, normalizer: Normalizer
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities ``(n, classes)`` and true labels ``(n,)``."""
    logits, labels = predict_logits(model, loader, runtime, normalizer)
    return torch.softmax(logits, dim=1).numpy(), labels.numpy()


def evaluation_root(data_dir: Path) -> Path:
    """A held-out split when the tree has one (``test/``, then ``val/``), else the whole folder."""
    for name in ("test", "val"):
        if (data_dir / name).is_dir():
            return data_dir / name
    return data_dir


def evaluate_folder(
    data_dir: Path, checkpoint: Path, *, device: str = "auto", precision: str = "auto", batch_size: int = 64
) -> tuple[Evaluation, list[str], Path]:
    runtime = make_runtime(device, precision)
    model, meta = load_checkpoint(checkpoint, runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    root = evaluation_root(data_dir)
    classes, samples = scan(root, meta.classes)
    with progress_bar(len(samples), f"decoding {root.name}") as advance:
        dataset = DecodedImages(samples, meta.image_size, progress=advance)
    loader = DataLoader(dataset, batch_size=batch_size)
    normalizer = Normalizer(meta.mean, meta.std, runtime.device, channels_last=runtime.channels_last)
    probs, labels = predict(model, loader, runtime, normalizer)
    return evaluate_predictions(probs, labels, classes), classes, root
