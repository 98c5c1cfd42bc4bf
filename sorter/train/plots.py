"""Pictures that say it better than numbers: training curves, confusion matrices, attention maps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


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
    fig.savefig(out, dpi=110)
    plt.close(fig)


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
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_attention(
    rgb: np.ndarray, attention: np.ndarray, top: Sequence[tuple[str, float]], out: Path, title: str = ""
) -> None:
    """Photo, attention heat map over it (``attention`` at photo size, in [0, 1]) and the top-k."""
    fig, (ax_img, ax_att, ax_bar) = plt.subplots(1, 3, figsize=(14, 4.2), gridspec_kw={"width_ratios": [4, 4, 3]})
    ax_img.imshow(rgb)
    ax_img.set_title("photo")
    ax_att.imshow(rgb)
    im = ax_att.imshow(attention, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    ax_att.set_title("spatial attention A (relative)")
    fig.colorbar(im, ax=ax_att, fraction=0.035)
    for ax in (ax_img, ax_att):
        ax.axis("off")
    labels = [t[0] for t in top][::-1]
    probs = [t[1] for t in top][::-1]
    ax_bar.barh(range(len(top)), probs, color="tab:blue")
    ax_bar.set_yticks(range(len(top)), labels, fontsize=8)
    ax_bar.set_xlim(0, 1)
    ax_bar.set_title("top predictions")
    for i, p in enumerate(probs):
        ax_bar.text(min(p + 0.02, 0.85), i, f"{p:.3f}", va="center", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
