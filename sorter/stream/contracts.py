"""The wire contracts: camera frames in, routing commands out, dead letters aside.

**Frames** (topics matching ``^frames\\..+`` by default, one per station). Value: the encoded photo
(JPEG, PNG or WebP). Key: the item id. Headers: ``item-id``, ``station-id``, ``camera-id``,
``captured-at`` (epoch milliseconds). A missing station id comes from the topic name
(``frames.<station>``); a missing item id from the key; neither -> dead letter.

**Routing commands** (``sort.commands``; key = station id, so each station's actuators read their
commands in order): JSON of :class:`RoutingCommand`, ``schema_version`` 1.

**Dead letters** (``frames.dlq``): the original key, value and headers, plus ``dlq-*`` headers saying
why (error class and message), where the frame came from (topic/partition/offset) and which worker.
A dead letter is always deliverable: one that would not fit ``kafka.dlq_max_bytes`` (or that the client
or the broker refuses for its size) goes without its payload (``dlq-payload-omitted: true``, with
``dlq-payload-size`` and ``dlq-payload-sha256`` of the original), and without the original key or
headers where those alone are too large (``dlq-key-omitted`` / ``dlq-headers-omitted`` say how large).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sorter.errors import SorterError

COMMAND_SCHEMA_VERSION = 1
ITEM_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")
STATION_ID_PATTERN = CAMERA_ID_PATTERN = ITEM_ID_PATTERN
# captured-at must fall within these bounds (2000-01-01 .. 2100-01-01, in ms): anything else is a unit
# mistake (seconds, microseconds) or garbage, and would poison latency metrics.
MIN_CAPTURED_AT_MS, MAX_CAPTURED_AT_MS = 946_684_800_000, 4_102_444_800_000

Reason = Literal["classified", "low_confidence", "unknown_sku", "station_override", "late", "unknown_product"]


class FrameError(SorterError):
    """A frame whose metadata breaks the contract; ``reason`` is a stable, machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Source:
    topic: str
    partition: int
    offset: int

    def as_dict(self) -> dict[str, object]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}


@dataclass(frozen=True)
class RawFrame:
    """What came off the wire, untouched (a dead letter must carry exactly this). ``header_error`` says
    why the headers could not be read at all (e.g. a header *name* that is not UTF-8): such a frame is
    a dead letter (``bad_header``), its headers left out."""

    source: Source
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    timestamp_ms: int | None = None
    header_error: str | None = None


@dataclass(frozen=True)
class Frame:
    """A frame whose metadata passed the contract; its pixels are not decoded yet."""

    raw: RawFrame
    item_id: str
    station_id: str
    camera_id: str | None
    captured_at_ms: int | None

    @property
    def payload(self) -> bytes:
        return self.raw.value or b""


def header_text(headers: tuple[tuple[str, bytes | None], ...], name: str) -> str | None:
    """The last value of header ``name`` as trimmed text (None when absent or blank); FrameError if it
    is not UTF-8. The one header rule: the worker, the metrics and the recording tools all read through it."""
    value = None
    for key, raw in headers:
        if key == name:
            value = raw
    if value is None:
        return None
    try:
        text = value.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise FrameError("bad_header", f"header {name!r} is not UTF-8 text") from None
    return text or None


def station_from_topic(topic: str, prefix: str = "frames.") -> str | None:
    return topic[len(prefix) :] if topic.startswith(prefix) and len(topic) > len(prefix) else None


def parse_frame(raw: RawFrame, topic_prefix: str = "frames.") -> Frame:
    """Validate a raw frame's metadata; raise :class:`FrameError` with a reason code when it breaks the contract."""
    if raw.header_error is not None:
        raise FrameError("bad_header", f"the headers cannot be read: {raw.header_error[:200]}")
    item_id = header_text(raw.headers, "item-id")
    if item_id is None and raw.key:
        try:
            item_id = raw.key.decode("utf-8").strip() or None
        except UnicodeDecodeError:
            raise FrameError("bad_key", "message key is not UTF-8 text and there is no item-id header") from None
    if item_id is None:
        raise FrameError("missing_item_id", "no item-id header and no message key: the item cannot be identified")
    if not ITEM_ID_PATTERN.match(item_id):
        raise FrameError("bad_item_id", f"item id {item_id[:40]!r} is not 1-128 characters of [A-Za-z0-9._:-]")
    station_id = header_text(raw.headers, "station-id") or station_from_topic(raw.source.topic, topic_prefix)
    if station_id is None:
        raise FrameError("missing_station_id", f"no station-id header and topic {raw.source.topic!r} names no station")
    if not STATION_ID_PATTERN.match(station_id):
        raise FrameError("bad_station_id", f"station id {station_id[:40]!r} is not 1-128 characters of [A-Za-z0-9._:-]")
    captured = header_text(raw.headers, "captured-at")
    captured_at_ms = None
    if captured is not None:
        try:
            captured_at_ms = int(captured)
        except ValueError:
            raise FrameError("bad_captured_at", f"captured-at {captured[:40]!r} is not epoch milliseconds") from None
        if not MIN_CAPTURED_AT_MS <= captured_at_ms <= MAX_CAPTURED_AT_MS:
            raise FrameError(
                "bad_captured_at", f"captured-at {captured_at_ms} is not a plausible epoch-millisecond time"
            )
    camera_id = header_text(raw.headers, "camera-id")
    if camera_id is not None and not CAMERA_ID_PATTERN.match(camera_id):
        raise FrameError("bad_camera_id", f"camera id {camera_id[:40]!r} is not 1-128 characters of [A-Za-z0-9._:-]")
    if not raw.value:
        raise FrameError("empty_payload", "the message has no image bytes")
    return Frame(raw, item_id, station_id, camera_id, captured_at_ms)


class CommandSource(BaseModel):
    topic: str
    partition: int
    offset: int

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.topic, self.partition, self.offset)


class RoutingCommand(BaseModel):
    """What a station's actuators obey. Actuators drop duplicates by ``item_id`` (at-least-once delivery)."""

    model_config = ConfigDict(frozen=True)

    schema_version: int = COMMAND_SCHEMA_VERSION
    item_id: str
    station_id: str
    camera_id: str | None = None
    sku: str | None = Field(description="SKU id of the predicted class")
    label: str | None
    confidence: float = Field(ge=0, le=1)
    chute: str
    reason: Reason
    model_version: str
    captured_at: int | None = Field(description="epoch ms when the camera took the photo")
    decided_at: int = Field(description="epoch ms when the worker decided")
    source: CommandSource
    worker_id: str
    frames: int = Field(1, description="frames of this item that the decision used")
    cached: bool = Field(False, description="decided earlier (another station or pass), reused without the model")
    ood_score: float | None = Field(
        None, description="unknown-product score of the deciding photo (higher: less like any trained product)"
    )
    views: int | None = Field(None, description="cameras whose views were fused into this decision (fusion on)")
    cameras: list[str] | None = Field(None, description="those cameras, first view first (fusion on)")
    shadow: bool = Field(False, description="a candidate model's decision (the shadow topic): never obeyed")

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


@dataclass(frozen=True)
class DeadLetterMessage:
    """A dead letter as it goes on the wire; ``smaller`` is the same without what makes it large."""

    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    smaller: DeadLetterMessage | None = None

    @property
    def size(self) -> int:
        return wire_size(self.key, self.value, self.headers)


def wire_size(key: bytes | None, value: bytes | None, headers) -> int:
    """Bytes of key, value and headers (names as UTF-8): what the client's and the broker's limits count."""
    return (
        len(key or b"")
        + len(value or b"")
        + sum(len(k.encode("utf-8", "surrogateescape")) + len(v or b"") for k, v in headers)
    )


KEY_KEPT_BYTES = 1024  # a key larger than this is not an item id: a slim dead letter goes without it


def dead_letter(raw: RawFrame, reason: str, error: str, message: str, worker_id: str, max_bytes: int):
    """The dead letter for ``raw``, as the largest of three forms that fits ``max_bytes``:

    1. full: the original key, value and headers plus the ``dlq-*`` headers;
    2. slim: the payload omitted (its size and SHA-256 said), a key over 1 KB omitted, the original
       headers kept if they fit;
    3. minimal: only the ``dlq-*`` headers (and the key if small): a few KB, whatever the frame was.

    Each form carries the next as ``smaller``, for when the client or the broker refuses it for its size
    anyway (a topic's ``max.message.bytes`` below ``max_bytes``)."""
    why = {
        "dlq-reason": reason,
        "dlq-error-class": error,
        "dlq-error-message": message[:1000],
        "dlq-source-topic": raw.source.topic[:300],
        "dlq-source-partition": str(raw.source.partition),
        "dlq-source-offset": str(raw.source.offset),
        "dlq-worker-id": worker_id[:300],
    }
    if raw.header_error is not None:
        why["dlq-headers-omitted"] = f"unreadable: {raw.header_error[:200]}"
    own = [(k, v if v is not None else b"") for k, v in raw.headers]
    dlq = [(k, v.encode()) for k, v in why.items()]
    value = raw.value or b""
    notes = [
        ("dlq-payload-omitted", b"true"),
        ("dlq-payload-size", str(len(value)).encode()),
        ("dlq-payload-sha256", hashlib.sha256(value).hexdigest().encode()),
    ]
    key = raw.key
    if key is not None and len(key) > KEY_KEPT_BYTES:
        notes.append(("dlq-key-omitted", f"{len(key)} bytes".encode()))
        key = None
    dropped = f"{len(own)} headers, {wire_size(None, None, own)} bytes".encode()
    minimal = DeadLetterMessage(key, b"", dlq + notes + ([("dlq-headers-omitted", dropped)] if own else []))
    slim = DeadLetterMessage(key, b"", own + dlq + notes, minimal) if own else minimal
    full = DeadLetterMessage(raw.key, value, own + dlq, slim)
    for form in (full, slim, minimal):
        if form.size <= max_bytes:
            return form
    return minimal
