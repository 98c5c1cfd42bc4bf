"""Why did the model say that? The photo, the spatial attention A on its absolute 0-1 scale (how much the head
weighs each place: a flat map means it weighs little), the same map contrast-stretched (where it weighs
*more*), Grad-CAM of the predicted class (which places pushed that decision), and the top-k classes."""

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
    attention: np.ndarray  # (H, W) at the photo's size, in [0, 1], absolute
    grad_cam: np.ndarray  # (H, W) at the photo's size, in [0, 1] (scaled to its maximum)


def grad_cam(model, x: torch.Tensor, cls: int) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., 2017) on the backbone's last feature map, for class ``cls``: channels
    weighted by the mean gradient of that class's logit, summed, negative parts dropped. ``(h, w)``."""
    with torch.enable_grad():
        features = model.backbone(x).detach().requires_grad_(True)
        gated = model.attention(features)[0] if model.attention is not None else features
        logit = model.head(gated.mean(dim=(2, 3)))[0, cls]
        (grads,) = torch.autograd.grad(logit, features)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * features).sum(dim=1))[0].detach()


def _at_photo_size(heat: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    return cv2.resize(heat.astype(np.float32), (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_CUBIC)


def explain_image(image: Path, checkpoint: Path, out: Path, *, top_k: int = 5, device: str = "auto") -> Explanation:
    runtime = make_runtime(device, "fp32")  # explanations are not a hot path: full precision
    model, meta = load_checkpoint(checkpoint, runtime.device)
    model.eval()
    rgb = decode_image(image.read_bytes())
    batch = torch.from_numpy(resize_square(rgb, meta.image_size))[None]
    x = Normalizer(meta.mean, meta.std, runtime.device)(batch)
    with torch.inference_mode():
        logits, attention = model.forward_with_attention(x)
    probs = torch.softmax(logits.float(), dim=1)[0].cpu()
    k = min(top_k, meta.num_classes)
    values, indices = probs.topk(k)
    top = [(meta.classes[i], meta.skus[i], float(v)) for v, i in zip(values.tolist(), indices.tolist(), strict=True)]
    heat = attention[0, 0].float().cpu().numpy()
    absolute = _at_photo_size(heat, rgb).clip(0, 1)
    low, high = float(heat.min()), float(heat.max())
    relative = ((absolute - low) / max(high - low, 1e-6)).clip(0, 1)
    cam = grad_cam(model, x, int(indices[0])).float().cpu().numpy()
    cam = _at_photo_size(cam / max(float(cam.max()), 1e-12), rgb).clip(0, 1)
    title = (
        f"{image.name}: {top[0][0]} ({top[0][2]:.1%}) - model {meta.model_version}; "
        f"attention A spans {low:.3f}..{high:.3f} over this photo ({heat.shape[0]}x{heat.shape[1]} positions)"
    )
    maps = [
        ("attention A (absolute 0..1)", absolute, (0.0, 1.0)),
        (f"attention A stretched ({low:.2f}..{high:.2f} -> 0..1)", relative, (0.0, 1.0)),
        (f"Grad-CAM of {top[0][0]}", cam, (0.0, 1.0)),
    ]
    plot_attention(rgb, maps, [(label, p) for label, _, p in top], out, title=title)
    return Explanation(top, absolute, cam)
