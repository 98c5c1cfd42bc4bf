"""A thin typed layer over confluent-kafka: client configs, message conversion, a producer that
raises delivery failures instead of logging and forgetting them, topic creation."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from sorter.errors import SorterError
from sorter.logs import get_logger
from sorter.settings import KafkaSettings
from sorter.stream.contracts import RawFrame, Source

log = get_logger("sorter.kafka")


class DeliveryError(SorterError):
    """Messages the broker did not acknowledge; the batch must not be committed."""

    def __init__(self, errors: list[KafkaError], fatal: bool) -> None:
        first = errors[0] if errors else None
        super().__init__(
            f"{len(errors)} message(s) not delivered"
            + (f": {first}" if first else "")
            + (" (fatal producer error)" if fatal else "")
        )
        self.errors = errors
        self.fatal = fatal


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
        "message.timeout.ms": 30_000,
        "log.connection.close": False,
        **s.client_config(),
    }


def to_raw(message: Message) -> RawFrame:
    ts_type, ts = message.timestamp()
    headers = tuple((k, v) for k, v in (message.headers() or []))
    return RawFrame(
        Source(message.topic(), message.partition(), message.offset()),
        message.key(),
        message.value(),
        headers,
        ts if ts_type else None,
    )


class CheckedProducer:
    """confluent-kafka Producer that collects delivery errors and raises them at ``flush``.

    A fatal error (e.g. an idempotent producer the broker no longer knows after a restart) is reported
    as such, so the caller can recreate the producer and re-send the batch.
    """

    def __init__(self, config: dict[str, object], on_error: Callable[[KafkaError], None] | None = None) -> None:
        self.config = config
        self.on_error = on_error
        self._errors: list[KafkaError] = []
        self._fatal = False
        self._lock = threading.Lock()
        self._producer = Producer({**config, "error_cb": self._on_error})

    def _on_error(self, err: KafkaError) -> None:
        if self.on_error is not None:
            self.on_error(err)
        if err.fatal():
            with self._lock:
                self._fatal = True
                self._errors.append(err)
        log.warning("kafka.producer_error", error=str(err), fatal=err.fatal())

    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            with self._lock:
                self._errors.append(err)
                self._fatal = self._fatal or err.fatal()

    def produce(
        self,
        topic: str,
        value: bytes,
        key: bytes | None,
        headers: Sequence[tuple[str, bytes | None]] | None = None,
        partition: int | None = None,
    ) -> None:
        extra = {} if partition is None else {"partition": partition}
        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=key, headers=list(headers or []), on_delivery=self._on_delivery, **extra
                )
                break
            except BufferError:  # local queue full: serve delivery reports, then retry
                self._producer.poll(0.1)
            except KafkaException as exc:
                err = exc.args[0]
                with self._lock:
                    self._errors.append(err)
                    self._fatal = self._fatal or err.fatal()
                raise DeliveryError(list(self._errors), self._fatal) from exc
        self._producer.poll(0)

    def _take_errors(self) -> tuple[list[KafkaError], bool]:
        """The delivery errors collected since the last call, and whether any was fatal."""
        with self._lock:
            errors, fatal = list(self._errors), self._fatal
            self._errors.clear()
        return errors, fatal

    def flush(self, timeout: float) -> None:
        remaining = self._producer.flush(timeout)
        errors, fatal = self._take_errors()
        if remaining:
            errors.append(
                KafkaError(KafkaError._MSG_TIMED_OUT, f"{remaining} message(s) still queued after {timeout} s")
            )
        if errors:
            raise DeliveryError(errors, fatal)

    def close(self) -> None:
        """Destroy the client now (flush first): no reconnect attempts linger after a stop."""
        self._producer = None

    @property
    def fatal(self) -> bool:
        return self._fatal


def admin_config(s: KafkaSettings) -> dict[str, object]:
    return {"bootstrap.servers": s.bootstrap_servers, **s.client_config()}


class TransactionAborted(SorterError):
    """The batch's transaction was rolled back: nothing of it is visible; re-read it from its offsets."""


class TransactionalProducer(CheckedProducer):
    """Exactly-once delivery: each batch's commands, dead letters and consumed offsets commit as one
    transaction (``send_offsets_to_transaction`` with the consumer's group metadata, KIP-447), so a
    read_committed reader sees every batch once or not at all.

    Errors, as the librdkafka transactions guide splits them: retriable -> retry the call; abortable ->
    abort the transaction and raise :class:`TransactionAborted` (the caller rewinds); fatal (e.g. fenced
    by a newer instance) -> raise, the caller recreates the producer."""

    def __init__(self, config: dict[str, object], on_error=None, *, timeout_s: float = 30.0) -> None:
        super().__init__(config, on_error)
        self.timeout_s = timeout_s
        self._producer.init_transactions(timeout_s)

    def _call(self, fn, *args) -> None:
        for _ in range(5):
            try:
                fn(*args)
                return
            except KafkaException as exc:
                err = exc.args[0]
                if err.retriable():
                    continue
                if err.txn_requires_abort():
                    with contextlib.suppress(KafkaException):
                        self._producer.abort_transaction(self.timeout_s)
                    raise TransactionAborted(f"transaction aborted: {err}") from exc
                raise DeliveryError([err], err.fatal()) from exc
        raise TransactionAborted(f"{getattr(fn, '__name__', fn)} kept failing with retriable errors")

    def begin(self) -> None:
        self._call(self._producer.begin_transaction)

    def commit(self, offsets: list, group_metadata) -> None:
        self._call(self._producer.send_offsets_to_transaction, offsets, group_metadata, self.timeout_s)
        self._call(self._producer.commit_transaction, self.timeout_s)
        errors, fatal = self._take_errors()
        if errors:  # cannot happen after a successful commit, but never ignore a delivery error
            raise DeliveryError(errors, fatal)


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
