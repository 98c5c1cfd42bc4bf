"""Canary (canary.py): a candidate decides at chosen stations, the live model decides their items on the side, and
the canary rolls back by itself when its chute agreement or its review rate crosses the line (fakes; the real
broker and checkpoints: tests/integration/test_shadow.py)."""

from __future__ import annotations

import json

from structlog.testing import capture_logs

from sorter.settings import load_settings
from sorter.stream.cache import MemoryCache
from sorter.stream.canary import Canary
from sorter.stream.kafka import KafkaClients
from sorter.stream.pipeline import Decoder, Pipeline
from sorter.stream.shadow import Shadow, ShadowProducer
from sorter.stream.worker import Worker
from tests.fakes import NOW_MS, FakeCluster, FakeModel, photo
from tests.test_shadow import ROUTES, Candidate


class Agreeing(FakeModel):
    model_version = "fake-2"


class Unsure(FakeModel):
    """Agrees on the class, but with too little confidence: everything to review."""

    model_version = "fake-2"

    def predict(self, images):
        return [type(p)(p.index, p.label, p.sku, 0.2, log_probs=p.log_probs) for p in super().predict(images)]


def _run(candidate, n: int = 120, **thresholds):
    cluster = FakeCluster()
    for station in ("dock-1", "dock-2"):
        cluster.create(f"frames.{station}")
    for i in range(n):
        for station in ("dock-1", "dock-2"):
            item = f"{station}-i{i}"
            headers = [("item-id", item.encode()), ("captured-at", str(NOW_MS).encode())]
            cluster.append(f"frames.{station}", photo(i % 3, 0.9), item.encode(), headers)
    live = Pipeline(FakeModel(delay_s=0.005), ROUTES, MemoryCache(), Decoder(2, 10_000), worker_id="w")
    s = load_settings(kafka={"bootstrap_servers": "fake:9092"}, batch={"max_size": 4, "max_wait_ms": 5},
                      observe={"enabled": False}, worker_id="w", shutdown_deadline_s=5)  # fmt: skip
    w = Worker(s, live, clients=KafkaClients(cluster.consumer, cluster.producer))
    canary = Canary(candidate, {"dock-2"}, metrics=w.metrics, **({"window": 10, "min_agreement": 0.9,
                    "max_review_rate": 0.5} | thresholds))  # fmt: skip
    live.canary = canary
    baseline = Pipeline(FakeModel(), ROUTES, MemoryCache(max_items=1000), Decoder(1, 10_000), worker_id="w")
    w.shadow = Shadow(baseline, ShadowProducer(cluster.producer, {}, print), "sort.shadow", w.metrics,
                      max_queued_batches=1000, stations=frozenset({"dock-2"}), on_compared=canary.compared)  # fmt: skip
    w.consumer.schedule(("assign", [("frames.dock-1", 0), ("frames.dock-2", 0)]))
    with capture_logs() as logs:
        w.run(idle_exit_s=0.5)
    commands = [json.loads(m.value()) for m in cluster.messages("sort.commands")]
    assert sorted(c["item_id"] for c in commands) == sorted(f"{s}-i{i}" for i in range(n) for s in ("dock-1", "dock-2"))
    at = {s: [c["model_version"] for c in sorted(commands, key=lambda c: c["source"]["offset"]) if c["station_id"] == s]
          for s in ("dock-1", "dock-2")}  # fmt: skip
    return w, at, [e for e in logs if e["event"].startswith("canary.")]


def test_the_candidate_decides_at_its_stations_only_and_a_good_one_stays():
    w, at, events = _run(Agreeing())
    assert set(at["dock-1"]) == {"fake-1"} and set(at["dock-2"]) == {"fake-2"}
    assert w.metrics.canary_rollbacks._value.get() == 0 and w.metrics.canary_active._value.get() == 1
    assert not [e for e in events if e["event"] == "canary.rolled_back"]


def test_a_candidate_that_disagrees_rolls_back_by_itself_and_the_live_model_decides_there_again():
    w, at, events = _run(Candidate())  # says "can" for every "bottle": a third of the chutes differ
    assert set(at["dock-1"]) == {"fake-1"}
    dock2 = at["dock-2"]
    switch = dock2.index("fake-1")
    assert switch >= 10 and set(dock2[:switch]) == {"fake-2"} and set(dock2[switch:]) == {"fake-1"}  # once, for good
    assert switch < len(dock2)  # rolled back while the line ran (how soon: the baseline runs at the lowest priority)
    rolled = [e for e in events if e["event"] == "canary.rolled_back"]
    assert len(rolled) == 1 and "chute agreement" in rolled[0]["why"]
    assert w.metrics.canary_rollbacks._value.get() == 1 and w.metrics.canary_active._value.get() == 0


def test_a_candidate_that_sends_too_much_to_review_rolls_back():
    _, at, events = _run(Unsure(), min_agreement=0.0)
    assert "fake-1" in at["dock-2"] and at["dock-2"][0] == "fake-2"
    rolled = [e for e in events if e["event"] == "canary.rolled_back"]
    assert len(rolled) == 1 and "review" in rolled[0]["why"]


def test_canary_settings_need_a_checkpoint_and_stations():
    import pytest

    from sorter.errors import ConfigError

    with pytest.raises(ConfigError, match="both a checkpoint and its stations"):
        load_settings(canary={"checkpoint": "/models/candidate.pt"})
    assert load_settings(canary={"checkpoint": "/m.pt", "stations": ["dock-2"]}).canary.stations == ["dock-2"]


def _raw(item, station, offset, captured, camera=None, cls=1):
    from sorter.stream.contracts import RawFrame, Source

    h = [("item-id", item.encode()), ("captured-at", str(captured).encode())]
    h += [("camera-id", camera.encode())] if camera else []
    return RawFrame(Source(f"frames.{station}", 0, offset), item.encode(), photo(cls, 0.9), tuple(h))


def _pipeline(routes=ROUTES, clock=None):
    p = Pipeline(FakeModel(), routes, MemoryCache(), Decoder(1, 10_000), worker_id="w",
                 clock_ms=clock or (lambda: NOW_MS + 60_000))  # fmt: skip
    p.judge_late = False
    p.canary = Canary(Candidate(), {"dock-2"}, window=10, min_agreement=0.9, max_review_rate=0.5)
    return p


def _commands(p, *raws):
    r = p.process(list(raws))
    p.cache.put_many(r.decisions)
    return [(c.item_id, c.station_id, c.chute, c.model_version, c.cached) for c in r.commands]


def test_a_candidate_decision_is_never_reused_off_its_stations_or_after_a_rollback():
    """The cache remembers an item's decision for its later stations: the candidate's must not leave the canary
    stations (a non-canary station, or any after the rollback, gets the live model's decision)."""
    p = _pipeline()
    assert _commands(p, _raw("X", "dock-2", 0, NOW_MS)) == [("X", "dock-2", "C-3", "fake-2", False)]
    assert _commands(p, _raw("X", "dock-1", 0, NOW_MS + 10_000)) == [("X", "dock-1", "C-2", "fake-1", False)]
    assert _commands(p, _raw("Y", "dock-2", 1, NOW_MS)) == [("Y", "dock-2", "C-3", "fake-2", False)]
    p.canary.active = False  # rolled back (by the shadow thread, between batches)
    assert _commands(p, _raw("Y", "dock-2", 2, NOW_MS + 20_000)) == [("Y", "dock-2", "C-2", "fake-1", False)]
    assert _commands(p, _raw("Z", "dock-1", 1, NOW_MS)) == [("Z", "dock-1", "C-2", "fake-1", False)]
    assert _commands(p, _raw("Z", "dock-2", 3, NOW_MS + 10_000)) == [("Z", "dock-2", "C-2", "fake-1", True)]
    p.close()


def test_a_rollback_decides_the_canarys_open_multi_camera_items_at_once_with_the_views_it_has():
    from sorter.stream.routing import RoutingTable

    chutes = {"box": "C-1", "bottle": "C-2", "can": "C-3"}
    routes = RoutingTable(default_chute="C-99", review_chute="R", min_confidence=0.5, routes=chutes,
                          fusion={"window_ms": 1000, "views": 3})  # fmt: skip
    clock = [NOW_MS]
    p = _pipeline(routes, lambda: clock[0])
    first = p.process([_raw("F", "dock-2", 0, NOW_MS, camera="a")])
    assert first.commands == [] and p.fuser.views() == 1  # waiting for two more views
    p.canary.active = False
    second = p.process([_raw("F", "dock-2", 1, NOW_MS, camera="b"), _raw("F", "dock-2", 2, NOW_MS, camera="c")])
    assert [(c.item_id, c.model_version, c.views) for c in second.commands] == [("F", "fake-2", 1)]
    assert len(second.hits) == 2 and p.fuser.views() == 0  # its later views: the decided pass's, not lost
    p.close()


def test_a_station_list_written_as_plain_text_stops_with_one_line(monkeypatch):
    import pytest

    from sorter.errors import ConfigError

    monkeypatch.setenv("SORTER_CANARY__STATIONS", "dock-2")
    monkeypatch.setenv("SORTER_CANARY__CHECKPOINT", "/models/candidate.pt")
    with pytest.raises(ConfigError, match=r"SORTER_CANARY__STATIONS='\[\"dock-2\"\]'"):
        load_settings()


def test_a_live_model_promoted_to_the_canarys_version_keeps_reusing_its_decisions():
    """Promotion (the live model reloaded to the candidate's version, the canary settings still on): the live
    model's cached decisions are reused at later stations as before."""
    p = _pipeline()
    promoted = Candidate()  # version fake-2, as the canary's
    p.swap(promoted)
    assert _commands(p, _raw("A", "dock-1", 0, NOW_MS)) == [("A", "dock-1", "C-3", "fake-2", False)]
    assert _commands(p, _raw("A", "dock-3", 0, NOW_MS + 10_000)) == [("A", "dock-3", "C-3", "fake-2", True)]
    p.close()
