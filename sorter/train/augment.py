"""Augmentations for overhead conveyor photos, on ``uint8`` ``(3, H, W)`` tensors.

What varies on a belt: the item's angle and place (flips, small re-framing), the light (brightness,
contrast, a little saturation, never much hue: colour often tells products apart), motion blur, and
partial occlusion by guards or neighbouring parcels (random erasing). Nothing here assumes the
synthetic generator.
"""

from __future__ import annotations

from torchvision.transforms import v2

from sorter.errors import ConfigError

PRESETS = ("none", "light", "belt", "belt-any-angle")


def train_transform(size: int, preset: str = "belt") -> v2.Transform:
    if preset not in PRESETS:
        raise ConfigError(f"augmentation preset must be one of {PRESETS}, got {preset!r}")
    if preset == "none":
        return v2.Identity()
    if preset == "light":
        return v2.Compose(
            [v2.RandomHorizontalFlip(), v2.RandomApply([v2.RandomAffine(degrees=0, translate=(0.06, 0.06))], p=0.5)]
        )
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
