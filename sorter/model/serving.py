"""A checkpoint loaded the way it is served: one path for the worker (``Classifier``) and ``sorter evaluate``,
so that evaluation scores exactly what a pod on this machine would serve.

Device and precision settled once: the checkpoint read and verified, precision int8 checked against it,
the torch model built (channels_last), bf16 vs fp32 timed on a CPU with native bf16, and the
checkpoint's int8 model (OpenVINO) taken where asked for or timed faster (:func:`sorter.model.int8.choose`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sorter.model import int8
from sorter.model.checkpoint import Checkpoint, ModelMeta, load_checkpoint, read_checkpoint
from sorter.model.preprocess import Normalizer
from sorter.model.runtime import Runtime, make_runtime, settle_precision


@dataclass
class Served:
    model: Callable[[torch.Tensor], torch.Tensor]  # the torch model, or the int8 one that replaced it
    meta: ModelMeta
    runtime: Runtime  # device, and the torch precision (fp32 beside an int8 model)
    precision: str  # what serves: int8, fp32, bf16 or fp16
    probe: dict[str, float]  # images/s measured at start-up (empty when nothing was timed)
    normalizer: Normalizer

    @property
    def quantised(self) -> bool:
        return self.precision == "int8"


def load_for_serving(
    path: Path, *, device: str = "auto", precision: str = "auto", read: Checkpoint | None = None
) -> Served:
    """``read``: what :func:`read_checkpoint` returned for ``path`` already (the file is read once)."""
    runtime = make_runtime(device, precision)
    read = read if read is not None else read_checkpoint(path)
    int8.check_int8(read, path, precision)
    model, meta = load_checkpoint(path, runtime.device, read)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    runtime, probe = settle_precision(runtime, precision, model, meta.image_size)

    def torch_forward(x: torch.Tensor) -> torch.Tensor:
        with runtime.autocast():
            return model(x.contiguous(memory_format=torch.channels_last))

    quantised, rates = int8.choose(read, precision, runtime.device, torch_forward, meta.image_size)
    channels_last = runtime.channels_last and quantised is None  # OpenVINO takes contiguous NCHW
    normalizer = Normalizer(meta.mean, meta.std, runtime.device, channels_last=channels_last)
    return Served(
        model=quantised or model,  # the torch model is dropped when the int8 one serves
        meta=meta,
        runtime=runtime,
        precision="int8" if quantised is not None else runtime.precision,
        probe=probe | rates,
        normalizer=normalizer,
    )
