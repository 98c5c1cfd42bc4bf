"""``sorter simulate``: synthetic conveyor traffic from the synthetic product generator.

Each station sends items about ``rate`` times a second: conveyors space items evenly, so gaps are the
period with +-25% jitter (not Poisson bursts). Each item is photographed by ``frames_per_item``
cameras (a range ``(lo, hi)`` draws the count per item), a few to tens of milliseconds apart; with
``camera_poses`` each camera sees its own pose of the item (face, side, back), occlusion, glare and
lighting (the hard catalogue's rendering, ``synth.render(hard=True)``), as a tunnel's cameras around the
belt do: one camera's photo may show little of what the product is, all of them together do. Item ids
are ``<station>-<run>-<n>``, unique across runs (``run`` is random unless given), ``captured-at`` is
the publish time. ``corrupt_fraction`` cuts that share of photos short, to exercise the dead-letter
path. Output goes to a broker (real time) or straight into a recording (simulated time, no waiting).
"""

from __future__ import annotations

import heapq
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sorter.data.synth import ProductDesign, catalog, render
from sorter.errors import ConfigError
from sorter.traffic.recording import Record, Writer

if TYPE_CHECKING:
    from sorter.settings import KafkaSettings


@dataclass(frozen=True)
class Photo:
    topic: str
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...]  # without captured-at: stamped when sent
    delay_s: float  # after the previous photo of this station
    design: ProductDesign


UNKNOWN_DESIGNS = 2  # products beyond the trained catalog that unknown_fraction draws from


class Simulator:
    def __init__(
        self,
        stations: list[str],
        rate: float,
        *,
        frames_per_item: tuple[int, int] = (1, 1),
        classes: int = 10,
        size: tuple[int, int] = (640, 480),
        corrupt_fraction: float = 0.0,
        unknown_fraction: float = 0.0,
        camera_poses: bool = False,
        seed: int = 0,
        topic_prefix: str = "frames.",
        run_id: str | None = None,
    ) -> None:
        """``unknown_fraction``: share of items that are products after the first ``classes`` of the catalog
        (two of them), which a model trained on those ``classes`` has never seen."""
        if rate <= 0:
            raise ConfigError("rate must be > 0 items per second per station")
        lo, hi = frames_per_item
        if not 1 <= lo <= hi:
            raise ValueError("frames per item must be a range 1 <= lo <= hi")
        self.stations = stations
        self.rate = rate
        self.frames_per_item = (lo, hi)
        if not 0 <= unknown_fraction < 1:
            raise ConfigError("unknown fraction must be in [0, 1)")
        self.designs = catalog(classes)
        self.unknown_designs = catalog(classes + UNKNOWN_DESIGNS)[classes:] if unknown_fraction else []
        self.unknown_fraction = unknown_fraction
        self.camera_poses = camera_poses
        self.size = size
        self.corrupt_fraction = corrupt_fraction
        self.seed = seed
        self.topic_prefix = topic_prefix
        self.run_id = run_id or uuid.uuid4().hex[:6]
        self.items_sent = 0
        self.frames_sent = 0

    def photos(self, index: int) -> Iterator[Photo]:
        """Station ``index``'s endless stream of photos."""
        station = self.stations[index]
        rng = np.random.default_rng([self.seed, index])
        period = 1 / self.rate
        lo, hi = self.frames_per_item
        n = 0
        while True:
            design = self.designs[int(rng.integers(len(self.designs)))]
            if self.unknown_fraction and rng.random() < self.unknown_fraction:
                design = self.unknown_designs[int(rng.integers(len(self.unknown_designs)))]
            item = f"{station}-{self.run_id}-{n:06d}"
            cameras = int(rng.integers(lo, hi + 1))
            for camera in range(cameras):
                if self.camera_poses:  # this camera's own pose of the item, neighbours, glare
                    photo = render(design, rng, size=self.size, hard=True, others=self.designs)
                else:
                    photo = render(design, rng, size=self.size)
                if self.corrupt_fraction and rng.random() < self.corrupt_fraction:
                    photo = photo[: len(photo) // 3]  # cut off mid-transfer
                gap = (
                    period * float(np.clip(rng.normal(1, 0.25), 0.75, 1.25))
                    if camera == 0
                    else rng.uniform(0.005, 0.04)
                )
                headers = (
                    ("item-id", item.encode()),
                    ("station-id", station.encode()),
                    ("camera-id", f"cam-{camera + 1}".encode()),
                )
                yield Photo(f"{self.topic_prefix}{station}", item.encode(), photo, headers, gap, design)
            n += 1

    # -- to a broker, in real time ---------------------------------------------------------------
    def publish(
        self,
        kafka: KafkaSettings,
        *,
        duration_s: float | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        """One thread per station until ``duration_s`` or ``stop``; returns when all are done."""
        from confluent_kafka import Producer

        from sorter.stream.kafka import kafka_config

        stop = stop or threading.Event()
        producer = Producer(kafka_config(kafka, {"linger.ms": 5}))
        lock = threading.Lock()
        end = None if duration_s is None else time.monotonic() + duration_s

        def run(index: int) -> None:
            next_at = time.monotonic()
            last_item = None
            for photo in self.photos(index):
                next_at += photo.delay_s
                if stop.wait(max(0.0, next_at - time.monotonic())) or (end is not None and time.monotonic() >= end):
                    return
                headers = [*photo.headers, ("captured-at", str(time.time_ns() // 1_000_000).encode())]
                producer.produce(photo.topic, value=photo.value, key=photo.key, headers=headers)
                producer.poll(0)
                with lock:
                    self.frames_sent += 1
                    if photo.key != last_item:
                        self.items_sent += 1
                last_item = photo.key

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(self.stations))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        producer.flush(30)

    # -- into a recording, in simulated time -----------------------------------------------------
    def record(self, writer: Writer, *, duration_s: float, start_ms: int | None = None) -> None:
        """Write ``duration_s`` of simulated traffic (all stations interleaved by time) without waiting."""
        start_ms = start_ms if start_ms is not None else time.time_ns() // 1_000_000
        streams = [self.photos(i) for i in range(len(self.stations))]
        heap: list[tuple[float, int, Photo]] = []
        for i, stream in enumerate(streams):
            photo = next(stream)
            heapq.heappush(heap, (photo.delay_s, i, photo))
        offsets: dict[str, int] = {}
        last_item: dict[int, bytes] = {}
        while heap:
            t, i, photo = heapq.heappop(heap)
            if t >= duration_s:
                continue
            ts = start_ms + round(t * 1000)
            offset = offsets.get(photo.topic, 0)
            offsets[photo.topic] = offset + 1
            headers = (*photo.headers, ("captured-at", str(ts).encode()))
            writer.write(Record(photo.topic, 0, offset, ts, photo.key, headers, photo.value, ts))
            self.frames_sent += 1
            if last_item.get(i) != photo.key:
                self.items_sent += 1
                last_item[i] = photo.key
            following = next(streams[i])
            heapq.heappush(heap, (t + following.delay_s, i, following))
        writer.close()
