"""Augmentations for overhead conveyor photos, on ``uint8`` ``(3, H, W)`` tensors.

What varies on a belt: the item's angle and place (flips, small re-framing), the light (brightness,
contrast, a little saturation, never much hue: colour often tells products apart), motion blur, and
partial occlusion by guards or neighbouring parcels (random erasing). Nothing here assumes the
synthetic generator.
"""

from __future__ import annotations

from torchvision.transforms import v2


def train_transform(size: int) -> v2.Compose:
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomApply([v2.RandomAffine(degrees=20, translate=(0.08, 0.08), scale=(0.85, 1.15))], p=0.7),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.15, hue=0.02),
            v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=0.3),
            v2.RandomErasing(p=0.25, scale=(0.02, 0.12), value=0),
        ]
    )
