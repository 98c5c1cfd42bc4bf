"""``sorter record``: copy what a set of topics carries into a recording file.

The recorder reads with its own throw-away consumer group and never commits, so recording a line
does not disturb the workers' groups or offsets. It stops on ``duration``, ``max_messages``, after
``idle_exit_s`` without a message, or on Ctrl-C/SIGTERM; every record written until then is whole.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError

from sorter.logs import get_logger
from sorter.progress import make_progress
from sorter.settings import KafkaSettings
from sorter.stream.kafka import kafka_config, to_raw
from sorter.traffic.recording import Record, Writer

log = get_logger("sorter.record")


@dataclass
class CaptureStats:
    records: int = 0
    bytes: int = 0
    seconds: float = 0.0


def capture(
    kafka: KafkaSettings,
    pattern: str,
    writer: Writer,
    *,
    start: str = "latest",
    duration_s: float | None = None,
    max_messages: int | None = None,
    idle_exit_s: float | None = None,
    stop: threading.Event | None = None,
    progress: bool = True,
) -> CaptureStats:
    """Record messages of the topics matching ``pattern`` (a regex if it starts with ``^``, else a topic list
    separated by commas) from ``start`` (earliest or latest) until a stop condition."""
    stop = stop or threading.Event()
    topics = [pattern] if pattern.startswith("^") else [t.strip() for t in pattern.split(",") if t.strip()]
    consumer = Consumer(
        kafka_config(
            kafka,
            {"fetch.wait.max.ms": 50, "session.timeout.ms": 6000, "topic.metadata.refresh.interval.ms": 2000},
            required={  # a throw-away group that never commits, reading from where --from says
                "group.id": f"sorter-record-{uuid.uuid4().hex[:12]}",
                "enable.auto.commit": False,
                "auto.offset.reset": start,
            },
        )
    )
    stats = CaptureStats()
    started = time.monotonic()
    last_message: float | None = None  # the idle clock starts once partitions are assigned

    def on_assign(c, partitions) -> None:
        nonlocal last_message
        c.assign(partitions)
        if last_message is None:
            last_message = time.monotonic()

    consumer.subscribe(topics, on_assign=on_assign)
    log.info("record.started", topics=topics, start=start, out=str(writer.path))
    with make_progress(transient=False) as bar:
        task = bar.add_task("recording", total=max_messages, info="") if progress else None
        try:
            while not stop.is_set():
                now = time.monotonic()
                if duration_s is not None and now - started >= duration_s:
                    break
                if idle_exit_s is not None and last_message is not None and now - last_message >= idle_exit_s:
                    break
                want = 500 if max_messages is None else min(500, max_messages - stats.records)
                for m in consumer.consume(want, 0.2):
                    if m.error() is not None:
                        if m.error().code() != KafkaError._PARTITION_EOF:
                            log.warning("record.consume_error", error=str(m.error()))
                        continue
                    raw = to_raw(m)  # never raises: unreadable headers are recorded as none, and said
                    if raw.header_error is not None:
                        log.warning(
                            "record.unreadable_headers", topic=m.topic(), offset=m.offset(), error=raw.header_error
                        )
                    writer.write(
                        Record(
                            m.topic(),
                            m.partition(),
                            m.offset(),
                            raw.timestamp_ms,
                            m.key(),
                            raw.headers,
                            m.value(),
                            time.time_ns() // 1_000_000,
                        )
                    )
                    stats.records += 1
                    last_message = time.monotonic()
                if task is not None:
                    bar.update(task, completed=stats.records, info=f"{writer.bytes / 1e6:.1f} MB")
                if max_messages is not None and stats.records >= max_messages:
                    break
        finally:
            consumer.close()
            writer.close()
    stats.bytes = writer.bytes
    stats.seconds = time.monotonic() - started
    log.info("record.stopped", records=stats.records, bytes=stats.bytes, seconds=round(stats.seconds, 2))
    return stats


def stop_on_signals(stop: threading.Event) -> None:
    """Ctrl-C / SIGTERM end a recording cleanly (the file stays whole)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
