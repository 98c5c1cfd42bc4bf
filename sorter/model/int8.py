"""The int8 CPU path: OpenVINO runs a post-training-quantised copy of the model.

Why OpenVINO (with NNCF for the quantisation) rather than PyTorch's own int8: torch 2.14 no longer
ships ``torch.ao``'s PT2E quantiser (it moved to torchao) and its x86 int8 kernels come through Inductor,
which needs a C++ toolchain and minutes of compilation in the pod; OpenVINO is a well-kept runtime from
the CPU's maker, picks VNNI/AMX kernels itself at run time and loads a quantised model in a second.
Measured on a 2-core Xeon (AVX-512 VNNI, no AMX), resnet18 224 px, batch 16: torch fp32 64 images/s,
OpenVINO int8 about 5x that (figures in the README's performance section).

The quantised model lives inside the checkpoint (``sorter quantize`` writes it, calibrated on the
model's own training photos and checked against its held-out photos), so a pod never calibrates on
live traffic and serves exactly what was measured. It is an optional extra: ``pip install 'sorter[int8]'``.

:class:`Int8Model` is a drop-in for the torch model at inference: float NCHW in (normalised as for the
torch model), float32 logits (divided by the temperature) out.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from sorter.errors import CheckpointError, ConfigError
from sorter.limits import cpu_limit
from sorter.logs import get_logger
from sorter.model.runtime import probe_input, time_forwards

log = get_logger("sorter.model")

INSTALL_HINT = "`pip install 'sorter[int8]'` to serve int8 (OpenVINO), 'sorter[quantize]' to make it (+ NNCF)"


@functools.cache
def _openvino():
    try:
        import openvino
    except ImportError:
        return None
    return openvino


def available() -> bool:
    return _openvino() is not None


def require() -> object:
    ov = _openvino()
    if ov is None:
        raise ConfigError(f"precision int8 needs OpenVINO, which is not installed: {INSTALL_HINT}")
    return ov


@functools.cache
def _core():
    return require().Core()


def require_nncf():
    # NNCF's own switch for its usage telemetry (it would otherwise assume consent); a user's setting stands
    os.environ.setdefault("NNCF_CI", "1")
    # NNCF imports torch's C++-extension helper, which warns on every CPU-only machine that CUDA is absent
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        import nncf
        from nncf.common.logging.logger import nncf_logger
    except ImportError:
        raise ConfigError(f"quantising needs NNCF, which is not installed: {INSTALL_HINT}") from None
    for handler in nncf_logger.handlers:  # it logs to stdout, which belongs to --json
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
    return nncf


@contextlib.contextmanager
def _no_converter_telemetry():
    """OpenVINO's model converter sends usage telemetry unless it runs in CI (``CI=true``, its only
    switch besides a consent file in the home folder): set for the conversion only, then restored."""
    before = os.environ.get("CI")
    os.environ["CI"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CI", None)
        else:
            os.environ["CI"] = before


def cpu_int8_flags() -> list[str]:
    """The CPU's int8 dot-product instructions (what makes int8 fast), for logs and benchmark reports."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in ("amx_int8", "avx512_vnni", "avx_vnni") if f in flags]


def quantize(model: torch.nn.Module, batches: Iterable[torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """Post-training int8 quantisation of ``model`` (eval mode, CPU) with NNCF, calibrated on ``batches``
    (normalised float NCHW, as the model sees them). Returns the OpenVINO model as two uint8 tensors,
    ``xml`` and ``bin``, ready to be stored in a checkpoint."""
    ov = require()
    nncf = require_nncf()
    model = model.eval()
    example = torch.zeros(1, 3, size, size)
    with torch.inference_mode(), warnings.catch_warnings(), _no_converter_telemetry():
        warnings.simplefilter("ignore", FutureWarning)  # OpenVINO traces with torch.jit, which torch deprecates
        converted = ov.convert_model(model, example_input=example, input=[(-1, 3, size, size)])
    # one item per photo: NNCF counts its subset in dataset items
    photos = [b[i : i + 1].contiguous().numpy() for b in batches for i in range(len(b))]
    # symmetric int8 activations and fast bias correction: on Fashion-MNIST (MobileNetV2 64 px, 300 photos)
    # the mixed preset and full bias correction were no more accurate (drops of 0.15-0.25 points all four)
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout belongs to --json
        quantised = nncf.quantize(
            converted,
            nncf.Dataset(photos),
            preset=nncf.QuantizationPreset.PERFORMANCE,
            subset_size=len(photos),
            fast_bias_correction=True,
        )
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "model.xml"
        ov.save_model(quantised, xml, compress_to_fp16=False)
        return {
            "xml": torch.frombuffer(bytearray(xml.read_bytes()), dtype=torch.uint8),
            "bin": torch.frombuffer(bytearray(xml.with_suffix(".bin").read_bytes()), dtype=torch.uint8),
        }


class Int8Model:
    """An OpenVINO int8 model compiled for this CPU; called like the torch model it was made from."""

    def __init__(self, blob: dict[str, torch.Tensor], made_with: str | None = None) -> None:
        ov = require()
        config = {
            # one request at a time (the worker runs one batch at a time): the pod's cores on it
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": max(1, math.floor(cpu_limit())),
            # what is not int8 runs in f32 on every CPU, as `sorter quantize` measured it (the default
            # would be bf16 on a CPU with bf16 instructions)
            "INFERENCE_PRECISION_HINT": "f32",
        }
        try:
            core = _core()
            weights = ov.Tensor(np.ascontiguousarray(blob["bin"].numpy()))
            model = core.read_model(model=blob["xml"].numpy().tobytes(), weights=weights)
            self._compiled = core.compile_model(model, "CPU", config)
            self._request = self._compiled.create_infer_request()
        except Exception as exc:  # OpenVINO raises RuntimeError and its own types: all mean "cannot serve it"
            raise ConfigError(
                f"OpenVINO {ov.__version__} cannot load the checkpoint's int8 model (made with OpenVINO "
                f"{made_with or 'unknown'}): {' '.join(str(exc).split())[:200]}. Quantise it again with this "
                f"version (`sorter quantize`) or serve --precision fp32"
            ) from None
        self._lock = threading.Lock()
        self.precision = "int8"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.detach().to("cpu", torch.float32).contiguous().numpy()
        with self._lock:
            out = self._request.infer({0: batch})
            logits = next(iter(out.values()))
            return torch.from_numpy(np.array(logits, dtype=np.float32, copy=True))

    # the torch model's interface, where evaluation code calls it: an int8 model only infers
    training = False

    def eval(self) -> Int8Model:
        return self

    def train(self, mode: bool = True) -> Int8Model:
        return self


def check_int8(checkpoint, path: Path, precision: str) -> None:
    """Precision int8 with a checkpoint that has no usable int8 model stops here, saying what to run."""
    if precision == "int8" and checkpoint.int8_problem:
        raise CheckpointError(checkpoint.int8_problem)
    if precision == "int8" and checkpoint.int8 is None:
        raise ConfigError(
            f"precision int8 asked for, but checkpoint {path} has no int8 model: make one with "
            f"`sorter quantize {path} DATA --out {path.with_name(path.stem + '.int8.pt')}`"
        )


def choose(
    checkpoint, precision: str, device: torch.device, torch_forward, size: int
) -> tuple[Int8Model | None, dict[str, float]]:
    """The int8 model to serve, or None for the torch one, and the measured images/s (empty when nothing
    was measured). precision int8: the int8 model. "auto" on a CPU, with an int8 model in the checkpoint
    and OpenVINO installed: whichever of the two is faster here, timed (int8 is not faster everywhere:
    without VNNI/AMX the gain shrinks, and a small model may be bound elsewhere)."""
    blob, report = checkpoint.int8, checkpoint.int8_report or {}
    if precision == "auto" and checkpoint.int8_problem and device.type == "cpu":
        log.warning("model.int8_skipped", reason=checkpoint.int8_problem)
    if blob is None or device.type != "cpu" or precision not in ("int8", "auto"):
        return None, {}
    if precision == "int8":
        return Int8Model(blob, report.get("openvino")), {}
    if not available():
        log.warning("model.int8_skipped", reason=f"OpenVINO is not installed: {INSTALL_HINT}")
        return None, {}
    try:
        model = Int8Model(blob, report.get("openvino"))
    except ConfigError as exc:  # auto: the torch model serves; the line says why int8 does not
        log.warning("model.int8_skipped", reason=str(exc))
        return None, {}
    errors: dict[str, Exception] = {}
    rates = time_forwards({"torch": torch_forward, "int8": model}, probe_input(size), errors=errors)
    if "torch" in errors:
        raise errors["torch"]
    if "int8" in errors:
        log.warning("model.int8_skipped", reason=f"the int8 model failed its timing run: {errors['int8']}")
    return (model if rates["int8"] > rates["torch"] else None), rates
