"""Where sorter keeps files it makes for itself (the demo's model and data)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$SORTER_CACHE``, else ``$XDG_CACHE_HOME/sorter``, else ``~/.cache/sorter``."""
    if os.environ.get("SORTER_CACHE"):
        return Path(os.environ["SORTER_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "sorter"
