"""Canary: a candidate model decides for chosen stations, and steps back by itself when it looks wrong.

``canary.checkpoint`` and ``canary.stations``: at those stations the candidate's decisions are the commands
actuators obey; everywhere else the live model decides, as before. The live model (a second copy of it:
a model is not shared between threads) decides the canary stations' items on the side, as a shadow
(``shadow.py``: after delivery, at the lowest CPU priority, to the shadow topic), and is the baseline the
candidate is judged against:

- chute agreement with the baseline over the last ``canary.window`` items both decided, below
  ``canary.min_agreement``;
- the share of the candidate's last ``canary.window`` decisions sent to review (low confidence, unknown
  product), above ``canary.max_review_rate``;

either rolls the canary back: from the next batch on the live model decides at those stations again
(``canary.rolled_back`` with the reason and the figures, ``sorter_canary_rollbacks_total``,
``sorter_canary_active`` 0). It stays rolled back until the pod restarts. A multi-camera item still waiting
for views at a rollback is decided by the model that classified its views (as at a hot reload).
"""

from __future__ import annotations

import threading
from collections import deque

from sorter.logs import get_logger

log = get_logger("sorter.canary")

REVIEW_REASONS = {"low_confidence", "unknown_product"}


class Canary:
    def __init__(self, model, stations, *, window: int, min_agreement: float, max_review_rate: float,
                 metrics=None) -> None:  # fmt: skip
        self.model, self.stations = model, frozenset(stations)
        self.window, self.min_agreement, self.max_review_rate = window, min_agreement, max_review_rate
        self.metrics = metrics
        self.active = True
        self._agreed: deque[bool] = deque(maxlen=window)
        self._reviewed: deque[bool] = deque(maxlen=window)
        self._lock = threading.Lock()
        if metrics is not None:
            metrics.enable_canary()
            metrics.canary_active.set(1)
        log.info("canary.started", candidate=model.model_version, stations=sorted(self.stations), window=window,
                 min_agreement=min_agreement, max_review_rate=max_review_rate)  # fmt: skip

    def serving(self):
        """(the candidate, its stations) for the batch about to run, or None: rolled back. Read once per batch,
        so a batch never switches halfway."""
        return (self.model, self.stations) if self.active else None

    def delivered(self, commands) -> None:
        """A batch's delivered commands (the batch thread): the candidate's own count toward its review rate."""
        version = self.model.model_version
        mine = [c for c in commands if c.station_id in self.stations and c.model_version == version and not c.cached
                and c.reason != "late"]  # fmt: skip
        if not mine:
            return
        with self._lock:
            self._reviewed.extend(c.reason in REVIEW_REASONS for c in mine)
            self._judge()

    def compared(self, station: str, decided, baseline) -> None:
        """An item decided at a canary station and by the baseline on the side (the shadow thread)."""
        if decided.model_version != self.model.model_version or decided.cached:
            return  # decided by the live model, or reused from the cache (as delivered() counts)
        with self._lock:
            self._agreed.append(decided.chute == baseline.chute)
            self._judge()

    def _judge(self) -> None:
        if not self.active:
            return
        why = None
        if (
            len(self._agreed) >= self.window
            and (agreement := sum(self._agreed) / len(self._agreed)) < self.min_agreement
        ):
            why = f"chute agreement with the live model {agreement:.1%} < {self.min_agreement:.1%}"
        elif (
            len(self._reviewed) >= self.window
            and (review := sum(self._reviewed) / len(self._reviewed)) > self.max_review_rate
        ):
            why = f"sent to review {review:.1%} > {self.max_review_rate:.1%}"
        if why is None:
            return
        self.active = False
        if self.metrics is not None:
            self.metrics.canary_rollbacks.inc()
            self.metrics.canary_active.set(0)
        log.error("canary.rolled_back", candidate=self.model.model_version, stations=sorted(self.stations), why=why,
                  compared=len(self._agreed), decided=len(self._reviewed))  # fmt: skip
