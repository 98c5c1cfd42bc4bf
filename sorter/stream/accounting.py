"""What a finished batch leaves behind: counters (:class:`WorkerStats`), one log line per item and per
batch, Prometheus metrics, and the ``on_batch`` hook (the bench's). Nothing here touches Kafka."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from sorter.logs import get_logger
from sorter.stream.contracts import RawFrame
from sorter.stream.observe import Metrics
from sorter.stream.pipeline import BatchResult

log = get_logger("sorter.worker")


@dataclass
class WorkerStats:
    batches: int = 0
    frames: int = 0
    commands: int = 0
    cached_commands: int = 0
    dead_letters: Counter = field(default_factory=Counter)
    cache_hits: int = 0
    late_frames: int = 0
    fused_items: int = 0
    producer_restarts: int = 0
    delivery_retries: int = 0
    revoked_dropped: int = 0
    partitions_revoked: int = 0
    slow_batches: int = 0
    aborted_batches: int = 0
    unfinished_batches: int = 0


def _best_effort_id(raw: RawFrame, header: str, fallback: bytes | None) -> str | None:
    """An id for the log line of a frame that broke the contract (so ops can grep it), never raising."""
    value = next((v for k, v in reversed(raw.headers) if k == header and v), None) or fallback
    return value.decode("utf-8", "replace")[:128] if value else None


class Accounting:
    def __init__(
        self,
        stats: WorkerStats,
        metrics: Metrics,
        cache_up: Callable[[], bool],
        on_batch: Callable[[BatchResult], None] | None = None,
    ) -> None:
        self.stats, self.metrics, self.cache_up, self.on_batch = stats, metrics, cache_up, on_batch

    def batch_done(self, result: BatchResult, frames_by_topic: dict[str, int], seconds: float):
        s = self.stats
        delivered_ms = result.times.delivered
        s.batches += 1
        s.frames += result.frames
        s.commands += len(result.commands)
        s.cached_commands += sum(c.cached for c in result.commands)
        s.cache_hits += result.cache_hits
        s.late_frames += len(result.late)
        s.fused_items += len(result.fused)
        for d in result.dead_letters:
            s.dead_letters[d.reason] += 1
            log.warning(
                "frame.dead_lettered",
                **({"model_version": result.model_version} if result.model_version else {}),
                item_id=_best_effort_id(d.raw, "item-id", d.raw.key),
                station_id=_best_effort_id(d.raw, "station-id", None),
                reason=d.reason,
                error=d.error,
                message=d.message[:300],
                topic=d.raw.source.topic,
                partition=d.raw.source.partition,
                offset=d.raw.source.offset,
                payload_bytes=len(d.raw.value or b""),
            )
        for c in result.commands:
            log.info(
                "item.routed",
                item_id=c.item_id,
                station_id=c.station_id,
                camera_id=c.camera_id,
                topic=c.source.topic,
                partition=c.source.partition,
                offset=c.source.offset,
                sku=c.sku,
                label=c.label,
                confidence=c.confidence,
                chute=c.chute,
                reason=c.reason,
                frames=c.frames,
                cached=c.cached,
                ood_score=c.ood_score,
                views=c.views,
                cameras=c.cameras,
                model_version=c.model_version,  # across a reload: the model that decided it
                latency_ms=round(delivered_ms - c.captured_at, 1) if c.captured_at and delivered_ms else None,
            )
        for h in result.hits:
            # debug, not info: a hit changes nothing on the conveyor (a new pass also gets its item.routed line,
            # cached=true), and on a line with several cameras per item most frames are hits, so at info they
            # would double or triple the lines per item; batch.done counts them. Chasing one item: debug level.
            log.debug(
                "item.cache_hit",
                item_id=h.frame.item_id,
                station_id=h.frame.station_id,
                camera_id=h.frame.camera_id,
                topic=h.frame.raw.source.topic,
                partition=h.frame.raw.source.partition,
                offset=h.frame.raw.source.offset,
                decided_at=h.decided_at,
                new_pass=h.new_pass,
            )
        ran = {"model_version": result.model_version} if result.model_version else {}  # across a reload: this batch's
        log.info(
            "batch.done",
            **ran,
            frames=result.frames,
            commands=len(result.commands),
            dead_letters=len(result.dead_letters),
            cache_hits=result.cache_hits,
            late=len(result.late),
            fused=len(result.fused),
            fusion_held_frames=result.held_frames,
            classified=result.classified,
            cache_up=self.cache_up(),
            decode_ms=round(result.decode_s * 1000, 2),
            infer_ms=round(result.infer_s * 1000, 2),
            batch_ms=round(seconds * 1000, 2),
        )
        self.metrics.observe_batch(result, frames_by_topic, seconds)
        if self.on_batch is not None:
            self.on_batch(result)
