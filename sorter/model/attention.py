"""Spatial attention head: ``A = sigmoid(conv1x1(X)); Y = A * X``.

One scalar weight per spatial position, shared across channels, in [0, 1]. The map is returned
so that it can be shown to a person (``sorter explain``) as well as used.
"""

from __future__ import annotations

import torch
from torch import nn


class SpatialAttention(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.score = nn.Conv2d(channels, 1, kernel_size=1)
        # Start neutral: A = 0.5 everywhere. A default (random) init on 512-1280 non-negative channels
        # saturates the sigmoid near 0 or 1 everywhere, and a saturated gate hardly learns where to look.
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(A * X, A)`` with ``A`` of shape ``(N, 1, H, W)``."""
        attention = torch.sigmoid(self.score(x))
        return x * attention, attention
