"""Where an item's milliseconds go, from the camera's shutter to the committed offset.

Every routed item's latency is cut into named stages, each the gap between two stamps (wall-clock
milliseconds, the clock ``captured-at`` is written in):

==========  ===================================================================================
broker      captured -> fetched: the camera's publish, the broker, and the time the frame waited
            there for the worker to ask (a backlog shows here); camera clock skew lands here too
collect     fetched -> batch closed: waiting for the batch to fill (``batch.max_wait_ms``) and for the
            model to finish the batch before (the batch closes when the model is free)
queue       closed -> started: the hand-over to the model's thread
cache       started -> looked up: parsing the frames and the decision-cache lookup
decode      looked up -> decoded: what is left of decoding (each photo starts decoding when fetched)
infer       decoded -> inferred: the model
route       inferred -> routed: the routing rules and building the commands
deliver     routed -> delivered: producing the commands and waiting for the broker's acknowledgement
commit      delivered -> committed: the loop takes the finished batch back (after closing and handing over
            the next one) and commits its offsets, synchronously; not in the actuator's path
==========  ===================================================================================

``broker`` through ``deliver`` add up to the latency the actuator sees (captured -> delivered).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

STAGES = ("broker", "collect", "queue", "cache", "decode", "infer", "route", "deliver", "commit")
_MARKS = ("closed", "started", "looked_up", "decoded", "inferred", "routed", "delivered", "committed")


def wall_ms() -> float:
    return time.time_ns() / 1e6


@dataclass
class BatchTimes:
    """One batch's stamps (wall-clock ms). The loop sets ``fetched`` (per frame, by its topic, partition and
    offset), ``closed``, ``delivered`` and ``committed``; the pipeline the ones in between."""

    fetched: dict[tuple[str, int, int], float] = field(default_factory=dict)
    closed: float = 0.0
    started: float = 0.0
    looked_up: float = 0.0
    decoded: float = 0.0
    inferred: float = 0.0
    routed: float = 0.0
    delivered: float = 0.0
    committed: float = 0.0

    def stages(self, captured_ms: float | None, source: tuple[str, int, int]) -> dict[str, float]:
        """One item's stages in milliseconds; ``broker`` only when the frame carried its capture time, and
        stages whose stamps are missing (0: a batch given up, a test's fake) left out."""
        fetched = self.fetched.get(source, self.closed)
        marks = [fetched, *(getattr(self, m) for m in _MARKS)]
        out = {}
        if captured_ms and fetched:
            out["broker"] = max(0.0, fetched - captured_ms)
        for stage, start, end in zip(STAGES[1:], marks[:-1], marks[1:], strict=True):
            if start and end:
                out[stage] = max(0.0, end - start)
        return out
