"""The embedded default: everything a newcomer needs to see sorter work, made locally, no set-up.

Today it covers the vision core: a synthetic product catalog, a model trained on it (cached), an
evaluation on photos it never saw, and an attention map. The streaming worker plugs in here next.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from sorter.data.synth import write_dataset
from sorter.logs import get_logger
from sorter.paths import cache_dir
from sorter.progress import progress_bar

log = get_logger("sorter.demo")

DEMO_CLASSES = 10
DEMO_SIZE = (320, 240)
#: Bump when the demo recipe changes, so a stale cached model is retrained rather than reused.
DEMO_RECIPE = "v1-mobilenet_v2-128px-10cls"


@dataclass(frozen=True)
class DemoFiles:
    root: Path
    data: Path
    test: Path
    checkpoint: Path


def demo_files(root: Path | None = None) -> DemoFiles:
    root = (root or cache_dir() / "demo") / DEMO_RECIPE
    return DemoFiles(root, root / "data", root / "test", root / "model.pt")


def ensure_demo_model(root: Path | None = None, *, device: str = "auto") -> DemoFiles:
    """Train the demo model on synthetic products unless a cached one exists (about a minute on 2 cores)."""
    from sorter.train.trainer import TrainConfig, train

    files = demo_files(root)
    if files.checkpoint.is_file():
        log.info("demo.model_cached", checkpoint=str(files.checkpoint))
        return files
    shutil.rmtree(files.root, ignore_errors=True)
    per_class = {"train": 40, "val": 10, "test": 15}
    with progress_bar(DEMO_CLASSES * sum(per_class.values()), "rendering demo photos") as advance:
        for seed, (split, n) in enumerate(per_class.items()):
            folder = files.test if split == "test" else files.data / split
            write_dataset(folder, DEMO_CLASSES, n, seed=100 + seed, size=DEMO_SIZE, progress=advance)
    shutil.copy(files.data / "train" / "skus.json", files.data / "skus.json")
    config = TrainConfig(backbone="mobilenet_v2", epochs=6, image_size=128, device=device, model_version="demo-1")
    train(files.data, files.checkpoint, config)
    return files
