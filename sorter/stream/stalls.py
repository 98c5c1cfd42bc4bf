"""Partitions that have frames waiting on the broker but give the worker none: a line that stops silently.

Two ways it was seen to happen (README, "Fetch stalls"): the local Tansu broker's fetch cost grows with
the partition's offset until it no longer answers within ``fetch.wait.max.ms`` (every fetch comes back
empty, forever), and librdkafka's shared prefetch queue starving one partition while the worker is
behind (confluentinc/librdkafka#1854). In both the worker is healthy by every other sign: it polls,
other partitions flow, nothing errors. So it is watched for directly.

A partition is **stalled** when librdkafka's statistics say the broker holds frames beyond the next offset
it will fetch (``hi_offset`` - or ``ls_offset`` under read_committed - past ``next_offset``) and the worker
has polled for ``after_s`` without a frame of it. Only time spent polling counts: while a batch holds
the loop (a slow model, the keep-alive) a partition is not starved, just not asked.

**Fair share** (:class:`FairShare`): while the worker is behind, librdkafka's one prefetch queue for all
partitions can feed some partitions and leave another to occasional bursts (measured: three stations
paced at 150 frames/s, a worker taking 108: after 4 minutes one station's items were 18 s late, the
others 65 and 113 s; a shorter ``fetch.queue.backoff.ms`` did not change it). The worker evens it out:
when one partition's backlog on the broker (seconds of frames past its fetch position) exceeds
another's by ``SKEW_S`` and by half its own, the others are paused for ``HOLD_S``, so the fetcher
serves it. Pausing drops the paused partitions' prefetched frames, and resuming fetches again from the
last frame the worker took (librdkafka): nothing is skipped, only fetched twice. A partition that got
(next to) nothing while the others were held is not starved but stalled, or served a trickle: it holds
the others back no more for a minute.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

TP = tuple[str, int]
POLL_GAP_S = 1.0  # a longer gap between two polls is the loop busy elsewhere: counted as this much
HOLD_S = 5.0  # how long a partition that is far ahead stays paused before it is looked at again
STUCK_S = 60.0  # a starved partition that holding the others did not help is not held for again this long
SKEW_S = 5.0  # a partition this many seconds less behind than the stalest one (and half its backlog) is held
STATS_FRESH = 3  # statistics older than this many intervals say nothing about now


@dataclass(frozen=True)
class Stall:
    tp: TP
    waiting: int  # frames on the broker past the next offset librdkafka will fetch
    next_offset: int
    quiet_s: float  # seconds of polling without a frame of this partition


@dataclass(frozen=True)
class Resumed:
    tp: TP
    stalled_s: float


class FetchWatch:
    """Fed by the worker's loop (``polled``, ``got``, ``assigned``, ``revoked``) and by librdkafka's
    statistics (``on_stats``, on the thread that serves the consumer); ``check`` says what changed."""

    def __init__(
        self,
        after_s: float,
        *,
        stats_interval_s: float,
        read_committed: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.after_s = after_s
        self.stats_fresh_s = STATS_FRESH * stats_interval_s
        self.end_key = "ls_offset" if read_committed else "hi_offset"
        self.clock = clock
        self.quiet: dict[TP, float] = {}  # watched partition -> seconds polled since its last frame
        self.stalled: dict[TP, float] = {}  # partition -> when it was reported stalled
        self._behind: dict[TP, tuple[int, int]] = {}  # (frames waiting past next_offset, next_offset)
        self._ends: dict[TP, tuple[float, int]] = {}  # partition -> (when, end offset) at the last statistics
        self.rate: dict[TP, float] = {}  # frames/s arriving on each partition (EWMA over statistics intervals)
        self._stats_at: float | None = None
        self._polled_at: float | None = None
        self.held: set[TP] = set()  # paused by the fair share: not watched meanwhile

    @property
    def enabled(self) -> bool:
        return self.after_s > 0

    def assigned(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            self.quiet[tp] = 0.0

    def revoked(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            self.quiet.pop(tp, None)
            self.stalled.pop(tp, None)
            self.held.discard(tp)
            self._ends.pop(tp, None)
            self.rate.pop(tp, None)

    def got(self, tp: TP) -> None:
        if tp in self.quiet:
            self.quiet[tp] = 0.0

    def polled(self) -> None:
        """The loop asked the consumer for frames: the time since it last asked counts for every partition
        (but those held by the fair share)."""
        now = self.clock()
        if self._polled_at is not None:
            step = min(now - self._polled_at, POLL_GAP_S)
            for tp in self.quiet:
                if tp not in self.held:
                    self.quiet[tp] += step
        self._polled_at = now

    def hold(self, tps: Iterable[TP]) -> None:
        """Paused on purpose (the fair share, the keep-alive): neither watched nor measured meanwhile."""
        self.held |= set(tps) & self.quiet.keys()

    def release(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            if tp in self.held:
                self.held.discard(tp)
                if tp not in self.stalled:  # a stall is not ended by a pause, only by a frame
                    self.quiet[tp] = 0.0  # its clock starts again when it is fetched again

    def on_stats(self, stats: dict) -> None:
        """One statistics report. The arrival rate is taken between reports by librdkafka's own clock
        (``ts``: two reports queued while the loop was busy arrive together), and only between reports
        whose end moved: librdkafka learns a partition's end from fetches, so the end of a partition that
        is paused, or not fetched while the prefetch queue is full, is frozen, and the frames that
        arrived meanwhile show up at once later. The rate is then taken over the whole span."""
        received = self.clock()
        ts = stats.get("ts")
        at = ts / 1e6 if isinstance(ts, (int, float)) and ts > 0 else received
        behind = {}
        for topic, t in stats.get("topics", {}).items():
            for pid, p in t.get("partitions", {}).items():
                end, next_offset = p.get(self.end_key, -1), p.get("next_offset", -1)
                if pid == "-1" or end < 0 or next_offset < 0:
                    continue
                tp = (topic, int(pid))
                behind[tp] = (end - next_offset, next_offset)
                last = self._ends.get(tp)
                if last is not None and end == last[1]:
                    continue  # frozen, or nothing new: keep the baseline, take no sample
                if last is not None and at > last[0] and end > last[1]:
                    r = (end - last[1]) / (at - last[0])
                    self.rate[tp] = r if tp not in self.rate else 0.5 * self.rate[tp] + 0.5 * r
                self._ends[tp] = (at, end)
        self._behind, self._stats_at = behind, received

    def backlog_s(self) -> dict[TP, float]:
        """Per watched partition in fresh statistics, seconds of frames waiting past its fetch position:
        frames over the rate they arrive at, taken as at least one a second (so frames count as seconds
        while no rate is known: a partition never fetched since it was assigned has none, and is the one
        to feed). One whose fetch position or end is not known yet is not in it."""
        fresh = self._stats_at is not None and self.clock() - self._stats_at <= self.stats_fresh_s
        if not fresh:
            return {}
        return {
            tp: max(0, self._behind[tp][0]) / max(self.rate.get(tp, 0.0), 1.0)
            for tp in self.quiet
            if tp in self._behind
        }

    def check(self) -> tuple[list[Stall], list[Resumed]]:
        """Partitions newly stalled, and stalled ones that gave a frame (or have nothing waiting) again."""
        if not self.enabled:
            return [], []
        fresh = self._stats_at is not None and self.clock() - self._stats_at <= self.stats_fresh_s
        behind = self._behind if fresh else {}
        new, resumed = [], []
        for tp, quiet in self.quiet.items():
            if tp in self.held:  # paused on purpose (fair share): quiet is expected
                continue
            waiting, next_offset = behind.get(tp, (0, -1))
            if tp in self.stalled:
                if quiet < self.after_s or (fresh and waiting <= 0):
                    resumed.append(Resumed(tp, round(self.clock() - self.stalled.pop(tp), 1)))
            elif quiet >= self.after_s and waiting > 0:
                self.stalled[tp] = self.clock()
                new.append(Stall(tp, waiting, next_offset, round(quiet, 1)))
        return new, resumed


class FairShare:
    """Which partitions to pause for a moment so that a starved one is fed (see the module's docstring).
    Asked about once a second with each partition's backlog in seconds (frames waiting past the fetch
    position over the rate they arrive at: :meth:`FetchWatch.backlog_s`). Only the worker's and the
    broker's own counts are used, no camera clock."""

    def __init__(
        self,
        *,
        skew_s: float = SKEW_S,
        hold_s: float = HOLD_S,
        stuck_s: float = STUCK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.skew_s, self.hold_s, self.stuck_s, self.clock = skew_s, hold_s, stuck_s, clock
        self.held: dict[TP, float] = {}  # partition -> when it was paused
        self.starved: TP | None = None  # the partition the others are held for
        self._fed = 0  # frames it got while the others were held
        self._stuck: dict[TP, float] = {}  # starved ones that holding the others did not help -> until when

    def got(self, tp: TP) -> None:
        if tp == self.starved:
            self._fed += 1

    def revoked(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            self.held.pop(tp, None)
            self._stuck.pop(tp, None)
            if tp == self.starved:
                self.starved = None

    def release_all(self) -> list[TP]:
        """Everything held was resumed by someone else (the keep-alive): forget it."""
        out, self.held, self.starved = list(self.held), {}, None
        return out

    def decide(self, backlog_s: dict[TP, float], capacity_fps: float | None = None) -> tuple[list[TP], list[TP]]:
        """(pause, resume): partitions held ``hold_s`` are resumed; then, if one partition is further behind
        than others by ``max(skew_s, half its backlog)``, those others are paused. A starved partition that
        got less than a quarter of what the worker can take (``capacity_fps``: frames/s; unknown: any
        frame) while the others were held is stalled or trickling, not starved: holding the healthy ones
        would only slow them, so it is left out for ``stuck_s``. One that arrives faster than the worker
        can take is still helped by the hold, and keeps being fed."""
        now = self.clock()
        resume = [tp for tp, since in self.held.items() if now - since >= self.hold_s]
        for tp in resume:
            del self.held[tp]
        if resume and not self.held:
            s = self.starved
            enough = 0.25 * capacity_fps * self.hold_s if capacity_fps else 1
            if s is not None and self._fed < enough:
                self._stuck[s] = now + self.stuck_s
            self.starved = None
        self._stuck = {tp: until for tp, until in self._stuck.items() if until > now}
        if self.held or not backlog_s:
            return [], resume
        behind = {tp: b for tp, b in backlog_s.items() if tp not in self._stuck}
        starved = max(behind, key=behind.__getitem__, default=None)
        if starved is None or behind[starved] <= 0:
            return [], resume
        margin = max(self.skew_s, behind[starved] / 2)
        pause = [tp for tp, b in backlog_s.items() if behind[starved] - b > margin and tp not in resume]
        if pause:
            self.held = dict.fromkeys(pause, now)
            self.starved, self._fed = starved, 0
        return pause, resume
