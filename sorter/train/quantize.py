"""``sorter quantize``: an int8 copy of a trained model, calibrated and checked on real photos.

1. Calibration: ``photos`` photos drawn (seeded) from the model's training data (``DATA/train``, else
   ``DATA``): the activations' ranges come from the photos the model knows, never from live traffic.
2. Quantisation: NNCF post-training quantisation of the model converted to OpenVINO
   (:func:`sorter.model.int8.quantize`).
3. Check: the fp32 (torch) and int8 models score the same held-out photos (``DATA/test``, the photos
   ``sorter evaluate`` would score); an accuracy drop above ``max_drop`` refuses to write anything.
4. The checkpoint is written again with the int8 model and this report inside (its int8 section).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from sorter.data.folder import scan
from sorter.errors import ConfigError, DatasetError
from sorter.logs import get_logger
from sorter.model import int8
from sorter.model.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from sorter.model.preprocess import Normalizer
from sorter.model.runtime import Runtime
from sorter.train.evaluate import decoded_loader, evaluation_root, predict, unseen_samples
from sorter.train.metrics import evaluate_predictions

log = get_logger("sorter.quantize")


@dataclass
class QuantizeConfig:
    photos: int = 300  # calibration photos
    max_drop: float = 0.005  # accuracy (fraction) the int8 model may lose on the held-out photos
    seed: int = 0
    include_seen: bool = False  # score photos that tuned the model too (optimistic; for a tree with no test/)


def quantize_checkpoint(checkpoint: Path, data_dir: Path, out: Path, cfg: QuantizeConfig | None = None) -> dict:
    """Write ``out``: ``checkpoint`` plus its int8 model; returns the report stored beside it."""
    cfg = cfg or QuantizeConfig()
    if cfg.photos < 1:
        raise ConfigError(f"--photos must be at least 1 (calibration photos), got {cfg.photos}")
    if not 0 <= cfg.max_drop <= 1:  # also refuses nan
        raise ConfigError(f"--max-drop must be between 0 and 100 accuracy points, got {100 * cfg.max_drop}")
    int8.require()
    int8.require_nncf()
    read = read_checkpoint(checkpoint)
    model, meta = load_checkpoint(checkpoint, "cpu", read)
    normalizer = Normalizer(meta.mean, meta.std, torch.device("cpu"))
    root = evaluation_root(data_dir)  # before the work: a tree with nothing held out stops here
    _, held_out, skipped = unseen_samples(root, meta, cfg.include_seen)
    calib_root = data_dir / "train" if (data_dir / "train").is_dir() else data_dir
    _, samples = scan(calib_root, meta.classes)
    overlap = False
    if calib_root == root:  # a flat tree: calibrate on photos the check does not score, where there are any
        scored = {s.path for s in held_out}
        rest = [s for s in samples if s.path not in scored]
        samples, overlap = (rest, False) if rest else (samples, True)
    if not samples:
        raise DatasetError(f"{calib_root} has no photos of this model's classes to calibrate on")
    samples = random.Random(cfg.seed).sample(samples, min(cfg.photos, len(samples)))
    calibration = decoded_loader(samples, meta.image_size, 32, f"decoding {len(samples)} calibration photos")
    log.info("quantize.calibrating", photos=len(samples), root=str(calib_root))
    blob = int8.quantize(model, (normalizer(images, nhwc=False) for images, _ in calibration), meta.image_size)

    loader = decoded_loader(held_out, meta.image_size, 64, f"decoding {root.name}")
    runtime = Runtime(torch.device("cpu"), "fp32")
    probs32, labels = predict(model, loader, runtime, normalizer)
    probs8, _ = predict(int8.Int8Model(blob), loader, runtime, normalizer)
    e32, e8 = (evaluate_predictions(p, labels, meta.classes) for p in (probs32, probs8))
    fp32_acc, int8_acc = e32.accuracy, e8.accuracy
    report = {
        "fp32_accuracy": round(fp32_acc, 4),
        "int8_accuracy": round(int8_acc, 4),
        "drop": round(fp32_acc - int8_acc, 4),
        "agreement": round(float((probs32.argmax(1) == probs8.argmax(1)).mean()), 4),
        # the temperature was fitted to the fp32 model: how far int8's confidences moved from it
        "fp32_ece": round(e32.ece, 4),
        "int8_ece": round(e8.ece, 4),
        "mean_confidence_change": round(float(probs8.max(1).mean() - probs32.max(1).mean()), 4),
        "max_confidence_change": round(float(abs(probs32.max(1) - probs8.max(1)).max()), 4),
        "scored_photos": len(held_out),
        "scored_root": str(root),
        "skipped_seen": skipped,
        "calibration_photos": len(samples),
        "calibration_overlaps_scored": overlap,  # a flat tree with nothing else: the check is optimistic
        "openvino": int8.require().__version__,
        "cpu_int8_flags": int8.cpu_int8_flags(),
    }
    log.info("quantize.scored", **report)
    if fp32_acc - int8_acc > cfg.max_drop + 1e-9:  # a drop exactly at the limit passes
        raise DatasetError(
            f"int8 loses {100 * (fp32_acc - int8_acc):.2f} accuracy points on {len(held_out)} photos of {root} "
            f"(fp32 {fp32_acc:.4f}, int8 {int8_acc:.4f}), more than --max-drop {100 * cfg.max_drop:.2f}: "
            f"nothing written. Calibrate on more photos (--photos) or serve fp32"
        )
    save_checkpoint(out, model, meta, int8=blob, int8_report=report)
    return report
