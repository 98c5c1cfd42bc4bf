"""Pictures that say it better than numbers: training curves, confusion matrices, attention maps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def _save(fig, out: Path) -> None:
    """Write a figure, making its folder (``--confusion reports/m.png``): an output path is never an error."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_training_curves(history: Sequence[dict[str, Any]], out: Path) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="validation")
    switch = next((h["epoch"] for h in history if h["phase"] == 2), None)
    for ax, title in ((ax_loss, "loss (train: label-smoothed CE; val: NLL)"), (ax_acc, "top-1 accuracy")):
        if switch is not None:
            ax.axvline(switch - 0.5, color="grey", ls="--", lw=1)
            ax.text(switch - 0.4, ax.get_ylim()[1], " fine-tune", va="top", fontsize=8, color="grey")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, out)


def plot_risk_coverage(rc: dict, out: Path, title: str = "") -> None:
    """Share sent to review vs error of what is routed, one point per confidence threshold."""
    curve = rc["curve"]
    review = [100 * c["review_share"] for c in curve]
    error = [100 * c["routed_error"] for c in curve]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(review, error, "-", color="#1f77b4")
    marks = {0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99}
    for c in curve:
        if round(c["threshold"], 4) in marks:
            ax.annotate(f"{c['threshold']:.2f}", (100 * c["review_share"], 100 * c["routed_error"]), fontsize=7)
    target = 100 * rc["target_error"]
    ax.axhline(target, color="grey", linestyle=":", label=f"target error {target:.1f}%")
    if rc["suggested_min_confidence"]:
        s = rc["suggested_min_confidence"]
        ax.plot([100 * s["review_share"]], [100 * s["routed_error"]], "o", color="#d62728",
                label=f"min_confidence {s['threshold']:.2f}: {100 * s['review_share']:.1f}% to review")  # fmt: skip
    ax.set_xlabel("items sent to review (%)")
    ax.set_ylabel("error among routed items (%)")
    ax.set_title(title or "risk-coverage (numbers: confidence threshold)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, out)


def plot_confusion(cm: np.ndarray, classes: Sequence[str], out: Path, title: str = "") -> None:
    k = len(classes)
    size = max(5.0, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.nan_to_num(cm / cm.sum(axis=1, keepdims=True))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(k), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        str(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    _save(fig, out)


def plot_attention(
    rgb: np.ndarray,
    maps: Sequence[tuple[str, np.ndarray, tuple[float, float]]],
    top: Sequence[tuple[str, float]],
    out: Path,
    title: str = "",
) -> None:
    """The photo, each ``(title, map at photo size, (vmin, vmax))`` over it, and the top-k predictions."""
    n = len(maps)
    ratios = [4] * (n + 1) + [3]
    fig, axes = plt.subplots(1, n + 2, figsize=(4 * (n + 1) + 3, 4.2), gridspec_kw={"width_ratios": ratios})
    axes[0].imshow(rgb)
    axes[0].set_title("photo")
    for ax, (name, heat, (vmin, vmax)) in zip(axes[1 : n + 1], maps, strict=True):
        ax.imshow(rgb)
        im = ax.imshow(heat, cmap="jet", alpha=0.45, vmin=vmin, vmax=vmax)
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.035)
    for ax in axes[: n + 1]:
        ax.axis("off")
    ax_bar = axes[-1]
    labels = [t[0] for t in top][::-1]
    probs = [t[1] for t in top][::-1]
    ax_bar.barh(range(len(top)), probs, color="tab:blue")
    ax_bar.set_yticks(range(len(top)), labels, fontsize=8)
    ax_bar.set_xlim(0, 1)
    ax_bar.set_title("top predictions")
    for i, p in enumerate(probs):
        ax_bar.text(min(p + 0.02, 0.85), i, f"{p:.3f}", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, out)
