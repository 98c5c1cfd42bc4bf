"""``sorter replay``: publish a recording again, on the recorded schedule (scaled), or feed it straight
into the worker's pipeline without a broker.

Schedule: record *i* is due ``(t_i - t_first) / speed`` seconds after the start, where ``t`` is the
message's own timestamp (else when it was recorded). Records are sent in file order, so each
partition's order is kept; a record whose due time has passed is sent at once and its lateness is
counted. ``--max-rate`` ignores the schedule. ``--loop N`` plays the recording N times back to back;
loops after the first get their item ids suffixed ``:r2``, ``:r3``, ... (key and ``item-id`` header),
so the worker sees new items rather than repeats it already decided.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from confluent_kafka import Producer

from sorter.errors import SorterError
from sorter.logs import get_logger
from sorter.progress import make_progress
from sorter.settings import KafkaSettings, Settings
from sorter.stream.contracts import RawFrame
from sorter.stream.pipeline import BatchResult, Pipeline, now_ms
from sorter.traffic.recording import Reader, Record, RecordingDamaged

log = get_logger("sorter.replay")


@dataclass(frozen=True)
class ReplayPlan:
    speed: float | None = 1.0  # None: as fast as the broker takes them
    loops: int = 1
    topic_map: dict[str, str] = field(default_factory=dict)
    topic_prefix: str = ""  # prepended to every (mapped) topic: replay into staging.frames.<station>
    stations: frozenset[str] | None = None
    restamp: bool = False  # captured-at := publish time (latency figures then mean something)
    frames_prefix: str = "frames."  # where a missing station-id header comes from

    def __post_init__(self) -> None:
        if self.speed is not None and self.speed <= 0:
            raise SorterError("--speed must be > 0 (or use --max-rate)")
        if self.loops < 1:
            raise SorterError("--loop must be >= 1")

    def topic(self, topic: str) -> str:
        return self.topic_prefix + self.topic_map.get(topic, topic)

    def station(self, record: Record) -> str | None:
        return record.station(self.frames_prefix)


def parse_topic_map(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old or not new:
            raise SorterError(f"--topic-map {pair!r}: expected OLD=NEW")
        out[old] = new
    return out


@dataclass(frozen=True)
class Survey:
    """One pass over a recording: what the schedule needs, and whether it is whole."""

    records: int
    first_ms: int | None
    last_ms: int | None
    partitions: dict[str, int]  # topic -> partitions seen (max index + 1)
    damage: RecordingDamaged | None


def survey(reader: Reader) -> Survey:
    n, first, last, parts = 0, None, None, {}
    for r in reader.records(allow_damaged=True):
        n += 1
        t = r.time_ms
        first = t if first is None else min(first, t)
        last = t if last is None else max(last, t)
        parts[r.topic] = max(parts.get(r.topic, 0), r.partition + 1)
    return Survey(n, first, last, parts, reader.damage)


def _renamed(record: Record, loop: int, topic: str, restamp_ms: int | None) -> Record:
    headers = record.headers
    key = record.key
    if loop > 0:  # the id as the worker reads it (trimmed), suffixed; a blank one stays blank (dead letter)
        suffix = f":r{loop + 1}".encode()
        key = key.strip() + suffix if key and key.strip() else key
        headers = tuple((k, v.strip() + suffix if k == "item-id" and v and v.strip() else v) for k, v in headers)
    if restamp_ms is not None:
        headers = tuple((k, str(restamp_ms).encode() if k == "captured-at" else v) for k, v in headers)
        if not any(k == "captured-at" for k, _ in headers):
            headers += (("captured-at", str(restamp_ms).encode()),)
    return Record(
        topic, record.partition, record.offset, record.timestamp_ms, key, headers, record.value, record.recorded_at_ms
    )


def scheduled(
    reader: Reader, plan: ReplayPlan, info: Survey, *, allow_damaged: bool
) -> Iterator[tuple[float, int, Record]]:
    """(due seconds from the start, loop, record) for every record to send, in send order."""
    span = ((info.last_ms or 0) - (info.first_ms or 0)) / 1000
    gap = span / max(1, info.records - 1)
    for loop in range(plan.loops):
        offset = loop * (span + gap)
        for r in reader.records(allow_damaged=allow_damaged):
            if plan.stations is not None and plan.station(r) not in plan.stations:
                continue
            due = 0.0 if plan.speed is None else (offset + (r.time_ms - info.first_ms) / 1000) / plan.speed
            yield due, loop, r


@dataclass
class ReplayReport:
    sent: int = 0
    seconds: float = 0.0
    schedule_s: float = 0.0
    lags_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, float]:
        lags = np.array(self.lags_ms or [0.0])
        return {
            "sent": self.sent,
            "seconds": round(self.seconds, 3),
            "schedule_s": round(self.schedule_s, 3),
            "rate_per_s": round(self.rate, 1),
            "lag_p50_ms": round(float(np.percentile(lags, 50)), 2),
            "lag_p99_ms": round(float(np.percentile(lags, 99)), 2),
            "lag_max_ms": round(float(lags.max()), 2),
        }


def _check(info: Survey, allow_damaged: bool) -> None:
    if info.damage is not None:
        if not allow_damaged:
            raise info.damage
        log.warning("replay.damaged_recording", intact=info.damage.intact, position=info.damage.position)


def replay_to_kafka(
    reader: Reader,
    kafka: KafkaSettings,
    plan: ReplayPlan,
    *,
    allow_damaged: bool = False,
    create_topics: bool = True,
    progress: bool = True,
    stop: Callable[[], bool] = lambda: False,
) -> ReplayReport:
    """Publish the recording with its keys and headers; returns the rate and the lag behind schedule."""
    from sorter.stream.delivery import CheckedProducer
    from sorter.stream.kafka import ensure_topics, kafka_config

    info = survey(reader)
    _check(info, allow_damaged)
    wanted: dict[str, int] = {}
    for topic, n in info.partitions.items():
        wanted[plan.topic(topic)] = max(wanted.get(plan.topic(topic), 0), n)
    if create_topics and wanted:
        ensure_topics(kafka, wanted)  # with the client settings (SASL, TLS) like every other call
    producer = CheckedProducer(kafka_config(kafka, {"linger.ms": 1, "enable.idempotence": True}))
    partitions = _partition_counts(Producer(kafka_config(kafka)), wanted)
    report = ReplayReport()
    total = info.records * plan.loops
    log.info("replay.started", records=info.records, loops=plan.loops, speed=plan.speed, topics=sorted(wanted))
    with make_progress() as bar:
        task = bar.add_task("replaying", total=total if progress else None, info="")
        started = time.perf_counter()
        last_update = 0.0
        for due, loop, r in scheduled(reader, plan, info, allow_damaged=allow_damaged):
            if stop():
                break
            wait = due - (time.perf_counter() - started)
            if wait > 0:
                time.sleep(wait)
            now = time.perf_counter() - started
            topic = plan.topic(r.topic)
            out = _renamed(r, loop, topic, now_ms() if plan.restamp else None)
            partition = r.partition if r.partition < partitions.get(topic, 0) else None
            producer.produce(topic, out.value or b"", out.key, out.headers, partition=partition)
            report.sent += 1
            if plan.speed is not None:
                report.lags_ms.append(max(0.0, (now - due) * 1000))
                report.schedule_s = due
            if now - last_update > 0.2:
                bar.update(task, completed=report.sent, info=f"{report.sent / max(now, 1e-9):.0f}/s")
                last_update = now
        producer.flush(60)  # raises if anything was not delivered
        producer.close()
        report.seconds = time.perf_counter() - started
        bar.update(task, completed=report.sent)
    log.info("replay.done", **report.summary())
    return report


def _partition_counts(client: Producer, topics: dict[str, int]) -> dict[str, int]:
    meta = client.list_topics(timeout=10)
    return {t: len(meta.topics[t].partitions) for t in topics if t in meta.topics and meta.topics[t].error is None}


def replay_direct(
    reader: Reader, pipeline: Pipeline, plan: ReplayPlan, *, batch_size: int = 32, allow_damaged: bool = False
) -> Iterator[BatchResult]:
    """Feed the recording to the worker's pipeline, no broker: one BatchResult per ``batch_size`` frames.

    The pipeline's cache stands in for Redis (use ``MemoryCache``), so repeated frames of an item give
    one decision, as in the worker. Timing is ignored: this is for tests and model comparisons, so no
    frame is judged late (a recording's capture times are hours old; there is no queue to be late in).
    Multi-camera fusion windows run on the recording's clock (when each frame was recorded), so an item's
    views are fused as the line would have; items still open at the end are decided then.
    """
    pipeline.judge_late = False
    recorded = [0]  # the recording's clock: the latest frame's recording time
    if pipeline.routes.fuses:
        pipeline.clock_ms = lambda: recorded[0]
    info = survey(reader)
    _check(info, allow_damaged)
    batch: list[RawFrame] = []

    def run(frames: list[RawFrame]) -> BatchResult:
        result = pipeline.process(frames)
        pipeline.cache.put_many(result.decisions)  # as the worker does once commands are delivered
        return result

    for _, loop, r in scheduled(reader, replace(plan, speed=None), info, allow_damaged=allow_damaged):
        topic = plan.topic(r.topic)
        out = _renamed(r, loop, topic, now_ms() if plan.restamp else None)
        recorded[0] = max(recorded[0], r.recorded_at_ms or r.timestamp_ms or 0)
        batch.append(out.to_raw())
        if len(batch) >= batch_size:
            yield run(batch)
            batch = []
    if batch:
        yield run(batch)
    if pipeline.fusion_due_in_ms() is not None:  # the recording ended with items waiting for views
        recorded[0] += 60_001  # past every window (window_ms is at most 60 s)
        yield run([])


def replay_direct_to(
    out: Path | None, reader: Reader, settings: Settings, plan: ReplayPlan, *, allow_damaged: bool = False
) -> dict:
    """``replay --direct``: the recording through the pipeline ``settings`` describe (its model, routing
    table and batch size; an in-memory cache for Redis), the commands as JSON lines into ``out`` (when
    given, for ``sorter diff``). Returns the counts."""
    from sorter.stream.app import build_pipeline
    from sorter.stream.cache import MemoryCache

    pipeline = build_pipeline(settings)
    pipeline.cache = MemoryCache()
    counts = {"frames": 0, "commands": 0, "dead_letters": 0, "cache_hits": 0}
    sink = out.open("w") if out else None
    try:
        for result in replay_direct(
            reader, pipeline, plan, batch_size=settings.batch.max_size, allow_damaged=allow_damaged
        ):
            counts["frames"] += result.frames
            counts["commands"] += len(result.commands)
            counts["dead_letters"] += len(result.dead_letters)
            counts["cache_hits"] += result.cache_hits
            if sink:
                sink.writelines(c.model_dump_json() + "\n" for c in result.commands)
    finally:
        if sink:
            sink.close()
        pipeline.decoder.close()
    return counts | {"model_version": pipeline.model.model_version}
