"""The wire contracts: camera frames in, routing commands out, dead letters aside.

**Frames** (topics matching ``^frames\\..+`` by default, one per station). Value: the encoded photo
(JPEG, PNG or WebP). Key: the item id. Headers: ``item-id``, ``station-id``, ``camera-id``,
``captured-at`` (epoch milliseconds). A missing station id comes from the topic name
(``frames.<station>``); a missing item id from the key; neither -> dead letter.

**Routing commands** (``sort.commands``; key = station id, so each station's actuators read their
commands in order): JSON of :class:`RoutingCommand`, ``schema_version`` 1.

**Dead letters** (``frames.dlq``): the original key, value and headers, plus ``dlq-*`` headers saying
why (error class and message), where the frame came from (topic/partition/offset) and which worker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

COMMAND_SCHEMA_VERSION = 1
ITEM_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")
STATION_ID_PATTERN = ITEM_ID_PATTERN
# captured-at must fall within these bounds (2000-01-01 .. 2100-01-01, in ms): anything else is a unit
# mistake (seconds, microseconds) or garbage, and would poison latency metrics.
MIN_CAPTURED_AT_MS, MAX_CAPTURED_AT_MS = 946_684_800_000, 4_102_444_800_000

Reason = Literal["classified", "low_confidence", "unknown_sku", "station_override"]


class FrameError(Exception):
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
    """What came off the wire, untouched (a dead letter must carry exactly this)."""

    source: Source
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    timestamp_ms: int | None = None


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


def _header(headers: tuple[tuple[str, bytes | None], ...], name: str) -> str | None:
    """The last value of header ``name`` as text; FrameError if it is not UTF-8."""
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
    item_id = _header(raw.headers, "item-id")
    if item_id is None and raw.key:
        try:
            item_id = raw.key.decode("utf-8").strip() or None
        except UnicodeDecodeError:
            raise FrameError("bad_key", "message key is not UTF-8 text and there is no item-id header") from None
    if item_id is None:
        raise FrameError("missing_item_id", "no item-id header and no message key: the item cannot be identified")
    if not ITEM_ID_PATTERN.match(item_id):
        raise FrameError("bad_item_id", f"item id {item_id[:40]!r} is not 1-128 characters of [A-Za-z0-9._:-]")
    station_id = _header(raw.headers, "station-id") or station_from_topic(raw.source.topic, topic_prefix)
    if station_id is None:
        raise FrameError("missing_station_id", f"no station-id header and topic {raw.source.topic!r} names no station")
    if not STATION_ID_PATTERN.match(station_id):
        raise FrameError("bad_station_id", f"station id {station_id[:40]!r} is not 1-128 characters of [A-Za-z0-9._:-]")
    captured = _header(raw.headers, "captured-at")
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
    if not raw.value:
        raise FrameError("empty_payload", "the message has no image bytes")
    return Frame(raw, item_id, station_id, _header(raw.headers, "camera-id"), captured_at_ms)


class CommandSource(BaseModel):
    topic: str
    partition: int
    offset: int


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

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


def dead_letter_headers(
    raw: RawFrame, reason: str, error: str, message: str, worker_id: str
) -> list[tuple[str, bytes]]:
    """The frame's own headers, then ``dlq-*`` headers saying why, where from and which worker."""
    extra = {
        "dlq-reason": reason,
        "dlq-error-class": error,
        "dlq-error-message": message[:1000],
        "dlq-source-topic": raw.source.topic,
        "dlq-source-partition": str(raw.source.partition),
        "dlq-source-offset": str(raw.source.offset),
        "dlq-worker-id": worker_id,
    }
    return [(k, v if v is not None else b"") for k, v in raw.headers] + [(k, v.encode()) for k, v in extra.items()]
