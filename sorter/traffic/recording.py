"""The recording file format (``.sorterrec``): Kafka messages, append-only, checked record by record.

Layout, all integers big-endian::

    file    = header record*
    header  = MAGIC (8 bytes: 89 'S' 'R' 'E' 'C' 0D 0A 1A) | version u16 | meta_len u32 | meta | crc32(meta) u32
    record  = body_len u32 | crc32(body) u32 | body
    body    = kind u8 (1 = message) | timestamp_ms i64 (-1: none) | recorded_at_ms i64 | partition i32
              | offset i64 | topic_len u16 | topic | key_len i32 (-1: null) | key
              | header_count u16 | (name_len u16 | name | value_len i32 (-1: null) | value)*
              | value_len i32 (-1: null) | value

``meta`` is UTF-8 JSON (who recorded what, when, with which sorter). Payloads are stored as they came:
photos are already compressed (JPEG, PNG, WebP), so there is no base64 and no second compression, and
a record costs 40-odd bytes plus its topic, key, headers and photo. The magic's bytes catch a file
mangled by text-mode transfers (as PNG's do).

Every record carries its own length and CRC-32, so a reader knows exactly where damage starts: a
truncated tail (a recorder killed mid-write, a copy cut short) or a corrupted record stops reading
with an error that gives the byte offset and how many records before it are intact, and those can
still be read (``allow_damaged``). A writer appends whole records and flushes them, so a reader may
open a recording while it grows (``follow``): an incomplete last record then means "not yet written".
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from sorter.errors import SorterError
from sorter.stream.contracts import FrameError, RawFrame, Source, header_text, station_from_topic

MAGIC = b"\x89SREC\r\n\x1a"
VERSION = 1
KIND_MESSAGE = 1
MAX_BODY = 256 * 1024 * 1024  # a length above this is damage, not a record
_U16, _I32, _U32, _I64 = struct.Struct(">H"), struct.Struct(">i"), struct.Struct(">I"), struct.Struct(">q")
_PREFIX = struct.Struct(">II")
_FIXED = struct.Struct(">BqqiqH")  # kind, timestamp, recorded_at, partition, offset, topic_len


class RecordingError(SorterError):
    """Not a recording, or a version this sorter cannot read."""


class RecordingDamaged(RecordingError):
    """Reading stopped at damage; ``intact`` records before byte ``position`` are good."""

    def __init__(self, path: Path, position: int, intact: int, what: str) -> None:
        super().__init__(
            f"{path}: {what} at byte {position}, after {intact} intact record(s); the records before it can "
            "still be used (replay --allow-damaged, inspect --allow-damaged)"
        )
        self.position = position
        self.intact = intact
        self.what = what


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    value: bytes | None
    recorded_at_ms: int = 0

    def header(self, name: str) -> str | None:
        """Header ``name`` as the worker reads it (last value, trimmed); None where the worker would find
        none, or would dead-letter the frame for it (not UTF-8)."""
        try:
            return header_text(self.headers, name)
        except FrameError:
            return None

    def to_raw(self, topic: str | None = None) -> RawFrame:
        """The frame the worker would have read (``topic``: where a replay sends it). A frame whose headers
        the client could not read was recorded without them: it reads here as a frame with no headers."""
        source = Source(topic or self.topic, self.partition, self.offset)
        return RawFrame(source, self.key, self.value, self.headers, self.timestamp_ms)

    def station(self, frames_prefix: str = "frames.") -> str | None:
        """The station-id header, else the station named by the topic (``frames.<station>``), as the worker does."""
        return self.header("station-id") or station_from_topic(self.topic, frames_prefix)

    @property
    def time_ms(self) -> int:
        """When it happened: the message's own timestamp, else when it was recorded."""
        return self.timestamp_ms if self.timestamp_ms is not None else self.recorded_at_ms


def _blob(data: bytes | None) -> bytes:
    return _I32.pack(-1) if data is None else _I32.pack(len(data)) + data


def encode(record: Record) -> bytes:
    topic = record.topic.encode()
    parts = [
        _FIXED.pack(
            KIND_MESSAGE,
            -1 if record.timestamp_ms is None else record.timestamp_ms,
            record.recorded_at_ms,
            record.partition,
            record.offset,
            len(topic),
        ),
        topic,
        _blob(record.key),
        _U16.pack(len(record.headers)),
    ]
    for name, value in record.headers:
        raw = name.encode()
        parts += [_U16.pack(len(raw)), raw, _blob(value)]
    parts.append(_blob(record.value))
    body = b"".join(parts)
    return _PREFIX.pack(len(body), zlib.crc32(body)) + body


def decode(body: bytes) -> Record:
    kind, ts, recorded_at, partition, offset, topic_len = _FIXED.unpack_from(body, 0)
    if kind != KIND_MESSAGE:
        raise ValueError(f"unknown record kind {kind}")
    pos = _FIXED.size
    topic = body[pos : pos + topic_len].decode()
    pos += topic_len

    def blob() -> bytes | None:
        nonlocal pos
        (n,) = _I32.unpack_from(body, pos)
        pos += 4
        if n == -1:
            return None
        if n < 0 or pos + n > len(body):
            raise ValueError("field length out of range")
        data = body[pos : pos + n]
        pos += n
        return data

    key = blob()
    (count,) = _U16.unpack_from(body, pos)
    pos += 2
    headers = []
    for _ in range(count):
        (n,) = _U16.unpack_from(body, pos)
        name = body[pos + 2 : pos + 2 + n].decode()
        pos += 2 + n
        headers.append((name, blob()))
    value = blob()
    if pos != len(body):
        raise ValueError("trailing bytes in record")
    return Record(topic, partition, offset, None if ts == -1 else ts, key, tuple(headers), value, recorded_at)


def _read_header(f: BinaryIO, path: Path) -> tuple[dict, int]:
    head = f.read(len(MAGIC) + 6)
    if len(head) < len(MAGIC) or head[: len(MAGIC)] != MAGIC:
        raise RecordingError(f"{path}: not a sorter recording (it does not start with the .sorterrec magic bytes)")
    if len(head) < len(MAGIC) + 6:
        raise RecordingDamaged(path, len(head), 0, "truncated file header")
    version, meta_len = struct.unpack(">HI", head[len(MAGIC) :])
    if version != VERSION:
        raise RecordingError(
            f"{path}: recording format version {version} is not supported by this sorter (it reads version {VERSION})"
        )
    meta = f.read(meta_len)
    crc = f.read(4)
    if len(meta) < meta_len or len(crc) < 4:
        raise RecordingDamaged(path, len(head), 0, "truncated file header")
    if zlib.crc32(meta) != _U32.unpack(crc)[0]:
        raise RecordingDamaged(path, len(head), 0, "corrupt file header (checksum mismatch)")
    return json.loads(meta), len(head) + meta_len + 4


@dataclass
class Reader:
    """Reads a recording. ``records()`` yields until the end, or raises ``RecordingDamaged`` at damage."""

    path: Path
    meta: dict = field(default_factory=dict)
    data_start: int = 0

    @classmethod
    def open(cls, path: Path | str) -> Reader:
        path = Path(path)
        if not path.is_file():
            raise RecordingError(f"{path}: no such recording")
        with path.open("rb") as f:
            meta, start = _read_header(f, path)
        return cls(path, meta, start)

    def records(
        self, *, allow_damaged: bool = False, follow: bool = False, stop=None, poll_s: float = 0.2
    ) -> Iterator[Record]:
        """Every record in order. ``allow_damaged``: stop quietly at damage (the caller may check
        ``self.damage``). ``follow``: at the end (or a partial last record), wait for more until
        ``stop()`` is true."""
        self.damage: RecordingDamaged | None = None
        count = 0
        with self.path.open("rb") as f:
            f.seek(self.data_start)
            while True:
                # decided before reading, so a record written just before ``stop`` turned true is still read
                last_look = not follow or (stop is not None and stop())
                position = f.tell()
                prefix = f.read(_PREFIX.size)
                body = b""
                if len(prefix) == _PREFIX.size:
                    length, crc = _PREFIX.unpack(prefix)
                    if length > MAX_BODY:
                        yield from self._damaged(position, count, "corrupt record length", allow_damaged)
                        return
                    body = f.read(length)
                    if len(body) == length:
                        if zlib.crc32(body) != crc:
                            yield from self._damaged(
                                position, count, "corrupt record (checksum mismatch)", allow_damaged
                            )
                            return
                        try:
                            record = decode(body)
                        except (ValueError, struct.error, UnicodeDecodeError) as exc:
                            yield from self._damaged(position, count, f"undecodable record ({exc})", allow_damaged)
                            return
                        count += 1
                        yield record
                        continue
                if not last_look:
                    f.seek(position)  # the end, or a tail still being written: wait for the rest
                    time.sleep(poll_s)
                    continue
                if not prefix:
                    return  # a clean end
                yield from self._damaged(position, count, "truncated record", allow_damaged)
                return

    def _damaged(self, position: int, count: int, what: str, allow: bool) -> Iterator[Record]:
        self.damage = RecordingDamaged(self.path, position, count, what)
        if not allow:
            raise self.damage
        return iter(())

    def verify(self) -> tuple[int, RecordingDamaged | None]:
        """(intact records, the damage if any), reading the whole file once."""
        n = sum(1 for _ in self.records(allow_damaged=True))
        return n, self.damage


class Writer:
    """Appends records to a new recording; each record is flushed whole, so readers may follow it."""

    def __init__(self, path: Path | str, meta: dict | None = None, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise RecordingError(f"{self.path} exists: choose another --out, or remove it first")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        meta_bytes = json.dumps({"format": "sorterrec", "created_at_ms": int(time.time() * 1000), **(meta or {})})
        raw = meta_bytes.encode()
        self._f = self.path.open("wb")
        self._f.write(MAGIC + struct.pack(">HI", VERSION, len(raw)) + raw + _U32.pack(zlib.crc32(raw)))
        self._f.flush()
        self.records = 0
        self.bytes = self._f.tell()

    def write(self, record: Record) -> None:
        data = encode(record)
        self._f.write(data)
        self._f.flush()  # whole records only reach the file: a follower never sees half a record for long
        self.records += 1
        self.bytes += len(data)

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
