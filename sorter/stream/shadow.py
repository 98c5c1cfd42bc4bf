"""Shadow: a candidate model decides the same items as the live one, on the side, and says how often they agree.

``--shadow-checkpoint FILE`` (``shadow.checkpoint``) loads a second model. After each batch's live commands
are delivered (and only then: the live path never waits for the candidate), the batch's frames are handed
to a pipeline of its own (the same routing table and fusion windows; its own decoder and an in-process
decision cache, so it never writes to the live cache and a view after its decision is a hit, as live), on
a thread of its own. Its commands go to ``shadow.topic`` (``sort.shadow``), the same schema with
``"shadow": true``, never read by actuators. ``shadow.fraction`` samples items (by a hash of the item id,
so every view of an item, at every station, is in or out together).

The candidate never slows the line beyond the cores it shares: at most ``shadow.max_queued_batches`` wait
for it, and a batch that finds the queue full is skipped (``sorter_shadow_skipped_frames_total``). A failure
of the candidate or of its topic is counted and said, never raised into the loop.

Agreement: each live decision (not ``late``: no model decided those) and each candidate decision of the
same item and station are matched (whichever comes first waits, bounded) and counted by the live chute:
same chute and label, same chute but another label, another chute (``sorter_shadow_compared_total``).
``sorter diff --shadow`` compares the two topics item by item.
"""

from __future__ import annotations

import contextvars
import os
import queue
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from sorter.logs import get_logger
from sorter.stream.contracts import FrameError, RawFrame, RoutingCommand, parse_frame

log = get_logger("sorter.shadow")

NOT_DECIDED_BY_A_MODEL = {"late"}


def lowest_priority() -> None:
    """This thread, and the threads it starts from now on (its decoder's, torch's intra-op team for it: Linux
    threads inherit their creator's nice value), run only on what the live model leaves of the CPU."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # Linux: a thread id sets that thread
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed: said once, shadowing goes on
        log.warning("shadow.priority_unchanged", error=str(exc))


def sampled(item_id: str, fraction: float) -> bool:
    """Is this item shadowed? The same answer for every view of it, in every pod."""
    return fraction >= 1.0 or zlib.crc32(item_id.encode()) < fraction * 2**32


class Agreement:
    """Matches live and candidate decisions of one item at one station; ``on_pair(station, live, candidate)``
    for each pair. At most ``limit`` wait on either side (the oldest are forgotten: a skipped batch's items)."""

    def __init__(self, on_pair: Callable[[str, RoutingCommand, RoutingCommand], None], limit: int = 50_000) -> None:
        self.on_pair, self.limit = on_pair, limit
        self._waiting: dict[str, OrderedDict[tuple[str, str], RoutingCommand]] = {
            "live": OrderedDict(),
            "candidate": OrderedDict(),
        }

    def add(self, side: str, command: RoutingCommand) -> None:
        key = (command.item_id, command.station_id)
        other = self._waiting["candidate" if side == "live" else "live"].pop(key, None)
        if other is not None:
            live, candidate = (command, other) if side == "live" else (other, command)
            self.on_pair(command.station_id, live, candidate)
            return
        mine = self._waiting[side]
        mine[key] = command
        mine.move_to_end(key)
        while len(mine) > self.limit:
            mine.popitem(last=False)


def agreement_of(live: RoutingCommand, candidate: RoutingCommand) -> str:
    if live.chute != candidate.chute:
        return "other_chute"
    return "same" if (live.label, live.sku) == (candidate.label, candidate.sku) else "other_label"


class Shadow:
    """``pipeline``: the candidate's (its model, the live routing table, an in-process cache). ``publish(value,
    key)``: sends one command to the shadow topic (raises on a refusal); ``poll()``: serves its delivery
    reports; ``flush(timeout)``. ``metrics``: :class:`sorter.stream.observe.Metrics`."""

    def __init__(
        self,
        pipeline,
        producer,
        topic: str,
        metrics,
        *,
        fraction: float = 1.0,
        max_queued_batches: int = 4,
        topic_prefix: str = "frames.",
        stations: frozenset[str] | None = None,
        on_compared: Callable[[str, RoutingCommand, RoutingCommand], None] | None = None,
    ) -> None:
        """``stations``: only these stations' items (a canary's baseline; None: every station). ``on_compared``:
        also told of each pair (the canary judges its candidate by them)."""
        self.pipeline, self.producer, self.topic, self.metrics = pipeline, producer, topic, metrics
        self.stations, self.on_compared = stations, on_compared
        metrics.enable_shadow()
        self.fraction, self.topic_prefix = fraction, topic_prefix
        self.agreement = Agreement(self._compared, limit=10_000)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued_batches)
        self._forget: list[tuple[int, list]] = []  # (batches offered before it, revoked partitions)
        self._offered = self._done = 0  # batches queued so far; batches finished so far (queue order)
        self._late_passes: OrderedDict[tuple[str, str], int | None] = OrderedDict()  # (item, station) -> captured
        self._lock = threading.Lock()
        self.batches = self.commands = self.skipped_frames = self.errors = 0
        context = contextvars.copy_context()  # its lines carry the worker's id, as every line does
        self._thread = threading.Thread(target=context.run, args=(self._loop,), name="shadow", daemon=True)
        self._thread.start()

    @property
    def model_version(self) -> str:
        return self.pipeline.model.model_version

    def offer(self, raws: Sequence[RawFrame], live) -> None:
        """A batch whose live commands were delivered (``live``: its BatchResult). Never blocks, never raises.
        Frames the live side sent to the late chute stay out: no model decided them live, nothing to compare."""
        try:
            late = {f.raw.source for f in live.late}
            for f in live.late:  # the pass is recirculated: its later views (hits live) stay out too
                self._late_passes[(f.item_id, f.station_id)] = f.captured_at_ms
                self._late_passes.move_to_end((f.item_id, f.station_id))
            while len(self._late_passes) > 10_000:
                self._late_passes.popitem(last=False)
            frames = [r for r in raws if r.source not in late and self._sampled(r)]
            commands = [c for c in live.commands if c.reason not in NOT_DECIDED_BY_A_MODEL and self._in(c.item_id)
                        and (self.stations is None or c.station_id in self.stations)]  # fmt: skip
            if not frames and not commands:
                return
            with self._lock:
                try:
                    self._queue.put_nowait((self._offered, frames, commands))
                    self._offered += 1
                except queue.Full:
                    self.skipped_frames += len(frames)
                    self.metrics.shadow_skipped.inc(len(frames))
        except Exception as exc:  # the live batch is delivered: nothing here may fail it
            self._failed("shadow.offer_failed", exc)

    def forget(self, partitions) -> None:
        """Revoked partitions: their open views go (their new owner shadows them), once the batches offered
        before the revocation are done (their views joined first), before any offered after it."""
        with self._lock:
            self._forget.append((self._offered, list(partitions)))

    def _forget_due(self) -> None:
        with self._lock:
            due = [p for seq, p in self._forget if seq <= self._done]
            self._forget = [(seq, p) for seq, p in self._forget if seq > self._done]
        for partitions in due:
            self.pipeline.forget(partitions)

    def _in(self, item_id: str) -> bool:
        return sampled(item_id, self.fraction)

    def _sampled(self, raw: RawFrame) -> bool:
        try:
            frame = parse_frame(raw, self.topic_prefix)
        except FrameError:
            return False  # the live side dead-lettered it
        if not self._in(frame.item_id) or (self.stations is not None and frame.station_id not in self.stations):
            return False
        then = self._late_passes.get((frame.item_id, frame.station_id), "never")
        if then == "never":
            return True
        window = self.pipeline.pass_window_ms  # a view of a pass recirculated late: not one to compare
        return not (then is None or frame.captured_at_ms is None or abs(frame.captured_at_ms - then) <= window)

    def _loop(self) -> None:
        lowest_priority()
        while True:
            try:
                due = self.pipeline.fusion_due_in_ms()
                try:
                    job = self._queue.get(timeout=None if due is None else max(due, 1) / 1000)
                except queue.Empty:
                    job = (None, [], [])  # an open multi-camera item's window closed: an empty batch decides it
                if job is None:
                    return
                self._batch(*job)
            except Exception as exc:  # never a dead thread that silently skips every later batch
                self._failed("shadow.batch_failed", exc)
                time.sleep(0.1)

    def _batch(self, seq: int | None, frames: list[RawFrame], live: list[RoutingCommand]) -> None:
        try:
            self._forget_due()
            for command in live:
                self.agreement.add("live", command)
            started = time.perf_counter()
            result = self.pipeline.process(frames)
            self.pipeline.cache.put_many(result.decisions)
            if frames:
                self.metrics.shadow_batch_s.observe(time.perf_counter() - started)
            for command in result.commands:
                shadowed = command.model_copy(update={"shadow": True})
                self.producer.publish(self.topic, shadowed.to_bytes(), command.station_id.encode())
                self.metrics.shadow_commands.labels(self.metrics.station(command.station_id), command.reason).inc()
                self.agreement.add("candidate", shadowed)
                self.commands += 1
            self.producer.poll()
            self.batches += 1
        except Exception as exc:  # the candidate or its topic: counted and said, never the live path's problem
            self._failed("shadow.batch_failed", exc, frames=len(frames))
        finally:
            if seq is not None:
                with self._lock:
                    self._done = seq + 1
                self._forget_due()

    def _failed(self, event: str, exc: Exception, **fields) -> None:
        with self._lock:
            self.errors += 1
        self.metrics.shadow_errors.inc()
        log.error(event, error=f"{type(exc).__name__}: {str(exc)[:300]}", **fields)

    def _compared(self, station: str, live: RoutingCommand, candidate: RoutingCommand) -> None:
        self.metrics.shadow_compared.labels(
            self.metrics.station(station), live.chute, agreement_of(live, candidate)
        ).inc()
        if self.on_compared is not None:
            self.on_compared(station, live, candidate)

    def close(self, timeout: float = 10.0) -> dict[str, Any]:
        """Finish what is queued (within ``timeout``), flush the topic; what it did, for the stop line."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._queue.put(None, timeout=max(0.01, deadline - time.monotonic()))
                break
            except queue.Full:
                if time.monotonic() >= deadline:
                    break
        self._thread.join(max(0.0, deadline - time.monotonic()))
        try:
            self.producer.flush(max(0.5, deadline - time.monotonic()))
        except Exception as exc:
            log.warning("shadow.flush_failed", error=f"{type(exc).__name__}: {str(exc)[:300]}")
        self.pipeline.close(wait=not self._thread.is_alive())
        return {"batches": self.batches, "commands": self.commands, "skipped_frames": self.skipped_frames,
                "errors": self.errors}  # fmt: skip


def undelivered(metrics, every_s: float = 60.0) -> Callable[[str], None]:
    """What a shadow command that could not be sent does: counted, said once a minute at most."""
    said = [float("-inf")]

    def on_error(why: str) -> None:
        metrics.shadow_errors.inc()
        if time.monotonic() - said[0] >= every_s:
            said[0] = time.monotonic()
            log.warning("shadow.undelivered", error=why[:300])

    return on_error


class ShadowProducer:
    """The shadow topic's producer: a plain confluent-kafka Producer (``factory(config)``), no transactions (a
    candidate's decisions are evidence, not orders); what it cannot send is counted (``on_error``), never
    raised into the shadow thread's next batch."""

    def __init__(self, factory: Callable[[dict], Any], config: dict, on_error: Callable[[str], None]) -> None:
        self.producer, self.on_error = factory(config), on_error

    def _delivered(self, err, _msg) -> None:
        if err is not None:
            self.on_error(err.str())

    def publish(self, topic: str, value: bytes, key: bytes) -> None:
        try:
            self.producer.produce(topic, value, key, on_delivery=self._delivered)
        except BufferError:  # the local queue is full (the broker is away): this one is lost, counted
            self.producer.poll(0)
            self.on_error("local queue full")
        except Exception as exc:  # KafkaException (e.g. larger than message.max.bytes): counted
            self.on_error(f"{type(exc).__name__}: {exc}")

    def poll(self) -> None:
        self.producer.poll(0)

    def flush(self, timeout: float) -> None:
        self.producer.flush(timeout)
