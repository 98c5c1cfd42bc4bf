"""The inference/training context chosen once: device, precision (autocast), memory format."""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sorter.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


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
    precision: str  # resolved: fp32 | bf16 | fp16 (int8 is a separate model beside it: sorter.model.int8)

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


def time_forwards(
    forwards: dict, x: torch.Tensor, rounds: int = 3, errors: dict[str, Exception] | None = None
) -> dict[str, float]:
    """Images/s of each forward pass on ``x``: a warm-up each, then ``rounds`` rounds taking turns, each
    rate from its fastest round. Taking turns and the best round keep a burst of load from another
    process (a shared node, a test run) from deciding: it slows every candidate's round alike, or one
    round that the others do not have to beat. A forward that raises ``RuntimeError`` in its warm-up
    (no kernel for that precision here) gets 0, and its exception goes into ``errors``."""
    best: dict[str, float | None] = {}
    errors = errors if errors is not None else {}
    with torch.inference_mode():
        for name, forward in forwards.items():
            try:
                forward(x)  # warm-up: kernels built for this shape
                best[name] = float("inf")
            except RuntimeError as exc:
                best[name], errors[name] = None, exc
        for _ in range(rounds):
            for name, forward in forwards.items():
                if best[name] is None:
                    continue
                started = time.perf_counter()
                try:
                    forward(x)
                except RuntimeError as exc:
                    best[name], errors[name] = None, exc
                    continue
                best[name] = min(best[name], max(time.perf_counter() - started, 1e-9))
    return {name: (len(x) / t if t is not None else 0.0) for name, t in best.items()}


def probe_input(size: int, batch: int = 8) -> torch.Tensor:
    """The probes' input: its own generator, so a seeded training run draws the same random numbers
    whatever is chosen here."""
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    return x.contiguous(memory_format=torch.channels_last)


def probe_cpu_precision(model: torch.nn.Module, size: int, batch: int = 8) -> dict[str, float]:
    """Images/s of ``model``'s forward pass on this CPU in fp32 and in bf16 autocast (:func:`time_forwards`).

    The CPU flags say bf16 instructions exist, not that they are faster: on a 2-core Intel Xeon with
    AVX-512 BF16 and no AMX, resnet18 224 px runs at 64 images/s in fp32 against 43 in bf16 (batch 16),
    while AMX CPUs run bf16 several times faster than fp32. So "auto" measures instead of assuming."""
    was_training = model.training
    model.eval()

    def forward(precision: str):
        def run(x: torch.Tensor) -> torch.Tensor:
            with Runtime(torch.device("cpu"), precision).autocast():
                return model(x)

        return run

    errors: dict[str, Exception] = {}
    try:
        rates = time_forwards({p: forward(p) for p in ("fp32", "bf16")}, probe_input(size, batch), errors=errors)
    finally:
        model.train(was_training)
    if "fp32" in errors:
        raise errors["fp32"]
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
    if precision == "int8":  # the int8 model runs in OpenVINO (sorter.model.int8); torch keeps fp32 beside it
        if dev.type != "cpu":
            raise ConfigError(
                "precision int8 is the CPU path (OpenVINO): use it with --device cpu; on CUDA use auto, bf16 or fp16"
            )
        from sorter.model import int8

        int8.require()
        precision = "fp32"
    return Runtime(dev, precision)
