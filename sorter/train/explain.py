"""Why did the model say that? The spatial attention map over the photo, with the top-k classes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from sorter.model.checkpoint import load_checkpoint
from sorter.model.preprocess import Normalizer, decode_image, resize_square
from sorter.model.runtime import make_runtime
from sorter.train.plots import plot_attention


@dataclass(frozen=True)
class Explanation:
    top: list[tuple[str, str, float]]  # (label, sku, probability)
    attention: np.ndarray  # (H, W) at the photo's size, in [0, 1]


@torch.inference_mode()
def explain_image(image: Path, checkpoint: Path, out: Path, *, top_k: int = 5, device: str = "auto") -> Explanation:
    runtime = make_runtime(device, "fp32")  # explanations are not a hot path: full precision
    model, meta = load_checkpoint(checkpoint, runtime.device)
    rgb = decode_image(image.read_bytes())
    batch = torch.from_numpy(resize_square(rgb, meta.image_size))[None]
    x = Normalizer(meta.mean, meta.std, runtime.device)(batch)
    logits, attention = model.forward_with_attention(x)
    probs = torch.softmax(logits.float(), dim=1)[0].cpu()
    k = min(top_k, meta.num_classes)
    values, indices = probs.topk(k)
    top = [(meta.classes[i], meta.skus[i], float(v)) for v, i in zip(values.tolist(), indices.tolist(), strict=True)]
    heat = attention[0, 0].float().cpu().numpy()
    heat_full = cv2.resize(heat, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    low, high = float(heat.min()), float(heat.max())
    relative = (heat_full - low) / max(high - low, 1e-6)  # where it looks *more*, even if A is high everywhere
    title = (
        f"{image.name}: {top[0][0]} ({top[0][2]:.1%}) - model {meta.model_version}\n"
        f"attention A ranges {low:.3f}..{high:.3f} over this photo; the map shows it rescaled to 0..1"
    )
    plot_attention(rgb, relative.clip(0, 1), [(label, p) for label, _, p in top], out, title=title)
    return Explanation(top, heat_full)
