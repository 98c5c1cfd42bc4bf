"""The model behind the worker: decoded photos in, (label, SKU, confidence) out, batched.

The inference context is chosen once: ``eval()``, ``inference_mode``, autocast (bf16 on CPUs with
native bf16, bf16/fp16 on CUDA), channels_last; uint8 batches are copied (pinned, non-blocking on CUDA)
and normalised on the device. Preprocessing comes from the checkpoint's metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sorter.model.checkpoint import ModelMeta, load_checkpoint
from sorter.model.preprocess import Normalizer
from sorter.model.runtime import make_runtime


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    sku: str
    confidence: float


class Classifier:
    def __init__(self, checkpoint: Path, *, device: str = "auto", precision: str = "auto") -> None:
        self.runtime = make_runtime(device, precision)
        self.model, self.meta = load_checkpoint(checkpoint, self.runtime.device)
        if self.runtime.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.normalizer = Normalizer(
            self.meta.mean, self.meta.std, self.runtime.device, channels_last=self.runtime.channels_last
        )
        self._pin = self.runtime.device.type == "cuda"

    @property
    def input_size(self) -> int:
        return self.meta.image_size

    @property
    def model_version(self) -> str:
        return self.meta.model_version

    @property
    def info(self) -> ModelMeta:
        return self.meta

    @torch.inference_mode()
    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """``images``: RGB uint8 arrays already resized to ``input_size`` (see ``preprocess.load_for_model``)."""
        if not images:
            return []
        batch = torch.from_numpy(np.stack(images))
        if self._pin:
            batch = batch.pin_memory()
        with self.runtime.autocast():
            logits = self.model(self.normalizer(batch))
        probs = torch.softmax(logits.float(), dim=1)
        confidence, index = probs.max(dim=1)
        return [
            Prediction(i, self.meta.classes[i], self.meta.skus[i], c)
            for i, c in zip(index.tolist(), confidence.tolist(), strict=True)
        ]
