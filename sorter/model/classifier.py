"""The attention classifier: backbone trunk -> spatial attention -> global average pooling -> linear.

    X = trunk(image)                    (N, C, H/32, W/32)
    A = sigmoid(conv1x1(X)); Y = A * X  (N, 1, h, w), (N, C, h, w)
    logits = linear(mean_hw(Y))         (N, classes)           pool="mean" (the average of Y)
    logits = linear(sum_hw(Y) / sum_hw(A))                     pool="attention"

With ``pool="attention"`` the pooled features are an A-weighted average of X: a gate that rose or fell
everywhere at once would change nothing, so A can only *redistribute* weight between places (product
vs belt and neighbours), which is what it is for; with the plain mean, a uniform A is just a scale the
linear layer absorbs, and the gate has little reason to separate anything.

Works for any batch size, including one (the pooled features are ``mean(dim=(2, 3))``, never a bare
``squeeze``), and the attention map can be returned to explain a decision.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sorter.errors import ConfigError
from sorter.model.attention import SpatialAttention
from sorter.model.backbones import get_backbone
from sorter.model.weights import WeightsSource, load_trunk_weights, resolve_weights


class AttentionClassifier(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        channels: int,
        num_classes: int,
        *,
        attention: bool = True,
        dropout: float = 0.2,
        pool: str = "mean",
    ) -> None:
        super().__init__()
        if pool not in ("mean", "attention"):
            raise ConfigError(f"pool must be 'mean' or 'attention', got {pool!r}")
        self.pool = pool
        if num_classes < 2:
            raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.backbone = backbone
        # ``attention=False`` exists for the ablation benchmark (does the head earn its place?).
        self.attention = SpatialAttention(channels) if attention else None
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, num_classes)
        # Temperature scaling (Guo et al., 2017), fitted on validation data after training: logits / T
        # makes the softmax confidence match the observed accuracy, which the routing threshold relies on.
        self.register_buffer("temperature", torch.ones(()))

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features ``(N, C)`` and the attention map ``(N, 1, h, w)`` (all ones without the head)."""
        features = self.backbone(x)
        if self.attention is None:
            attention_map = features.new_ones(features.shape[0], 1, *features.shape[2:])
            return features.mean(dim=(2, 3)), attention_map
        gated, attention_map = self.attention(features)
        if self.pool == "attention":
            return gated.sum(dim=(2, 3)) / attention_map.sum(dim=(2, 3)).clamp_min(1e-6), attention_map
        return gated.mean(dim=(2, 3)), attention_map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_attention(x)[0]

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Calibrated logits ``(N, classes)`` and the attention map ``(N, 1, h, w)`` in [0, 1]."""
        pooled, attention_map = self.forward_features(x)
        return self.head(self.dropout(pooled)) / self.temperature, attention_map

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything trained in phase 1 (the backbone stays frozen)."""
        params = list(self.head.parameters())
        if self.attention is not None:
            params += list(self.attention.parameters())
        return params


def build_classifier(
    backbone: str,
    num_classes: int,
    *,
    pretrained: bool = True,
    weights: Path | None = None,
    attention: bool = True,
    dropout: float = 0.2,
    pool: str = "mean",
) -> tuple[AttentionClassifier, WeightsSource | None]:
    """Build a classifier; with ``pretrained`` the trunk gets ImageNet weights found offline.

    Returns the model and where its trunk weights came from (``None`` for random initialisation).
    """
    spec = get_backbone(backbone)
    full = spec.build_model()
    trunk = spec.trunk(full)
    source = None
    if pretrained:
        source = resolve_weights(spec, weights)
        load_trunk_weights(spec, full, trunk, source.path)
    model = AttentionClassifier(trunk, spec.channels, num_classes, attention=attention, dropout=dropout, pool=pool)
    return model, source
