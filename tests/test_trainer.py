import json

import pytest
import torch

from sorter.data.folder import load_splits
from sorter.model.checkpoint import load_checkpoint
from sorter.train.trainer import TrainConfig, Trainer, train


def _config(**kw) -> TrainConfig:
    return TrainConfig(
        **({"backbone": "mobilenet_v2", "image_size": 64, "batch_size": 16, "device": "cpu", "precision": "fp32"} | kw)
    )


def test_phase_one_changes_the_head_and_nothing_in_the_backbone(synth_tree, tmp_path):
    trainer = Trainer(_config(epochs=1), load_splits(synth_tree), out=tmp_path / "m.pt")
    backbone_before = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    head_before = trainer.model.head.weight.detach().clone()
    attention_before = trainer.model.attention.score.weight.detach().clone()
    loaders = trainer._loaders()
    train_loader, val_loader = loaders["train"], loaders["val"]
    best = {"accuracy": -1.0, "nll": float("inf"), "epoch": 0, "state": None}
    trainer._run_phase(1, 1, train_loader, val_loader, best)
    for name, value in trainer.model.backbone.state_dict().items():  # weights and batch-norm statistics
        assert torch.equal(value, backbone_before[name]), name
    assert not torch.equal(trainer.model.head.weight, head_before)
    assert not torch.equal(trainer.model.attention.score.weight, attention_before)


def test_phase_split():
    assert _config(epochs=10).phase_epochs() == (2, 8)
    assert _config(epochs=1).phase_epochs() == (1, 0)
    assert _config(epochs=5, head_epochs=2).phase_epochs() == (2, 3)
    assert _config(epochs=5, pretrained=False).phase_epochs() == (0, 5)


def test_the_schedule_follows_the_dataset_size_not_a_fixed_epoch_count():
    from sorter.train.trainer import auto_epochs

    assert auto_epochs(4_000, 32) == 18  # 2,214 steps: the 500-photos-per-class protocol
    assert auto_epochs(48_000, 32) == 5  # the full Fashion-MNIST training set
    assert auto_epochs(96, 32) == 114  # 343 steps: a tiny set still gets more than the 300-step floor
    assert auto_epochs(40, 32) == 300  # the floor: 300 steps of the one full batch (the rest is dropped)
    assert _config(batch_size=32).phase_epochs(4_000) == (3, 15)


def test_mixing_is_on_for_long_runs_and_off_for_short_ones_unless_chosen():
    """CutMix/MixUp paid on Fashion-MNIST's 2,214-step run and only slows a short one: "auto" decides by
    the run's optimisation steps; an explicit choice stands either way."""
    from sorter.train.trainer import MIX_MIN_STEPS, steps_per_epoch

    assert _config(batch_size=32).resolved_mix(4_000) == "both"  # 18 epochs x 125 steps
    assert _config(batch_size=32, epochs=4).resolved_mix(4_000) == "none"  # 500 steps
    assert _config(batch_size=32).resolved_mix(96) == "none"  # 342 steps
    assert _config(batch_size=32, mix="none").resolved_mix(4_000) == "none"
    assert _config(batch_size=32, mix="cutmix").resolved_mix(96) == "cutmix"
    assert MIX_MIN_STEPS == 1_000
    # steps counted as the loader runs them (a last partial batch dropped), not rounded up
    assert (steps_per_epoch(4_000, 32), steps_per_epoch(97, 32), steps_per_epoch(20, 32)) == (125, 3, 1)


@pytest.mark.slow
def test_short_training_run_beats_chance_and_writes_its_reports(synth_tree, tmp_path):
    out = tmp_path / "model.pt"
    result = train(synth_tree, out, _config(epochs=4, image_size=96, model_version="ci-1"))
    assert result.evaluation.n == 20 and result.test is None  # val/ split in half: early stopping, temperature
    assert result.meta.train_config["splits"] == {"train": 96, "val": 20, "calib": 20, "test": 0}
    assert result.evaluation.accuracy >= 0.75, result.history  # chance is 0.25 with 4 classes
    _, meta = load_checkpoint(out)
    assert meta.model_version == "ci-1" and meta.image_size == 96 and meta.backbone == "mobilenet_v2"
    assert meta.skus[0].startswith("SKU-") and len(meta.data_fingerprint) == 64
    assert meta.metrics["val_accuracy"] == pytest.approx(result.evaluation.accuracy)
    assert meta.train_config["weights_source"] == "package"
    # the unknown-product threshold, fitted on the calibration split (photos it never trained on)
    assert meta.ood is not None and (meta.ood.score, meta.ood.fitted_on, meta.ood.photos) == ("energy", "calib", 20)
    assert meta.ood.false_review == 0.02 and -1e6 < meta.ood.threshold < 1e6
    report = json.loads((tmp_path / "model.metrics.json").read_text())
    assert [h["epoch"] for h in report["history"]] == list(range(1, len(report["history"]) + 1))
    assert {h["phase"] for h in report["history"]} == {1, 2}
    assert (tmp_path / "model.curves.png").stat().st_size > 10_000


def test_batch_norm_keeps_imagenet_statistics_only_when_there_are_some():
    """From ImageNet weights the statistics are kept while fine-tuning (no phase-2 collapse); from random
    weights they must adapt: frozen at their initial values they leave the network unnormalised."""
    from sorter.train.trainer import TrainConfig

    assert TrainConfig().bn_frozen and not TrainConfig(pretrained=False).bn_frozen
    assert TrainConfig(pretrained=False, bn="frozen").bn_frozen and not TrainConfig(bn="train").bn_frozen


def test_batch_mixing_trains_every_batch_on_soft_labels(synth_tree, tmp_path):
    trainer = Trainer(_config(epochs=1, mix="both"), load_splits(synth_tree), out=tmp_path / "m.pt")
    loaders = trainer._loaders()
    mixed, mixer = [], trainer.mixer

    def spy(x, y):
        x, soft = mixer(x, y)
        mixed.append(soft)
        return x, soft

    trainer.mixer = spy
    best = {"accuracy": -1.0, "nll": float("inf"), "epoch": 0, "state": None}
    trainer._run_phase(1, 1, loaders["train"], loaders["val"], best)
    assert len(mixed) == len(loaders["train"])
    assert all(s.shape[1] == 4 and torch.allclose(s.sum(1), torch.ones(len(s))) for s in mixed)
    assert any((s.max(1).values < 1).any() for s in mixed)  # labels really mixed
    assert torch.isfinite(torch.tensor(trainer.history[-1]["train_loss"]))


def test_an_unknown_mix_is_a_config_error():
    from sorter.errors import ConfigError

    with pytest.raises(ConfigError, match="--mix"):
        TrainConfig(mix="cutout")
