"""The batch logic with in-memory fakes at the seams (no broker, no Redis, no real model)."""

import cv2
import numpy as np
import pytest

from sorter.stream.cache import MemoryCache
from sorter.stream.contracts import RawFrame, Source
from sorter.stream.pipeline import Decoder, Pipeline
from sorter.stream.routing import RoutingTable
from tests.fakes import FakeModel, photo


def frame(item, value, *, station="dock-1", offset=0, headers=()):
    hdrs = (("item-id", item.encode()), ("captured-at", b"1795700000000"), *headers)
    return RawFrame(Source(f"frames.{station}", 0, offset), item.encode(), value, hdrs)


@pytest.fixture
def setup():
    routes = RoutingTable(
        default_chute="C-99", review_chute="REVIEW", min_confidence=0.8, routes={"SKU-0": "C-00", "SKU-1": "C-01"}
    )
    model, cache = FakeModel(), MemoryCache()
    decoder = Decoder(2, max_pixels=10_000)
    pipeline = Pipeline(
        model, routes, cache, decoder, worker_id="w-1", max_payload_bytes=50_000, clock_ms=lambda: 1795700000123
    )
    yield pipeline, model, cache
    decoder.close()


def test_each_item_gets_one_command_with_its_chute(setup):
    pipeline, _, cache = setup
    result = pipeline.process(
        [
            frame("a", photo(0, 0.9), offset=1),
            frame("b", photo(1, 0.95), offset=2),
            frame("c", photo(2, 0.9), offset=3),
            frame("d", photo(0, 0.5), offset=4),
        ]
    )
    by_item = {c.item_id: c for c in result.commands}
    assert {i: (c.chute, c.reason) for i, c in by_item.items()} == {
        "a": ("C-00", "classified"),
        "b": ("C-01", "classified"),
        "c": ("C-99", "unknown_sku"),
        "d": ("REVIEW", "low_confidence"),
    }
    a = by_item["a"]
    assert (a.station_id, a.sku, a.label, a.model_version, a.worker_id) == ("dock-1", "SKU-0", "box", "fake-1", "w-1")
    assert (a.captured_at, a.decided_at, a.source.offset, a.frames) == (1795700000000, 1795700000123, 1, 1)
    assert set(result.decisions) == {"a", "b", "c", "d"}
    assert cache.data == {}  # the worker stores decisions only after the commands are delivered


def test_frames_of_one_item_in_a_batch_give_one_command_from_the_most_confident(setup):
    pipeline, _, _ = setup
    result = pipeline.process(
        [
            frame("a", photo(2, 0.85), offset=1),
            frame("a", photo(0, 0.97), offset=2),
            frame("a", photo(1, 0.6), offset=3),
        ]
    )
    (command,) = result.commands
    assert (command.label, command.chute, command.frames, command.source.offset) == ("box", "C-00", 3, 2)


def test_an_item_already_decided_skips_the_model_and_gets_no_command(setup):
    pipeline, model, cache = setup
    cache.put_many({"a": {"chute": "C-00"}})
    result = pipeline.process([frame("a", photo(0, 0.9)), frame("a", photo(0, 0.9)), frame("b", photo(1, 0.9))])
    assert [c.item_id for c in result.commands] == ["b"]
    assert result.cache_hits == 2 and model.seen == 1


def test_bad_frames_become_dead_letters_and_good_ones_still_flow(setup):
    pipeline, _, _ = setup
    jpeg = cv2.imencode(".jpg", np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8))[1].tobytes()
    bomb = cv2.imencode(".png", np.zeros((200, 200, 3), np.uint8))[1].tobytes()  # 40,000 px > limit of 10,000
    result = pipeline.process(
        [
            frame("good-1", photo(0, 0.9)),
            frame("trunc", jpeg[: len(jpeg) // 2]),
            frame("zero", b""),
            frame("noise", np.random.default_rng(0).bytes(3000)),
            frame("bomb", bomb),
            frame("huge", b"x" * 60_000),
            frame("bad id!", photo(0, 0.9)),
            frame("good-2", photo(1, 0.9), headers=(("captured-at", b"not-a-time"),)),
            frame("good-3", photo(1, 0.9)),
        ]
    )
    assert sorted(c.item_id for c in result.commands) == ["good-1", "good-3"]
    reasons = {d.raw.key.decode(): d.reason for d in result.dead_letters}
    assert reasons == {
        "trunc": "corrupt_image",
        "zero": "empty_payload",
        "noise": "unknown_format",
        "bomb": "too_many_pixels",
        "huge": "payload_too_large",
        "bad id!": "bad_item_id",
        "good-2": "bad_captured_at",
    }
    assert all(d.message for d in result.dead_letters)


def _cached(station: str, captured_at: int, sku="SKU-0", label="box", chute="C-00") -> dict:
    return {
        "chute": chute,
        "reason": "classified",
        "sku": sku,
        "label": label,
        "confidence": 0.93,
        "model_version": "fake-0",
        "decided_at": captured_at + 50,
        "station_id": station,
        "captured_at": captured_at,
    }


def test_another_view_of_the_same_pass_is_suppressed_without_the_model(setup):
    """Same station, captured within the pass window of the decided photo: no second command."""
    pipeline, model, cache = setup
    cache.put_many({"a": _cached("dock-1", 1795700000000 - 2_000)})
    result = pipeline.process([frame("a", photo(1, 0.9))])
    assert result.commands == [] and result.cache_hits == 1 and model.seen == 0
    assert [(h.frame.item_id, h.new_pass, h.decided_at) for h in result.hits] == [("a", False, 1795699998050)]


def test_an_item_reaching_another_station_gets_a_command_from_the_cached_decision(setup):
    """The cache skips the model, not the command: the item is routed at the second station too, by that
    station's rules, from the cached prediction, and the command says it was cached."""
    pipeline, model, cache = setup
    cache.put_many({"a": _cached("dock-1", 1795700000000 - 2_000)})
    result = pipeline.process([frame("a", photo(1, 0.9), station="dock-2")])
    assert model.seen == 0 and result.cache_hits == 1
    (command,) = result.commands
    assert (command.station_id, command.sku, command.chute, command.reason) == ("dock-2", "SKU-0", "C-00", "classified")
    assert command.cached and command.confidence == 0.93 and command.model_version == "fake-0"
    assert [(h.frame.station_id, h.new_pass) for h in result.hits] == [("dock-2", True)]
    assert result.decisions["a"]["station_id"] == "dock-2"  # the next view at dock-2 is the same pass


def test_an_item_coming_round_again_gets_a_command_from_the_cached_decision(setup):
    """Recirculation: the same station, long after the pass that was decided."""
    pipeline, model, cache = setup
    cache.put_many({"a": _cached("dock-1", 1795700000000 - 90_000)})
    result = pipeline.process([frame("a", photo(1, 0.9))])
    assert model.seen == 0
    (command,) = result.commands
    assert command.cached and command.chute == "C-00" and command.station_id == "dock-1"


def test_views_of_two_stations_interleaved_give_one_command_per_station_pass(setup):
    """A late view at A after B was commanded is still A's pass: no second command at A (the cache
    remembers the last pass per station, not only the last station)."""
    pipeline, model, cache = setup
    t0 = 1795700000000

    def view(station, dt):
        return frame("a", photo(0, 0.9), station=station, headers=(("captured-at", str(t0 + dt).encode()),))

    commands = []
    for station, dt in [("dock-1", 0), ("dock-2", 4000), ("dock-1", 300), ("dock-2", 4200), ("dock-1", 60_000)]:
        result = pipeline.process([view(station, dt)])
        cache.put_many(result.decisions)
        commands += [(c.station_id, c.cached) for c in result.commands]
    assert commands == [("dock-1", False), ("dock-2", True), ("dock-1", True)]  # the last: a second lap
    assert model.seen == 1
