"""The control topic (``kafka.control_topic``, ``sort.control``): which model the fleet serves.

A model job (or an operator) publishes ``{"action": "load", "checkpoint": "/models/model-v7.pt", "version":
"resnet18-...-v7"}``; every pod loads that file in the background and serves it from one batch on, exactly as a
hot reload of the checkpoint path does (``reload.py``: verified, checked, warmed up; refused with a reason, the
old model serving on), and only if the file's ``model_version`` is ``version`` when one is given (a message
that names one file while another lies at the path is refused, not served).

Every pod must see every message, so the reader is in no consumer group: it assigns itself every partition of
the topic from the beginning and keeps no offsets. A pod that starts later therefore applies the latest
``load`` too (the one the fleet is on), not only those published while it ran. A message that is not valid
JSON, names another action or misses a field is ignored with one line (``control.ignored``), never a crash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from confluent_kafka import OFFSET_BEGINNING, TopicPartition
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sorter.logs import get_logger

log = get_logger("sorter.control")


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    action: Literal["load"]
    checkpoint: Path
    version: str | None = Field(None, min_length=1)


def parse(value: bytes | None) -> LoadRequest | str:
    """A control message -> the request, or why it is ignored."""
    try:
        return LoadRequest.model_validate(json.loads(value or b""))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"not JSON: {exc}"
    except ValidationError as exc:
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or '(message)'}: {e['msg']}" for e in exc.errors())


class ControlReader:
    """Reads the control topic without a group (see the module's docstring). ``consumer``: a confluent-kafka
    Consumer (or the tests' fake)."""

    def __init__(self, consumer, topic: str, timeout_s: float = 10.0) -> None:
        self.consumer, self.topic = consumer, topic
        meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        partitions = sorted(meta.partitions) if meta is not None and meta.error is None else [0]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])

    def poll(self) -> LoadRequest | None:
        """The latest valid ``load`` among the messages that arrived since the last call (never waits)."""
        latest = None
        for m in self.consumer.consume(100, 0):
            if m.error() is not None:
                continue
            request = parse(m.value())
            if isinstance(request, str):
                log.warning("control.ignored", why=request[:300], partition=m.partition(), offset=m.offset())
            else:
                latest = request
        return latest

    def close(self) -> None:
        self.consumer.close()
