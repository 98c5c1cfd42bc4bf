"""The control topic (``kafka.control_topic``, ``sort.control``): which model the fleet serves.

A model job (or an operator) publishes ``{"action": "load", "checkpoint": "/models/model-v7.pt", "version":
"resnet18-...-v7"}``; every pod loads that file in the background and serves it from one batch on, exactly as a
hot reload of the checkpoint path does (``reload.py``: verified, checked, warmed up; refused with a reason, the
old model serving on), and only if the file's ``model_version`` is ``version`` when one is given (a message
that names one file while another lies at the path is refused, not served).

Every pod must see every message, so the reader is in no consumer group: it assigns itself every partition of
the topic from the beginning and keeps no offsets. A pod that starts later therefore applies the latest
``load`` too (the one the fleet is on), not only those published while it ran: it reads the topic's history
to its end (every partition's end-of-partition event, so the consumer needs ``enable.partition.eof``; Tansu's
high watermarks are not exact) and acts on the newest request only: the last of its partition (the order the
running pods acted in, whatever the publishers' clocks say), and between partitions the latest by publish time
(sorter creates the topic with one partition, kept forever). From then on each poll acts on the last
request that arrived. A message that is not valid JSON, names another action or misses a
field is ignored with one line (``control.ignored``), never a crash.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sorter.logs import get_logger

log = get_logger("sorter.control")

MAX_MESSAGE_BYTES = 64_000  # a load request is a few hundred bytes: anything far larger is not parsed
CATCH_UP_S = 30.0  # a history that cannot be read to its end in this long is acted on as far as it was read


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    action: Literal["load"]
    checkpoint: Path
    version: str | None = Field(None, min_length=1)


def parse(value: bytes | None) -> LoadRequest | str:
    """A control message -> the request, or why it is ignored."""
    if value is not None and len(value) > MAX_MESSAGE_BYTES:
        return f"too large for a control message: {len(value)} bytes (at most {MAX_MESSAGE_BYTES})"
    try:
        document = json.loads(value or b"")
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError; nested too deep
        return f"not JSON: {str(exc)[:200]}"
    try:
        return LoadRequest.model_validate(document)
    except ValidationError as exc:
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or '(message)'}: {e['msg']}" for e in exc.errors())
    except Exception as exc:  # anything else a hostile document provokes: ignored, never a crash
        return f"unreadable: {type(exc).__name__}: {str(exc)[:200]}"


class ControlReader:
    """Reads the control topic without a group (see the module's docstring). ``consumer``: a confluent-kafka
    Consumer with ``enable.partition.eof`` (or the tests' fake)."""

    def __init__(self, consumer, topic: str, timeout_s: float = 10.0) -> None:
        from sorter.stream.kafka import BrokerUnreachable

        self.consumer, self.topic = consumer, topic
        try:
            meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
            partitions = sorted(meta.partitions) if meta is not None and meta.error is None else [0]
        except KafkaException as exc:
            raise BrokerUnreachable(
                f"the Kafka broker did not answer for the control topic {topic!r} ({exc.args[0].str()}): check "
                "SORTER_KAFKA__BOOTSTRAP_SERVERS, or set SORTER_KAFKA__CONTROL_TOPIC= (empty) to run without one"
            ) from None
        if len(partitions) > 1:
            why = "requests in different partitions are ordered by publish time: use one partition"
            log.warning("control.partitions", topic=topic, partitions=len(partitions), why=why)
        self._behind = set(partitions)  # history still to read: no end-of-partition event yet
        self._since = time.monotonic()
        self._newest: dict[int, tuple[int, LoadRequest]] = {}  # while catching up: partition -> its last request
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])

    def poll(self) -> LoadRequest | None:
        """The request to act on, if one arrived since the last call (never waits): while the history is read,
        nothing until its end, then its newest request; afterwards the last that arrived."""
        latest = None
        for m in self.consumer.consume(1000 if self._behind else 100, 0):  # the history: in large reads
            error = m.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    self._behind.discard(m.partition())
                else:
                    log.warning("control.error", topic=self.topic, error=error.str())
                continue
            request = parse(m.value())
            if isinstance(request, str):
                log.warning("control.ignored", why=request[:300], partition=m.partition(), offset=m.offset())
            elif self._behind:  # a partition's order is the publishers' order: its last request wins there
                self._newest[m.partition()] = (m.timestamp()[1], request)
            else:
                latest = request
        if self._behind:
            if time.monotonic() - self._since < CATCH_UP_S:
                return None
            log.warning("control.history_unread", topic=self.topic, partitions=sorted(self._behind))
            self._behind = set()
        if self._newest:  # between partitions only, the publish time says which came last
            newest = max(self._newest.values(), key=lambda tr: tr[0])[1]
            self._newest = {}
            return latest or newest
        return latest

    def close(self) -> None:
        self.consumer.close()
