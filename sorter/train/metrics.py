"""Classification metrics as pure functions of (probabilities, labels).

Calibration matters here, not only accuracy: the router sends an item to manual review when the
model's confidence is below a threshold, and that threshold only means something if a confidence of
0.9 is right about 90% of the time (expected calibration error, ECE, measures the gap).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ClassReport:
    label: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class Evaluation:
    n: int
    accuracy: float
    macro_f1: float
    ece: float
    nll: float
    per_class: list[ClassReport]
    confusion: np.ndarray  # rows: true class, columns: predicted class

    def summary(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "ece": self.ece,
            "nll": self.nll,
            "per_class": [asdict(c) for c in self.per_class],
        }


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, predicted), 1)
    return cm


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Weighted mean |accuracy - confidence| over equal-width confidence bins."""
    if confidence.size == 0:
        return 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def evaluate_predictions(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> Evaluation:
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0] or probs.shape[1] != len(classes):
        raise ValueError(f"probs {probs.shape} do not match {labels.shape[0]} labels and {len(classes)} classes")
    predicted = probs.argmax(axis=1)
    cm = confusion_matrix(labels, predicted, len(classes))
    tp = np.diag(cm).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(cm.sum(0) > 0, tp / cm.sum(0), 0.0)
        recall = np.where(cm.sum(1) > 0, tp / cm.sum(1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = cm.sum(1) > 0  # macro-F1 over classes that occur in this set
    n = int(labels.shape[0])
    eps = 1e-12
    return Evaluation(
        n=n,
        accuracy=float(tp.sum() / n) if n else 0.0,
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        ece=expected_calibration_error(probs.max(axis=1), predicted == labels),
        nll=float(-np.log(probs[np.arange(n), labels] + eps).mean()) if n else 0.0,
        per_class=[
            ClassReport(c, float(precision[i]), float(recall[i]), float(f1[i]), int(cm[i].sum()))
            for i, c in enumerate(classes)
        ],
        confusion=cm,
    )


def risk_coverage(probs: np.ndarray, labels: np.ndarray, target_error: float = 0.005) -> dict[str, Any]:
    """What a line manager sets ``min_confidence`` from: for each threshold, the share of items sent to
    review (confidence below it) and the error rate of the items routed; and the lowest threshold whose
    routed error is at most ``target_error`` (None if no threshold reaches it). Thresholds: a 0.01 grid
    and the confidence at every percentile of the items."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    n = len(labels)
    curve = []
    # a 0.01 grid reads well, but calibrated models put most confidences above 0.9, where one grid step
    # can move a third of the items: the confidences at every 1% of the items are thresholds too
    grid = np.round(np.linspace(0.0, 0.99, 100), 4)
    steps = np.quantile(confidence, np.linspace(0.0, 0.99, 100), method="lower") if n else np.array([])
    for t in np.unique(np.concatenate([grid, np.round(steps, 4)])):
        routed = confidence >= t
        k = int(routed.sum())
        error = float(1 - correct[routed].mean()) if k else 0.0
        curve.append({"threshold": float(t), "review_share": 1 - k / n if n else 0.0, "routed_error": error})
    suggested = next((c for c in curve if c["review_share"] < 1 and c["routed_error"] <= target_error), None)
    return {"target_error": target_error, "suggested_min_confidence": suggested, "curve": curve}
