"""The Kafka loop: consume a micro-batch, run the pipeline, deliver, remember, commit. Repeat.

At-least-once, in numbered steps per batch:

1. collect up to ``batch.max_size`` frames, waiting at most ``batch.max_wait_ms`` after the first;
   start decoding them at once in the decode thread pool;
2. on the helper thread (one, so batches run in order): run the pipeline (cache lookup, wait for the
   decoders, model, routing) and steps 3-4. With ``batch.overlap`` the main thread meanwhile collects
   and starts decoding the next batch, so consuming, decoding and inference overlap;
3. produce routing commands (key = station) and dead letters, then flush: any delivery failure is
   raised; a fatal producer error recreates the producer and re-sends the batch;
4. store the batch's decisions in the cache (only now: a decision remembered before its command was
   delivered could lose the command after a crash; and the next batch's lookup runs after this);
5. back on the main thread, commit ``offset + 1`` per partition still assigned, synchronously.

If waiting for a batch takes longer than a third of ``max.poll.interval.ms`` (a slow model, a stalled
broker), the main thread pauses the assigned partitions and keeps polling until it is done, so the
group does not evict the consumer; anything a poll returns meanwhile is kept for the next batch.

A crash anywhere before step 5 re-delivers the batch: commands may repeat (actuators drop them by
``item_id``), none is lost. Rebalances happen inside ``consume``/``poll``: on revocation the batches in
flight are finished and committed first, while the partitions are still ours (no repeats for their new
owner); frames of revoked partitions collected but not started are dropped deliberately (the new owner
reads them). SIGTERM/SIGINT only set a flag: the loop finishes the batches in hand, commits and
closes, within ``shutdown_deadline_s``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from sorter.logs import get_logger
from sorter.settings import Settings
from sorter.stream.contracts import RawFrame, dead_letter_headers
from sorter.stream.kafka import (
    CheckedProducer,
    DeliveryError,
    TransactionAborted,
    TransactionalProducer,
    consumer_config,
    producer_config,
    to_raw,
)
from sorter.stream.observe import Health, Metrics, ObservabilityServer
from sorter.stream.pipeline import BatchResult, Pipeline, now_ms

log = get_logger("sorter.worker")


@dataclass
class InFlight:
    future: Future
    messages: list[Message]
    started: float
    finished: bool = False


@dataclass
class WorkerStats:
    batches: int = 0
    frames: int = 0
    commands: int = 0
    dead_letters: Counter = field(default_factory=Counter)
    cache_hits: int = 0
    producer_restarts: int = 0
    revoked_dropped: int = 0
    slow_batches: int = 0
    aborted_batches: int = 0


def _best_effort_id(raw: RawFrame, header: str, fallback: bytes | None) -> str | None:
    """An id for the log line of a frame that broke the contract (so ops can grep it), never raising."""
    value = next((v for k, v in reversed(raw.headers) if k == header and v), None) or fallback
    return value.decode("utf-8", "replace")[:128] if value else None


def _failpoints() -> dict[str, float]:
    """``SORTER_FAILPOINTS="after_produce=0.5"``: sleep that long at that point of every batch. For the
    fault-injection tests (widen the window a crash can hit); empty, and free, in production."""
    out = {}
    for part in os.environ.get("SORTER_FAILPOINTS", "").split(","):
        name, _, seconds = part.partition("=")
        if name.strip():
            out[name.strip()] = float(seconds or 0)
    return out


def _next_offsets(messages: list[Message]) -> list[TopicPartition]:
    """``offset + 1`` of the last message per partition: what a commit of these messages stores."""
    last: dict[tuple[str, int], int] = {}
    for m in messages:
        key = (m.topic(), m.partition())
        last[key] = max(last.get(key, -1), m.offset())
    return [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]


class Worker:
    def __init__(
        self, settings: Settings, pipeline: Pipeline, *, on_batch: Callable[[BatchResult], None] | None = None
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.on_batch = on_batch
        self.stop_event = threading.Event()
        self.stats = WorkerStats()
        self.assigned: set[tuple[str, int]] = set()
        self._revoked: set[tuple[str, int]] = set()
        self._stash: list[Message] = []  # polled while a slow batch ran: first in the next batch
        self._runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch")  # batches run in order
        self._inflight: deque[InFlight] = deque()
        self.last_progress = time.monotonic()
        self.own_topics = {settings.kafka.commands_topic, settings.kafka.dlq_topic}
        # exactly-once: each batch is one transaction (commands, dead letters, offsets); batches then run
        # one at a time, so an aborted batch is simply read again
        self.exactly_once = settings.kafka.delivery == "exactly-once"
        self.overlap = settings.batch.overlap and not self.exactly_once
        self.failpoints = _failpoints()
        self.metrics = Metrics()
        self.health = Health()
        self.server: ObservabilityServer | None = None
        self.consumer = Consumer(
            consumer_config(settings.kafka)
            | {
                "error_cb": self._on_consumer_error,
                "stats_cb": self.health.on_stats,
                "statistics.interval.ms": settings.observe.stats_interval_ms,
            }
        )
        self.producer = self._new_producer()

    def _new_producer(self) -> CheckedProducer:
        on_error = lambda _: self.metrics.kafka_errors.labels("producer").inc()  # noqa: E731
        config = producer_config(self.settings.kafka)
        if self.exactly_once:
            # stable per worker: a restarted pod fences its previous incarnation's open transaction
            config["transactional.id"] = f"{self.settings.kafka.group_id}-{self.settings.worker_id}"
            return TransactionalProducer(config, on_error)
        return CheckedProducer(config, on_error)

    # -- rebalance callbacks (run inside consume) ------------------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The default pattern ^frames\..+ also matches the default dead-letter topic frames.dlq: the
        # worker's own output topics are assigned but paused, never read (or it would loop on its DLQ).
        consumer.assign(partitions)
        own = [p for p in partitions if p.topic in self.own_topics]
        if own:
            consumer.pause(own)
        self.assigned |= {(p.topic, p.partition) for p in partitions if p.topic not in self.own_topics}
        log.info(
            "worker.assigned",
            partitions=sorted(f"{p.topic}[{p.partition}]" for p in partitions if p.topic not in self.own_topics),
        )

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Finish the batches in flight and commit them while the partitions are still ours: the new
        # owner then starts after them (no repeats). Waiting here also holds up the rebalance, which is
        # bounded by the batch time.
        self._drain()
        gone = {(p.topic, p.partition) for p in partitions}
        self.assigned -= gone
        self._revoked |= gone
        self._stash = [m for m in self._stash if (m.topic(), m.partition()) not in gone]
        log.info("worker.revoked", partitions=sorted(f"{t}[{p}]" for t, p in gone))

    def _on_consumer_error(self, err: KafkaError) -> None:
        self.metrics.kafka_errors.labels("consumer").inc()
        log.warning("kafka.consumer_error", error=str(err), fatal=err.fatal())
        if err.fatal():
            self.stop_event.set()

    # -- the loop ------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            log.info("worker.stopping", signal=signal.Signals(signum).name)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _collect(self) -> list[Message]:
        b = self.settings.batch
        messages, self._stash = self._stash, []
        deadline = time.monotonic() + b.max_wait_ms / 1000 if messages else None
        while len(messages) < b.max_size and not self.stop_event.is_set():
            timeout = 0.1 if deadline is None else max(0.0, deadline - time.monotonic())
            got = self.consumer.consume(b.max_size - len(messages), timeout)
            for m in got:
                err = m.error()
                if err is None:
                    if m.topic() not in self.own_topics:  # paused on assignment; never processed
                        messages.append(m)
                elif err.code() != KafkaError._PARTITION_EOF:
                    log.warning("kafka.consume_error", error=str(err), topic=m.topic(), partition=m.partition())
            if messages and deadline is None:
                deadline = time.monotonic() + b.max_wait_ms / 1000
            if deadline is None:
                self.last_progress = time.monotonic()  # idle, but polling: alive
                return messages  # nothing yet: let the caller check the stop flag
            if time.monotonic() >= deadline:
                break
        return messages

    def _produce_batch(self, producer: CheckedProducer, result: BatchResult) -> None:
        """Commands (keyed by station) and dead letters (original key, value and headers + why)."""
        k = self.settings.kafka
        for c in result.commands:
            producer.produce(k.commands_topic, c.to_bytes(), c.station_id.encode())
        for d in result.dead_letters:
            headers = dead_letter_headers(d.raw, d.reason, d.error, d.message, self.settings.worker_id)
            producer.produce(k.dlq_topic, d.raw.value or b"", d.raw.key, headers)

    def _deliver(self, result: BatchResult) -> None:
        for attempt in range(3):
            try:
                self._produce_batch(self.producer, result)
                self.producer.flush(timeout=30)
                return
            except DeliveryError as exc:
                if not exc.fatal or attempt == 2:
                    raise
                log.warning("worker.producer_recreated", error=str(exc), attempt=attempt + 1)
                self.stats.producer_restarts += 1
                self.producer = self._new_producer()

    def _deliver_transaction(self, result: BatchResult, offsets: list[TopicPartition]) -> None:
        producer = self.producer
        try:
            producer.begin()
            self._produce_batch(producer, result)
            self._failpoint("after_produce")  # the transaction is open: a crash here aborts it
            producer.commit(offsets, self.consumer.consumer_group_metadata())
        except DeliveryError as exc:
            if not exc.fatal:
                raise
            # fenced or otherwise dead: a new producer (new epoch) and the batch again, from its offsets
            log.warning("worker.producer_recreated", error=str(exc), transactional=True)
            self.stats.producer_restarts += 1
            self.producer = self._new_producer()
            raise TransactionAborted(f"producer recreated after a fatal error: {exc}") from exc

    def _commit(self, messages: list[Message]) -> None:
        offsets = _next_offsets(messages)
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except Exception as exc:  # e.g. a rebalance took the partitions: they will be re-read, not lost
            log.warning("worker.commit_failed", error=str(exc), partitions=len(offsets))

    def process_once(self) -> int:
        """Collect a batch and start it; finish (deliver, remember, commit) the batch before it.

        With ``batch.overlap`` the batch just collected is decoded (thread pool) and queued on the helper
        thread while the previous one is still in the model, so collection, decoding and inference
        overlap; without it each batch is finished before the next is collected. Batches always run and
        commit in order. Returns the frames collected or finished (0: idle).
        """
        self._revoked.clear()
        messages = self._collect()
        if self._revoked:
            kept = [m for m in messages if (m.topic(), m.partition()) not in self._revoked]
            self.stats.revoked_dropped += len(messages) - len(kept)
            if len(kept) != len(messages):
                log.info("worker.revoked_dropped", frames=len(messages) - len(kept))
            messages = kept
        if messages:
            raws = [to_raw(m) for m in messages]
            predecoded = self.pipeline.predecode(raws) if self.overlap else None
            future = self._runner.submit(self._work, raws, predecoded, _next_offsets(messages))
            self._inflight.append(InFlight(future, messages, time.perf_counter()))
        keep = 1 if messages and self.overlap else 0
        finished = 0
        while len(self._inflight) > keep:
            finished += self._finish_oldest(keepalive=True)
        return len(messages) + finished

    def _finish_oldest(self, *, keepalive: bool) -> int:
        batch = self._inflight[0]
        if keepalive:
            # may run the revoke callback, which finishes every batch in flight, this one first
            self._wait_polling(batch.future, len(batch.messages))
            if batch.finished:
                return len(batch.messages)
        self._inflight.popleft()
        batch.finished = True
        try:
            result, delivered_ms = batch.future.result()  # raises what the helper raised (e.g. DeliveryError)
        except TransactionAborted as exc:
            self._rewind(batch.messages, exc)
            return 0
        except BaseException:
            self._abandon()  # the batches after a failed one must not commit past it
            raise
        if not self.exactly_once:  # (exactly-once: the offsets were committed inside the transaction)
            # a partition revoked meanwhile belongs to another worker now: its offsets are not ours to commit
            self._commit([m for m in batch.messages if (m.topic(), m.partition()) not in self._revoked])
        seconds = time.perf_counter() - batch.started
        self._account(result, delivered_ms, seconds)
        self.metrics.observe_batch(result, Counter(m.topic() for m in batch.messages), delivered_ms, seconds)
        self.last_progress = time.monotonic()
        return len(batch.messages)

    def _abandon(self) -> None:
        """After a batch failed (its commands not delivered): let the later batches end, commit none of
        them, so the failed batch's offsets are the next to be read by whoever owns the partitions."""
        while self._inflight:
            later = self._inflight.popleft()
            later.finished = True
            with contextlib.suppress(BaseException):
                later.future.result()
        log.error("worker.batch_failed", abandoned="later batches not committed; their frames are read again")

    def _drain(self) -> None:
        """Finish every batch in flight, in order (stop, revocation): no polling meanwhile."""
        while self._inflight:
            self._finish_oldest(keepalive=False)

    def _failpoint(self, name: str) -> None:
        if name in self.failpoints:
            time.sleep(self.failpoints[name])

    def _rewind(self, messages: list[Message], exc: Exception) -> None:
        """An aborted transaction: nothing of the batch is visible; read it again from its first offsets."""
        first: dict[tuple[str, int], int] = {}
        for m in messages:
            key = (m.topic(), m.partition())
            first[key] = min(first.get(key, m.offset()), m.offset())
        self._stash.clear()  # polled after the batch: they come again after the seek
        for (topic, partition), offset in first.items():
            if (topic, partition) in self.assigned:
                self.consumer.seek(TopicPartition(topic, partition, offset))
        self.stats.aborted_batches += 1
        log.warning("worker.transaction_aborted", error=str(exc), frames=len(messages), partitions=len(first))

    def _work(self, raws: list[RawFrame], predecoded, offsets: list[TopicPartition]) -> tuple[BatchResult, int]:
        result = self.pipeline.process(raws, predecoded)
        if self.exactly_once:
            self._deliver_transaction(result, offsets)
        else:
            self._deliver(result)
            self._failpoint("after_produce")  # delivered, neither remembered nor committed: a crash repeats it
        delivered_ms = now_ms()
        self.pipeline.cache.put_many(result.decisions)
        return result, delivered_ms

    def _wait_polling(self, future: Future, frames: int) -> None:
        """Wait for the helper thread; if it takes long, keep the group membership alive meanwhile."""
        patience = self.settings.kafka.max_poll_interval_ms / 3000
        try:
            future.exception(timeout=patience)
            return
        except FutureTimeout:
            pass
        # Pausing costs a re-fetch, so it happens only for a slow batch, never on the fast path.
        self.stats.slow_batches += 1
        log.warning("worker.slow_batch", frames=frames, waited_s=round(patience, 1))
        self.consumer.pause(self.consumer.assignment())
        try:
            while not future.done():
                m = self.consumer.poll(min(patience, 0.5))  # serves rebalances, proves liveness
                if m is not None and m.error() is None and m.topic() not in self.own_topics:
                    self._stash.append(m)
        finally:
            self.consumer.resume([p for p in self.consumer.assignment() if p.topic not in self.own_topics])

    def _account(self, result: BatchResult, delivered_ms: int, seconds: float) -> None:
        s = self.stats
        s.batches += 1
        s.frames += result.frames
        s.commands += len(result.commands)
        s.cache_hits += result.cache_hits
        for d in result.dead_letters:
            s.dead_letters[d.reason] += 1
            log.warning(
                "frame.dead_lettered",
                item_id=_best_effort_id(d.raw, "item-id", d.raw.key),
                station_id=_best_effort_id(d.raw, "station-id", None),
                reason=d.reason,
                error=d.error,
                message=d.message[:300],
                topic=d.raw.source.topic,
                partition=d.raw.source.partition,
                offset=d.raw.source.offset,
            )
        for c in result.commands:
            latency = delivered_ms - c.captured_at if c.captured_at else None
            log.info(
                "item.routed",
                item_id=c.item_id,
                station_id=c.station_id,
                sku=c.sku,
                label=c.label,
                confidence=c.confidence,
                chute=c.chute,
                reason=c.reason,
                frames=c.frames,
                latency_ms=latency,
            )
        log.info(
            "batch.done",
            frames=result.frames,
            commands=len(result.commands),
            dead_letters=len(result.dead_letters),
            cache_hits=result.cache_hits,
            classified=result.classified,
            cache_up=self.pipeline.cache.available,
            decode_ms=round(result.decode_s * 1000, 2),
            infer_ms=round(result.infer_s * 1000, 2),
            batch_ms=round(seconds * 1000, 2),
        )
        if self.on_batch is not None:
            self.on_batch(result)

    def run(self, *, max_frames: int | None = None, idle_exit_s: float | None = None) -> WorkerStats:
        """Run until stopped (signal, ``stop_event``), ``max_frames`` handled, or idle for ``idle_exit_s``."""
        k = self.settings.kafka
        self.consumer.subscribe(
            [k.frames_pattern], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke
        )
        log.info(
            "worker.started",
            worker_id=self.settings.worker_id,
            pattern=k.frames_pattern,
            group_id=k.group_id,
            model_version=self.pipeline.model.model_version,
        )
        o = self.settings.observe
        if o.enabled and self.server is None:
            self.server = ObservabilityServer(self, o.host, o.port, o.liveness_timeout_s).start()
        idle_since = time.monotonic()
        try:
            while not self.stop_event.is_set():
                handled = self.process_once()
                if handled:
                    idle_since = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                    break
                if max_frames is not None and self.stats.frames >= max_frames:
                    break
        finally:
            try:
                self._drain()  # the batches in hand are delivered and committed before closing
            finally:
                self.close()
        return self.stats

    def close(self) -> None:
        deadline = self.settings.shutdown_deadline_s
        try:
            self.producer.flush(timeout=min(10.0, deadline))
        except DeliveryError as exc:
            log.error("worker.flush_failed_on_close", error=str(exc))
        self.producer.close()
        self.consumer.close()
        if self.server is not None:
            self.server.stop()
            self.server = None
        self._runner.shutdown(wait=False)
        log.info(
            "worker.stopped",
            batches=self.stats.batches,
            frames=self.stats.frames,
            commands=self.stats.commands,
            cache_hits=self.stats.cache_hits,
            dead_letters=dict(self.stats.dead_letters),
        )
