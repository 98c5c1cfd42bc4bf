"""Augmentations for overhead conveyor photos, on ``uint8`` ``(3, H, W)`` tensors.

What varies on a belt: the item's angle and place (flips, small re-framing), the light (brightness,
contrast, a little saturation, never much hue: colour often tells products apart), motion blur, and
partial occlusion by guards or neighbouring parcels (random erasing). Nothing here assumes the
synthetic generator.
"""

from __future__ import annotations

from torchvision.transforms import v2

from sorter.errors import ConfigError

PRESETS = ("none", "light", "light-erase", "belt", "belt-any-angle")
MIXES = ("none", "cutmix", "mixup", "both")


def train_transform(size: int, preset: str = "belt") -> v2.Transform:
    if preset not in PRESETS:
        raise ConfigError(f"augmentation preset must be one of {PRESETS}, got {preset!r}")
    if preset == "none":
        return v2.Identity()
    if preset in ("light", "light-erase"):
        light = [v2.RandomHorizontalFlip(), v2.RandomApply([v2.RandomAffine(degrees=0, translate=(0.06, 0.06))], p=0.5)]
        if preset == "light-erase":  # a guard or a neighbour hiding part of the item
            light.append(v2.RandomErasing(p=0.5, scale=(0.02, 0.2), value=0))
        return v2.Compose(light)
    degrees = 180 if preset == "belt-any-angle" else 20
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomApply([v2.RandomAffine(degrees=degrees, translate=(0.08, 0.08), scale=(0.85, 1.15))], p=0.7),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.15, hue=0.02),
            v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=0.3),
            v2.RandomErasing(p=0.25, scale=(0.02, 0.12), value=0),
        ]
    )


def batch_mixer(mix: str, num_classes: int) -> v2.Transform | None:
    """Mixes a batch (images, labels) into (images, soft labels): CutMix pastes a box of one photo into
    another, MixUp blends two; "both" picks one per batch. None: no mixing."""
    if mix not in MIXES:
        raise ConfigError(f"--mix must be one of {', '.join(MIXES)}, got {mix!r}")
    if mix == "none":
        return None
    if mix == "cutmix":
        return v2.CutMix(num_classes=num_classes)
    if mix == "mixup":
        return v2.MixUp(num_classes=num_classes, alpha=0.2)
    return v2.RandomChoice([v2.CutMix(num_classes=num_classes), v2.MixUp(num_classes=num_classes, alpha=0.2)])
