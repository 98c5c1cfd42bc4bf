"""The Kafka loop: collect a micro-batch, hand it to the helper thread, finish the one before it. Repeat.

Per batch (delivery's own numbered steps are in ``delivery.py``):

1. collect up to ``batch.max_size`` frames, waiting ``batch.max_wait_ms`` after the first and, with
   ``batch.overlap``, until the model has finished the batch before (dynamic batching: see ``_collect``);
   each frame starts decoding in the decode thread pool as soon as it is fetched;
2. on the helper thread (one, so batches run in order): run the pipeline (cache lookup, wait for the
   decoders, model, routing), deliver its commands and dead letters, then remember its decisions in the
   cache. With ``batch.overlap`` the main thread meanwhile collects and starts decoding the next batch;
3. back on the main thread, commit ``offset + 1`` per partition still owned, synchronously: by then the
   next batch is already in the model, so the commit is off the path of every item (measured:
   ``timeline.py``). Asynchronous commits are not used: librdkafka may retry one after a timeout or a
   coordinator move and land it after a later commit, moving the committed offset back (found in review).

Rules that keep every frame routed exactly where it should be:

- **Rebalances** run inside ``consume``/``poll`` (librdkafka calls the callbacks there). On revocation the
  batches in flight are finished and committed first, while the partitions are still ours; frames of
  the revoked partitions that were collected but not started are dropped from the batch being collected
  (their new owner, or we again, read them from the committed offset). Only those: frames fetched after
  the partitions come back in the same ``consume`` call are kept. The assignment is
  ``cooperative-sticky`` by default: station topics spread across the group, and a member joining or
  leaving moves only the partitions that change owner (the others keep flowing).
- **A failed batch** (its commands could not be delivered and waiting would not help) stops every later
  batch from sending anything and from committing: the worker stops, and after the restart the failed
  batch is read again first, so a station's commands keep their order.
- **A slow batch** (longer than a third of ``max.poll.interval.ms``: a stalled model, a broker outage)
  does not get the worker evicted: the main thread pauses the partitions and keeps polling; anything a
  poll returns meanwhile is kept for the next batch.
- **Stop** (SIGTERM/SIGINT, ``stop_event``) only sets a flag: the loop finishes the batches in hand,
  commits and closes, all within ``shutdown_deadline_s``. A batch still unfinished at 80% of it (a wedged
  model, a broker that does not come back) is given up uncommitted (read again after the restart), the
  decode pool and the cache's connections are closed, and ``run`` returns.

A crash anywhere before step 3 re-delivers the batch: commands may repeat (actuators drop them by
``item_id``), none is lost.
"""

from __future__ import annotations

import contextvars
import os
import queue
import re
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_for
from dataclasses import dataclass

import structlog
from confluent_kafka import KafkaError, Message, TopicPartition

from sorter.errors import SorterError
from sorter.logs import bound_context, get_logger
from sorter.settings import Settings
from sorter.stream.accounting import Accounting, WorkerStats
from sorter.stream.contracts import RawFrame
from sorter.stream.delivery import (
    AtLeastOnce,
    DeliveryInterrupted,
    ExactlyOnce,
    TransactionAborted,
    cap_offsets,
    next_offsets,
    outgoing,
    rewind,
    transactional_id,
)
from sorter.stream.kafka import KafkaClients, consumer_config, producer_config, to_raw, transactional_producer_config
from sorter.stream.observe import Health, Metrics, ObservabilityServer
from sorter.stream.pipeline import BatchResult, Pipeline
from sorter.stream.stalls import FairShare, FetchWatch
from sorter.stream.timeline import BatchTimes, wall_ms

log = get_logger("sorter.worker")

DRAIN_SHARE = 0.8  # of shutdown_deadline_s for finishing batches; the rest is for closing the clients
BUSY_POLL_S = 0.002  # a full batch waits for the model: how often to look whether it is free yet
COST_EWMA = 0.2  # weight of the newest batch in the per-frame model cost estimate


class StopSignal(threading.Event):
    """The worker's stop flag. It remembers when it was set, so every wait can keep to one deadline."""

    def __init__(self, grace_s: float) -> None:
        super().__init__()
        self.grace_s = grace_s
        self.at: float | None = None

    def set(self) -> None:
        if self.at is None:
            self.at = time.monotonic()
        super().set()

    def left(self, share: float = 1.0) -> float | None:
        """Seconds left of ``share`` of the grace period (None: no stop requested)."""
        return None if self.at is None else self.at + self.grace_s * share - time.monotonic()

    def drain_over(self) -> bool:
        left = self.left(DRAIN_SHARE)
        return left is not None and left <= 0


class NoPartitions(SorterError):
    """``--idle-exit`` ran out and this worker never owned a partition: nothing was read, say why."""


class BatchSkipped(Exception):
    """An earlier batch failed: this one must not send anything (it is read again after the restart)."""


class SerialRunner:
    """Runs calls one at a time, in order, on one daemon thread: a model wedged past the shutdown deadline
    cannot hold the process open at exit (the standard thread pools join their threads at exit). Each call
    runs in the submitter's context (contextvars): its log lines carry what the submitter bound."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        self._calls.put((future, contextvars.copy_context(), fn, args))
        return future

    def _loop(self) -> None:
        while (call := self._calls.get()) is not None:
            future, context, fn, args = call
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(context.run(fn, *args))
                except BaseException as exc:
                    future.set_exception(exc)

    def shutdown(self) -> None:
        self._calls.put(None)


@dataclass
class InFlight:
    future: Future
    messages: list[Message]
    started: float
    times: BatchTimes
    finished: bool = False
    commit: bool = True  # False once its partitions were lost: offsets not ours to commit


def _failpoints() -> dict[str, float]:
    """``SORTER_FAILPOINTS="after_produce=0.5"``: sleep that long at that point of every batch. For the
    fault-injection tests (widen the window a crash can hit); empty, and free, in production."""
    out = {}
    for part in os.environ.get("SORTER_FAILPOINTS", "").split(","):
        name, _, seconds = part.partition("=")
        if name.strip():
            out[name.strip()] = float(seconds or 0)
    return out


def _tp(m: Message) -> tuple[str, int]:
    return (m.topic(), m.partition())


def _next(messages: list[Message]) -> dict[tuple[str, int], int]:
    """Partition -> ``offset + 1`` of its last message in ``messages``."""
    return {(o.topic, o.partition): o.offset for o in next_offsets(messages)}


class Worker:
    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        *,
        clients: KafkaClients | None = None,
        on_batch: Callable[[BatchResult], None] | None = None,
    ) -> None:
        clients = clients or KafkaClients()
        k = settings.kafka
        self.settings = settings
        self.pipeline = pipeline
        self.stop_event = StopSignal(settings.shutdown_deadline_s)
        self.stats = WorkerStats()
        self.metrics = Metrics(topic_prefix=k.topic_prefix)
        self.health = Health()
        self.accounting = Accounting(self.stats, self.metrics, lambda: pipeline.cache.available, on_batch)
        self.server: ObservabilityServer | None = None
        self.assigned: set[tuple[str, int]] = set()
        self.last_progress = time.monotonic()
        self.own_topics = {k.commands_topic, k.dlq_topic} | ({k.control_topic} if k.control_topic else set())
        config = consumer_config(k)  # the strategy as librdkafka gets it (a client pass-through may set it)
        self.cooperative = "cooperative" in str(config["partition.assignment.strategy"])
        self._collecting: list[Message] = []  # the batch being collected (a revocation may take from it)
        self._stash: list[Message] = []  # polled while a slow batch ran: first in the next batch
        self._fetched: dict[int, float] = {}  # id(message) -> when a consume returned it (wall ms)
        # with overlap, each frame starts decoding as soon as it is fetched: id(message) -> (raw, decode)
        self._decoding: dict[int, tuple[RawFrame, Future | None]] = {}
        self._frame_cost_s: float | None = None  # decode wait + model per classified frame, EWMA of batches
        self._inflight: deque[InFlight] = deque()
        # per partition, the offset after the last frame of a finished (delivered) batch: what a batch that
        # fused views of that partition without reading from it may commit (never past a view still open)
        self._finished_next: dict[tuple[str, int], int] = {}
        self._failed = threading.Event()  # a batch failed: later batches send nothing
        self._keepalive_paused = False  # a slow batch has the partitions paused: new ones start paused too
        # the last rebalance event (None: the group never answered, not even with an empty assignment);
        # a handover may be under way
        self._group_changed_at: float | None = None
        self._ever_owned = False
        self._runner = SerialRunner("batch")
        self.reloader = None  # a Reloader (reload.py) when hot reload is on; app.py sets it
        self.control = None  # a ControlReader (control.py): the control topic's load requests
        self._control_failed_at = float("-inf")
        self._serving_version = pipeline.model.model_version  # what batches submitted from now on run
        self._new_model = None  # loaded by the reloader, handed to the next batch submitted
        self.shadow = None  # a Shadow (shadow.py): a candidate model deciding on the side; app.py sets it
        self.failpoints = _failpoints()
        self.fetch_watch = FetchWatch(
            k.fetch_stall_s,
            stats_interval_s=settings.observe.stats_interval_ms / 1000,
            read_committed=config.get("isolation.level") == "read_committed",  # as the consumer is configured
        )
        self.health.listeners.append(self.fetch_watch.on_stats)
        # With decision deadlines a partition far behind drains at broker speed (its frames are late), and
        # holding the others for it would only make their fresh frames late too: no fair share then.
        self.fair = FairShare() if k.fair_share and not pipeline.judge_late else None
        if k.fair_share and pipeline.judge_late:
            log.info("worker.fair_share_off", why="decision deadlines: late frames drain at broker speed")
        self._watched_at = 0.0
        self.consumer = clients.consumer(
            config
            | {
                "error_cb": self._on_consumer_error,
                "stats_cb": self.health.on_stats,
                "statistics.interval.ms": settings.observe.stats_interval_ms,
            }
        )
        on_error = lambda _: self.metrics.kafka_errors.labels("producer").inc()  # noqa: E731
        if k.delivery == "exactly-once":
            # each batch is one transaction (commands, dead letters, offsets); batches then run one at a
            # time, so an aborted batch is simply read again
            config = transactional_producer_config(k, transactional_id(k))
            self.delivery: AtLeastOnce = ExactlyOnce(
                config, stop=self.stop_event.drain_over, on_error=on_error, factory=clients.producer
            )
        else:
            self.delivery = AtLeastOnce(
                producer_config(k),
                stop=self.stop_event.drain_over,
                on_error=on_error,
                factory=clients.producer,
                flush_timeout_s=k.message_timeout_ms / 1000 + 30,  # every message reported: delivered or timed out
            )
        self.overlap = settings.batch.overlap and not self.delivery.transactional

    # -- what observe.py reads (WorkerView) ----------------------------------------------------------
    @property
    def stopping(self) -> bool:
        return self.stop_event.is_set()

    @property
    def blocked_s(self) -> float | None:
        since = self.delivery.blocked_since
        return None if since is None else time.monotonic() - since

    @property
    def cache_up(self) -> bool:
        return self.pipeline.cache.available

    @property
    def cache_errors(self) -> int:
        return getattr(self.pipeline.cache, "errors", 0)

    # -- rebalance callbacks (run inside consume/poll) -----------------------------------------------
    def _on_assign(self, consumer, partitions: list[TopicPartition]) -> None:
        # The default pattern ^frames\..+ also matches the default dead-letter topic frames.dlq: the
        # worker's own output topics are assigned but paused, never read (or it would loop on its DLQ).
        if self.cooperative:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        # own topics are never read; while a slow batch keeps the group alive, new partitions wait with the
        # others (unpaused, every poll of the keep-alive would stash one more frame of theirs, unbounded)
        self._group_changed_at = time.monotonic()
        held = [p for p in partitions if p.topic in self.own_topics or self._keepalive_paused]
        if held:
            consumer.pause(held)
        frames = {(p.topic, p.partition) for p in partitions if p.topic not in self.own_topics}
        self.assigned |= frames
        self.fetch_watch.assigned(frames)
        self._ever_owned = self._ever_owned or bool(self.assigned)
        log.info(
            "worker.assigned",
            partitions=sorted(f"{p.topic}[{p.partition}]" for p in partitions if p.topic not in self.own_topics),
            owned=len(self.assigned),
        )

    def _on_revoke(self, consumer, partitions: list[TopicPartition]) -> None:
        self._give_up_partitions(consumer, partitions, lost=False)

    def _on_lost(self, consumer, partitions: list[TopicPartition]) -> None:
        self._give_up_partitions(consumer, partitions, lost=True)

    def _give_up_partitions(self, consumer, partitions: list[TopicPartition], *, lost: bool) -> None:
        # Finish the batches in flight and commit them while the partitions are still ours: the new owner
        # starts after them (no repeats). Waiting here also holds up the rebalance, bounded by the batch
        # time. Lost partitions (the group moved on without us) cannot be committed: their batches are
        # still delivered, and their new owner repeats them.
        self._drain(commit=not lost)
        self._group_changed_at = time.monotonic()
        gone = {(p.topic, p.partition) for p in partitions}
        if self.shadow is not None:
            self.shadow.forget(gone)
        forgotten = self.pipeline.forget(gone)  # open multi-camera views, uncommitted: the new owner reads them
        for tp in gone:
            self._finished_next.pop(tp, None)
        before = len(self._collecting) + len(self._stash)
        self._collecting = [m for m in self._collecting if _tp(m) not in gone]
        self._stash = [m for m in self._stash if _tp(m) not in gone]
        dropped = before - len(self._collecting) - len(self._stash)
        self.stats.revoked_dropped += dropped
        self.stats.partitions_revoked += len(gone & self.assigned)
        # librdkafka keeps a partition's pause flag when it is unassigned: one we paused (the keep-alive,
        # the fair share) is resumed before it goes, or it would come back paused and never be fetched
        ours = self._keepalive_paused or (self.fair is not None and bool(self.fair.held.keys() & gone))
        if ours:
            consumer.resume([p for p in partitions if p.topic not in self.own_topics])
        self.assigned -= gone
        self.fetch_watch.revoked(gone)
        if self.fair is not None:
            self.fair.revoked(gone)
        self.metrics.stalled.set(len(self.fetch_watch.stalled))
        if self.cooperative:
            consumer.incremental_unassign(partitions)
        else:
            consumer.unassign()
        log.info(
            "worker.lost" if lost else "worker.revoked",
            partitions=sorted(f"{t}[{p}]" for t, p in gone if t not in self.own_topics),
            dropped_frames=dropped,  # collected, not started: read again from the committed offset
            open_views_dropped=forgotten,
            owned=len(self.assigned),
        )

    def _on_consumer_error(self, err: KafkaError) -> None:
        self.metrics.kafka_errors.labels("consumer").inc()
        log.warning("kafka.consumer_error", error=str(err), fatal=err.fatal())
        if err.fatal():
            self.stop_event.set()

    # -- the loop --------------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            log.info("worker.stopping", signal=signal.Signals(signum).name)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _collect(self) -> list[Message]:
        """Fill ``self._collecting``; rebalance callbacks inside ``consume`` may take from it meanwhile.

        The batch closes at ``batch.max_size``, or once it has waited ``batch.max_wait_ms`` after its first
        frame (less when ``batch.latency_budget_ms`` leaves no room for waiting: see :meth:`_wait_s`) *and*
        the model is free. While the batch before is still in the model, a batch closed now would only queue
        behind it: it keeps collecting instead, and starts the moment the model is free (the batch size
        follows the load: dynamic batching, as Triton's). Frames arriving meanwhile join this batch rather
        than the one after it, which would wait a whole model run more."""
        b = self.settings.batch
        self._collecting, self._stash = self._stash, []
        deadline = time.monotonic() + self._wait_s() if self._collecting else None
        for m in self._collecting:
            self._got(_tp(m))
        while len(self._collecting) < b.max_size and not self.stop_event.is_set():
            left = self._idle_wait_s() if deadline is None else deadline - time.monotonic()
            self.fetch_watch.polled()
            got = self.consumer.consume(b.max_size - len(self._collecting), left if left > 0 else BUSY_POLL_S)
            fetched = wall_ms()
            for m in got:
                err = m.error()
                if err is None:
                    if m.topic() not in self.own_topics:  # paused on assignment; never processed
                        self._got(_tp(m))
                        self._collecting.append(m)
                        self._fetched[id(m)] = fetched
                        if self.overlap:  # decoding overlaps the batch in the model (and the collecting)
                            raw = to_raw(m)
                            self._decoding[id(m)] = (raw, self.pipeline.predecode(raw))
                elif err.code() != KafkaError._PARTITION_EOF:
                    log.warning("kafka.consume_error", error=str(err), topic=m.topic(), partition=m.partition())
            if self._collecting and deadline is None:
                deadline = time.monotonic() + self._wait_s()
            if deadline is None:
                self.last_progress = time.monotonic()  # idle, but polling: alive
                break  # nothing yet: let the caller check the stop flag
            if time.monotonic() >= deadline and not self._model_busy():
                break
            if self._model_slow():  # stalled or slow: the keep-alive in _await takes over (and says so)
                break
        messages, self._collecting = self._collecting, []
        return messages

    def _idle_wait_s(self) -> float:
        """How long an empty poll may wait: 0.1 s, less when an open multi-camera item's window closes sooner."""
        due_ms = self.pipeline.fusion_due_in_ms()
        return 0.1 if due_ms is None else min(0.1, max(due_ms / 1000, BUSY_POLL_S))

    def _share_fairly(self) -> None:
        if self.fair is None or self._keepalive_paused:
            return
        backlog = {tp: b for tp, b in self.fetch_watch.backlog_s().items() if tp not in self.fetch_watch.stalled}
        capacity = 1 / self._frame_cost_s if self._frame_cost_s else None  # frames/s the model takes
        pause, resume = self.fair.decide(backlog, capacity)
        pause = [tp for tp in pause if tp in self.assigned]
        resume = [tp for tp in resume if tp in self.assigned]
        if resume:
            self.fetch_watch.release(resume)
            self.consumer.resume([TopicPartition(t, p) for t, p in resume])
        if pause:
            # their prefetched frames are dropped; on resume librdkafka fetches from the last frame taken
            self.consumer.pause([TopicPartition(t, p) for t, p in pause])
            self.fetch_watch.hold(pause)
            starved = self.fair.starved or max(backlog, key=backlog.__getitem__)
            log.info(
                "worker.fair_share",
                starved=f"{starved[0]}[{starved[1]}]",
                starved_backlog_s=round(backlog[starved], 1),
                held=sorted(f"{t}[{p}]" for t, p in pause),
                held_s=self.fair.hold_s,
            )

    def _release_fair_share(self) -> None:
        """Resume what the fair share holds (before a seek, or once the keep-alive resumed everything)."""
        if self.fair is None:
            return
        held = [tp for tp in self.fair.release_all() if tp in self.assigned]
        self.fetch_watch.release(held)
        if held:
            self.consumer.resume([TopicPartition(t, p) for t, p in held])

    def _model_busy(self) -> bool:
        """The helper thread is still on the last batch handed to it (only with overlap: without it every
        batch is finished before the next is collected)."""
        return self.overlap and bool(self._inflight) and not self._inflight[-1].future.done()

    def _model_slow(self) -> bool:
        """The model has been on the last batch for longer than a third of ``max.poll.interval.ms``."""
        patience = self.settings.kafka.max_poll_interval_ms / 3000
        return self._model_busy() and time.perf_counter() - self._inflight[-1].started > patience

    def _wait_s(self) -> float:
        """How long a batch may wait for more frames after its first: ``batch.max_wait_ms``, cut so that the
        first frame's wait plus the model's time for a full batch (measured: :attr:`_frame_cost_s`) stays
        inside ``batch.latency_budget_ms`` where one is set. Never below zero: an over-budget batch goes at once."""
        b = self.settings.batch
        wait = b.max_wait_ms / 1000
        if b.latency_budget_ms and self._frame_cost_s is not None:
            wait = min(wait, b.latency_budget_ms / 1000 - self._frame_cost_s * b.max_size)
        return max(0.0, wait)

    def _close(self, messages: list[Message]) -> tuple[list[RawFrame], dict[int, Future] | None, BatchTimes]:
        """The batch's frames, the decodes started for them (by position) and its first stamps: when each
        frame was fetched, and now (the batch closed). Nothing else is in hand between two collections (the
        stash fills only later), so what was kept per message is dropped here; decodes of frames a
        revocation took are cancelled."""
        closed = wall_ms()
        fetched = {(m.topic(), m.partition(), m.offset()): self._fetched.get(id(m), closed) for m in messages}
        started = [self._decoding.pop(id(m), None) for m in messages]
        raws = [s[0] if s else to_raw(m) for s, m in zip(started, messages, strict=True)]
        predecoded = {i: s[1] for i, s in enumerate(started) if s and s[1]} if self.overlap else None
        for _, future in self._decoding.values():
            if future is not None:
                future.cancel()
        self._fetched.clear()
        self._decoding.clear()
        return raws, predecoded, BatchTimes(fetched=fetched, closed=closed)

    def process_once(self) -> int:
        """Collect a batch and start it; finish (deliver, remember, commit) the batch before it.

        With ``batch.overlap`` the batch just collected is decoded (thread pool) and queued on the helper
        thread while the previous one is still in the model, so collection, decoding and inference
        overlap; without it each batch is finished before the next is collected. Batches always run and
        commit in order. Returns the frames collected or finished (0: idle).
        """
        self._take_new_model()
        messages = self._collect()
        if messages:
            raws, predecoded, times = self._close(messages)
            offsets = _next(messages) if self.delivery.transactional else None
            future = self._runner.submit(self._work, raws, predecoded, offsets, times, self._serve_new_model())
            self._inflight.append(InFlight(future, messages, time.perf_counter(), times))
        elif (
            not self._inflight
            and not self._failed.is_set()
            and (self.pipeline.fusion_due_in_ms() == 0 or self._new_model is not None)
        ):
            # no frame came, but an open multi-camera item's window has closed (an empty batch decides it), or
            # a reloaded model waits (an empty batch puts it in service)
            times = BatchTimes(closed=wall_ms())
            offsets = {} if self.delivery.transactional else None
            future = self._runner.submit(self._work, [], None, offsets, times, self._serve_new_model())
            self._inflight.append(InFlight(future, [], time.perf_counter(), times))
        keep = 1 if messages and self.overlap else 0
        finished = 0
        while len(self._inflight) > keep:
            finished += self._finish_oldest(keepalive=True)
        self._watch_fetches()
        return len(messages) + finished

    def _take_new_model(self) -> None:
        if self.reloader is None:
            return
        request = self._control_request()
        if request is not None:
            pending = self._new_model
            retried = pending is not None and pending.path == request.checkpoint
            if retried and request.version in (None, pending.model.model_version):
                pass  # the same request again (a publisher's retry): it serves from the next batch
            elif request.version is not None and request.version == self._serving_version:
                self._new_model = None  # loaded but not served yet: the newest request wins, a rollback included
                log.info("control.already_serving", version=request.version, checkpoint=str(request.checkpoint))
                self.reloader.cancel()  # a load another request started is dropped
            elif self.reloader.request(request.checkpoint, request.version):
                self._new_model = None
                log.info("control.load", version=request.version, checkpoint=str(request.checkpoint))
        self.reloader.poll()
        loaded = self.reloader.take()
        if loaded is not None:
            self._new_model = loaded

    def _control_request(self):
        """The control topic's request, if any; a failure to read it is said (once a minute), never a crash:
        the model serving keeps serving."""
        if self.control is None:
            return None
        try:
            return self.control.poll()
        except Exception as exc:
            now = time.monotonic()
            if now - self._control_failed_at >= 60.0:
                self._control_failed_at = now
                log.error("control.failed", error=f"{type(exc).__name__}: {str(exc)[:300]}",
                          serving=self._serving_version)  # fmt: skip
            return None

    def _serve_new_model(self):
        """The reloaded model, handed to the batch about to be submitted: it and every later batch use it,
        every batch before it the old one. From here on this thread's lines (and the batches' it submits)
        carry the new version; ``sorter_model_info`` changes."""
        loaded, self._new_model = self._new_model, None
        if loaded is None:
            return None
        old, self._serving_version = self._serving_version, loaded.model.model_version
        structlog.contextvars.bind_contextvars(model_version=loaded.model.model_version)
        self.metrics.set_model(loaded.model)
        self.metrics.reloads.labels("loaded").inc()
        log.info("model.reloaded", previous=old, path=str(loaded.path), load_s=round(loaded.load_s, 1))
        if self.pipeline.canary is not None and self.pipeline.canary.active:
            log.warning("canary.baseline_stale", baseline=old, serving=loaded.model.model_version,
                        why="the canary is judged against the model the pod started with: restart to judge it "
                        "against the new one")  # fmt: skip
        return loaded.model

    def _got(self, tp: tuple[str, int]) -> None:
        self.fetch_watch.got(tp)
        if self.fair is not None:
            self.fair.got(tp)

    def _watch_fetches(self) -> None:
        """Once a second: say which partitions have frames waiting on the broker but give none, and hold
        back the partitions far ahead of a starved one (stalls.py)."""
        now = time.monotonic()
        if now - self._watched_at < 1.0:
            return
        self._watched_at = now
        self._share_fairly()
        stalled, resumed = self.fetch_watch.check()
        for s in stalled:
            self.metrics.fetch_stalls.inc()
            log.warning(
                "worker.fetch_stalled",
                partition=f"{s.tp[0]}[{s.tp[1]}]",
                waiting_frames=s.waiting,
                next_offset=s.next_offset,
                quiet_s=s.quiet_s,
            )
        for r in resumed:
            log.info("worker.fetch_resumed", partition=f"{r.tp[0]}[{r.tp[1]}]", stalled_s=r.stalled_s)
        if stalled or resumed:
            self.metrics.stalled.set(len(self.fetch_watch.stalled))

    def _work(self, raws: list[RawFrame], predecoded, offsets, times: BatchTimes, model=None) -> BatchResult:
        """The helper thread's part: pipeline, delivery, cache. Runs batches one at a time, in order.
        ``model``: a reloaded model, served from this batch on."""
        if model is not None:
            self.pipeline.swap(model)
        if self._failed.is_set():
            raise BatchSkipped("an earlier batch failed")
        result = None
        try:
            result = self.pipeline.process(raws, predecoded, times)
            if self._failed.is_set():
                raise BatchSkipped("an earlier batch failed")
            if offsets is not None:  # transactional: one batch at a time, so the finished offsets are settled
                offsets = self._to_commit(offsets, result)
            metadata = self.consumer.consumer_group_metadata() if self.delivery.transactional else None
            self.delivery.send(outgoing(result, self.settings.kafka, self.settings.worker_id), offsets, metadata)
            if not self.delivery.transactional:
                self._failpoint("after_produce")  # delivered, neither remembered nor committed: a crash repeats it
            result.times.delivered = wall_ms()
            self.pipeline.cache.put_many(result.decisions)
            if self.pipeline.canary is not None:
                try:
                    self.pipeline.canary.delivered(result.commands)
                except Exception as exc:  # delivered already: nothing here may fail the batch
                    log.error("canary.failed", error=f"{type(exc).__name__}: {str(exc)[:300]}")
            if self.shadow is not None:  # the candidate sees the batch once its live commands are out
                self.shadow.offer(raws, result)
            return result
        except TransactionAborted:
            if result is not None:  # its frames are read again (rewound); views fused from before are not
                self.pipeline.fuser.reopen(result.fused)
            raise  # rewound by the loop; the next batch may go on
        except BaseException:
            self._failed.set()  # before the next batch starts on this thread: it will send nothing
            raise

    def _to_commit(self, offsets: dict[tuple[str, int], int], result: BatchResult) -> list[TopicPartition]:
        """A finished batch's commit: its own partitions, and those whose open views it decided (up to what
        earlier batches finished there), each kept below any view still open; partitions we own only."""
        offsets = dict(offsets)
        for tp in result.released - offsets.keys():
            if tp in self._finished_next:
                offsets[tp] = self._finished_next[tp]
        return cap_offsets({tp: o for tp, o in offsets.items() if tp in self.assigned}, result.held)

    def _finish_oldest(self, *, keepalive: bool) -> int:
        batch = self._inflight[0]
        if not self._await(batch, keepalive=keepalive):
            self._give_up("the shutdown deadline passed with the batch unfinished")
            return 0
        if batch.finished:  # finished by a revocation that ran while we waited
            return len(batch.messages)
        self._inflight.popleft()
        batch.finished = True
        try:
            result = batch.future.result()  # raises what the helper raised (e.g. DeliveryError)
        except TransactionAborted as exc:
            self._release_fair_share()  # a seek of a paused partition would be undone by its resume
            rewound = rewind(self.consumer, batch.messages, self.assigned)
            for tp in rewound:  # read again: the offsets finished before stay, nothing after them
                self._finished_next.pop(tp, None)
            # polled after the batch from the partitions sought back: they come again after the seek
            # (frames stashed from other partitions stay: nothing re-reads them)
            self._stash = [m for m in self._stash if _tp(m) not in rewound]
            self.stats.aborted_batches += 1
            self.last_progress = time.monotonic()  # the loop works: the batch is read again
            log.warning(
                "worker.transaction_aborted", error=str(exc), frames=len(batch.messages), partitions=len(rewound)
            )
            return 0
        except DeliveryInterrupted as exc:
            self._give_up(str(exc), current=batch)
            return 0
        except BaseException as exc:
            self._give_up(f"batch failed: {exc}", current=batch, failed=True)
            raise
        for tp, offset in _next(batch.messages).items():
            self._finished_next[tp] = max(offset, self._finished_next.get(tp, 0))
        if batch.commit:
            self.delivery.commit(self.consumer, self._to_commit(_next(batch.messages), result))
            result.times.committed = wall_ms()
        self.stats.producer_restarts = self.delivery.restarts
        self.stats.delivery_retries = self.delivery.retries
        seconds = time.perf_counter() - batch.started
        if result.classified:
            cost = (result.decode_s + result.infer_s) / result.classified
            last = self._frame_cost_s
            self._frame_cost_s = cost if last is None else (1 - COST_EWMA) * last + COST_EWMA * cost
        self.accounting.batch_done(result, Counter(m.topic() for m in batch.messages), seconds)
        self.last_progress = time.monotonic()
        return len(batch.messages)

    def _await(self, batch: InFlight, *, keepalive: bool) -> bool:
        """Wait for a batch's helper-thread work: True once done, False if a stop's drain deadline passed
        first. With ``keepalive``, a batch slower than a third of ``max.poll.interval.ms`` gets the
        partitions paused and the consumer polled meanwhile, so the group does not evict us (a revocation
        served by such a poll may finish this very batch)."""
        patience = self.settings.kafka.max_poll_interval_ms / 3000
        started, paused = time.monotonic(), False
        try:
            while not batch.future.done() and not batch.finished:
                if self.stop_event.drain_over():
                    return False
                if keepalive and not paused and time.monotonic() - started > patience:
                    paused = self._keepalive_paused = True  # costs a re-fetch: only slow batches pay it
                    self.stats.slow_batches += 1
                    log.warning("worker.slow_batch", frames=len(batch.messages), waited_s=round(patience, 1))
                    self.consumer.pause(self.consumer.assignment())
                    self.fetch_watch.hold(self.assigned)
                if paused:
                    m = self.consumer.poll(0.2)  # serves rebalances, proves liveness
                    if m is not None and m.error() is None and m.topic() not in self.own_topics:
                        self._stash.append(m)
                else:
                    wait_for([batch.future], timeout=0.1)
        finally:
            if paused:
                self._keepalive_paused = False
                self.consumer.resume([p for p in self.consumer.assignment() if p.topic not in self.own_topics])
                self._release_fair_share()  # resumed with the rest
                self.fetch_watch.release(set(self.assigned))
        return True

    def _give_up(self, why: str, *, current: InFlight | None = None, failed: bool = False) -> None:
        """End ``current`` and every batch in flight uncommitted; none after this sends anything: they
        are read again (after the restart) in their order."""
        self._failed.set()
        ended = ([current] if current is not None else []) + list(self._inflight)
        self._inflight.clear()
        for b in ended:
            b.finished = True
        frames = sum(len(b.messages) for b in ended)
        self.stats.producer_restarts = self.delivery.restarts
        if failed:
            log.error("worker.batch_failed", error=why, batches_not_committed=len(ended), frames=frames)
        else:
            self.stats.unfinished_batches += len(ended)
            log.error("worker.batch_unfinished", error=why, batches_not_committed=len(ended), frames=frames)

    def _drain(self, *, commit: bool = True) -> None:
        """Finish every batch in flight, in order (stop, revocation): no polling meanwhile."""
        for b in self._inflight:
            b.commit = b.commit and commit
        while self._inflight:
            self._finish_oldest(keepalive=False)

    def _failpoint(self, name: str) -> None:
        if name in self.failpoints:
            time.sleep(self.failpoints[name])

    def run(self, *, max_frames: int | None = None, idle_exit_s: float | None = None) -> WorkerStats:
        """Run until stopped (signal, ``stop_event``), ``max_frames`` handled, or idle for ``idle_exit_s``.

        Every line logged meanwhile, here and on the helper thread (client logs included), carries
        ``worker_id`` and ``model_version``: bound once, through contextvars."""
        context = {"worker_id": self.settings.worker_id, "model_version": self.pipeline.model.model_version}
        with bound_context(**context):
            return self._run(max_frames, idle_exit_s)

    def _run(self, max_frames: int | None, idle_exit_s: float | None) -> WorkerStats:
        k = self.settings.kafka
        self.consumer.subscribe(
            [k.frames_pattern], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        log.info("worker.started", pattern=k.frames_pattern, group_id=k.group_id, assignment=k.assignment_strategy)
        # The idle clock starts when the group has answered (the first assignment) and starts again at every
        # frame and every rebalance event: a cooperative handover can take several seconds between its
        # phases, and exiting in between would leave the partitions being handed over to nobody.
        idle_since = None
        subscribed_at = time.monotonic()
        # a join can wait for a previous member's session to expire, the broker's initial rebalance delay
        # and a metadata refresh (librdkafka joins only once the pattern matches a topic)
        join_limit_s = None
        if idle_exit_s is not None:
            join_limit_s = idle_exit_s + (k.session_timeout_ms + k.metadata_refresh_ms) / 1000 + 3.0
        try:
            o = self.settings.observe
            if o.enabled and self.server is None:  # in the try: a port taken now still closes the clients
                self.server = ObservabilityServer(self, o.host, o.port, o.liveness_timeout_s).start()
            while not self.stop_event.is_set():
                handled = self.process_once()
                now = time.monotonic()
                joined = self._group_changed_at is not None
                if not joined and join_limit_s is not None and now - subscribed_at > join_limit_s:
                    raise NoPartitions(self._never_joined(join_limit_s))
                if handled or idle_since is None:
                    idle_since = now if (handled or joined) else None
                elif joined and self._group_changed_at > idle_since:
                    idle_since = self._group_changed_at
                elif idle_exit_s is not None and now - idle_since > idle_exit_s:
                    if not self._ever_owned:
                        raise NoPartitions(
                            f"no partition was assigned to this worker in {idle_exit_s:g} s after joining group "
                            f"{k.group_id!r}: check that SORTER_KAFKA__FRAMES_PATTERN ({k.frames_pattern}) matches "
                            "a topic, and that other workers do not already own every partition"
                        )
                    break
                if max_frames is not None and self.stats.frames >= max_frames:
                    break
        finally:
            try:
                self._drain()  # the batches in hand are delivered and committed before closing
            finally:
                self.close()
        return self.stats

    def _never_joined(self, waited_s: float) -> str:
        k = self.settings.kafka
        why = "check the broker's group coordinator and that this client may join the group (group ACL)"
        try:
            pattern = re.compile(k.frames_pattern)
            topics = self.consumer.list_topics(timeout=5).topics
            if not any(pattern.search(t) for t in topics if t not in self.own_topics):
                why = (
                    f"no topic matches SORTER_KAFKA__FRAMES_PATTERN ({k.frames_pattern}) on the broker (it has "
                    f"{len(topics)} topics): start the cameras or `sorter simulate` first, or fix the pattern"
                )
        except Exception:
            pass
        return (
            f"group {k.group_id!r} assigned this worker nothing (not even an empty assignment) in {waited_s:g} s "
            f"(--idle-exit plus a session timeout, a metadata refresh and 3 s): {why}"
        )

    def close(self) -> None:
        if self.control is not None:
            try:
                self.control.close()
            except Exception as exc:  # nothing to lose there: the frames' consumer and the producer matter
                log.warning("control.close_failed", error=f"{type(exc).__name__}: {str(exc)[:300]}")
        left = self.stop_event.left()
        self.delivery.close(timeout=min(10.0, max(0.5, left)) if left is not None else 10.0)
        self.consumer.close()
        if self.server is not None:
            self.server.stop()
            self.server = None
        self._runner.shutdown()
        if self.shadow is not None:
            left = self.stop_event.left()
            done = self.shadow.close(timeout=min(10.0, max(0.5, left)) if left is not None else 10.0)
            log.info("shadow.stopped", model_version=self.shadow.model_version, **done)
        self.pipeline.close(wait=not self.stats.unfinished_batches)
        log.info(
            "worker.stopped",
            batches=self.stats.batches,
            frames=self.stats.frames,
            commands=self.stats.commands,
            cache_hits=self.stats.cache_hits,
            dead_letters=dict(self.stats.dead_letters),
            unfinished_batches=self.stats.unfinished_batches,
        )
