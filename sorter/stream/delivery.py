"""Getting a batch's commands and dead letters to the broker, then its offsets committed.

**At-least-once** (:class:`AtLeastOnce`), per batch, in numbered steps:

1. produce every command (key = station) and dead letter. A message the client refuses for its size
   (librdkafka's ``message.max.bytes``) is replaced at once by its smaller form (a dead letter without
   its payload; see ``contracts.dead_letter``);
2. flush, and look at what the broker said of each message:
   - refused for its size (the topic's ``max.message.bytes``) -> its smaller form is sent instead;
   - retriable (timed out after ``message.timeout.ms``, broker down, leader moving) -> sent again after a
     backoff (0.5 s doubling to 8 s), for as long as it takes: the batch waits in place, the worker does
     not exit, and ``blocked_since`` makes readiness fail meanwhile. Re-sending is safe: the producer is
     idempotent and the content the same (at worst an actuator sees a command twice and drops it by
     ``item_id``). Only what failed is sent again, in its original order;
   - a fatal producer error (fenced, an idempotent producer the broker forgot) -> a new producer, and
     what was not delivered is sent again;
   - anything else (not authorized, invalid topic) -> :class:`DeliveryError`: the batch failed, and the
     loop stops every later batch from sending anything;
   a stop requested while the batch waits for the broker ends the wait at the drain deadline
   (:class:`DeliveryInterrupted`; nothing committed, the batch is read again after the restart);
3. (the loop) remember the decisions in the decision cache: only now, so a decision is never
   remembered for a command that was not delivered;
4. (the loop, main thread) :meth:`AtLeastOnce.commit` ``offset + 1`` per partition still owned,
   synchronously. A failed commit is logged: its frames are read again (repeats, never loss).

**Exactly-once** (:class:`ExactlyOnce`): each batch is one transaction: begin, produce (as 1), send the
consumed offsets with the group's metadata, commit. A message refused for its size aborts the
transaction, which is retried at once with smaller forms; any other abortable error aborts and raises
:class:`TransactionAborted`, and the loop rewinds the partitions to the batch's first offsets
(:func:`rewind`); a fatal error (fenced by a newer instance of the same ``transactional.id``) recreates
the producer and rewinds.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from sorter.errors import SorterError
from sorter.logs import get_logger
from sorter.settings import KafkaSettings
from sorter.stream.contracts import dead_letter

log = get_logger("sorter.delivery")

SIZE_ERRORS = {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE}
# The producer's identity is gone or out of step with the broker (after a long outage the broker may fence
# an idempotent producer's bumped epoch, as Tansu does): only a new producer gets through again.
PRODUCER_ID_ERRORS = {
    KafkaError.PRODUCER_FENCED,
    KafkaError.INVALID_PRODUCER_EPOCH,
    KafkaError.UNKNOWN_PRODUCER_ID,
    KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
    KafkaError.INVALID_PRODUCER_ID_MAPPING,
    KafkaError._FENCED,
    KafkaError._GAPLESS_GUARANTEE,
    KafkaError._FATAL,
}
# Errors no amount of waiting fixes; everything else (timeouts, transport, leader moves, purges) is retried.
PERMANENT_ERRORS = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    KafkaError.SASL_AUTHENTICATION_FAILED,
    KafkaError._AUTHENTICATION,
    KafkaError.TOPIC_EXCEPTION,
    KafkaError.INVALID_RECORD,
    KafkaError.POLICY_VIOLATION,
    KafkaError.INVALID_REQUIRED_ACKS,
    KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
    KafkaError._INVALID_ARG,
}
# Exactly-once: a newer producer with the same transactional.id exists. Recreating would fence it back
# (two live workers taking turns): the worker that was fenced stops instead.
FENCED_ERRORS = {KafkaError.PRODUCER_FENCED, KafkaError._FENCED, KafkaError.INVALID_PRODUCER_EPOCH}
BACKOFF_S = (0.5, 8.0)


def pause(seconds: float, stop: Callable[[], bool], what: str) -> None:
    """Sleep ``seconds`` in small steps; raise :class:`DeliveryInterrupted` once ``stop()`` says so."""
    end = time.monotonic() + seconds
    while True:
        if stop():
            raise DeliveryInterrupted(f"{what} when the stop deadline passed")
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(0.1, left))


@dataclass(frozen=True)
class Failed:
    """A message that was not delivered: why, its tag (the :class:`Outgoing`), and whether the client
    refused it before sending (``local``: it never left, so nothing of it can be in a transaction)."""

    error: KafkaError
    tag: Any = None
    local: bool = False


class DeliveryError(SorterError):
    """Messages the broker did not take and waiting will not change that; the batch must not be committed."""

    def __init__(self, errors: list[KafkaError], fatal: bool, failed: Sequence[Failed] = ()) -> None:
        first = errors[0] if errors else None
        super().__init__(
            f"{len(errors)} message(s) not delivered"
            + (f": {first}" if first else "")
            + (" (fatal producer error)" if fatal else "")
        )
        self.errors = errors
        self.fatal = fatal
        self.failed = list(failed)


class DeliveryInterrupted(SorterError):
    """The worker was asked to stop while a batch waited for the broker; nothing of it was committed."""


class TransactionAborted(SorterError):
    """The batch's transaction was rolled back: nothing of it is visible; re-read it from its offsets."""


class TransactionFenced(SorterError):
    """Another live worker uses this worker's ``transactional.id`` and fenced this one: it was replaced."""


def error_kind(err: KafkaError) -> str:
    """``size`` (refused as too large), ``fatal`` (the producer is unusable), ``permanent`` or ``retry``."""
    if err.code() in SIZE_ERRORS:
        return "size"
    if err.fatal() or err.code() in PRODUCER_ID_ERRORS:
        return "fatal"
    if err.code() in PERMANENT_ERRORS:
        return "permanent"
    return "retry"


@dataclass(frozen=True)
class Outgoing:
    """One message to produce; ``smaller`` replaces it if the client or the broker refuses its size."""

    topic: str
    value: bytes | None
    key: bytes | None
    headers: Sequence[tuple[str, bytes | None]] = ()
    smaller: Outgoing | None = None


def outgoing(result, k: KafkaSettings, worker_id: str) -> list[Outgoing]:
    """A batch result as messages: commands keyed by station, then dead letters (original key)."""
    out = [Outgoing(k.commands_topic, c.to_bytes(), c.station_id.encode()) for c in result.commands]
    for d in result.dead_letters:
        letter = dead_letter(d.raw, d.reason, d.error, d.message, worker_id, k.dlq_max_bytes)
        out.append(_as_outgoing(k.dlq_topic, letter))
    return out


def _as_outgoing(topic: str, m) -> Outgoing:
    return Outgoing(topic, m.value, m.key, m.headers, _as_outgoing(topic, m.smaller) if m.smaller else None)


class CheckedProducer:
    """confluent-kafka Producer that records what failed, per message, and raises it at :meth:`flush`.

    A message the client refuses at ``produce()`` (e.g. larger than ``message.max.bytes``) is recorded as
    failed, not raised, so one message never stops the others being sent. ``tag`` (anything) comes back
    with the error in :attr:`DeliveryError.failed` (:class:`Failed`).
    """

    def __init__(
        self,
        config: dict[str, object],
        on_error: Callable[[KafkaError], None] | None = None,
        *,
        factory: Callable[[dict], Any] | None = None,
    ) -> None:
        from confluent_kafka import Producer

        self.config = config
        self.on_error = on_error
        self._failed: list[Failed] = []
        self._fatal = False
        self._lock = threading.Lock()
        self._producer = (factory or Producer)({**config, "error_cb": self._on_error})

    def _on_error(self, err: KafkaError) -> None:
        if self.on_error is not None:
            self.on_error(err)
        if err.fatal():
            with self._lock:
                self._fatal = True
        log.warning("kafka.producer_error", error=str(err), fatal=err.fatal())

    def _record(self, err: KafkaError, tag: Any, local: bool = False) -> None:
        with self._lock:
            self._failed.append(Failed(err, tag, local))
            self._fatal = self._fatal or err.fatal()

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        headers: Sequence[tuple[str, bytes | None]] | None = None,
        partition: int | None = None,
        *,
        tag: Any = None,
    ) -> None:
        extra = {} if partition is None else {"partition": partition}

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                self._record(err, tag)

        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=key, headers=list(headers or []), on_delivery=on_delivery, **extra
                )
                break
            except BufferError:  # local queue full: serve delivery reports, then retry
                self._producer.poll(0.1)
            except KafkaException as exc:  # refused before sending (too large, unknown partition, fatal)
                self._record(exc.args[0], tag, local=True)
                return
        self._producer.poll(0)

    def take_failures(self) -> tuple[list[Failed], bool]:
        """What failed since the last call, and whether the producer hit a fatal error."""
        with self._lock:
            failed, fatal = list(self._failed), self._fatal
            self._failed.clear()
        return failed, fatal

    def flush(self, timeout: float, stop: Callable[[], bool] | None = None) -> None:
        """Wait for every delivery report (in slices of 1 s, so ``stop`` can end the wait); raise what failed."""
        deadline = time.monotonic() + timeout
        remaining = len(self._producer)
        while remaining and time.monotonic() < deadline:
            if stop is not None and stop():
                self.purge()
                raise DeliveryInterrupted(f"{remaining} message(s) still undelivered when the stop deadline passed")
            remaining = self._producer.flush(min(1.0, max(0.0, deadline - time.monotonic())))
        if remaining:  # still queued at the deadline: purged, so each comes back as a failure of its own
            self.purge()
            remaining = self._producer.flush(1.0)
        failed, fatal = self.take_failures()
        if remaining:
            failed.append(Failed(KafkaError(KafkaError._MSG_TIMED_OUT, f"{remaining} message(s) still queued")))
        if failed:
            raise DeliveryError([f.error for f in failed], fatal, failed)

    def purge(self) -> None:
        with contextlib.suppress(Exception):
            self._producer.purge()
            self._producer.poll(0)

    def close(self) -> None:
        """Destroy the client now (flush first): no reconnect attempts linger after a stop."""
        self._producer = None

    @property
    def fatal(self) -> bool:
        return self._fatal


class TransactionalProducer(CheckedProducer):
    """One transaction per batch (``send_offsets_to_transaction`` with the consumer's group metadata,
    KIP-447): a read_committed reader sees every batch once or not at all.

    Errors, as the librdkafka transactions guide splits them: retriable (a timeout: the coordinator or
    the broker away) -> the same call again after a backoff, which librdkafka resumes where it stopped
    (calling ``abort`` instead would only conflict with the pending call), for as long as it takes or
    until ``stop()``; abortable -> abort and raise :class:`TransactionAborted`; fenced by a newer
    instance with the same id -> :class:`TransactionFenced`; other fatal errors -> :class:`DeliveryError`
    with ``fatal``, the caller recreates the producer. After an abort, nothing of that transaction's
    delivery reports is carried into the next one."""

    def __init__(
        self,
        config: dict[str, object],
        on_error=None,
        *,
        timeout_s: float = 30.0,
        factory=None,
        stop: Callable[[], bool] | None = None,
        on_wait: Callable[[KafkaError], None] | None = None,
        on_resume: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config, on_error, factory=factory)
        self.timeout_s = timeout_s
        self.stop = stop or (lambda: False)
        self.on_wait = on_wait or (lambda err: None)
        self.on_resume = on_resume or (lambda: None)
        self.aborted_failures: list[Failed] = []
        self._call(self._producer.init_transactions, timeout_s)

    def abort(self, why: str, cause: Exception | None = None, failures: Sequence[Failed] = ()) -> None:
        """Abort the open transaction and raise :class:`TransactionAborted`; what failed in it is kept in
        :attr:`aborted_failures` and not carried into the next transaction."""
        self._call(self._producer.abort_transaction, self.timeout_s)
        self.aborted_failures = [*failures, *self.take_failures()[0]]
        raise TransactionAborted(why) from cause

    def _call(self, fn, *args) -> None:
        delay, waited = BACKOFF_S[0], False
        while True:
            try:
                fn(*args)
                if waited:
                    self.on_resume()
                return
            except KafkaException as exc:
                err = exc.args[0]
                if err.code() in FENCED_ERRORS:
                    raise TransactionFenced(
                        f"fenced ({err}): the coordinator timed out a transaction of transactional.id "
                        f"{self.config.get('transactional.id')!r}, or another worker runs with the same id. Each "
                        "worker needs its own id: run exactly-once as a StatefulSet or set "
                        "SORTER_KAFKA__TRANSACTIONAL_ID per worker"
                    ) from exc
                if err.retriable() and not err.fatal():
                    waited = True
                    self.on_wait(err)
                    pause(delay, self.stop, f"{getattr(fn, '__name__', 'a transaction call')} still failing ({err})")
                    delay = min(delay * 2, BACKOFF_S[1])
                    continue
                if err.txn_requires_abort() and fn != self._producer.abort_transaction:
                    self.abort(f"transaction aborted: {err}", exc)
                raise DeliveryError([err], err.fatal()) from exc

    def begin(self) -> None:
        self.aborted_failures = []
        self.take_failures()
        self._call(self._producer.begin_transaction)

    def commit(self, offsets: list, group_metadata) -> None:
        if offsets:  # none: an empty batch that only decided items whose partitions we no longer own
            self._call(self._producer.send_offsets_to_transaction, offsets, group_metadata, self.timeout_s)
        self._call(self._producer.commit_transaction, self.timeout_s)
        failed, fatal = self.take_failures()
        if failed:  # cannot happen after a successful commit, but never ignore a delivery error
            raise DeliveryError([f.error for f in failed], fatal, failed)


def transactional_id(k: KafkaSettings) -> str:
    """Stable per worker slot, so a replacement fences its predecessor's open transaction: the setting, or
    group id + host name (a StatefulSet pod keeps its name, ``sorter-0``, across replacements)."""
    import socket

    return k.transactional_id or f"{k.group_id}-{socket.gethostname()}"


class AtLeastOnce:
    """Steps 1, 2 and 4 above. ``stop`` says when a stop's drain deadline has passed."""

    transactional = False

    def __init__(
        self,
        config: dict[str, object],
        *,
        stop: Callable[[], bool],
        on_error: Callable[[KafkaError], None] | None = None,
        factory: Callable[[dict], Any] | None = None,
        flush_timeout_s: float = 60.0,
    ) -> None:
        self.config, self.on_error, self.factory = config, on_error, factory
        self.stop = stop
        self.flush_timeout_s = flush_timeout_s
        self.blocked_since: float | None = None  # the batch in hand waits for the broker since then
        self.restarts = 0
        self.retries = 0
        self.producer = self._new()

    def _new(self) -> CheckedProducer:
        return CheckedProducer(self.config, self.on_error, factory=self.factory)

    def _recreate(self, error: KafkaError) -> None:
        log.warning("worker.producer_recreated", error=str(error))
        self.restarts += 1
        self.producer.purge()
        self.producer.close()
        self.producer = self._new()

    def send(self, messages: list[Outgoing], offsets=None, group_metadata=None) -> None:
        pending, delay = list(messages), BACKOFF_S[0]
        try:
            while pending:
                for m in pending:
                    self.producer.produce(m.topic, m.value, m.key, m.headers, tag=m)
                try:
                    self.producer.flush(self.flush_timeout_s, self.stop)
                    return
                except DeliveryError as exc:
                    pending, wait = self._triage(exc, pending)
                if wait:
                    self._wait(delay, pending)
                    delay = min(delay * 2, BACKOFF_S[1])
        finally:
            self.blocked_since = None

    def _triage(self, exc: DeliveryError, sent: list[Outgoing]) -> tuple[list[Outgoing], bool]:
        """What to send again (in the original order) and whether to back off first; raise if hopeless.

        A message that failed for a retriable reason is sent again with every later message of the same
        key (a station's commands): librdkafka may have delivered those after the gap (its documented
        message-timeout caveat), and re-sending them keeps the station's log ending in order."""
        again: dict[int, Outgoing] = {}
        wait, fatal_error = False, None
        order = {id(m): i for i, m in enumerate(sent)}
        first_gap: dict[tuple[str, bytes | None], int] = {}
        for f in exc.failed:
            err, m = f.error, f.tag
            if m is None:  # a flush that timed out without reports: everything outstanding
                return sent, True
            kind, i = error_kind(err), order.get(id(m), len(order))
            if kind == "size" and m.smaller is not None:
                log.warning("delivery.sent_smaller", topic=m.topic, error=str(err), why="refused for its size")
                again[i] = m.smaller
            elif kind in ("size", "permanent"):
                raise exc
            else:  # retry, or fatal: a new producer, and a backoff so a broken cluster is not hammered
                if kind == "fatal":
                    fatal_error = err
                again[i] = m
                key = (m.topic, m.key)
                first_gap[key] = min(first_gap.get(key, i), i)
                wait = True
        for i, m in enumerate(sent):
            if i not in again and (m.topic, m.key) in first_gap and i > first_gap[(m.topic, m.key)]:
                again[i] = m
        if fatal_error is not None or exc.fatal:
            self._recreate(fatal_error or exc.errors[0])
        if wait:
            self.retries += 1
            if self.blocked_since is None:
                self.blocked_since = time.monotonic()
            log.warning(
                "delivery.retry",
                messages=len(again),
                error=str(exc.errors[0]) if exc.errors else None,
                blocked_s=round(time.monotonic() - self.blocked_since, 1),
            )
        return [again[i] for i in sorted(again)], wait

    def _wait(self, seconds: float, pending: list[Outgoing]) -> None:
        pause(seconds, self.stop, f"{len(pending)} message(s) undelivered")

    def commit(self, consumer, offsets: list[TopicPartition]) -> None:
        """Step 4: ``offset + 1`` of the last message per partition (the worker's :meth:`Worker._to_commit`),
        synchronously."""
        if not offsets:
            return
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except Exception as exc:  # e.g. a rebalance took the partitions: they will be re-read, not lost
            log.warning("worker.commit_failed", error=str(exc), partitions=len(offsets))

    def close(self, timeout: float) -> None:
        if self.producer is None:
            return
        try:
            self.producer.flush(timeout)
        except SorterError as exc:
            log.error("worker.flush_failed_on_close", error=str(exc))
        self.producer.close()


class ExactlyOnce(AtLeastOnce):
    """One transaction per batch; offsets are committed inside it (step 4 is part of the transaction).

    The transactional producer is made at the first batch, on the helper thread, where waiting for the
    coordinator shows in readiness and a stop can end it (not at start-up, where nothing could)."""

    transactional = True
    FENCED_AGAIN_S = 300.0  # fenced again this soon after recreating: another live worker has our id

    def __init__(self, config: dict[str, object], *, timeout_s: float = 30.0, **kwargs) -> None:
        self.timeout_s = timeout_s
        self._abort_delay = BACKOFF_S[0]
        self._fenced_at: float | None = None
        super().__init__(config, **kwargs)

    def _new(self) -> TransactionalProducer | None:
        return None  # made by send()

    def _make(self) -> TransactionalProducer:
        return TransactionalProducer(
            self.config, self.on_error, timeout_s=self.timeout_s, factory=self.factory, stop=self.stop,
            on_wait=self._waiting, on_resume=self._resumed,
        )  # fmt: skip

    def _waiting(self, err: KafkaError) -> None:
        self.retries += 1
        if self.blocked_since is None:
            self.blocked_since = time.monotonic()
        log.warning("delivery.retry", error=str(err), blocked_s=round(time.monotonic() - self.blocked_since, 1))

    def _resumed(self) -> None:
        self.blocked_since = None

    def _recreate(self, error: KafkaError) -> None:
        """Drop the dead producer; the next batch makes a new one."""
        log.warning("worker.producer_recreated", error=str(error))
        self.restarts += 1
        if self.producer is not None:
            self.producer.purge()
            self.producer.close()
        self.producer = None

    def send(self, messages: list[Outgoing], offsets=None, group_metadata=None) -> None:
        if self.producer is None:
            self.producer = self._make()  # init_transactions: waits for the coordinator, fences a predecessor
        pending = list(messages)
        while True:
            producer = self.producer
            try:
                producer.begin()
                queue = list(pending)
                while queue:
                    for m in queue:
                        producer.produce(m.topic, m.value, m.key, m.headers, tag=m)
                    queue = []
                    for f in producer.take_failures()[0]:
                        smaller = _smaller(f)
                        if f.local and smaller is not None:  # never left the client: swap it in this transaction
                            pending = [smaller if m is f.tag else m for m in pending]
                            queue.append(smaller)
                        else:
                            producer.abort(f"message not delivered: {f.error}", failures=[f])
                producer.commit(offsets, group_metadata)
                self._abort_delay = BACKOFF_S[0]
                return
            except TransactionAborted as exc:
                failures = producer.aborted_failures
                swapped = {id(f.tag): _smaller(f) for f in failures if _smaller(f) is not None}
                if swapped:  # each dead letter shrinks at most twice (slim, minimal): this loop ends
                    log.warning("delivery.sent_smaller", messages=len(swapped), why="refused for its size")
                    pending = [swapped.get(id(m), m) for m in pending]
                    continue
                hopeless = [f for f in failures if error_kind(f.error) in ("size", "permanent")]
                if hopeless:  # waiting will not help: the batch failed (the worker stops, as at-least-once)
                    raise DeliveryError([f.error for f in hopeless], False, hopeless) from exc
                self._aborted(exc)
                raise
            except TransactionFenced as exc:
                now = time.monotonic()
                if self._fenced_at is not None and now - self._fenced_at < self.FENCED_AGAIN_S:
                    raise  # fenced again right after taking the id back: another live worker has it
                self._fenced_at = now  # e.g. the coordinator timed out our transaction during an outage
                self._recreate(KafkaError(KafkaError._FENCED, str(exc)))
                self._aborted(exc)
                raise TransactionAborted(f"producer recreated after being fenced: {exc}") from exc
            except DeliveryError as exc:
                if not exc.fatal:
                    raise
                self._recreate(exc.errors[0])  # dead: a new producer (new epoch), the batch from its offsets
                self._aborted(exc)
                raise TransactionAborted(f"producer recreated after a fatal error: {exc}") from exc

    def _aborted(self, exc: Exception) -> None:
        """The batch will be read again: not at once (the cause may last); not ready while waiting."""
        self._waiting(KafkaError(KafkaError._STATE, f"transaction aborted: {exc}"))
        try:
            self._wait(self._abort_delay, [])
        finally:
            self._resumed()
        self._abort_delay = min(self._abort_delay * 2, BACKOFF_S[1])

    def commit(self, consumer, offsets: list[TopicPartition]) -> None:
        return None  # the offsets were committed inside the transaction


def _smaller(f: Failed) -> Outgoing | None:
    """The smaller form of a message refused for its size, if it has one."""
    return f.tag.smaller if error_kind(f.error) == "size" and isinstance(f.tag, Outgoing) else None


def next_offsets(messages: list[Message]) -> list[TopicPartition]:
    """``offset + 1`` of the last message per partition: what a commit of these messages stores."""
    last: dict[tuple[str, int], int] = {}
    for m in messages:
        key = (m.topic(), m.partition())
        last[key] = max(last.get(key, -1), m.offset())
    return [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]


def cap_offsets(offsets: dict[tuple[str, int], int], held: dict[tuple[str, int], int]) -> list[TopicPartition]:
    """Offsets to commit (partition -> next offset), each lowered to the first frame still ``held`` in its
    partition (a multi-camera item waiting for its other views: read again after a restart)."""
    return [TopicPartition(t, p, min(o, held.get((t, p), o))) for (t, p), o in offsets.items()]


def rewind(consumer, messages: list[Message], owned: set[tuple[str, int]]) -> set[tuple[str, int]]:
    """An aborted transaction: nothing of the batch is visible; seek each partition still owned back to the
    batch's first offset in it. Returns the partitions rewound."""
    first: dict[tuple[str, int], int] = {}
    for m in messages:
        key = (m.topic(), m.partition())
        first[key] = min(first.get(key, m.offset()), m.offset())
    rewound = set()
    for (topic, partition), offset in first.items():
        if (topic, partition) in owned:
            consumer.seek(TopicPartition(topic, partition, offset))
            rewound.add((topic, partition))
    return rewound
