"""Several cameras, one decision: the views of an item at a station, held until they can decide together.

A tunnel photographs each item from several sides (``fusion: {window_ms, views}`` in the routing table).
Each view is classified in whichever batch it arrives; its item stays *open* here until ``views`` distinct
cameras have been classified or ``window_ms`` has passed since its first view was, whichever comes first.
Then the views decide together:

- the label: the mean of the views' log-probabilities, renormalised (the normalised geometric mean of
  their posteriors). Its most probable class is the product rule's (the sum, which would be right for
  independent views), but its confidence is not inflated by views that repeat each other: views of one
  product share its ambiguities (a shirt looks like a t-shirt from every side), and with the sum 4 such
  views sent 6% of items to review but routed 9.8% of the rest wrong, against 1.8% for the mean
  (README, "Several cameras"). A view that sees little (occluded, glare, the item's plain back) pulls the
  confidence down: the item goes to review rather than to a chute on one good view's word;
- the unknown-product score: the mean of the views' scores, against the checkpoint's threshold (a single
  odd view does not send a known product to review);
- a model that gives no log-probabilities (test fakes, an old runtime): the most confident view decides.

At-least-once across batches and restarts: the offsets of views still open are not committed
(:meth:`Fuser.low_offsets` caps the commit), so after a crash or a stop the item's views are read again and
it is decided after the restart; views of items decided since are cache hits then (no second command). A
revoked partition's open views are forgotten (:meth:`Fuser.forget`): its new owner reads them again.
A view seen twice (an aborted transaction read again) replaces itself: it counts once.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from sorter.stream.contracts import Frame
from sorter.stream.inference import Prediction
from sorter.stream.routing import Fusion

Key = tuple[str, str]  # (item_id, station_id)
LOG_FLOOR = -100.0  # log-probability a view gives a class it rules out


@dataclass
class OpenItem:
    key: Key
    views: dict[tuple[str, int, int], tuple[Frame, Prediction]]  # by source (topic, partition, offset)
    closes_ms: int  # worker clock: its first view's classification + window_ms
    expected: int
    earlier: dict | None = None  # the item's cache entry when its first view came (passes to keep)
    opened_ms: int = 0
    model: object = None  # the model that classified its views: it names the fused class and judges unknowns

    @property
    def cameras(self) -> list[str]:
        """Distinct cameras in arrival order."""
        return list(dict.fromkeys(camera_of(f) for f, _ in self.views.values()))

    @property
    def complete(self) -> bool:
        return len(self.cameras) >= self.expected


def camera_of(frame: Frame) -> str:
    """A view's camera: its ``camera-id``, or for a frame without one, a camera of its own."""
    return frame.camera_id or f"{frame.raw.source.topic}[{frame.raw.source.partition}]@{frame.raw.source.offset}"


class Fuser:
    """The open items. Fed and drained by the pipeline on the batch thread; the worker's main thread reads
    when the next window closes and forgets revoked partitions (between batches): one lock for both."""

    def __init__(self) -> None:
        self._open: dict[Key, OpenItem] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._open)

    def views(self) -> int:
        """Frames held open, over every item."""
        with self._lock:
            return sum(len(i.views) for i in self._open.values())

    def is_open(self, key: Key) -> bool:
        return key in self._open

    def frames(self, key: Key) -> list[Frame]:
        with self._lock:
            item = self._open.get(key)
            return [f for f, _ in item.views.values()] if item else []

    def add(self, frame: Frame, prediction: Prediction, fusion: Fusion, now_ms: int, earlier: dict | None,
            model: object = None) -> None:  # fmt: skip
        """``model``: the one that classified the view. A view classified by another model than the open item's
        (its batch was read again after a model swap) is left out: no item is decided by two models."""
        key = (frame.item_id, frame.station_id)
        source = (frame.raw.source.topic, frame.raw.source.partition, frame.raw.source.offset)
        with self._lock:
            item = self._open.get(key)
            if item is None:
                item = self._open[key] = OpenItem(key, {}, now_ms + fusion.window_ms, fusion.views, earlier, now_ms,
                                                  model)  # fmt: skip
            if item.model is model:
                item.views[source] = (frame, prediction)

    def take_due(self, now_ms: int) -> list[OpenItem]:
        """Items with every expected view, or whose window has closed: removed, oldest first."""
        with self._lock:
            due = [i for i in self._open.values() if i.complete or i.closes_ms <= now_ms]
            for item in due:
                del self._open[item.key]
        return sorted(due, key=lambda i: i.opened_ms)

    def take_all(self, stations: frozenset[str] | None = None) -> list[OpenItem]:
        """Every open item (of ``stations``, when given), removed, oldest first (the model that classified
        their views is being replaced there: they are decided now)."""
        with self._lock:
            items = [i for i in self._open.values() if stations is None or i.key[1] in stations]
            for item in items:
                del self._open[item.key]
        return sorted(items, key=lambda i: i.opened_ms)

    def reopen(self, items: list[OpenItem]) -> None:
        """Items decided in a batch whose transaction was aborted: open again (due at once), so the next
        batch decides them; their views read again meanwhile count once."""
        with self._lock:
            for item in items:
                current = self._open.get(item.key)
                if current is None:
                    self._open[item.key] = item
                else:
                    current.views.update(item.views)
                    current.closes_ms = min(current.closes_ms, item.closes_ms)

    def next_close_ms(self) -> int | None:
        with self._lock:
            return min((i.closes_ms for i in self._open.values()), default=None)

    def low_offsets(self) -> dict[tuple[str, int], int]:
        """Per partition, the lowest offset of a view still open: a commit must not pass it."""
        low: dict[tuple[str, int], int] = {}
        with self._lock:
            for item in self._open.values():
                for topic, partition, offset in item.views:
                    low[(topic, partition)] = min(low.get((topic, partition), offset), offset)
        return low

    def forget(self, partitions: Iterable[tuple[str, int]]) -> int:
        """Drop the views read from ``partitions`` (revoked: their new owner reads them again); returns how
        many. An item left with views from other partitions stays open with those."""
        gone, dropped = set(partitions), 0
        with self._lock:
            for key, item in list(self._open.items()):
                for source in [s for s in item.views if s[:2] in gone]:
                    del item.views[source]
                    dropped += 1
                if not item.views:
                    del self._open[key]
        return dropped


@dataclass(frozen=True)
class Fused:
    index: int
    confidence: float
    ood_score: float | None
    unknown: bool
    label: str
    sku: str


def fuse(
    predictions: list[Prediction], *, ood_threshold: float | None, names: Callable[[int], tuple[str, str]] | None
) -> Fused:
    """One decision from several views (see the module's docstring). ``names``: class index -> (label, SKU)
    for a class no single view ranked first; without it, or without log-probabilities, the most confident
    view decides."""
    scores = [p.ood_score for p in predictions if p.ood_score is not None and math.isfinite(p.ood_score)]
    ood = float(np.mean(scores)) if scores else None
    if ood_threshold is not None and ood is not None:
        unknown = ood > ood_threshold
    else:
        unknown = sum(p.unknown for p in predictions) * 2 > len(predictions)  # most views say so
    usable = [p for p in predictions if p.log_probs and not any(math.isnan(x) or x == math.inf for x in p.log_probs)]
    if names is None or not usable or len({len(p.log_probs) for p in usable}) != 1:
        best = max(predictions, key=lambda p: p.confidence if math.isfinite(p.confidence) else 0.0)
        return Fused(best.index, best.confidence, ood, unknown, best.label, best.sku)
    # a class a view rules out entirely (-inf) stays very unlikely, without wiping out the other views
    total = np.mean([np.maximum(np.asarray(p.log_probs, np.float64), LOG_FLOOR) for p in usable], axis=0)
    total -= np.logaddexp.reduce(total)  # log-softmax
    index = int(np.argmax(total))
    named = next((p for p in usable if p.index == index), None)
    label, sku = (named.label, named.sku) if named else names(index)
    return Fused(index, float(math.exp(total[index])), ood, unknown, label, sku)
