import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from sorter.errors import FrameDecodeError
from sorter.model.preprocess import Normalizer, decode_image, load_for_model


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_formats_decode_to_rgb(fmt):
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[..., 0] = 220  # red
    out = decode_image(_encode(rgb, fmt))
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    assert out[..., 0].mean() > 200 and out[..., 2].mean() < 30  # RGB order, not OpenCV's BGR


def test_grayscale_becomes_three_channels():
    out = decode_image(_encode(np.full((30, 30), 128, np.uint8), "PNG"))
    assert out.shape == (30, 30, 3)


def test_rgba_drops_alpha():
    out = decode_image(_encode(np.full((8, 8, 4), 200, np.uint8), "PNG"))
    assert out.shape == (8, 8, 3)


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"", "empty payload"),
        (b"\x00" * 100, "not a readable image"),
        (np.random.default_rng(0).bytes(5000), "not a readable image"),
    ],
)
def test_garbage_is_a_decode_error(payload, reason):
    with pytest.raises(FrameDecodeError, match=reason):
        decode_image(payload)


def test_truncated_jpeg_is_a_decode_error():
    data = _encode(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8), "JPEG")
    with pytest.raises(FrameDecodeError):
        decode_image(data[:200])


def test_pixel_limit_is_checked_before_decoding():
    data = _encode(np.zeros((100, 100, 3), np.uint8), "PNG")
    with pytest.raises(FrameDecodeError, match="over the limit"):
        decode_image(data, max_pixels=5000)


def test_large_jpeg_decodes_at_reduced_scale_but_never_below_the_input_size():
    data = cv2.imencode(".jpg", np.zeros((480, 640, 3), np.uint8))[1].tobytes()
    assert decode_image(data, min_side=224).shape == (240, 320, 3)
    assert decode_image(data, min_side=100).shape == (120, 160, 3)
    assert decode_image(data, min_side=300).shape == (480, 640, 3)
    assert load_for_model(data, 224).shape == (224, 224, 3)


def test_normalizer_matches_the_textbook_formula():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    batch = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    out = Normalizer(mean, std, torch.device("cpu"))(batch)
    expected = (batch.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(out, expected)
    assert Normalizer(mean, std, torch.device("cpu"), channels_last=True)(batch).is_contiguous(
        memory_format=torch.channels_last
    )
    with pytest.raises(TypeError):
        Normalizer(mean, std, torch.device("cpu"))(batch.float())
