"""The precision probe, the hard synthetic catalogue and batch mixing: what an independent review of that change
proved wrong (fixed), kept as regression tests."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sorter.data.folder import load_splits
from sorter.data.synth import catalog
from sorter.model import runtime as rt
from sorter.train.trainer import Trainer
from tests.test_trainer import _config

# --- hard catalogue -------------------------------------------------------------------------------------


def test_hard_catalogue_labels_are_unique_up_to_its_limit_and_refuses_more():
    """Its (kind, colour) families repeat after 32 families: 96 classes, each its own design; 97 is refused
    in one line instead of writing two classes into one folder (found by review)."""
    from sorter.errors import ConfigError

    labels = [d.label for d in catalog(96, hard=True)]
    assert len(set(labels)) == 96
    with pytest.raises(ConfigError, match="at most 96"):
        catalog(97, hard=True)


# --- precision probe ------------------------------------------------------------------------------------


def test_the_precision_probe_does_not_draw_from_the_global_rng():
    """The probe runs inside Trainer.__init__, after seed_everything and before any training draw
    (augmentation, dropout, CutMix/MixUp all use the global torch RNG)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    torch.manual_seed(0)
    before = torch.get_rng_state()
    rt.probe_cpu_precision(model, 32, batch=2)
    assert torch.equal(before, torch.get_rng_state())


def test_auto_precision_that_settles_on_fp32_trains_like_fp32_with_the_same_seed(synth_tree, tmp_path, monkeypatch):
    """On a bf16 CPU, `--precision auto` that measures fp32 faster must give the run `--precision fp32` gives
    with the same seed. It does not: the probe's torch.rand shifts every later random draw."""
    monkeypatch.setattr(rt, "cpu_has_fast_bf16", lambda: True)
    ticks = iter([0.0, 1.0, 0.0, 100.0] * 3)  # each round fp32 timed faster than bf16: auto settles on fp32
    monkeypatch.setattr(rt, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    splits = load_splits(synth_tree)

    auto = Trainer(_config(precision="auto"), splits, out=tmp_path / "a.pt")
    assert auto.precision_probe and auto.runtime.precision == "fp32"
    after_auto = torch.get_rng_state()

    fp32 = Trainer(_config(precision="fp32"), splits, out=tmp_path / "b.pt")
    assert fp32.runtime.precision == "fp32"
    assert torch.equal(after_auto, torch.get_rng_state()), "same seed, same precision, different random stream"


# --- batch mixing ---------------------------------------------------------------------------------------


def test_train_accuracy_under_mixing_is_scored_against_the_labels_the_batch_carries(synth_tree, tmp_path):
    """With --mix, a photo of class A blended/pasted with class B (lam < 0.5: mostly B) is trained towards B,
    but train_accuracy counts it right only when the model says A: the metric in history, curves.png and
    the benchmarks' JSON measures the mixing, not the fit."""
    trainer = Trainer(_config(epochs=1, mix="mixup"), load_splits(synth_tree), out=tmp_path / "m.pt")
    loaders = trainer._loaders()
    mixer, softs, logits = trainer.mixer, [], []

    def spy(x, y):
        x, soft = mixer(x, y)
        softs.append(soft)
        return x, soft

    trainer.mixer = spy
    trainer.model.register_forward_hook(lambda module, args, out: logits.append(out.detach()))  # not the EMA copy
    best = {"accuracy": -1.0, "nll": float("inf"), "epoch": 0, "state": None}
    trainer._run_phase(1, 1, loaders["train"], loaders["val"], best)

    agree = sum(int((lg.argmax(1) == s.argmax(1)).sum()) for lg, s in zip(logits, softs, strict=True))
    seen = sum(len(s) for s in softs)
    assert trainer.history[-1]["train_accuracy"] == pytest.approx(agree / seen)


# --- evaluate vs the worker ------------------------------------------------------------------------------


def test_evaluate_scores_in_the_precision_the_worker_serves_in(tmp_path, monkeypatch):
    """`sorter evaluate` (which suggests min_confidence for the worker) keeps "auto" = bf16 from the CPU
    flags, while the worker (Classifier) and `sorter train` now settle "auto" by measuring (fp32 here)."""
    from sorter.bench import BenchConfig, make_checkpoint
    from sorter.data.synth import write_dataset
    from sorter.stream.inference import Classifier
    from sorter.train import evaluate as ev

    monkeypatch.setattr(rt, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(rt, "probe_cpu_precision", lambda *a, **k: {"fp32": 64.0, "bf16": 43.0})
    checkpoint = make_checkpoint(BenchConfig(backbone="mobilenet_v2", image_size=64), tmp_path)
    write_dataset(tmp_path / "data", 10, 1, seed=5, size=(64, 48))
    served = Classifier(checkpoint, device="cpu", precision="auto").runtime.precision

    used = []
    real_predict = ev.predict_logits
    monkeypatch.setattr(ev, "predict_logits", lambda model, loader, runtime, *a: used.append(runtime.precision)
                        or real_predict(model, loader, runtime, *a))  # fmt: skip
    ev.evaluate_folder(tmp_path / "data", checkpoint, device="cpu", precision="auto")
    assert used == [served] == ["fp32"]
