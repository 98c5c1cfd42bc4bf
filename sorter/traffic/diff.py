"""``sorter diff``: compare the routing commands of two runs (two model versions, two routing tables).

Either side is a JSON-lines file of commands (``sorter replay --direct --out``) or a recording of a
commands topic (``sorter record --topics sort.commands``), or, with ``--shadow``, the live commands topic
against the shadow topic read from the broker (:func:`load_topic`). Items are matched by ``item_id``; an
item with several commands on one side (at-least-once duplicates) is judged by its last one, and the
duplicates are counted.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sorter.errors import SorterError
from sorter.traffic.recording import MAGIC, Reader

REVIEW_REASONS = {"low_confidence", "unknown_product"}  # what sends an item to a person


def load_commands(path: Path) -> tuple[dict[str, dict], int]:
    """item_id -> its last command, and how many duplicate commands there were."""
    path = Path(path)
    if not path.is_file():
        raise SorterError(f"{path}: no such file")
    with path.open("rb") as f:
        recording = f.read(len(MAGIC)) == MAGIC
    values: list[tuple[str, bytes]] = []
    if recording:
        values = [(f"record {i}", r.value or b"") for i, r in enumerate(Reader.open(path).records())]
    else:
        lines = path.read_bytes().splitlines()
        values = [(f"line {i + 1}", line) for i, line in enumerate(lines) if line.strip()]
    return _commands(str(path), values)


def _commands(source: str, values: list[tuple[str, bytes]]) -> tuple[dict[str, dict], int]:
    out: dict[str, dict] = {}
    seen = 0
    for where, value in values:
        try:
            command = json.loads(value)
            item = command["item_id"]
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise SorterError(f"{source}, {where}: not a routing command ({exc})") from None
        seen += 1
        out[item] = command
    return out, seen - len(out)


def load_topic(kafka, topic: str, timeout_s: float = 60.0) -> tuple[dict[str, dict], int]:
    """A commands topic on the broker, from its beginning to its end now (every partition's end-of-partition
    event): item_id -> its last command, and how many duplicates. ``kafka``: KafkaSettings."""
    import uuid

    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

    from sorter.stream.kafka import kafka_config

    required = {"group.id": f"sorter-diff-{uuid.uuid4().hex[:12]}", "enable.auto.commit": False,
                "enable.partition.eof": True}  # fmt: skip
    consumer = Consumer(kafka_config(kafka, {"fetch.wait.max.ms": 50}, required=required))
    try:
        try:
            meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        except KafkaException as exc:
            raise SorterError(f"the broker at {kafka.bootstrap_servers} did not answer ({exc.args[0].str()})") from None
        if meta is None or meta.error is not None or not meta.partitions:
            raise SorterError(f"topic {topic} is not on the broker at {kafka.bootstrap_servers}")
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        behind, values = set(meta.partitions), []
        deadline = time.monotonic() + timeout_s
        while behind:
            if time.monotonic() > deadline:
                raise SorterError(
                    f"topic {topic}: its end not reached in {timeout_s:g} s (partitions {sorted(behind)})"
                )
            for m in consumer.consume(500, 0.5):
                if m.error() is None:
                    values.append((f"partition {m.partition()} offset {m.offset()}", m.value() or b""))
                elif m.error().code() == KafkaError._PARTITION_EOF:
                    behind.discard(m.partition())
                else:
                    raise SorterError(f"topic {topic}: {m.error().str()}")
        return _commands(f"topic {topic}", values)
    finally:
        consumer.close()


@dataclass
class Diff:
    a_items: int
    b_items: int
    common: int
    same_chute: int
    same_label: int
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    changed: list[dict] = field(default_factory=list)  # items whose chute changed
    transitions: Counter = field(default_factory=Counter)  # (chute a, chute b) -> items
    duplicates_a: int = 0
    duplicates_b: int = 0
    versions_a: list[str] = field(default_factory=list)
    versions_b: list[str] = field(default_factory=list)
    review_a: int = 0  # items of the common ones each side sent to review (low confidence, unknown product)
    review_b: int = 0

    @property
    def chute_agreement(self) -> float:
        return self.same_chute / self.common if self.common else 1.0

    def as_dict(self, limit: int = 50) -> dict:
        return {
            "a_items": self.a_items,
            "b_items": self.b_items,
            "common": self.common,
            "chute_agreement": round(self.chute_agreement, 4),
            "label_agreement": round(self.same_label / self.common, 4) if self.common else 1.0,
            "changed": len(self.changed),
            "only_a": len(self.only_a),
            "only_b": len(self.only_b),
            "duplicates_a": self.duplicates_a,
            "duplicates_b": self.duplicates_b,
            "model_versions_a": self.versions_a,
            "model_versions_b": self.versions_b,
            "review_share_a": round(self.review_a / self.common, 4) if self.common else 0.0,
            "review_share_b": round(self.review_b / self.common, 4) if self.common else 0.0,
            "transitions": [{"a": a, "b": b, "items": n} for (a, b), n in self.transitions.most_common()],
            "changed_items": self.changed[:limit],
        }


def diff_commands(a: dict[str, dict], b: dict[str, dict]) -> Diff:
    common = sorted(set(a) & set(b))
    d = Diff(len(a), len(b), len(common), 0, 0)
    d.only_a = sorted(set(a) - set(b))
    d.only_b = sorted(set(b) - set(a))
    d.versions_a = sorted({str(c.get("model_version")) for c in a.values()})
    d.versions_b = sorted({str(c.get("model_version")) for c in b.values()})
    for item in common:
        ca, cb = a[item], b[item]
        d.review_a += ca.get("reason") in REVIEW_REASONS
        d.review_b += cb.get("reason") in REVIEW_REASONS
        d.same_label += ca.get("label") == cb.get("label")
        if ca.get("chute") == cb.get("chute"):
            d.same_chute += 1
            continue
        d.transitions[(ca.get("chute"), cb.get("chute"))] += 1
        d.changed.append(
            {
                "item_id": item,
                "station_id": ca.get("station_id"),
                "chute": [ca.get("chute"), cb.get("chute")],
                "label": [ca.get("label"), cb.get("label")],
                "confidence": [ca.get("confidence"), cb.get("confidence")],
                "reason": [ca.get("reason"), cb.get("reason")],
            }
        )
    return d
