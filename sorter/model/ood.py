"""Unknown products: how unlike everything it was trained on a photo looks, from the logits the model
already computes, and the threshold above which an item goes to review instead of a chute.

Scores (higher: more likely a product the model does not know), on the served, temperature-scaled logits
``z`` of one photo:

- ``energy``: ``-logsumexp(z)`` (Liu et al., 2020, "Energy-based out-of-distribution detection");
- ``max_logit``: ``-max(z)`` (Hendrycks et al., 2022, "Scaling out-of-distribution detection");
- ``msp``: ``1 - max(softmax(z))``, the confidence the routing threshold already reads (the baseline).

All three come from the logits, so every runtime that serves the model (eager, compiled, OpenVINO int8)
gives them at no cost. ``benchmarks/unknown_products.py`` measured them (README, "Unknown products").
The threshold is fitted at training time on the calibration split (known products the model never
trained on) as the score that ``false_review`` of them exceed, and stored in the checkpoint.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

Score = Literal["energy", "max_logit", "msp"]
SCORES: tuple[Score, ...] = ("energy", "max_logit", "msp")
DEFAULT_SCORE: Score = "energy"
DEFAULT_FALSE_REVIEW = 0.02


class OodMeta(BaseModel):
    """What the checkpoint carries for unknown-product detection."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    score: Score
    threshold: float = Field(allow_inf_nan=False)
    false_review: float = Field(gt=0, lt=1, description="target share of known products sent to review")
    fitted_on: str = Field(description="the split the threshold was fitted on")
    photos: int = Field(ge=1)


def ood_scores(logits: torch.Tensor, score: Score = DEFAULT_SCORE) -> torch.Tensor:
    """One score per row of ``logits`` ``(n, classes)``, float32."""
    z = logits.float()
    if score == "energy":
        return -torch.logsumexp(z, dim=1)
    if score == "max_logit":
        return -z.max(dim=1).values
    if score == "msp":
        return 1 - torch.softmax(z, dim=1).max(dim=1).values
    raise ValueError(f"unknown OOD score {score!r} (known: {', '.join(SCORES)})")


def fit_threshold(known: np.ndarray, false_review: float = DEFAULT_FALSE_REVIEW) -> float:
    """The lowest threshold that at most ``floor(false_review * n)`` of the ``n`` known photos' scores
    exceed (strictly: a score is unknown when ``> threshold``), an order statistic. Non-finite scores
    (a model that produced NaN) are left out. With fewer than ``1 / false_review`` photos no photo may
    exceed it: the threshold is their highest score."""
    scores = np.sort(np.asarray(known, dtype=np.float64))
    scores = scores[np.isfinite(scores)]
    if len(scores) == 0:
        raise ValueError("no known photos with a finite score to fit an unknown-product threshold on")
    allowed = math.floor(false_review * len(scores) + 1e-9)
    return float(scores[max(len(scores) - allowed - 1, 0)])


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """Probability that an unknown photo scores above a known one (ties count half): Mann-Whitney U."""
    known, unknown = np.sort(np.asarray(known, np.float64)), np.asarray(unknown, np.float64)
    if len(known) == 0 or len(unknown) == 0:
        return float("nan")
    below = np.searchsorted(known, unknown, side="left")
    ties = np.searchsorted(known, unknown, side="right") - below
    return float((below + 0.5 * ties).sum() / (len(known) * len(unknown)))


def at_threshold(known: np.ndarray, unknown: np.ndarray, threshold: float) -> dict[str, float]:
    """Shares sent to review at ``threshold``: unknown photos caught, known photos reviewed by mistake."""
    return {
        "unknown_caught": float(np.mean(np.asarray(unknown) > threshold)) if len(unknown) else float("nan"),
        "known_reviewed": float(np.mean(np.asarray(known) > threshold)) if len(known) else float("nan"),
    }
