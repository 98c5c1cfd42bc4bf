"""The inference/training context chosen once: device, precision (autocast), memory format."""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sorter.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True where the CPU computes bf16 natively (AMX or AVX-512 BF16); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


def select_device(preference: str = "auto") -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(preference)
    except RuntimeError as exc:
        raise ConfigError(f"device {preference!r} is not a torch device (use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {preference!r} asked for, but CUDA is not available here; use --device cpu")
    return device


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # resolved: fp32 | bf16 | fp16

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @property
    def channels_last(self) -> bool:
        # NHWC is what cuDNN and oneDNN's fast convolutions want; measured on a 2-core AVX2 CPU in fp32
        # too: resnet18 224 px 22 -> 26 img/s, mobilenet_v2 128 px 108 -> 130 img/s (batch 16).
        return True


def probe_cpu_precision(model: torch.nn.Module, size: int, batch: int = 8, repeats: int = 2) -> dict[str, float]:
    """Images/s of ``model``'s forward pass on this CPU in fp32 and in bf16 autocast (after a warm-up each).

    The CPU flags say bf16 instructions exist, not that they are faster: on a 2-core Intel Xeon with
    AVX-512 BF16 and no AMX, resnet18 224 px runs at 64 images/s in fp32 against 43 in bf16 (batch 16),
    while AMX CPUs run bf16 several times faster than fp32. So "auto" measures instead of assuming."""
    # its own generator: a seeded training run must draw the same random numbers whatever is chosen here
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    rates = {}
    try:
        with torch.inference_mode():
            for precision in ("fp32", "bf16"):
                context = Runtime(torch.device("cpu"), precision).autocast
                try:
                    with context():
                        model(x)  # warm-up: oneDNN builds its kernels for this shape
                    started = time.perf_counter()
                    for _ in range(repeats):
                        with context():
                            model(x)
                    rates[precision] = batch * repeats / (time.perf_counter() - started)
                except RuntimeError:  # an operator without a bf16 kernel here: that precision is out
                    if precision == "fp32":
                        raise
                    rates[precision] = 0.0
    finally:
        model.train(was_training)
    return rates


def settle_precision(runtime: Runtime, requested: str, model: torch.nn.Module, size: int) -> tuple[Runtime, dict]:
    """The runtime to use with ``model``: ``runtime`` as it is, except for "auto" on a CPU with native bf16,
    where the faster of fp32 and bf16 for this model and input size is measured (:func:`probe_cpu_precision`).
    Returns the runtime and the measured images/s (empty when nothing was measured)."""
    if requested != "auto" or runtime.device.type != "cpu" or runtime.precision != "bf16":
        return runtime, {}
    rates = probe_cpu_precision(model, size)
    return Runtime(runtime.device, max(rates, key=rates.__getitem__)), rates


def make_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dev = select_device(device)
    if precision == "auto":
        if dev.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_fast_bf16() else "fp32"
    if precision == "fp16" and dev.type == "cpu":
        raise ConfigError("fp16 is for CUDA; on a CPU use bf16 (with AMX/AVX-512) or fp32")
    return Runtime(dev, precision)
