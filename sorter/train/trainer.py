"""Two-phase transfer learning.

Phase 1 ("head"): the pretrained backbone is frozen (weights *and* batch-norm statistics); only the
attention head and the linear classifier learn, at a higher learning rate.
Phase 2 ("fine-tune"): everything learns, the backbone at a lower rate than the head; batch-norm keeps
ImageNet's statistics (``bn="frozen"``), which is what stops phase 2 from collapsing on small batches.

Both phases: AdamW, cosine learning-rate schedule (with a short warm-up when fine-tuning), label
smoothing, a weight EMA, early stopping on validation accuracy, and the best epoch's weights kept. The
length follows the data (optimisation steps ~ sqrt(training photos)), not a fixed epoch count. Mixed precision
is chosen once (bf16 autocast on CPUs with native bf16, AMP on CUDA). Nothing here knows about the
synthetic generator: any ImageFolder tree trains the same way.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from sorter.data.folder import DecodedImages, Splits, fingerprint, load_splits, photo_digest, read_skus
from sorter.errors import ConfigError
from sorter.logs import get_logger
from sorter.model.backbones import IMAGENET_MEAN, IMAGENET_STD
from sorter.model.checkpoint import ModelMeta, save_checkpoint
from sorter.model.classifier import AttentionClassifier, build_classifier
from sorter.model.ood import SCORES, OodMeta, fit_threshold, ood_scores
from sorter.model.preprocess import Normalizer
from sorter.model.runtime import Runtime, make_runtime, settle_precision
from sorter.progress import make_progress, progress_bar
from sorter.train.augment import batch_mixer, train_transform
from sorter.train.calibrate import fit_temperature
from sorter.train.evaluate import gate_spread, predict, predict_logits
from sorter.train.metrics import Evaluation, evaluate_predictions
from sorter.train.plots import plot_training_curves

log = get_logger("sorter.train")


# The schedule follows the data, not a fixed epoch count: about 35 optimisation steps per square root of the
# training photos (4,000 photos, batch 32: 2,214 steps, 18 epochs; 48,000: 5 epochs; 70: the 300-step
# floor), 15% of them with the backbone frozen. 23 before batch mixing was on: mixing needs the longer run.
STEPS_PER_SQRT_PHOTO, MIN_STEPS, MAX_STEPS, HEAD_SHARE = 35, 300, 20_000, 0.15
# mix "auto": CutMix/MixUp (both) from this many optimisation steps on, none below: on a short run mixing
# only slows the fit (measured on Fashion-MNIST, 500/class: +0.6 points at 2,214 steps, none at 1,455)
MIX_MIN_STEPS = 1_000

# The defaults before issue #14 (what a newcomer got), kept for the benchmarks' comparisons.
OLD_RECIPE = {
    "augment": "belt",
    "bn": "train",
    "ema": 0.0,
    "lr_finetune": 1e-4,
    "pool": "mean",
    "epochs": 10,
    "head_epochs": 4,
    "mix": "none",
}


@dataclass
class TrainConfig:
    backbone: str = "resnet18"
    epochs: int | None = None  # default: from the dataset size (see STEPS_PER_SQRT_PHOTO)
    head_epochs: int | None = None  # phase 1 length; default 15% of the epochs (0 without pretraining)
    image_size: int = 224
    batch_size: int = 32
    lr_head: float = 1e-3
    lr_finetune: float = 3e-4  # backbone rate in phase 2; the head gets 3x
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    patience: int = 3
    val_fraction: float = 0.2  # of the photos left after the test split: half validation, half calibration
    test_fraction: float = 0.1  # held out from a flat tree (DATA/test, when present, is used instead)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    pretrained: bool = True
    weights: Path | None = None
    attention: bool = True
    num_workers: int = 0
    model_version: str | None = None
    # Measured on real product photos (README, "Model quality"): "light" beats "belt" (which underfits at
    # this size) and "none" (which overfits); ImageNet's batch-norm statistics kept while fine-tuning stop
    # phase 2 from collapsing (batches of 32 give noisy statistics); a weight average (EMA) steadies the end.
    augment: str = "light"
    # batch-norm statistics while fine-tuning: "frozen" (ImageNet's), "train" (adapt), or "auto": frozen when
    # starting from ImageNet weights, trained from random weights (there are no statistics to keep: frozen
    # at their initial values they leave a deep network unnormalised, and it stays at chance, measured)
    bn: str = "auto"
    ema: float = 0.995  # weight EMA decay per step (0: off)
    dropout: float = 0.2
    mix: str = "auto"  # batch mixing: auto (MIX_MIN_STEPS), none, cutmix, mixup or both (augment.batch_mixer)
    pool: str = "attention"  # A-weighted average: the gate redistributes weight (classifier.py); or "mean"
    ood_score: str = "energy"  # unknown-product score (model/ood.py), its threshold fitted on the calibration split
    ood_false_review: float = 0.02  # ... for this share of known products sent to review

    def __post_init__(self) -> None:
        from sorter.errors import ConfigError
        from sorter.model.ood import SCORES
        from sorter.train.augment import MIXES, PRESETS

        for name, value, allowed in (
            ("augment", self.augment, PRESETS),
            ("bn", self.bn, ("auto", "frozen", "train")),
            ("pool", self.pool, ("attention", "mean")),
            ("mix", self.mix, ("auto", *MIXES)),
            ("ood-score", self.ood_score, SCORES),
        ):
            if value not in allowed:
                raise ConfigError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
        if not 0 < self.ood_false_review < 1:
            raise ConfigError(f"--ood-false-review must be in (0, 1), got {self.ood_false_review}")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"--ema must be in [0, 1), got {self.ema}")
        if self.precision == "int8":
            raise ConfigError("--precision int8 is for serving: train in auto/fp32/bf16, then `sorter quantize`")
        for name, value in (("epochs", self.epochs), ("head-epochs", self.head_epochs)):
            if value is not None and value < (1 if name == "epochs" else 0):
                raise ConfigError(f"--{name} must be at least {1 if name == 'epochs' else 0}, got {value}")
        if self.image_size < 32 or self.batch_size < 1:
            raise ConfigError(
                f"--image-size must be >= 32 and --batch-size >= 1 (got {self.image_size}, {self.batch_size})"
            )

    @property
    def bn_frozen(self) -> bool:
        return self.bn == "frozen" or (self.bn == "auto" and self.pretrained)

    def resolved_mix(self, train_photos: int) -> str:
        """``mix``, with "auto" settled: both on a run of at least MIX_MIN_STEPS optimisation steps, else none."""
        if self.mix != "auto":
            return self.mix
        head, finetune = self.phase_epochs(train_photos)
        steps = (head + finetune) * steps_per_epoch(train_photos, self.batch_size)
        return "both" if steps >= MIX_MIN_STEPS else "none"

    def phase_epochs(self, train_photos: int = 0) -> tuple[int, int]:
        epochs = self.epochs if self.epochs is not None else auto_epochs(train_photos, self.batch_size)
        if epochs < 1:
            raise ConfigError("epochs must be at least 1")
        if not self.pretrained:
            head = 0  # a frozen random backbone teaches nothing: train everything from the start
        elif self.head_epochs is not None:
            head = min(self.head_epochs, epochs)
        else:
            head = max(1, round(epochs * HEAD_SHARE))
        return head, epochs - head


def _ema_with_warmup(decay: float):
    """EMA whose decay grows from 0 towards ``decay`` over the first steps, ``min(decay, (1 + n) / (10 + n))``:
    a short run (a few dozen steps) is then not an average dominated by the starting weights."""

    def avg(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        n = float(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        return averaged * d + current * (1 - d)

    return avg


def steps_per_epoch(train_photos: int, batch_size: int) -> int:
    """Optimisation steps in one epoch, as the training loader runs them (a last partial batch is
    dropped when there is more than one batch: a batch of one or two breaks batch-norm statistics)."""
    if train_photos > batch_size:
        return train_photos // batch_size
    return 1


def auto_epochs(train_photos: int, batch_size: int) -> int:
    steps = min(MAX_STEPS, max(MIN_STEPS, round(STEPS_PER_SQRT_PHOTO * math.sqrt(max(1, train_photos)))))
    return max(2, round(steps / steps_per_epoch(train_photos, batch_size)))


@dataclass
class TrainResult:
    checkpoint: Path
    meta: ModelMeta
    evaluation: Evaluation  # the validation split, calibrated
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    test: Evaluation | None = None  # the held-out test split, when the data has one


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def freeze_backbone(model: AttentionClassifier, frozen: bool) -> None:
    for p in model.backbone.parameters():
        p.requires_grad_(not frozen)


def set_train_mode(model: AttentionClassifier, *, backbone_frozen: bool, bn_frozen: bool = False) -> None:
    model.train()
    if backbone_frozen:
        model.backbone.eval()  # keep ImageNet batch-norm statistics while the backbone is frozen
    elif bn_frozen:
        for m in model.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _cosine_with_warmup(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Trainer:
    def __init__(self, config: TrainConfig, splits: Splits, *, out: Path) -> None:
        self.config = config
        self.splits = splits
        self.out = out
        self.runtime: Runtime = make_runtime(config.device, config.precision)
        self.generator = seed_everything(config.seed)
        self.model, self.weights_source = build_classifier(
            config.backbone,
            len(splits.classes),
            pretrained=config.pretrained,
            weights=config.weights,
            attention=config.attention,
            dropout=config.dropout,
            pool=config.pool,
        )
        self.model.to(self.runtime.device)
        if self.runtime.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.runtime, self.precision_probe = settle_precision(
            self.runtime, config.precision, self.model, config.image_size
        )
        if self.precision_probe:
            log.info(
                "model.precision_chosen",
                precision=self.runtime.precision,
                images_per_s={k: round(v, 1) for k, v in self.precision_probe.items()},
            )
        self.normalizer = Normalizer(
            IMAGENET_MEAN, IMAGENET_STD, self.runtime.device, channels_last=self.runtime.channels_last
        )
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.mix = config.resolved_mix(len(splits.train))
        self.mixer = batch_mixer(self.mix, len(splits.classes))
        self.ema = (
            torch.optim.swa_utils.AveragedModel(self.model, avg_fn=_ema_with_warmup(config.ema), use_buffers=True)
            if config.ema
            else None
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.runtime.precision == "fp16")
        self.history: list[dict[str, Any]] = []

    def _loaders(self) -> dict[str, DataLoader]:
        """Train (augmented, shuffled), validation, calibration and test loaders (empty splits: None)."""
        c = self.config
        sp = self.splits
        with progress_bar(len(sp.train) + len(sp.val) + len(sp.calib) + len(sp.test), "decoding images") as advance:
            train = DecodedImages(sp.train, c.image_size, transform=train_transform(c.image_size, c.augment),
                                  progress=advance)  # fmt: skip
            held = {name: DecodedImages(getattr(sp, name), c.image_size, progress=advance) if getattr(sp, name)
                    else None for name in ("val", "calib", "test")}  # fmt: skip
        pin = self.runtime.device.type == "cuda"
        kw = {"num_workers": c.num_workers, "pin_memory": pin, "persistent_workers": c.num_workers > 0}
        loaders = {
            "train": DataLoader(
                train,
                batch_size=c.batch_size,
                shuffle=True,
                drop_last=len(train) > c.batch_size,
                generator=self.generator,
                **kw,
            )
        }
        for name, data in held.items():
            loaders[name] = DataLoader(data, batch_size=c.batch_size * 2, **kw) if data is not None else None
        return loaders

    @property
    def evaluated(self) -> AttentionClassifier:
        """The weights validation sees (and the checkpoint keeps): the EMA average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def _validate(self, loader: DataLoader) -> Evaluation:
        probs, labels = predict(self.evaluated, loader, self.runtime, self.normalizer)
        return evaluate_predictions(probs, labels, self.splits.classes)

    def _run_phase(
        self, phase: int, epochs: int, train_loader: DataLoader, val_loader: DataLoader, best: dict[str, Any]
    ) -> None:
        c = self.config
        frozen = phase == 1
        freeze_backbone(self.model, frozen)
        if frozen:
            optimizer = torch.optim.AdamW(self.model.head_parameters(), lr=c.lr_head, weight_decay=c.weight_decay)
            warmup = 0
        else:
            head_ids = {id(p) for p in self.model.head_parameters()}
            optimizer = torch.optim.AdamW(
                [
                    {"params": list(self.model.backbone.parameters()), "lr": c.lr_finetune},
                    {"params": [p for p in self.model.parameters() if id(p) in head_ids], "lr": c.lr_finetune * 3},
                ],
                weight_decay=c.weight_decay,
            )
            warmup = max(1, len(train_loader) // 2)
        scheduler = _cosine_with_warmup(optimizer, epochs * len(train_loader), warmup)
        stale = 0
        name = "head" if frozen else "fine-tune"
        with make_progress() as progress:
            for local_epoch in range(epochs):
                epoch = len(self.history) + 1
                task = progress.add_task(
                    f"phase {phase} ({name}) epoch {local_epoch + 1}/{epochs}", total=len(train_loader), info=""
                )
                set_train_mode(self.model, backbone_frozen=frozen, bn_frozen=c.bn_frozen)
                started = time.perf_counter()
                loss_sum, correct, seen = 0.0, 0, 0
                for images, targets in train_loader:
                    targets = targets.to(self.runtime.device, non_blocking=True)
                    x = self.normalizer(images, nhwc=False)
                    soft = targets
                    if self.mixer is not None and x.shape[0] > 1:
                        x, soft = self.mixer(x, targets)
                    with self.runtime.autocast():
                        logits = self.model(x)
                    loss = self.criterion(logits.float(), soft)
                    optimizer.zero_grad(set_to_none=True)
                    self.scaler.scale(loss).backward()
                    self.scaler.step(optimizer)
                    self.scaler.update()
                    scheduler.step()
                    if self.ema is not None:
                        self.ema.update_parameters(self.model)
                    loss_sum += loss.item() * targets.shape[0]
                    hard = soft.argmax(1) if soft.dim() == 2 else soft  # mixed: the label that dominates
                    correct += int((logits.argmax(1) == hard).sum())
                    seen += targets.shape[0]
                    progress.update(task, advance=1, info=f"loss {loss_sum / seen:.3f}")
                val = self._validate(val_loader)
                record = {
                    "epoch": epoch,
                    "phase": phase,
                    "train_loss": loss_sum / max(1, seen),
                    "train_accuracy": correct / max(1, seen),
                    "val_loss": val.nll,
                    "val_accuracy": val.accuracy,
                    "val_macro_f1": val.macro_f1,
                    "val_ece": val.ece,
                    "lr": optimizer.param_groups[0]["lr"],
                    "seconds": time.perf_counter() - started,
                }
                self.history.append(record)
                progress.update(task, info=f"loss {record['train_loss']:.3f} val acc {val.accuracy:.3f}")
                log.info("train.epoch", **{k: round(v, 5) if isinstance(v, float) else v for k, v in record.items()})
                if (val.accuracy, -val.nll) > (best["accuracy"], -best["nll"]):
                    best.update(
                        accuracy=val.accuracy,
                        nll=val.nll,
                        epoch=epoch,
                        state=copy.deepcopy(self.evaluated.state_dict()),
                    )
                    stale = 0
                else:
                    stale += 1
                    if stale >= c.patience:
                        log.info("train.early_stop", phase=phase, epoch=epoch, best_epoch=best["epoch"])
                        break

    def fit(self) -> TrainResult:
        c = self.config
        started = time.perf_counter()
        head_epochs, finetune_epochs = c.phase_epochs(len(self.splits.train))
        log.info(
            "train.start",
            backbone=c.backbone,
            classes=len(self.splits.classes),
            train_images=len(self.splits.train),
            val_images=len(self.splits.val),
            calib_images=len(self.splits.calib),
            test_images=len(self.splits.test),
            device=str(self.runtime.device),
            precision=self.runtime.precision,
            weights=self.weights_source.kind if self.weights_source else "random",
            head_epochs=head_epochs,
            mix=self.mix,
            finetune_epochs=finetune_epochs,
        )
        loaders = self._loaders()
        train_loader, val_loader = loaders["train"], loaders["val"]
        best: dict[str, Any] = {"accuracy": -1.0, "nll": math.inf, "epoch": 0, "state": None}
        if head_epochs:
            self._run_phase(1, head_epochs, train_loader, val_loader, best)
        if finetune_epochs:
            self._run_phase(2, finetune_epochs, train_loader, val_loader, best)
        self.model.load_state_dict(best["state"])
        self.ema = None  # from here on the model holds the best weights (averaged or not)
        # the temperature comes from its own split: the one that picked the epoch would flatter it
        calib_name = "calib" if loaders["calib"] is not None else "val"
        logits, labels = predict_logits(self.model, loaders[calib_name], self.runtime, self.normalizer)
        uncalibrated = evaluate_predictions(torch.softmax(logits, dim=1).numpy(), labels.numpy(), self.splits.classes)
        temperature = fit_temperature(logits, labels)
        self.model.temperature.fill_(temperature)
        calibrated = self._validate(loaders[calib_name])
        ood, thresholds = self._fit_unknown(loaders[calib_name], calib_name)
        evaluation = self._validate(val_loader)
        test = self._validate(loaders["test"]) if loaders["test"] is not None else None
        gate = gate_spread(self.model, loaders["test"] or val_loader, self.runtime, self.normalizer)
        log.info(
            "train.calibrated",
            split=calib_name,
            photos=calibrated.n,
            temperature=round(temperature, 4),
            ece_before=round(uncalibrated.ece, 4),
            ece_after=round(calibrated.ece, 4),
        )
        if test is None:
            log.warning("train.no_test_split", why="the data has no held-out test photos: validation figures only")
        seconds = time.perf_counter() - started
        meta = self._meta(evaluation, test, best["epoch"], seconds, uncalibrated.ece, calibrated.ece, temperature, gate)
        meta = meta.model_copy(update={"ood": ood, "metrics": meta.metrics | thresholds})
        save_checkpoint(self.out, self.model, meta)
        self._write_reports(meta, evaluation, test, seconds)
        log.info(
            "train.done",
            checkpoint=str(self.out),
            model_version=meta.model_version,
            val_accuracy=round(evaluation.accuracy, 4),
            test_accuracy=round(test.accuracy, 4) if test else None,
            test_ece=round(test.ece, 4) if test else None,
            gate_span=round(gate["gate_span"], 4),
            best_epoch=best["epoch"],
            seconds=round(seconds, 1),
        )
        return TrainResult(self.out, meta, evaluation, self.history, seconds, test)

    def _fit_unknown(self, loader: DataLoader, split: str) -> tuple[OodMeta | None, dict[str, float]]:
        """The unknown-product threshold: the score that ``ood_false_review`` of the split's known photos
        (never trained on) exceed, on the calibrated logits the worker will see; and every score's
        threshold (in the checkpoint's metrics, for ``benchmarks/unknown_products.py`` to compare)."""
        c = self.config
        logits, _ = predict_logits(self.model, loader, self.runtime, self.normalizer)
        finite = logits[torch.isfinite(logits).all(dim=1)]  # a row the model could not score is not a known photo
        if len(finite) == 0:
            log.warning("train.unknown_not_fitted", photos=len(logits), why="no calibration photo scored finite")
            return None, {}
        fitted = {s: fit_threshold(ood_scores(finite, s).numpy(), c.ood_false_review) for s in SCORES}
        ood = OodMeta(score=c.ood_score, threshold=fitted[c.ood_score], false_review=c.ood_false_review,
                      fitted_on=split, photos=len(finite))  # fmt: skip
        log.info("train.unknown_fitted", score=ood.score, threshold=round(ood.threshold, 4), split=split,
                 photos=ood.photos, false_review=ood.false_review)  # fmt: skip
        if math.floor(c.ood_false_review * len(finite) + 1e-9) == 0:
            log.warning("train.unknown_threshold_coarse", photos=len(finite), false_review=c.ood_false_review,
                        why="too few calibration photos for this rate: the threshold is their highest score, "
                        "so fewer known and fewer unknown products go to review")  # fmt: skip
        return ood, {f"ood_threshold_{s}": t for s, t in fitted.items()}

    def _meta(
        self,
        evaluation: Evaluation,
        test: Evaluation | None,
        best_epoch: int,
        seconds: float,
        ece_uncalibrated: float,
        ece_calibrated: float,
        temperature: float,
        gate: dict[str, float],
    ) -> ModelMeta:
        c = self.config
        seen = self.splits.seen
        data_print = fingerprint(self.splits.root, seen)
        stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(c).items()}
        config["mix"] = self.mix  # what "auto" settled on, and the schedule the data size gave
        config["head_epochs"], finetune = c.phase_epochs(len(self.splits.train))
        config["epochs"] = config["head_epochs"] + finetune
        metrics = {
            "val_accuracy": evaluation.accuracy,
            "val_macro_f1": evaluation.macro_f1,
            "val_ece": evaluation.ece,
            "val_nll": evaluation.nll,
            "calib_ece_uncalibrated": ece_uncalibrated,
            "calib_ece": ece_calibrated,
            "temperature": temperature,
            "best_epoch": float(best_epoch),
            "train_seconds": seconds,
            **gate,
        }
        if test is not None:
            metrics |= {"test_accuracy": test.accuracy, "test_macro_f1": test.macro_f1, "test_ece": test.ece}
        return ModelMeta(
            backbone=c.backbone,
            attention=c.attention,
            pool=c.pool,
            classes=self.splits.classes,
            skus=read_skus(self.splits.root, self.splits.classes),
            image_size=c.image_size,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            model_version=c.model_version or f"{c.backbone}-{stamp}-{data_print[:8]}",
            data_fingerprint=data_print,
            metrics=metrics,
            train_config=config
            | {
                "weights_source": self.weights_source.kind if self.weights_source else "random",
                "precision": self.runtime.precision,
                "device": str(self.runtime.device),
                "splits": {name: len(getattr(self.splits, name)) for name in ("train", "val", "calib", "test")},
            },
            seen=sorted(photo_digest(s.path) for s in seen),
        )

    def _write_reports(self, meta: ModelMeta, evaluation: Evaluation, test: Evaluation | None, seconds: float):
        stem = self.out.with_suffix("")
        report = {
            "model_version": meta.model_version,
            "classes": meta.classes,
            "seconds": seconds,
            "validation": evaluation.summary(),
            "test": test.summary() if test is not None else None,
            "history": self.history,
            "train_config": meta.train_config,
        }
        Path(f"{stem}.metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        plot_training_curves(self.history, Path(f"{stem}.curves.png"))


def train(data_dir: Path, out: Path, config: TrainConfig) -> TrainResult:
    splits = load_splits(data_dir, config.val_fraction, config.seed, config.test_fraction)
    return Trainer(config, splits, out=out).fit()
