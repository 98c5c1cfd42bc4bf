"""Bytes -> pixels -> model input, shared by training, evaluation and the streaming worker.

One code path for all three, so a model never sees pixels at serving time that were prepared
differently from the ones it was trained on. The recipe (input size, resize mode, mean/std) lives
in the checkpoint's metadata, never in constants here.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import cv2
import numpy as np
import torch
from PIL import Image

from sorter.errors import FrameDecodeError

#: Default cap on decoded pixels per frame: 40 MP is far above any conveyor camera, far below a bomb.
DEFAULT_MAX_PIXELS = 40_000_000

_REDUCED_FLAGS = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


#: What the frame contract accepts (and OpenCV decodes everywhere); anything else is refused by name.
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})


def image_size_from_header(data: bytes) -> tuple[int, int, str]:
    """Width, height and format read from the header alone (no pixels are decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return img.width, img.height, img.format or "unknown"
    except Image.DecompressionBombError as exc:
        raise FrameDecodeError(f"image header claims too many pixels: {exc}", "too_many_pixels") from exc
    except Exception as exc:
        raise FrameDecodeError(
            f"not a readable image ({len(data)} bytes): {type(exc).__name__}: {exc}", "unknown_format"
        ) from exc


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> np.ndarray:
    """Decode JPEG/PNG/WebP/... bytes to an RGB ``uint8`` array ``(H, W, 3)``.

    Grayscale and palette images become 3 channels, alpha is dropped. The header is checked against
    ``max_pixels`` before any pixel is decoded. With ``min_side``, JPEGs much larger than needed are
    decoded at 1/2, 1/4 or 1/8 scale (DCT scaling: faster, and the result is still >= ``min_side``).
    """
    if not data:
        raise FrameDecodeError("empty payload (0 bytes)", "empty_payload")
    width, height, fmt = image_size_from_header(data)
    if fmt not in SUPPORTED_FORMATS:
        raise FrameDecodeError(
            f"{fmt} images are not supported: send JPEG, PNG or WebP ({width}x{height}, {len(data)} bytes)",
            "unsupported_format",
        )
    if width * height > max_pixels:
        raise FrameDecodeError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}", "too_many_pixels"
        )
    factor = 1
    if min_side is not None and fmt == "JPEG":
        while factor < 8 and min(width, height) // (factor * 2) >= min_side:
            factor *= 2
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), _REDUCED_FLAGS[factor])
    if bgr is None:
        raise FrameDecodeError(
            f"{fmt} image {width}x{height} could not be decoded (truncated or corrupt)", "corrupt_image"
        )
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize the whole photo to ``size x size`` ("squash"): nothing at the frame's edges is cropped
    away, which matters on a belt where the item can be anywhere in view."""
    h, w = rgb.shape[:2]
    interpolation = cv2.INTER_AREA if (h > size or w > size) else cv2.INTER_LINEAR
    return cv2.resize(rgb, (size, size), interpolation=interpolation)


def load_for_model(data: bytes, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes -> ``(size, size, 3)`` RGB ``uint8``: the per-image part of preprocessing."""
    return resize_square(decode_image(data, max_pixels=max_pixels, min_side=size), size)


class Normalizer:
    """uint8 NHWC (or NCHW) batch -> normalised float NCHW on the model's device.

    Normalisation runs on the device after the (4x smaller) uint8 copy; on CUDA the host batch
    should be pinned so the copy can be asynchronous.
    """

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], device: torch.device, *, channels_last: bool = False
    ) -> None:
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t
        self.device = device
        self.channels_last = channels_last

    def __call__(self, batch: torch.Tensor, *, nhwc: bool = True) -> torch.Tensor:
        if batch.dtype != torch.uint8:
            raise TypeError(f"expected a uint8 batch, got {batch.dtype}")
        x = batch.to(self.device, non_blocking=True)
        if nhwc:
            x = x.permute(0, 3, 1, 2)
        x = x.float().mul_(self.scale).add_(self.shift)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=memory_format)
