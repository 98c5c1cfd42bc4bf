"""The model behind the worker: decoded photos in, (label, SKU, confidence) out, batched.

The inference context is chosen once: ``eval()``, ``inference_mode``, autocast (on CPUs with native bf16,
bf16 where it measures faster than fp32 for this model, at start-up; bf16/fp16 on CUDA), channels_last;
on a CPU, the checkpoint's int8 model (OpenVINO, ``sorter quantize``) where asked for or measured faster;
uint8 batches are copied (pinned, non-blocking on CUDA) and normalised on the device. Preprocessing comes
from the checkpoint's metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sorter.logs import get_logger
from sorter.model import int8
from sorter.model.checkpoint import Checkpoint, ModelMeta
from sorter.model.ood import ood_scores
from sorter.model.serving import load_for_serving

log = get_logger("sorter.model")


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    sku: str
    confidence: float
    ood_score: float | None = None  # unknown-product score (model/ood.py); None: the checkpoint has no threshold
    unknown: bool = False  # ood_score above the checkpoint's threshold: a product the model was not trained on
    log_probs: tuple[float, ...] | None = None  # per class (the served, calibrated logits): multi-camera fusion


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two up to ``max_batch`` (and ``max_batch`` itself): the shapes a compiled model sees."""
    sizes, n = [], 1
    while n < max_batch:
        sizes.append(n)
        n *= 2
    return [*sizes, max_batch]


class Classifier:
    """``compile``: ``torch.compile`` (Inductor, weights frozen into the graph), with batches padded to a
    power of two so that a handful of shapes are compiled once, at start-up, not while items wait."""

    def __init__(
        self,
        checkpoint: Path,
        *,
        device: str = "auto",
        precision: str = "auto",
        compile: bool = False,
        max_batch: int = 32,
        read: Checkpoint | None = None,
    ) -> None:
        served = load_for_serving(checkpoint, device=device, precision=precision, read=read)
        self.model, self.meta, self.runtime = served.model, served.meta, served.runtime
        self.precision, self.precision_probe, self.normalizer = served.precision, served.probe, served.normalizer
        if self.precision_probe:
            log.info(
                "model.precision_chosen",
                precision=self.precision,
                images_per_s={k: round(v, 1) for k, v in self.precision_probe.items()},
                int8_flags=int8.cpu_int8_flags() if "int8" in self.precision_probe else None,
            )
        self._pin = self.runtime.device.type == "cuda"
        self.buckets: list[int] | None = None
        self.compile_s = 0.0
        if compile and not served.quantised:  # OpenVINO compiled the int8 model already
            self._compile(max_batch)

    def _compile(self, max_batch: int) -> None:
        import time

        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # constant-fold the weights: prepacked convolutions on CPU
        # Dynamo's limit on compiled variants counts per code object, across model instances: a second
        # model in one process (a benchmark, a test) would silently fall back to eager without headroom.
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        started = time.perf_counter()
        self.model = torch.compile(self.model, dynamic=False)
        self.buckets = batch_buckets(max_batch)
        blank = np.zeros((self.input_size, self.input_size, 3), np.uint8)
        for n in self.buckets:  # compile every shape now
            self.predict([blank] * n)
        self.compile_s = time.perf_counter() - started

    @property
    def input_size(self) -> int:
        return self.meta.image_size

    @property
    def model_version(self) -> str:
        return self.meta.model_version

    @property
    def info(self) -> ModelMeta:
        return self.meta

    @property
    def ood_threshold(self) -> float | None:
        return self.meta.ood.threshold if self.meta.ood else None

    def names(self, index: int) -> tuple[str, str]:
        """Class index -> (label, SKU)."""
        return self.meta.classes[index], self.meta.skus[index]

    @torch.inference_mode()
    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """``images``: RGB uint8 arrays already resized to ``input_size`` (see ``preprocess.load_for_model``)."""
        if not images:
            return []
        n = len(images)
        if self.buckets is not None:
            size = next((b for b in self.buckets if b >= n), None)
            if size is None:  # larger than compiled for: run in compiled-size chunks
                step = self.buckets[-1]
                return [p for i in range(0, n, step) for p in self.predict(images[i : i + step])]
            images = list(images) + [images[0]] * (size - n)
        batch = torch.from_numpy(np.stack(images))
        if self._pin:
            batch = batch.pin_memory()
        with self.runtime.autocast():
            logits = self.model(self.normalizer(batch))
        log_probs = torch.log_softmax(logits[:n].float(), dim=1)
        confidence, index = log_probs.exp().max(dim=1)
        ood = self.meta.ood
        scores = ood_scores(logits[:n], ood.score).tolist() if ood else [None] * n
        return [
            Prediction(i, self.meta.classes[i], self.meta.skus[i], c, s, s is not None and s > ood.threshold, tuple(lp))
            for i, c, s, lp in zip(index.tolist(), confidence.tolist(), scores, log_probs.tolist(), strict=True)
        ]
