"""What every stage shares: the settings, the photos, the checkpoint."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sorter.progress import make_progress

STATIONS = ("s1", "s2", "s3")


@dataclass
class BenchConfig:
    backbone: str = "resnet18"
    image_size: int = 224
    frames: int = 600
    checkpoint: Path | None = None
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    overlap: bool = True
    delivery: str = "at-least-once"
    batch_sizes: tuple[int, ...] = (8, 16, 32)
    max_wait_ms: int | None = None  # the worker's batch.max_wait_ms; None: the setting's default
    latency_budget_ms: int = 0  # the worker's batch.latency_budget_ms (0: off, the default)
    naive_frames: int = 100  # also the Quix Streams application's
    quix_python: Path | None = None  # interpreter of a venv with the bench-quix extra: stage 5 runs when set
    paced_seconds: float = 20.0
    paced_fraction: float = 0.7
    decode_threads: int | None = None
    bootstrap: str | None = None
    redis_url: str | None = None
    pool: int = 48  # distinct photos, cycled
    shadow_checkpoint: Path | None = None  # a candidate model beside the live one (shadow.py): what shadowing costs
    out: Path | None = None


@dataclass
class Frames:
    photos: list[bytes]

    def item(self, i: int) -> bytes:
        return self.photos[i % len(self.photos)]


def make_frames(n_distinct: int, seed: int = 7) -> Frames:
    from sorter.data.synth import catalog, render

    designs = catalog(10)
    rng = np.random.default_rng(seed)
    photos = []
    with make_progress(transient=True) as bar:
        task = bar.add_task("rendering 640x480 photos", total=n_distinct, info="")
        for i in range(n_distinct):
            photos.append(render(designs[i % len(designs)], rng, size=(640, 480)))
            bar.advance(task)
    return Frames(photos)


def make_checkpoint(cfg: BenchConfig, folder: Path, frames: Frames | None = None) -> Path:
    """The bench's model: ``cfg.checkpoint``, or an untrained one of ``cfg.backbone`` (speed does not depend
    on the weights). With precision int8 it gets an int8 copy calibrated on ``frames``' photos (an untrained
    model has no accuracy to check: ``sorter quantize`` does that for real models)."""
    if cfg.checkpoint is not None:
        return cfg.checkpoint
    from sorter.data.synth import catalog
    from sorter.model.backbones import IMAGENET_MEAN, IMAGENET_STD
    from sorter.model.checkpoint import ModelMeta, save_checkpoint
    from sorter.model.classifier import build_classifier

    designs = catalog(10)
    model, _ = build_classifier(cfg.backbone, len(designs), pretrained=False)
    meta = ModelMeta(
        backbone=cfg.backbone,
        classes=[d.label for d in designs],
        skus=[d.sku for d in designs],
        image_size=cfg.image_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        model_version=f"bench-{cfg.backbone}-{cfg.image_size}",
    )
    path = folder / "bench.pt"
    blob, report = None, None
    if cfg.precision == "int8" and frames is not None:
        import torch

        from sorter.model import int8
        from sorter.model.preprocess import Normalizer, load_for_model

        normalizer = Normalizer(meta.mean, meta.std, torch.device("cpu"))
        pixels = torch.from_numpy(np.stack([load_for_model(p, cfg.image_size) for p in frames.photos]))
        blob = int8.quantize(model, [normalizer(pixels)], cfg.image_size)
        report = {"calibration_photos": len(frames.photos), "bench": True}
    save_checkpoint(path, model, meta, int8=blob, int8_report=report)
    return path


def decode_threads_for(cfg: BenchConfig) -> int:
    return cfg.decode_threads or max(1, min(8, os.cpu_count() or 1))
