"""Inference throughput of the serving path (``sorter.stream.inference.Classifier``) on this machine.

Random weights (speed does not depend on them), the real checkpoint loading, uint8 batches, device-side
normalisation, autocast and channels_last as the worker uses them. Prints one JSON object last.

    .venv/bin/python benchmarks/infer_throughput.py [--device cuda] [--batches 1 16 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sorter.model.backbones import IMAGENET_MEAN, IMAGENET_STD
from sorter.model.checkpoint import ModelMeta, save_checkpoint
from sorter.model.classifier import build_classifier
from sorter.stream.inference import Classifier


def measure(classifier: Classifier, batch: int, repeats: int) -> float:
    size = classifier.input_size
    images = [np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8) for i in range(batch)]
    for _ in range(3):
        classifier.predict(images)
    times = []
    for _ in range(repeats):
        if classifier.runtime.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        classifier.predict(images)  # returns Python floats: includes the device->host sync
        times.append(time.perf_counter() - started)
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backbones", nargs="*", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 16, 64])
    parser.add_argument("--precisions", nargs="*", default=["fp32", "auto"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in args.backbones:
            model, _ = build_classifier(backbone, 10, pretrained=False)
            ckpt = Path(tmp) / f"{backbone}.pt"
            meta = ModelMeta(
                backbone=backbone,
                classes=[f"c{i}" for i in range(10)],
                skus=[f"s{i}" for i in range(10)],
                image_size=args.image_size,
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                model_version="bench",
            )
            save_checkpoint(ckpt, model, meta)
            for precision in args.precisions:
                classifier = Classifier(ckpt, device=args.device, precision=precision)
                for batch in args.batches:
                    fps = measure(classifier, batch, args.repeats)
                    row = {
                        "backbone": backbone,
                        "precision": classifier.runtime.precision,
                        "channels_last": classifier.runtime.channels_last,
                        "batch": batch,
                        "images_per_s": round(fps, 1),
                    }
                    rows.append(row)
                    print(row, flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    print(
        json.dumps(
            {
                "device": device,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "image_size": args.image_size,
                "results": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
