"""A thin typed layer over confluent-kafka: client configs built from ``KafkaSettings``, where clients come
from (:class:`KafkaClients`, the seam unit tests use for in-memory fakes), message conversion, waiting for
the broker at start-up, topic creation. Producing and committing: ``delivery.py``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from sorter.errors import SorterError
from sorter.logs import get_logger
from sorter.settings import KafkaSettings
from sorter.stream.contracts import RawFrame, Source

log = get_logger("sorter.kafka")


def consumer_config(s: KafkaSettings) -> dict[str, object]:
    return {
        "bootstrap.servers": s.bootstrap_servers,
        "group.id": s.group_id,
        "enable.auto.commit": False,  # offsets are committed by the loop, after delivery
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": s.session_timeout_ms,
        "max.poll.interval.ms": s.max_poll_interval_ms,
        "fetch.wait.max.ms": s.fetch_wait_max_ms,
        "partition.assignment.strategy": s.assignment_strategy,
        "topic.metadata.refresh.interval.ms": s.metadata_refresh_ms,
        "log.connection.close": False,  # idle-connection closes are routine, not news
        # exactly-once: never read what a rolled-back transaction wrote (frames from transactional cameras)
        "isolation.level": "read_committed" if s.delivery == "exactly-once" else "read_uncommitted",
        **s.client_config(),
    }


def producer_config(s: KafkaSettings) -> dict[str, object]:
    return {
        "bootstrap.servers": s.bootstrap_servers,
        "enable.idempotence": True,  # no duplicates from the producer's own retries
        "acks": "all",
        "linger.ms": 2,
        "message.timeout.ms": s.message_timeout_ms,
        "log.connection.close": False,
        **s.client_config(),
    }


def transactional_producer_config(s: KafkaSettings, transactional_id: str) -> dict[str, object]:
    """Exactly-once: a stable ``transactional.id`` and a short ``transaction.timeout.ms``, so a transaction a
    dead worker left open blocks read_committed readers for seconds, not the minute librdkafka defaults to
    (librdkafka requires ``message.timeout.ms`` <= ``transaction.timeout.ms``)."""
    return producer_config(s) | {
        "transactional.id": transactional_id,
        "transaction.timeout.ms": s.transaction_timeout_ms,
        "message.timeout.ms": min(s.message_timeout_ms, s.transaction_timeout_ms),
    }


@dataclass(frozen=True)
class KafkaClients:
    """Where the worker's clients come from: confluent-kafka's, unless a test hands in fakes that speak the
    same API (``tests/fakes.py``: rebalance callbacks inside ``consume()``, size limits, outages)."""

    consumer: Callable[[dict], Any] = Consumer
    producer: Callable[[dict], Any] = Producer


def to_raw(message: Message) -> RawFrame:
    """The message as a :class:`RawFrame`. Never raises: headers confluent-kafka cannot decode (a header
    *name* that is not UTF-8 raises inside ``headers()``) make a frame with ``header_error`` set."""
    source = Source(message.topic(), message.partition(), message.offset())
    ts_type, ts = message.timestamp()
    try:
        headers = tuple((k, v) for k, v in (message.headers() or []))
        error = None
    except Exception as exc:  # e.g. SystemError from a UnicodeDecodeError in the C extension
        headers, error = (), f"{type(exc).__name__}: {exc.__cause__ or exc}"
    return RawFrame(source, message.key(), message.value(), headers, ts if ts_type else None, error)


def admin_config(s: KafkaSettings) -> dict[str, object]:
    return {"bootstrap.servers": s.bootstrap_servers, **s.client_config()}


class BrokerUnreachable(SorterError):
    """No broker answered within the start-up deadline."""


def wait_for_broker(s: KafkaSettings, timeout_s: float) -> None:
    """Bounded retries with exponential backoff (0.5 s, doubling to 8 s) until the cluster answers, so a
    worker started before its broker waits instead of crash-looping; past ``timeout_s`` it stops with a
    message that says what to check."""
    admin = AdminClient(admin_config(s))
    deadline = time.monotonic() + timeout_s
    delay, attempt = 0.5, 0
    while True:
        attempt += 1
        try:
            admin.list_topics(timeout=max(0.5, min(5.0, deadline - time.monotonic())))
            if attempt > 1:
                log.info("kafka.reachable", bootstrap_servers=s.bootstrap_servers, attempts=attempt)
            return
        except KafkaException as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerUnreachable(
                    f"no Kafka broker answered at {s.bootstrap_servers} within {timeout_s:.0f} s ({exc.args[0]}): "
                    "check SORTER_KAFKA__BOOTSTRAP_SERVERS, the network policy and the broker"
                ) from None
            wait = min(delay, left)
            log.warning(
                "kafka.unreachable",
                bootstrap_servers=s.bootstrap_servers,
                attempt=attempt,
                retry_in_s=round(wait, 1),
                error=str(exc.args[0]),
            )
            time.sleep(wait)
            delay = min(delay * 2, 8.0)


def ensure_topics(s: KafkaSettings, topics: dict[str, int], timeout: float = 10.0) -> None:
    """Create the topics that do not exist yet (name -> partitions); existing ones are left alone."""
    admin = AdminClient(admin_config(s))
    existing = set(admin.list_topics(timeout=timeout).topics)
    missing = [
        NewTopic(name, num_partitions=n, replication_factor=1) for name, n in topics.items() if name not in existing
    ]
    if not missing:
        return
    for name, future in admin.create_topics(missing, operation_timeout=timeout).items():
        try:
            future.result(timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
        log.info("kafka.topic_created", topic=name)
