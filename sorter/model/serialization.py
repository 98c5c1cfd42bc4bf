"""Loading torch files safely: ``weights_only=True`` always, and errors a person can act on."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from sorter.errors import SorterError

# torch.save's two formats: a zip archive (torch >= 1.6) or the legacy stream that opens with a pickled magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


def _looks_like_torch_file(path: Path) -> bool:
    if zipfile.is_zipfile(path):
        return True
    with path.open("rb") as f:
        return f.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC


def safe_torch_load(path: Path, error: type[SorterError], what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; failures become ``error`` saying why."""
    if not _looks_like_torch_file(path):
        raise error(f"{what} {path} cannot be read safely: it is not a torch file (truncated, or another kind of file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise error(
            f"{what} {path} cannot be read safely: it holds pickled Python objects, and sorter never executes "
            f"pickled code ({' '.join(str(exc).split())[:160]})"
        ) from exc
    except Exception as exc:
        raise error(
            f"{what} {path} cannot be read safely: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        ) from exc
