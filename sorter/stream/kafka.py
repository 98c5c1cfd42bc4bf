"""A thin typed layer over confluent-kafka: client configs built from ``KafkaSettings`` (their clients log
through structlog: :class:`ClientLogs`), where clients come from (:class:`KafkaClients`, the seam unit tests
use for in-memory fakes), message conversion, waiting for the broker at start-up, topic creation. Producing
and committing: ``delivery.py``."""

from __future__ import annotations

import logging
import re
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

_THREAD = re.compile(r"^\[thrd:[^\]]*\]: ")  # librdkafka's internal thread name: noise for an operator
_TAIL = re.compile(r" \(after \d+ms in state \w+[^)]*\)")  # differs at every retry of the same failure


class ClientLogs(logging.Handler):
    """librdkafka's own log lines as ``kafka.client_log`` events (JSON like every other line), instead of
    raw ``%3|...|FAIL|...`` lines on stderr. A failing connect repeats at every backoff: the same line from
    the same client (its "(after Nms in state X)" tail aside) is logged at most once per ``every_s``, and
    the next one says how many were held back (``suppressed``).

    confluent-kafka hands the lines to its ``logger`` config, ``logger.log(level, "%s [%s] %s", facility,
    client, message)``, only while the client is served (``poll``, ``consume``, ``flush``): they come out
    on the thread that serves it, with that thread's bound context."""

    def __init__(self, every_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(logging.DEBUG)
        self.every_s, self.clock = every_s, clock
        self._seen: dict[tuple[str, str, str], list] = {}  # (client, facility, line) -> [logged at, held back]

    def emit(self, record: logging.LogRecord) -> None:
        try:
            facility, client, message = (str(a) for a in record.args)
        except (TypeError, ValueError):  # not confluent-kafka's call: log it whole
            facility, client, message = "", "", record.getMessage()
        message = _THREAD.sub("", message)
        key, now = (client, facility, _TAIL.sub("", message)), self.clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.every_s:
            seen[1] += 1
            return
        if len(self._seen) >= 1_000:  # bounded: forget the lines whose window has passed
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.every_s}
        self._seen[key] = [now, 0]
        log.log(
            record.levelno,  # confluent-kafka maps syslog levels: 3 error, 4 warning, 5-6 info, 7 debug
            "kafka.client_log",
            client=client,
            facility=facility,
            message=message,
            suppressed=seen[1] if seen else 0,
        )


def _client_logger() -> logging.Logger:
    logger = logging.Logger("sorter.kafka.client", logging.DEBUG)  # not in logging's tree: nothing else prints
    logger.addHandler(ClientLogs())
    return logger


CLIENT_LOGGER = _client_logger()  # in every config below: one rate limit per process, kept per client name


def kafka_config(
    s: KafkaSettings, defaults: dict[str, object] | None = None, *, required: dict[str, object] | None = None
) -> dict[str, object]:
    """Every client sorter makes (the worker's, and the demo view, record, replay, simulate, bench), from the
    Kafka settings: the user's client settings (SASL, TLS, timeouts) apply, idle-connection closes are not
    logged (routine, not news), and librdkafka's lines go through the same rate-limited JSON events, never
    raw to stderr. The client's own ``defaults`` (linger,
    idempotence, timeouts) give way to the user's client settings; what it
    ``required`` (its own consumer group, where it starts reading, no auto-commit) does not:
    ``auto.offset.reset=latest`` tuned for the worker must not turn ``record --from earliest`` into latest."""
    return {
        "bootstrap.servers": s.bootstrap_servers,
        "log.connection.close": False,
        "logger": CLIENT_LOGGER,
        **(defaults or {}),
        **s.client_config(),
        **(required or {}),
    }


def consumer_config(s: KafkaSettings) -> dict[str, object]:
    return kafka_config(
        s,
        {
            "group.id": s.group_id,
            "enable.auto.commit": False,  # offsets are committed by the loop, after delivery
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": s.session_timeout_ms,
            "max.poll.interval.ms": s.max_poll_interval_ms,
            "fetch.wait.max.ms": s.fetch_wait_max_ms,
            "partition.assignment.strategy": s.assignment_strategy,
            "topic.metadata.refresh.interval.ms": s.metadata_refresh_ms,
            # exactly-once: never read what a rolled-back transaction wrote (frames from transactional cameras)
            "isolation.level": "read_committed" if s.delivery == "exactly-once" else "read_uncommitted",
        },
    )


def producer_config(s: KafkaSettings) -> dict[str, object]:
    return kafka_config(
        s,
        {
            "enable.idempotence": True,  # no duplicates from the producer's own retries
            "acks": "all",
            "linger.ms": 2,
            "message.timeout.ms": s.message_timeout_ms,
        },
    )


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
    return {"bootstrap.servers": s.bootstrap_servers, "logger": CLIENT_LOGGER, **s.client_config()}


class BrokerUnreachable(SorterError):
    """No broker answered within the start-up deadline."""


def wait_for_broker(s: KafkaSettings, timeout_s: float) -> None:
    """Bounded retries with exponential backoff (0.5 s, doubling to 8 s) until the cluster answers, so a
    worker started before its broker waits instead of crash-looping; past ``timeout_s`` it stops with a
    message that says what to check, and why: the client's last error (connection refused, a name that
    does not resolve, a TLS handshake or SASL failure), not just "transport failure"."""
    causes: list[str] = []

    def on_error(err: KafkaError) -> None:
        if err.code() != KafkaError._ALL_BROKERS_DOWN:  # "1/1 brokers are down" says nothing of why
            causes[:] = [err.str()]

    admin = AdminClient(admin_config(s) | {"error_cb": on_error})
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
            admin.poll(0)  # serves error_cb (the cause) and the client's log lines
            cause = causes[0] if causes else str(exc.args[0])
            wait = min(delay, deadline - time.monotonic())
            log.warning(
                "kafka.unreachable",
                bootstrap_servers=s.bootstrap_servers,
                attempt=attempt,
                retry_in_s=round(wait, 1) if wait > 0 else None,  # None: the last attempt, giving up
                error=str(exc.args[0]),
                cause=cause,
            )
            if wait <= 0:
                raise BrokerUnreachable(
                    f"no Kafka broker answered at {s.bootstrap_servers} within {timeout_s:.0f} s ({cause}): "
                    "check SORTER_KAFKA__BOOTSTRAP_SERVERS, the client's TLS/SASL settings, the network policy "
                    "and the broker"
                ) from None
            time.sleep(wait)
            delay = min(delay * 2, 8.0)


def ensure_topics(
    s: KafkaSettings, topics: dict[str, int], timeout: float = 10.0, configs: dict[str, dict[str, str]] | None = None
) -> None:
    """Create the topics that do not exist yet (name -> partitions; ``configs``: name -> topic configs);
    existing ones are left alone."""
    admin = AdminClient(admin_config(s))
    try:
        existing = set(admin.list_topics(timeout=timeout).topics)
    except KafkaException as exc:  # it answered a moment ago (wait_for_broker), or was never asked
        raise BrokerUnreachable(
            f"the Kafka broker at {s.bootstrap_servers} did not answer while creating topics ({exc.args[0].str()}): "
            "check SORTER_KAFKA__BOOTSTRAP_SERVERS and the broker"
        ) from None
    missing = [
        NewTopic(name, num_partitions=n, replication_factor=1, config=(configs or {}).get(name, {}))
        for name, n in topics.items()
        if name not in existing
    ]
    if not missing:
        return
    for name, future in admin.create_topics(missing, operation_timeout=timeout).items():
        try:
            future.result(timeout)
        except KafkaException as exc:
            if exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise SorterError(
                f"the broker at {s.bootstrap_servers} refused to create topic {name} ({exc.args[0].str()}): "
                "create it yourself, or give sorter's principal the right to"
            ) from None
        log.info("kafka.topic_created", topic=name)
