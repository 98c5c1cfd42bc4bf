"""In-memory stand-ins for the outside world, for unit tests of the loop's logic (never for integration tests).

- :class:`FakeCluster` holds topics, partitions and committed offsets, and can refuse sizes or go down;
- :class:`FakeConsumer` speaks the part of confluent-kafka's ``Consumer`` API the worker uses and behaves like
  librdkafka where it matters: rebalance callbacks run *inside* ``consume()``/``poll()``, before the fetch; an
  eager rebalance revokes every partition, a cooperative one only those that move; a (re)assigned partition
  is fetched from its committed offset; a paused partition stays paused when it is unassigned and assigned
  again (librdkafka keeps the application's pause flag); statistics know a partition's end only from
  fetches (a paused partition's is frozen); committing a partition the consumer does not own fails;
  ``close()`` revokes what is still assigned;
- :class:`FakeProducer` speaks ``Producer``'s API: ``message.max.bytes`` is enforced at ``produce()`` (as
  librdkafka does, ``MSG_SIZE_TOO_LARGE``), a topic's own limit at delivery (the broker's error), and a
  cluster that is down times messages out at ``flush()``;
- :class:`FakeModel` answers from the pixels :func:`photo` encodes (class in red, confidence in green).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from sorter.stream.inference import Prediction

LABELS = ["box", "bottle", "can"]
NOW_MS = 1_795_700_000_000


def photo(cls: int, confidence: float) -> bytes:
    """A solid PNG whose colour encodes what the fake model will say: R = class * 60, G = confidence."""
    img = np.zeros((48, 64, 3), np.uint8)
    img[..., 2] = cls * 60  # OpenCV writes BGR: channel 2 is red
    img[..., 1] = round(confidence * 250)
    return cv2.imencode(".png", img)[1].tobytes()


class FakeModel:
    input_size = 32
    model_version = "fake-1"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.seen = 0
        self.delay_s = delay_s

    def names(self, index: int) -> tuple[str, str]:
        return LABELS[index], f"SKU-{index}"

    def predict(self, images):
        if self.delay_s:
            time.sleep(self.delay_s)
        self.seen += len(images)
        out = []
        for image in images:
            cls, conf = round(int(image[0, 0, 0]) / 60), float(image[0, 0, 1] / 250)
            probs = [conf if i == cls else (1 - conf) / (len(LABELS) - 1) for i in range(len(LABELS))]
            log_probs = tuple(float(np.log(max(p, 1e-9))) for p in probs)
            out.append(Prediction(cls, LABELS[cls], f"SKU-{cls}", conf, log_probs=log_probs))
        return out


@dataclass
class FakeMessage:
    _topic: str
    _partition: int
    _offset: int
    _key: bytes | None
    _value: bytes | None
    _headers: list[tuple[str, bytes | None]] = field(default_factory=list)
    _timestamp: int = NOW_MS
    _error: KafkaError | None = None
    aborted: bool = False  # written by a transaction that was aborted: read_committed readers skip it
    unreadable_headers: bool = False  # a header name that is not UTF-8: confluent-kafka raises in headers()

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self):
        if self.unreadable_headers:
            raise SystemError("<method 'headers' of 'cimpl.Message' objects> returned a result with an exception set")
        return list(self._headers) or None

    def timestamp(self) -> tuple[int, int]:
        return (1, self._timestamp)

    def error(self) -> KafkaError | None:
        return self._error


def _size(value: bytes | None, key: bytes | None, headers) -> int:
    return len(value or b"") + len(key or b"") + sum(len(k.encode()) + len(v or b"") for k, v in headers or [])


class FakeCluster:
    def __init__(self) -> None:
        self.topics: dict[str, list[list[FakeMessage]]] = {}
        self.committed: dict[tuple[str, int], int] = {}
        self.max_message_bytes: dict[str, int] = {}  # per-topic limit the "broker" applies at delivery
        self.down = False  # deliveries time out (message.timeout.ms has passed) while True
        self.flushes_while_down = 0
        self.fatal_producers = 0  # this many producers fail every delivery fatally (fenced), then work
        self.fail_init: list[KafkaError] = []  # init_transactions of any producer raises these, in turn
        self.fail_commit: list[KafkaError] = []  # commit_transaction of any producer raises these, in turn
        self.reject: Callable[[str, bytes | None, bytes | None], KafkaError | None] | None = None  # per message
        self.lock = threading.RLock()
        self.consumers: list[FakeConsumer] = []
        self.producers: list[FakeProducer] = []

    def create(self, topic: str, partitions: int = 1) -> None:
        with self.lock:
            self.topics.setdefault(topic, [[] for _ in range(partitions)])

    def append(self, topic: str, value, key=None, headers=(), partition: int | None = None) -> FakeMessage:
        with self.lock:
            self.create(topic)
            parts = self.topics[topic]
            p = partition if partition is not None else (hash(key) % len(parts) if key else 0)
            m = FakeMessage(topic, p, len(parts[p]), key, value, list(headers))
            parts[p].append(m)
            return m

    def messages(self, topic: str) -> list[FakeMessage]:
        with self.lock:
            return [m for part in self.topics.get(topic, []) for m in part if not m.aborted]

    def consumer(self, config: dict) -> FakeConsumer:
        self.consumers.append(FakeConsumer(self, config))
        return self.consumers[-1]

    def producer(self, config: dict) -> FakeProducer:
        self.producers.append(FakeProducer(self, config))
        return self.producers[-1]


class FakeConsumer:
    def __init__(self, cluster: FakeCluster, config: dict) -> None:
        self.cluster = cluster
        self.config = config
        self.cooperative = config.get("partition.assignment.strategy") == "cooperative-sticky"
        self.callbacks: dict[str, Callable | None] = {}
        self.assigned: list[tuple[str, int]] = []
        self.paused: set[tuple[str, int]] = set()
        self.position: dict[tuple[str, int], int] = {}
        self._eof_at: dict[tuple[str, int], int] = {}  # enable.partition.eof: the end last reported
        self.events: list[tuple[int, float, str, list[tuple[str, int]]]] = []  # (due call, due time, event)
        self.max_per_call = 1_000_000  # at most this many messages per consume(), as a fetch may return few
        self.commits: list[list[tuple[str, int, int]]] = []
        self.closed = False
        self.consume_calls = 0
        self._assigned_in_callback = False
        self.stuck: set[tuple[str, int]] = set()  # partitions whose fetches come back empty (a stalled broker)
        self.stats_every_s: float | None = None  # call the config's stats_cb this often, from consume()
        self.drain_first = False  # serve the first assigned partition with frames before any other (starvation)
        self.seen_end: dict[tuple[str, int], int] = {}  # a partition's end as the last fetch for it said
        self._stats_at = 0.0

    # -- what the test drives ------------------------------------------------------------------
    def schedule(self, *events: tuple[str, list[tuple[str, int]]], after_calls: int = 0, after_s: float = 0.0) -> None:
        """Rebalance events (``("revoke" | "assign" | "lost", [(topic, partition), ...])``) to run inside
        the next ``consume()``/``poll()`` (or the first one ``after_calls`` calls and ``after_s`` seconds
        later), before it fetches, as librdkafka runs them. Events run in the order they were scheduled."""
        due_call, due_time = self.consume_calls + 1 + after_calls, time.monotonic() + after_s
        self.events.extend((due_call, due_time, kind, parts) for kind, parts in events)

    # -- the Consumer API ----------------------------------------------------------------------
    def subscribe(self, topics, on_assign=None, on_revoke=None, on_lost=None) -> None:
        self.topics = topics
        self.callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost or on_revoke}

    def _run_events(self) -> None:
        while self.events and self.consume_calls >= self.events[0][0] and time.monotonic() >= self.events[0][1]:
            _, _, kind, parts = self.events.pop(0)
            if kind in ("revoke", "lost") and not self.cooperative:
                parts = list(self.assigned)  # eager: every partition goes
            tps = [TopicPartition(t, p) for t, p in parts]
            self._assigned_in_callback = False
            callback = self.callbacks.get(kind)
            if callback is not None:
                callback(self, tps)
            if not self._assigned_in_callback:  # what the Python client does when the callback did not
                if kind == "assign":
                    self.incremental_assign(tps) if self.cooperative else self.assign(tps)
                else:
                    self.incremental_unassign(tps) if self.cooperative else self.unassign()

    def _fetch(self, n: int) -> list[FakeMessage]:
        out: list[FakeMessage] = []
        with self.cluster.lock:
            for tp in self.assigned:  # a fetch goes out for each (an empty answer carries the end too)
                if tp not in self.paused and tp[0] in self.cluster.topics:
                    self.seen_end[tp] = len(self.cluster.topics[tp[0]][tp[1]])
            progress = True
            while len(out) < n and progress:
                progress = False
                for tp in list(self.assigned):
                    if tp in self.paused or tp in self.stuck or len(out) >= n:
                        continue
                    part = self.cluster.topics.get(tp[0], [])
                    if tp[1] >= len(part):
                        continue
                    pos = self.position.get(tp, 0)
                    if pos < len(part[tp[1]]):
                        if not part[tp[1]][pos].aborted:
                            out.append(part[tp[1]][pos])
                        self.position[tp] = pos + 1
                        progress = True
                        if self.drain_first:  # as librdkafka's shared queue can: the same one, first, every time
                            break
            if self.config.get("enable.partition.eof"):  # once per end reached, as librdkafka says it
                for tp in self.assigned:
                    part = self.cluster.topics.get(tp[0], [])
                    end = len(part[tp[1]]) if tp[1] < len(part) else 0
                    if len(out) < n and self.position.get(tp, 0) == end and self._eof_at.get(tp) != end:
                        self._eof_at[tp] = end
                        out.append(
                            FakeMessage(tp[0], tp[1], end, None, None, _error=KafkaError(KafkaError._PARTITION_EOF))
                        )
        return out

    def stats(self) -> str:
        """librdkafka's statistics JSON, the fields sorter reads: per assigned partition the next offset to
        fetch, the partition's end and the lag behind the committed offset; one broker, up."""
        topics: dict[str, dict] = {}
        with self.cluster.lock:
            for t, p in self.assigned:
                end = self.seen_end.get((t, p), -1001)
                if end < 0:
                    continue  # never fetched: librdkafka has no end for it yet
                fetch_from = self.position.get((t, p), 0)
                lag = max(0, end - self.cluster.committed.get((t, p), 0))
                part = {"next_offset": fetch_from, "hi_offset": end, "ls_offset": end, "consumer_lag": lag}
                topics.setdefault(t, {"partitions": {}})["partitions"][str(p)] = part
        return json.dumps({"type": "consumer", "brokers": {"b": {"state": "UP", "nodeid": 1}}, "topics": topics})

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMessage]:
        assert not self.closed, "consume() after close()"
        self.consume_calls += 1
        self._run_events()
        if self.stats_every_s is not None and time.monotonic() - self._stats_at >= self.stats_every_s:
            self._stats_at = time.monotonic()
            self.config["stats_cb"](self.stats())  # librdkafka calls it from poll/consume too
        out = self._fetch(min(num_messages, self.max_per_call))
        if not out and timeout and timeout > 0:
            time.sleep(min(timeout, 0.005))
        return out

    def poll(self, timeout: float = -1) -> FakeMessage | None:
        got = self.consume(1, timeout)
        return got[0] if got else None

    def _start(self, parts) -> None:
        for t, p in parts:
            if (t, p) not in self.assigned:
                self.assigned.append((t, p))
            # a partition paused before it was unassigned comes back paused (librdkafka's app pause flag)
            self.position[(t, p)] = self.cluster.committed.get((t, p), 0)  # from the committed offset

    def assign(self, tps) -> None:
        self._assigned_in_callback = True
        self.assigned = []
        self._start([(tp.topic, tp.partition) for tp in tps])

    def incremental_assign(self, tps) -> None:
        self._assigned_in_callback = True
        self._start([(tp.topic, tp.partition) for tp in tps])

    def unassign(self) -> None:
        self._assigned_in_callback = True
        self.assigned = []

    def incremental_unassign(self, tps) -> None:
        self._assigned_in_callback = True
        gone = {(tp.topic, tp.partition) for tp in tps}
        self.assigned = [tp for tp in self.assigned if tp not in gone]

    def list_topics(self, topic=None, timeout: float = -1):
        from types import SimpleNamespace

        topics = {
            t: SimpleNamespace(topic=t, error=None, partitions={p: SimpleNamespace(id=p) for p in range(len(parts))})
            for t, parts in self.cluster.topics.items()
        }
        return SimpleNamespace(topics=topics)

    def get_watermark_offsets(self, tp, timeout: float = -1, cached: bool = False) -> tuple[int, int]:
        with self.cluster.lock:
            return 0, len(self.cluster.topics[tp.topic][tp.partition])

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in self.assigned]

    def pause(self, tps) -> None:
        self.paused |= {(tp.topic, tp.partition) for tp in tps}

    def resume(self, tps) -> None:
        self.paused -= {(tp.topic, tp.partition) for tp in tps}

    def seek(self, tp) -> None:
        self.position[(tp.topic, tp.partition)] = tp.offset

    def commit(self, message=None, offsets=None, asynchronous: bool = True) -> None:
        not_owned = [tp for tp in offsets or [] if (tp.topic, tp.partition) not in self.assigned]
        if not_owned:  # the group moved on: another member owns it (librdkafka: ILLEGAL_GENERATION etc.)
            raise KafkaException(KafkaError(KafkaError.ILLEGAL_GENERATION, f"not assigned: {not_owned[0]}"))
        with self.cluster.lock:
            for tp in offsets or []:
                self.cluster.committed[(tp.topic, tp.partition)] = tp.offset
        self.commits.append([(tp.topic, tp.partition, tp.offset) for tp in offsets or []])

    def consumer_group_metadata(self) -> str:
        return "group-metadata"

    def close(self) -> None:
        if self.assigned and not self.closed:
            self.schedule(("revoke", list(self.assigned)))
            self._run_events()
        self.closed = True


class FakeProducer:
    def __init__(self, cluster: FakeCluster, config: dict) -> None:
        self.cluster = cluster
        self.config = config
        self.max_bytes = int(config.get("message.max.bytes", 1_000_000))
        self.queue: list[tuple] = []
        self.sent: list[FakeMessage] = []
        self.transactions: list[str] = []  # begin / commit / abort, in order
        self.txn_failed = False
        self.txn_msgs: list[FakeMessage] = []
        self.dead = cluster.fatal_producers > 0  # every delivery fails fatally (fenced)
        if self.dead:
            cluster.fatal_producers -= 1
        self.fail_commit: list[KafkaError] = []  # errors commit_transaction raises, one per call
        self.fail_init: list[KafkaError] = []  # errors init_transactions raises, one per call
        self.lock = threading.Lock()

    def produce(self, topic, value=None, key=None, headers=None, on_delivery=None, partition=None) -> None:
        if _size(value, key, headers) > self.max_bytes:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "message larger than message.max.bytes"))
        with self.lock:
            self.queue.append((topic, value, key, list(headers or []), on_delivery))

    def _deliver(self) -> None:
        with self.lock:
            queued, self.queue = self.queue, []
        for topic, value, key, headers, on_delivery in queued:
            if self.txn_failed and "transactional.id" in self.config:  # librdkafka purges the rest
                if on_delivery is not None:
                    on_delivery(KafkaError(KafkaError._PURGE_QUEUE, "purged"), FakeMessage(topic, -1, -1, key, value))
                continue
            limit = self.cluster.max_message_bytes.get(topic)
            if self.cluster.down:
                err, msg = KafkaError(KafkaError._MSG_TIMED_OUT, "Local: Message timed out"), None
            elif self.cluster.reject is not None and (refused := self.cluster.reject(topic, key, value)):
                err, msg = refused, None
            elif limit is not None and _size(value, key, headers) > limit:
                err, msg = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too large"), None
            elif self.dead:
                err, msg = KafkaError(KafkaError._FENCED, "Local: This instance has been fenced", fatal=True), None
            else:
                err, msg = None, self.cluster.append(topic, value, key, headers)
                self.sent.append(msg)
                self.txn_msgs.append(msg)
            self.txn_failed = self.txn_failed or err is not None
            if on_delivery is not None:
                on_delivery(err, msg or FakeMessage(topic, -1, -1, key, value, headers))

    def poll(self, timeout: float = 0) -> int:
        return 0  # messages stay in flight until flush() (or a transaction's commit)

    def flush(self, timeout: float = -1) -> int:
        if self.cluster.down:
            self.cluster.flushes_while_down += 1
        self._deliver()
        return 0

    def purge(self, *args) -> None:
        with self.lock:
            queued, self.queue = self.queue, []
        for topic, value, key, _, on_delivery in queued:
            if on_delivery is not None:
                on_delivery(KafkaError(KafkaError._PURGE_QUEUE, "purged"), FakeMessage(topic, -1, -1, key, value))

    def __len__(self) -> int:
        return len(self.queue)

    # -- transactions ----------------------------------------------------------------------------
    def init_transactions(self, timeout=None) -> None:
        if self.fail_init or self.cluster.fail_init:
            raise KafkaException((self.fail_init or self.cluster.fail_init).pop(0))
        self.transactions.append("init")

    def begin_transaction(self) -> None:
        self.txn_failed, self.txn_msgs = False, []
        self.transactions.append("begin")

    def send_offsets_to_transaction(self, offsets, metadata, timeout=None) -> None:
        self.transactions.append("offsets")
        self.txn_offsets = offsets

    def commit_transaction(self, timeout=None) -> None:
        if self.fail_commit or self.cluster.fail_commit:  # before any delivery: an abort purges it all
            raise KafkaException((self.fail_commit or self.cluster.fail_commit).pop(0))
        self._deliver()
        if self.txn_failed:  # librdkafka: a message of the transaction failed, it can only be aborted
            raise KafkaException(KafkaError(KafkaError._INCONSISTENT, "a message failed", txn_requires_abort=True))
        self.transactions.append("commit")
        for tp in getattr(self, "txn_offsets", []):
            self.cluster.committed[(tp.topic, tp.partition)] = tp.offset

    def abort_transaction(self, timeout=None) -> None:
        with self.lock:  # librdkafka purges what the transaction still had queued: each gets a report
            queued, self.queue = self.queue, []
        for topic, value, key, _, on_delivery in queued:
            if on_delivery is not None:
                on_delivery(KafkaError(KafkaError._PURGE_QUEUE, "purged"), FakeMessage(topic, -1, -1, key, value))
        for m in self.txn_msgs:
            m.aborted = True
        self.transactions.append("abort")
