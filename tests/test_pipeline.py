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


@pytest.fixture
def deadline():
    """A line whose scan-to-divert budget is 800 ms: the clock reads 1,000 ms after the first capture."""
    routes = RoutingTable(
        default_chute="C-99", review_chute="REVIEW", routes={"SKU-0": "C-00", "SKU-1": "C-01"},
        decision_deadline_ms=800, late_chute="RECIRC",
    )  # fmt: skip
    model, cache = FakeModel(), MemoryCache()
    decoder = Decoder(2, max_pixels=10_000)
    now = [T0 + 1_000]
    pipeline = Pipeline(model, routes, cache, decoder, worker_id="w-1", clock_ms=lambda: now[0])
    yield pipeline, model, cache, now
    decoder.close()


T0 = 1795700000000


def _at(item, dt_ms, *, station="dock-1", offset=0, conf=0.9):
    return frame(item, photo(0, conf), station=station, offset=offset,
                 headers=(("captured-at", str(T0 + dt_ms).encode()),))  # fmt: skip


def test_a_frame_past_its_deadline_is_not_classified_and_its_item_goes_to_the_late_chute_at_once(deadline):
    pipeline, model, _, _ = deadline
    result = pipeline.process([_at("old", 0, offset=1), _at("old", 100, offset=2), _at("fresh", 500, offset=3)])
    by_item = {c.item_id: c for c in result.commands}
    assert (by_item["old"].chute, by_item["old"].reason, by_item["old"].frames) == ("RECIRC", "late", 2)
    assert by_item["old"].label is None and by_item["old"].confidence == 0.0 and not by_item["old"].cached
    assert (by_item["fresh"].chute, by_item["fresh"].reason) == ("C-00", "classified")
    assert model.seen == 1 and result.classified == 1  # only the fresh photo ran through the model
    assert [f.item_id for f in result.late] == ["old", "old"]
    assert pipeline.predecode(_at("old", 0)) is None  # not decoded ahead either: a drain is not slowed by it
    assert pipeline.predecode(_at("fresh", 500)) is not None


def test_other_views_of_a_late_pass_get_no_second_command_and_a_later_pass_is_classified(deadline):
    """Several cameras photograph one item: once it is sent to the late chute, its other views of that pass
    (in later batches) are cache hits with no command; when it comes round again (recirculation) and is in
    time, it is classified, not routed from a remembered 'late'."""
    pipeline, model, cache, now = deadline
    first = pipeline.process([_at("a", 0)])
    assert [c.reason for c in first.commands] == ["late"]
    cache.put_many(first.decisions)
    second = pipeline.process([_at("a", 50, offset=1)])  # another camera, same pass, also late
    assert second.commands == [] and second.cache_hits == 1 and model.seen == 0
    now[0] = T0 + 60_000
    lap = pipeline.process([_at("a", 59_900, offset=2)])  # a minute later, 100 ms old when read: in time
    assert [(c.reason, c.chute, c.cached) for c in lap.commands] == [("classified", "C-00", False)]
    assert model.seen == 1


def test_a_late_pass_of_an_item_decided_before_keeps_its_prediction_for_the_next_station(deadline):
    pipeline, model, cache, _ = deadline
    cache.put_many({"a": _cached("dock-1", T0 - 60_000)})
    late = pipeline.process([_at("a", 0, station="dock-2")])
    assert [(c.station_id, c.reason, c.chute) for c in late.commands] == [("dock-2", "late", "RECIRC")]
    cache.put_many(late.decisions)
    onward = pipeline.process([_at("a", 950, station="dock-3")])
    assert [(c.station_id, c.chute, c.cached, c.sku) for c in onward.commands] == [("dock-3", "C-00", True, "SKU-0")]
    assert model.seen == 0


def test_without_a_deadline_old_frames_are_classified_as_before(setup):
    pipeline, model, _ = setup
    result = pipeline.process([frame("a", photo(0, 0.9), headers=(("captured-at", b"1700000000000"),))])
    assert [c.reason for c in result.commands] == ["classified"] and model.seen == 1 and result.late == []


def test_an_unknown_product_goes_to_review_with_its_score_and_stays_unknown_at_the_next_station(setup):
    from sorter.stream.inference import Prediction

    pipeline, _, cache = setup

    class Unknowing:  # confident, but its photos look like nothing it was trained on
        input_size, model_version = 32, "m-1"

        def predict(self, images):
            return [Prediction(0, "box", "SKU-0", 0.97, ood_score=-1.25, unknown=True) for _ in images]

    pipeline.model = Unknowing()
    (command,) = pipeline.process([frame("a", photo(0, 0.9))]).commands
    assert (command.chute, command.reason, command.ood_score, command.sku) == (
        "REVIEW",
        "unknown_product",
        -1.25,
        "SKU-0",
    )
    cache.put_many(pipeline.process([frame("b", photo(0, 0.9), station="dock-1")]).decisions)
    (onward,) = pipeline.process([frame("b", photo(0, 0.9), station="dock-2")]).commands
    assert (onward.reason, onward.cached, onward.ood_score) == ("unknown_product", True, -1.25)


# Found in review: a pass whose views straddle the deadline, and a late pass forgotten by the next one.
def _cam(item, dt_ms, camera, *, station="dock-1", offset=0):
    return frame(item, photo(0, 0.9), station=station, offset=offset,
                 headers=(("captured-at", str(T0 + dt_ms).encode()), ("camera-id", camera.encode())))  # fmt: skip


def test_views_of_one_pass_on_both_sides_of_the_deadline_give_one_command_from_the_view_in_time(deadline):
    """Two cameras 30 ms apart, read 1,000 ms after T0: 810 ms old (late) and 780 ms (in time)."""
    pipeline, _, cache, _ = deadline
    result = pipeline.process([_cam("x", 190, "cam-0", offset=1), _cam("x", 220, "cam-1", offset=2)])
    assert [(c.reason, c.chute) for c in result.commands] == [("classified", "C-00")] and result.late == []
    no_time = RawFrame(Source("frames.dock-1", 0, 4), b"y", photo(0, 0.9), (("item-id", b"y"),))
    result = pipeline.process([_cam("y", 0, "cam-0", offset=3), no_time])  # no capture time: cannot be late
    assert [c.reason for c in result.commands] == ["classified"]
    cache.put_many({"z": _cached("dock-0", T0 - 60_000)})  # decided before, at another station
    result = pipeline.process([_cam("z", 190, "cam-0", station="dock-2"), _cam("z", 220, "cam-1", station="dock-2")])
    assert [(c.reason, c.cached) for c in result.commands] == [("classified", True)]


def test_a_pass_classified_after_a_late_one_keeps_every_station_pass_remembered(deadline):
    pipeline, _, cache, now = deadline
    commands = []
    for station, captured, clock in [("dock-1", 0, 1_000), ("dock-2", 2_000, 3_000), ("dock-1", 30_000, 30_100),
                                     ("dock-2", 2_030, 30_200)]:  # fmt: skip
        now[0] = T0 + clock
        result = pipeline.process([_cam("a", captured, "cam-0", station=station)])
        cache.put_many(result.decisions)
        commands += [(c.station_id, c.reason) for c in result.commands]
    # late at dock-1, late at dock-2, back at dock-1 in time (a new lap); then a second camera's view of the
    # dock-2 pass, read late (a lagging partition, a redelivery): that pass was commanded, no second command
    assert commands == [("dock-1", "late"), ("dock-2", "late"), ("dock-1", "classified")]


def test_a_late_view_still_decides_when_the_view_in_time_of_its_pass_does_not_decode(deadline):
    """Found in review: the late views of a pass with a view in time were dropped, so when that view then
    failed to decode (a dead letter) the item got no command at all."""
    pipeline, _, _, _ = deadline
    broken = frame("x", b"\xff\xd8 not a jpeg", offset=2,
                   headers=(("captured-at", str(T0 + 220).encode()), ("camera-id", b"cam-1")))  # fmt: skip
    result = pipeline.process([_cam("x", 190, "cam-0", offset=1), broken])
    assert [(c.reason, c.chute, c.camera_id) for c in result.commands] == [("classified", "C-00", "cam-0")]
    assert [d.reason for d in result.dead_letters] == ["unknown_format"] and result.late == []


def test_a_late_view_of_an_earlier_lap_is_not_joined_to_the_pass_in_time(deadline):
    """Found in review: joining every late view of an item and station to the view in time merged a frame
    of the item's previous lap (a lagging partition) into this one: the command took the old frame, the
    cache remembered the old lap, and the next view of this lap got a second command."""
    pipeline, _, cache, now = deadline
    now[0] = T0 + 61_000
    old_lap = frame("x", photo(0, 0.99), offset=1, headers=(("captured-at", str(T0).encode()),))
    this_lap = frame("x", photo(0, 0.85), offset=2, headers=(("captured-at", str(T0 + 60_500).encode()),))
    result = pipeline.process([old_lap, this_lap])
    assert sorted((c.reason, c.captured_at) for c in result.commands) == [
        ("classified", T0 + 60_500), ("late", T0)
    ]  # fmt: skip
    assert [f.captured_at_ms for f in result.late] == [T0]
    cache.put_many(result.decisions)
    later = frame("x", photo(0, 0.9), offset=3, headers=(("captured-at", str(T0 + 60_520).encode()),))
    assert pipeline.process([later]).commands == []  # another camera of this lap: already commanded
