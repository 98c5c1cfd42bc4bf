"""``sorter inspect``: what a recording holds, and its frames as image files."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sorter.traffic.recording import Reader, Record

_SAFE = re.compile(r"[^A-Za-z0-9._:-]+")


def image_extension(value: bytes | None) -> str:
    if not value:
        return ".bin"
    if value[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if value[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if value[:4] == b"RIFF" and value[8:12] == b"WEBP":
        return ".webp"
    return ".bin"


@dataclass
class Summary:
    path: str
    meta: dict
    records: int = 0
    topics: Counter = field(default_factory=Counter)
    stations: Counter = field(default_factory=Counter)
    items: int = 0
    first_ms: int | None = None
    last_ms: int | None = None
    value_bytes: list[int] = field(default_factory=list, repr=False)
    file_bytes: int = 0
    damage: str | None = None
    intact_before_damage: int | None = None

    def as_dict(self) -> dict:
        sizes = np.array(self.value_bytes or [0])
        span = ((self.last_ms or 0) - (self.first_ms or 0)) / 1000
        return {
            "path": self.path,
            "format_version": 1,
            "meta": self.meta,
            "records": self.records,
            "topics": dict(self.topics),
            "stations": dict(self.stations),
            "items": self.items,
            "frames_per_item": round(self.records / self.items, 3) if self.items else None,
            "first_ms": self.first_ms,
            "last_ms": self.last_ms,
            "span_s": round(span, 3),
            "rate_per_s": round(self.records / span, 2) if span > 0 else None,
            "value_bytes": {
                "total": int(sizes.sum()),
                "min": int(sizes.min()),
                "median": int(np.median(sizes)),
                "max": int(sizes.max()),
            },
            "file_bytes": self.file_bytes,
            "damage": self.damage,
            "intact_before_damage": self.intact_before_damage,
        }


def station_of(record: Record, frames_prefix: str = "frames.") -> str:
    return record.station(frames_prefix) or "?"


def _command(record: Record) -> dict | None:
    """The routing command a record of the commands topic holds (None for a frame)."""
    if not (record.value or b"").startswith(b"{"):
        return None
    try:
        value = json.loads(record.value)
    except ValueError:
        return None
    return value if isinstance(value, dict) and "item_id" in value and "chute" in value else None


def summarize(reader: Reader, *, extract_to: Path | None = None, limit: int | None = None) -> Summary:
    """Read the whole recording (stopping quietly at damage, which is reported) and optionally write
    up to ``limit`` frames as ``DIR/<station>/<item>_<camera>_<topic>-<partition>-<offset>.<ext>``."""
    s = Summary(str(reader.path), reader.meta, file_bytes=reader.path.stat().st_size)
    items: set[str] = set()
    extracted = 0
    for r in reader.records(allow_damaged=True):
        s.records += 1
        s.topics[r.topic] += 1
        command = _command(r)  # a recording of the commands topic: ids from the command (its key is the station)
        station = str(command.get("station_id") or "?") if command else station_of(r)
        s.stations[station] += 1
        item = str(command["item_id"]) if command else r.header("item-id") or (r.key or b"").decode("utf-8", "replace")
        items.add(item)
        t = r.time_ms
        s.first_ms = t if s.first_ms is None else min(s.first_ms, t)
        s.last_ms = t if s.last_ms is None else max(s.last_ms, t)
        s.value_bytes.append(len(r.value or b""))
        if extract_to is not None and (limit is None or extracted < limit):
            folder = extract_to / _SAFE.sub("_", station)
            folder.mkdir(parents=True, exist_ok=True)
            camera = r.header("camera-id") or "cam"
            name = f"{_SAFE.sub('_', item)}_{_SAFE.sub('_', camera)}_{_SAFE.sub('_', r.topic)}-{r.partition}-{r.offset}"
            (folder / (name + image_extension(r.value))).write_bytes(r.value or b"")
            extracted += 1
    s.items = len(items)
    if reader.damage is not None:
        s.damage = str(reader.damage)
        s.intact_before_damage = reader.damage.intact
    return s
