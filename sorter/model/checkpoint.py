"""Checkpoints: the weights plus everything needed to serve them, verified on load.

File layout (a ``torch.save`` of plain containers, so it loads with ``weights_only=True``)::

    {"format": "sorter-checkpoint", "format_version": 1,
     "meta": {... ModelMeta as JSON-compatible types ...},
     "state_dict": {name: tensor},
     "sha256": hex digest over meta + every tensor's name, dtype, shape and bytes,
     "int8": {...},   # optional, ``sorter quantize``: the OpenVINO int8 model ("xml", "bin": uint8 tensors),
                      # its report ("report": JSON text) and a digest over those and the "sha256" above
     "ood": {...}}    # optional: the unknown-product score and threshold ("meta": OodMeta as JSON) and a
                      # digest over it and the "sha256" above

The int8 and ood sections stand beside the rest and change nothing in it: a sorter that does not know
them reads, verifies and serves the fp32 weights as before (rolling a fleet back keeps working; that
sorter then has no unknown-product detection). ``ModelMeta.ood`` is filled from the ood section.

Loading refuses, with a message that says what to fix: a file that is not there, truncated or not a
torch file; one that would need pickled code; another format or version; a digest that does not
match (edited after it was written); metadata that does not validate; weights that do not fit the
model the metadata describes (strict keys and shapes).
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sorter.errors import CheckpointError
from sorter.model.backbones import BACKBONES
from sorter.model.classifier import AttentionClassifier, build_classifier
from sorter.model.ood import OodMeta
from sorter.model.serialization import safe_torch_load

FORMAT = "sorter-checkpoint"
FORMAT_VERSION = 1


class ModelMeta(BaseModel):
    """What a server needs to know about a model, carried inside its checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: str
    attention: bool = True
    pool: Literal["mean", "attention"] = "mean"
    classes: list[str] = Field(min_length=2, description="label of each output index")
    skus: list[str] = Field(description="SKU id of each output index")
    image_size: int = Field(ge=32, le=1024)
    resize: str = "squash"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    model_version: str = Field(min_length=1)
    data_fingerprint: str = ""
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    metrics: dict[str, float] = Field(default_factory=dict)
    train_config: dict[str, Any] = Field(default_factory=dict)
    seen: list[str] = Field(
        default_factory=list, description="content digests of the photos that trained or tuned the model"
    )
    ood: OodMeta | None = Field(None, description="unknown-product score and threshold (None: trained before them)")

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        if value not in BACKBONES:
            raise ValueError(f"unknown backbone {value!r} (known: {', '.join(BACKBONES)})")
        return value

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) <= 0:
            raise ValueError("std must be positive")
        return value

    @model_validator(mode="after")
    def _aligned(self) -> ModelMeta:
        if len(self.skus) != len(self.classes):
            raise ValueError(f"{len(self.skus)} skus for {len(self.classes)} classes")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("class labels must be unique")
        if self.resize != "squash":
            raise ValueError(f"unknown resize mode {self.resize!r}")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class Checkpoint(NamedTuple):
    """A checkpoint as read and verified: metadata, weights, and the int8 model with its report when it
    has one (``int8``: {"xml", "bin"} uint8 tensors for :class:`sorter.model.int8.Int8Model`)."""

    meta: ModelMeta
    state: dict[str, torch.Tensor]
    int8: dict[str, torch.Tensor] | None = None
    int8_report: dict[str, Any] | None = None
    int8_problem: str | None = None  # an int8 section that cannot be used, and why: only int8 needs it


def _digest(meta: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(meta, sort_keys=True).encode())
    _hash_tensors(h, state_dict)
    return h.hexdigest()


def _hash_tensors(h: Any, tensors: dict[str, torch.Tensor]) -> None:
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def _int8_digest(main_digest: str, report: str, model: dict[str, torch.Tensor]) -> str:
    """Binds the int8 model and its report to the fp32 checkpoint it was made from."""
    h = hashlib.sha256(f"{main_digest}|{report}|".encode())
    _hash_tensors(h, model)
    return h.hexdigest()


def _ood_digest(main_digest: str, ood: dict[str, Any]) -> str:
    """Binds the unknown-product threshold to the weights it was fitted for."""
    return hashlib.sha256(f"{main_digest}|{json.dumps(ood, sort_keys=True)}".encode()).hexdigest()


def save_checkpoint(
    path: Path,
    model: AttentionClassifier,
    meta: ModelMeta,
    int8: dict[str, torch.Tensor] | None = None,
    int8_report: dict[str, Any] | None = None,
) -> None:
    """Write atomically (temp file + rename): a reader never sees half a checkpoint. ``int8``: the
    quantised copy (:func:`sorter.model.int8.quantize`) and ``int8_report``, how it was made and checked."""
    state = {
        k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
        for k, v in model.state_dict().items()
    }
    meta_json = meta.model_dump(mode="json", exclude={"ood"})
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "meta": meta_json,
        "state_dict": state,
        "sha256": _digest(meta_json, state),
    }
    if meta.ood is not None:
        ood = meta.ood.model_dump(mode="json")
        payload["ood"] = {"meta": ood, "sha256": _ood_digest(payload["sha256"], ood)}
    if int8 is not None:
        report = json.dumps(int8_report or {}, sort_keys=True)
        model8 = {"xml": int8["xml"], "bin": int8["bin"]}
        payload["int8"] = model8 | {"report": report, "sha256": _int8_digest(payload["sha256"], report, model8)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: Path) -> Checkpoint:
    """Read and verify a checkpoint file, without building a model."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train one with `sorter train DATA --out {path}`")
    payload = safe_torch_load(path, CheckpointError, "checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a sorter checkpoint (no '{FORMAT}' format marker)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {payload.get('format_version')!r}; this sorter reads "
            f"version {FORMAT_VERSION}. Re-export it with the sorter version that wrote it."
        )
    meta_json, state = payload.get("meta"), payload.get("state_dict")
    if not isinstance(meta_json, dict) or not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} lacks its metadata or weights")
    if payload.get("sha256") != _digest(meta_json, state):
        raise CheckpointError(
            f"checkpoint {path} fails its integrity check: its weights or metadata were changed after it "
            f"was written. Use the original file or retrain."
        )
    try:
        meta = ModelMeta.model_validate(meta_json)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise CheckpointError(f"checkpoint {path} has invalid metadata ({problems})") from None
    meta = meta.model_copy(update={"ood": _read_ood(path, payload)})
    try:
        int8, report = _read_int8(path, payload)
    except CheckpointError as exc:  # the fp32 weights verified: they serve; only precision int8 stops on it
        return Checkpoint(meta, state, int8_problem=str(exc))
    return Checkpoint(meta, state, int8, report)


def _read_ood(path: Path, payload: dict) -> OodMeta | None:
    """The unknown-product section, verified; one that does not verify stops start-up (routing would change
    silently otherwise)."""
    section = payload.get("ood")
    if section is None:
        return None
    ood = section.get("meta") if isinstance(section, dict) else None
    if not isinstance(ood, dict) or section.get("sha256") != _ood_digest(payload["sha256"], ood):
        raise CheckpointError(
            f"checkpoint {path}'s unknown-product threshold fails its integrity check (changed after it was "
            "written, or made for other weights): retrain, or use the original file"
        )
    try:
        return OodMeta.model_validate(ood)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise CheckpointError(f"checkpoint {path} has an invalid unknown-product threshold ({problems})") from None


def _read_int8(path: Path, payload: dict) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
    section = payload.get("int8")
    if section is None:
        return None, None
    redo = "quantise it again with `sorter quantize`, or serve --precision fp32"
    model = {k: section.get(k) for k in ("xml", "bin")} if isinstance(section, dict) else {}
    report = section.get("report") if isinstance(section, dict) else None
    if not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in model.values()) or not model:
        raise CheckpointError(f"checkpoint {path} has a malformed int8 section: {redo}")
    if not isinstance(report, str) or section.get("sha256") != _int8_digest(payload["sha256"], report, model):
        raise CheckpointError(
            f"checkpoint {path}'s int8 model fails its integrity check (changed after it was written, or made "
            f"from other weights): {redo}"
        )
    try:
        parsed = json.loads(report)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise CheckpointError(f"checkpoint {path}'s int8 report is not a JSON object: {redo}")
    return model, parsed


def load_checkpoint(
    path: Path, device: torch.device | str = "cpu", read: Checkpoint | None = None
) -> tuple[AttentionClassifier, ModelMeta]:
    """A verified checkpoint -> an ``eval()`` model on ``device`` and its metadata (``read``: what
    :func:`read_checkpoint` returned for ``path`` already, so the file is read and verified once)."""
    meta, state = (read if read is not None else read_checkpoint(path))[:2]
    model, _ = build_classifier(
        meta.backbone, meta.num_classes, pretrained=False, attention=meta.attention, pool=meta.pool
    )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {path}'s weights do not fit a {meta.backbone} classifier with {meta.num_classes} "
            f"classes: {' '.join(str(exc).split())[:600]}"
        ) from exc
    return model.to(device).eval(), meta
