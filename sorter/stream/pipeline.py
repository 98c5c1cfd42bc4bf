"""One batch of raw frames -> routing commands, dead letters and decisions to remember.

No Kafka here: the worker feeds raw frames in and produces what comes out, so this logic is tested
with in-memory fakes, and a replay can drive it without a broker.

Policy for several frames of one item (several cameras, a photo retaken, a second station, a second lap):
1. an item already decided (in the decision cache) never runs the model again. The cache skips the model,
   not the command: a frame of the same *pass* (same station, captured within ``pass_window_ms`` of the
   decided photo) gets no second command; a frame at another station, or at the same station in a later
   pass (recirculation), gets a command built from the cached prediction by that station's rules,
   marked ``cached: true``. Either way the frame counts as a cache hit;
2. frames of one item at one station in the same batch are all classified, and the most confident one
   decides (one command, ``frames`` says how many were used);
3. a frame that breaks the contract or cannot be decoded goes to the dead-letter topic with a reason;
   the item's other frames still decide;
4. a frame already past its station's decision deadline (``decision_deadline_ms`` in the routing table)
   when its batch starts is not classified: its item has passed the diverter, so it gets a ``late``
   command to the late chute at once (one per item and station in the batch). The cache remembers that
   pass, so the item's other views of it get no second command, and a later pass is decided afresh (the
   item's earlier prediction, if any, is kept for other stations);
5. at a station with multi-camera fusion (``fusion`` in the routing table) rule 2 spans batches: the item's
   views are held open until all expected cameras were classified or its window closed, then decide together
   (``fusion.py``); the commit does not pass an open view (``BatchResult.held``), and a late view of an open
   item's pass joins it.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from sorter.errors import FrameDecodeError
from sorter.model.preprocess import load_for_model
from sorter.stream.cache import DecisionCache
from sorter.stream.contracts import CommandSource, Frame, FrameError, RawFrame, RoutingCommand, parse_frame
from sorter.stream.fusion import Fuser, OpenItem, camera_of, fuse
from sorter.stream.inference import Prediction
from sorter.stream.routing import Decision, RoutingTable, decide, late
from sorter.stream.timeline import BatchTimes, wall_ms


class Model(Protocol):
    @property
    def input_size(self) -> int: ...

    @property
    def model_version(self) -> str: ...

    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]: ...


@dataclass(frozen=True)
class DeadLetter:
    raw: RawFrame
    reason: str
    error: str
    message: str


@dataclass(frozen=True)
class CacheHit:
    """A frame of an item decided before: ``new_pass`` when a command was built from the cached decision
    (another station, a later pass), otherwise another view of a pass already commanded (no command)."""

    frame: Frame
    decided_at: int | None
    new_pass: bool


@dataclass
class BatchResult:
    commands: list[RoutingCommand] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    decisions: dict[str, dict] = field(default_factory=dict)  # item_id -> what the cache should remember
    hits: list[CacheHit] = field(default_factory=list)  # one per frame answered from the cache
    late: list[Frame] = field(default_factory=list)  # past their deadline: not classified, sent to the late chute
    fused: list[OpenItem] = field(default_factory=list)  # multi-camera items decided in this batch
    held: dict[tuple[str, int], int] = field(default_factory=dict)  # partition -> lowest offset still open
    released: set[tuple[str, int]] = field(default_factory=set)  # partitions of the views fused in this batch
    held_frames: int = 0  # views held open after this batch, their items waiting for more views
    model_version: str | None = None  # of the model this batch ran (its log lines say so, across a reload)
    cache_hits: int = 0  # len(hits)
    frames: int = 0
    classified: int = 0
    decode_s: float = 0.0
    infer_s: float = 0.0
    times: BatchTimes = field(default_factory=BatchTimes)  # where its items' milliseconds went (timeline.py)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Decoder:
    """Decodes payloads in a thread pool (OpenCV releases the GIL), each to the model's input size."""

    def __init__(self, threads: int, max_pixels: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        self.max_pixels = max_pixels

    def _one(self, payload: bytes, size: int) -> np.ndarray | FrameDecodeError:
        try:
            return load_for_model(payload, size, max_pixels=self.max_pixels)
        except FrameDecodeError as exc:
            return exc
        except Exception as exc:  # an OpenCV/Pillow surprise on hostile input must not stop the worker
            return FrameDecodeError(f"{type(exc).__name__}: {exc}", "undecodable")

    def decode(self, payloads: Sequence[bytes], size: int) -> list[np.ndarray | FrameDecodeError]:
        return list(self.pool.map(lambda p: self._one(p, size), payloads))

    def submit(self, payload: bytes, size: int) -> Future:
        """Start decoding now; the result (array or FrameDecodeError) is picked up later."""
        return self.pool.submit(self._one, payload, size)

    def close(self, wait: bool = True) -> None:
        self.pool.shutdown(wait=wait, cancel_futures=not wait)


class Pipeline:
    def __init__(
        self,
        model: Model,
        routes: RoutingTable,
        cache: DecisionCache,
        decoder: Decoder,
        *,
        worker_id: str,
        topic_prefix: str = "frames.",
        max_payload_bytes: int = 20_000_000,
        pass_window_ms: int = 10_000,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.model = model
        self.routes = routes
        self.cache = cache
        self.decoder = decoder
        self.worker_id = worker_id
        self.topic_prefix = topic_prefix
        self.max_payload_bytes = max_payload_bytes
        self.pass_window_ms = pass_window_ms
        self.clock_ms = clock_ms
        # frames past their station's deadline go to the late chute; off for a direct replay (no queue)
        self.judge_late = routes.decision_deadline_ms is not None or any(
            o.decision_deadline_ms for o in routes.stations.values()
        )
        self.fuser = Fuser()  # items waiting for more of their views (fusion.py)
        self.canary = None  # a Canary (canary.py): a candidate deciding at chosen stations; app.py sets it
        self._canary_stations: frozenset[str] | None = None  # where the candidate decided the last batch
        self._next_model: Model | None = None  # a reloaded model, served from the next batch (reload.py)

    def close(self, wait: bool = True) -> None:
        """Stop the decode threads and close the cache's connections (``wait=False``: a batch was given up)."""
        self.decoder.close(wait)
        self.cache.close()

    def _dead(self, result: BatchResult, raw: RawFrame, reason: str, exc: Exception) -> None:
        result.dead_letters.append(DeadLetter(raw, reason, type(exc).__name__, str(exc)))

    def predecode(self, raw: RawFrame) -> Future | None:
        """Start decoding one photo ahead of :meth:`process` (which then only waits for it), so decoding
        overlaps the model's work on the batch before. Oversized payloads are not decoded (None); a photo
        whose item turns out to be decided already was decoded for nothing."""
        if raw.value and len(raw.value) <= self.max_payload_bytes and not self._late_already(raw):
            return self.decoder.submit(raw.value, self.model.input_size)
        return None

    def _late_already(self, raw: RawFrame) -> bool:
        """Past its deadline when fetched, so it will not be classified: decoding it would only slow a drain."""
        if not self.judge_late:
            return False
        try:
            frame = parse_frame(raw, self.topic_prefix)
        except FrameError:
            return False  # process() dead-letters it
        return late(self.routes, frame.station_id, _age(self.clock_ms(), frame)) is not None

    def process(
        self, raws: Sequence[RawFrame], predecoded: dict[int, Future] | None = None, times: BatchTimes | None = None
    ) -> BatchResult:
        """``predecoded``: decodes already started (:meth:`predecode`), by position in ``raws``; the others are
        decoded here. ``times``: the loop's stamps so far (fetched, closed); the pipeline adds its own and
        returns them on the result."""
        result = BatchResult(frames=len(raws), times=times or BatchTimes())
        result.times.started = wall_ms()
        closing: dict[tuple[str, str], OpenItem] = {}
        if self._next_model is not None:  # a new model from this batch on: items waiting for more views are
            closing = {i.key: i for i in self.fuser.take_all()}  # decided now, by the model that saw their views
            self.model, self._next_model = self._next_model, None
        result.model_version = self.model.model_version
        canary = self.canary.serving() if self.canary is not None else None  # once: a batch never switches
        if self._canary_stations is not None and canary is None:  # rolled back: decide its open items now
            closing |= {i.key: i for i in self.fuser.take_all(self._canary_stations)}
        self._canary_stations = canary[1] if canary is not None else None

        def model_for(station_id: str) -> Model:
            return canary[0] if canary is not None and station_id in canary[1] else self.model

        def reusable(cached: dict, station_id: str) -> bool:
            """A canary candidate's decision is reused only where (and while) the candidate decides."""
            version = cached.get("model_version")
            if self.canary is None or version != self.canary.model.model_version or version == self.model.model_version:
                return True  # not the candidate's (or the live model is that version now: promoted)
            return model_for(station_id) is self.canary.model

        position = {id(raw): i for i, raw in enumerate(raws)}
        frames: list[Frame] = []
        for raw in raws:
            try:
                if raw.value is not None and len(raw.value) > self.max_payload_bytes:
                    raise FrameError(
                        "payload_too_large",
                        f"payload is {len(raw.value)} bytes, over the limit of {self.max_payload_bytes}",
                    )
                frames.append(parse_frame(raw, self.topic_prefix))
            except FrameError as exc:
                self._dead(result, raw, exc.reason, exc)

        known = self.cache.get_many(list(dict.fromkeys(f.item_id for f in frames)))
        now = self.clock_ms()
        fresh: list[Frame] = []
        again: dict[tuple[str, str], list[Frame]] = defaultdict(list)  # decided before, not in this pass
        overdue: dict[tuple[str, str], list[Frame]] = defaultdict(list)  # past the deadline
        verdicts: dict[tuple[str, str], Decision] = {}
        open_now = {key for key in {(f.item_id, f.station_id) for f in frames} if self.fuser.is_open(key)}
        for f in frames:
            cached = known.get(f.item_id)
            key = (f.item_id, f.station_id)
            if key in open_now and self._joins(f, self.fuser.frames(key)):  # its pass is being decided: it joins
                fresh.append(f)
            elif key in closing and self._joins(f, [v for v, _ in closing[key].views.values()]):
                result.hits.append(CacheHit(f, None, False))  # its pass is decided in this batch (a model swap)
            elif cached is not None and self._same_pass(cached, f):
                result.hits.append(CacheHit(f, cached.get("decided_at"), False))
            elif self.judge_late and (verdict := late(self.routes, f.station_id, _age(now, f))):
                overdue[(f.item_id, f.station_id)].append(f)
                verdicts.setdefault((f.item_id, f.station_id), verdict)
                result.late.append(f)
            elif cached is not None and _prediction(cached) and reusable(cached, f.station_id):
                result.hits.append(CacheHit(f, cached.get("decided_at"), True))
                again[(f.item_id, f.station_id)].append(f)
            else:  # never decided, or only sent to a late chute before: classify
                fresh.append(f)
        # one decision per item and station pass: when a view in time (or without a capture time) decides it,
        # that pass's late views in this batch (captured within pass_window_ms of it) join it instead of getting
        # a late command of their own, and still decide if the view in time turns out not to decode; a late
        # view of an earlier lap (a lagging partition) stays late
        in_time: dict[tuple[str, str], list[Frame]] = defaultdict(list)
        for f in fresh:
            in_time[(f.item_id, f.station_id)].append(f)
        for key, views in again.items():
            in_time[key].extend(views)
        for key in [k for k in overdue if k in in_time]:
            joining = [v for v in overdue[key] if any(self._one_pass(v, f) for f in in_time[key])]
            overdue[key] = [v for v in overdue[key] if v not in joining]
            if not overdue[key]:
                del overdue[key]
            if key in again:
                again[key].extend(joining)
                result.hits.extend(CacheHit(f, known[key[0]].get("decided_at"), True) for f in joining)
            else:
                fresh.extend(joining)
        still = {id(f) for views in overdue.values() for f in views}
        result.late = [f for f in result.late if id(f) in still]
        result.cache_hits = len(result.hits)
        result.times.looked_up = wall_ms()
        for (item_id, _), views in again.items():
            self._reuse(result, known[item_id], views, now)
        for key, views in overdue.items():
            self._late(result, known.get(key[0]), views, verdicts[key], now)

        started = time.perf_counter()  # with predecoding: the time spent waiting for the decoders
        size = self.model.input_size  # what the loop did not start decoding, starts now
        started_early = [predecoded.get(position[id(f.raw)]) if predecoded else None for f in fresh]
        futures = [fut or self.decoder.submit(f.payload, size) for f, fut in zip(fresh, started_early, strict=True)]
        decoded = [fut.result() for fut in futures]
        result.decode_s = time.perf_counter() - started
        result.times.decoded = wall_ms()
        ok: list[tuple[Frame, np.ndarray]] = []
        for frame, image in zip(fresh, decoded, strict=True):
            if isinstance(image, FrameDecodeError):
                self._dead(result, frame.raw, image.reason, image)
            else:
                ok.append((frame, image))

        started = time.perf_counter()
        models = [model_for(frame.station_id) for frame, _ in ok]
        predictions: list[Prediction] = [None] * len(ok)  # type: ignore[list-item]
        for model in {id(m): m for m in models}.values():  # one model run per model (a canary's stations: two)
            mine = [i for i, m in enumerate(models) if m is model]
            for i, prediction in zip(mine, model.predict([ok[i][1] for i in mine]), strict=True):
                predictions[i] = prediction
        result.infer_s = time.perf_counter() - started
        result.times.inferred = wall_ms()
        result.classified = len(predictions)

        by_item: dict[tuple[str, str], list[tuple[Frame, Prediction]]] = defaultdict(list)
        for (frame, _), prediction in zip(ok, predictions, strict=True):
            by_item[(frame.item_id, frame.station_id)].append((frame, prediction))
        decided_at = self.clock_ms()
        for (item_id, station_id), candidates in by_item.items():
            fusion = self.routes.fusion_at(station_id)
            if fusion is not None:  # decided with the item's other views: now if all are in, else later
                for frame, prediction in candidates:
                    self.fuser.add(frame, prediction, fusion, decided_at, known.get(item_id), model_for(station_id))
                continue
            frame, best = max(candidates, key=lambda c: _finite(c[1].confidence))
            version = model_for(station_id).model_version
            self._classified(result, frame, best, known.get(item_id), decided_at, len(candidates), version=version)
        due = list(closing.values()) + self.fuser.take_due(decided_at)
        now_known = self.cache.get_many(list({i.key[0] for i in due})) if due else {}  # decided elsewhere since?
        for item in due:
            self._fused(result, item, now_known.get(item.key[0]), decided_at)
        result.held = self.fuser.low_offsets()
        result.held_frames = self.fuser.views()
        result.times.routed = wall_ms()
        return result

    def swap(self, model: Model) -> None:
        """Serve ``model`` from the next batch on (called on the batch thread, between batches)."""
        self._next_model = model

    def fusion_due_in_ms(self) -> int | None:
        """Milliseconds until an open item's window closes (0: now), or None: nothing open. The worker runs
        an empty batch then, so an item whose last view never comes is still decided on time."""
        closes = self.fuser.next_close_ms()
        return None if closes is None else max(0, closes - self.clock_ms())

    def forget(self, partitions) -> int:
        """Revoked partitions: drop their open views (the new owner reads them again, uncommitted)."""
        return self.fuser.forget(partitions)

    def _classified(self, result: BatchResult, frame: Frame, best: Prediction, earlier: dict | None, decided_at: int,
                    frames: int, cameras: list[str] | None = None, version: str | None = None) -> None:  # fmt: skip
        confidence = round(_finite(best.confidence), 6)  # a NaN from the model goes to review, never a chute
        decision = decide(self.routes, frame.station_id, best.sku, best.label, confidence, unknown=best.unknown)
        self._command(  # earlier: only sent to a late chute before: keep the passes it remembers
            result, frame, best.sku, best.label, confidence, decision, version or self.model.model_version,
            decided_at, frames=frames, cached=False, passes=self._passes(earlier) or {} if earlier else {},
            ood=(best.ood_score, best.unknown), cameras=cameras,
        )  # fmt: skip

    def _joins(self, frame: Frame, views: list[Frame]) -> bool:
        """Is ``frame`` a view of the same pass as ``views`` (not a straggler of an earlier lap)?"""
        return any(self._one_pass(frame, v) for v in views)

    def _fused(self, result: BatchResult, item: OpenItem, current: dict | None, decided_at: int) -> None:
        """An item's views decide together (a camera's retakes as one view: its most confident); its command
        names the first view (camera, source, capture time) and the version of the model that classified them.
        ``current``: the item's cache entry now (None: none, or the cache is down). Past the station's deadline
        by now (its window closed after the item passed the diverter): the late chute instead; this pass
        commanded meanwhile by another worker (its views were split by a rebalance): no second command."""
        result.released.update((topic, partition) for topic, partition, _ in item.views)
        result.fused.append(item)
        views = sorted(item.views.values(), key=lambda v: (v[0].captured_at_ms or 0, v[0].raw.source.offset))
        first = views[0][0]
        if current is not None and self._same_pass(current, first):
            result.hits.extend(CacheHit(f, current.get("decided_at"), False) for f, _ in views)
            result.cache_hits = len(result.hits)
            return
        earlier = current or item.earlier
        if self.judge_late and (verdict := late(self.routes, first.station_id, _age(decided_at, first))):
            result.late.extend(f for f, _ in views)
            self._late(result, earlier, [f for f, _ in views], verdict, decided_at)
            return
        model = item.model if item.model is not None else self.model  # the one that classified its views
        per_camera: dict[str, Prediction] = {}
        for frame, prediction in views:
            camera = camera_of(frame)
            kept = per_camera.get(camera)
            if kept is None or _finite(prediction.confidence) > _finite(kept.confidence):
                per_camera[camera] = prediction
        fused = fuse(
            list(per_camera.values()),
            ood_threshold=getattr(model, "ood_threshold", None),
            names=getattr(model, "names", None),
        )
        best = Prediction(fused.index, fused.label, fused.sku, fused.confidence, fused.ood_score, fused.unknown)
        self._classified(result, first, best, earlier, decided_at, len(views), item.cameras, model.model_version)

    @staticmethod
    def _passes(cached: dict) -> dict[str, int] | None:
        """Station -> time of the last pass commanded there (capture time, else decision time)."""
        if "passes" in cached:
            return dict(cached["passes"])
        if cached.get("station_id"):  # an entry of one station only
            return {cached["station_id"]: cached.get("captured_at") or cached.get("decided_at", 0)}
        return None

    def _same_pass(self, cached: dict, frame: Frame) -> bool:
        """Is ``frame`` another view of a pass already commanded at its station? Same station, captured
        within ``pass_window_ms`` of that pass's photo (the time now where a frame has no capture time)."""
        passes = self._passes(cached)
        if passes is None:  # remembered before stations were: as it was then, suppress
            return True
        then = passes.get(frame.station_id)
        if then is None:
            return False
        return abs((frame.captured_at_ms or self.clock_ms()) - then) <= self.pass_window_ms

    def _one_pass(self, a: Frame, b: Frame) -> bool:
        """Views of one pass: captured within ``pass_window_ms`` of each other (or one has no capture time)."""
        if a.captured_at_ms is None or b.captured_at_ms is None:
            return True
        return abs(a.captured_at_ms - b.captured_at_ms) <= self.pass_window_ms

    def _reuse(self, result: BatchResult, cached: dict, views: list[Frame], decided_at: int) -> None:
        """A command from a cached prediction, by the rules of the station the item is at now."""
        frame = views[0]
        confidence = _finite(float(cached.get("confidence", 0.0)))
        sku, label = cached.get("sku"), cached.get("label")
        unknown = bool(cached.get("unknown", False))
        decision = decide(self.routes, frame.station_id, sku, label, confidence, unknown=unknown)
        version = str(cached.get("model_version", self.model.model_version))
        self._command(
            result, frame, sku, label, confidence, decision, version, decided_at, len(views), cached=True,
            passes=self._passes(cached) or {}, ood=(cached.get("ood_score"), unknown),
        )  # fmt: skip

    def _late(self, result: BatchResult, cached: dict | None, views: list[Frame], decision: Decision,
              decided_at: int) -> None:  # fmt: skip
        """A ``late`` command (unclassified, to the late chute); the cache keeps any earlier prediction of the
        item, so another station can still reuse it, and remembers this pass so its other views are quiet."""
        frame = views[0]
        earlier = result.decisions.get(frame.item_id)  # this item at another station, this batch
        prediction = earlier if earlier and _prediction(earlier) else cached if cached and _prediction(cached) else None
        self._command(
            result, frame, None, None, 0.0, decision, self.model.model_version, decided_at, len(views), cached=False,
            passes=self._passes(cached) or {} if cached else {},
        )  # fmt: skip
        entry = result.decisions[frame.item_id]
        if prediction is None:
            entry["late"] = True  # no prediction to reuse: the next pass is classified
        else:
            keep = ("chute", "reason", "sku", "label", "confidence", "model_version", "decided_at", "ood_score",
                    "unknown")  # fmt: skip
            entry.update({k: prediction[k] for k in keep if k in prediction})

    def _command(self, result, frame, sku, label, confidence, decision, version, decided_at, frames, *, cached,
                 passes: dict[str, int], ood: tuple[float | None, bool] = (None, False),
                 cameras: list[str] | None = None):  # fmt: skip
        command = RoutingCommand(
            item_id=frame.item_id,
            station_id=frame.station_id,
            camera_id=frame.camera_id,
            sku=sku,
            label=label,
            confidence=confidence,
            chute=decision.chute,
            reason=decision.reason,
            model_version=version,
            captured_at=frame.captured_at_ms,
            decided_at=decided_at,
            source=CommandSource(**frame.raw.source.as_dict()),
            worker_id=self.worker_id,
            frames=frames,
            cached=cached,
            ood_score=None if ood[0] is None or not math.isfinite(ood[0]) else round(ood[0], 4),
            views=None if cameras is None else len(cameras),
            cameras=cameras,
        )
        result.commands.append(command)
        earlier = result.decisions.get(frame.item_id, {}).get("passes", {})  # another station, this batch
        passes = {**passes, **earlier, frame.station_id: command.captured_at or decided_at}
        result.decisions[frame.item_id] = {
            "chute": command.chute,
            "reason": command.reason,
            "sku": command.sku,
            "label": command.label,
            "confidence": command.confidence,
            "model_version": command.model_version,
            "decided_at": decided_at,
            "station_id": command.station_id,
            "captured_at": command.captured_at,
            "passes": dict(sorted(passes.items(), key=lambda kv: kv[1])[-MAX_PASSES:]),
            "ood_score": command.ood_score,
            "unknown": ood[1],
        }


MAX_PASSES = 16  # stations remembered per item (the most recent passes)


def _age(now_ms: int, frame: Frame) -> int | None:
    """How old a frame is now (captured-at to now), or None without a capture time."""
    return None if frame.captured_at_ms is None else now_ms - frame.captured_at_ms


def _prediction(entry: dict) -> bool:
    """Does a remembered decision carry a prediction to reuse (not only a pass sent to the late chute)?"""
    return not entry.get("late")


def _finite(confidence: float) -> float:
    return confidence if math.isfinite(confidence) else 0.0
