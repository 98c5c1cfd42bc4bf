"""Multi-camera fusion: the combination rule, the open items, and the pipeline across batches (fakes only)."""

import json
import math
import time

import numpy as np
import pytest
from confluent_kafka import KafkaError

from sorter.settings import load_settings
from sorter.stream.cache import MemoryCache
from sorter.stream.contracts import RawFrame, Source
from sorter.stream.fusion import fuse
from sorter.stream.inference import Prediction
from sorter.stream.kafka import KafkaClients
from sorter.stream.pipeline import Decoder, Pipeline
from sorter.stream.routing import Fusion, RoutingTable, StationOverride
from sorter.stream.worker import Worker
from tests.fakes import LABELS, NOW_MS, FakeCluster, FakeModel, photo

T0 = 1_795_700_000_000


def pred(probs, unknown=False, ood=None) -> Prediction:
    i = int(np.argmax(probs))
    logs = tuple(math.log(p) for p in probs)
    return Prediction(i, LABELS[i], f"SKU-{i}", float(max(probs)), ood, unknown, logs)


def names(i):
    return LABELS[i], f"SKU-{i}"


def test_agreeing_views_are_not_overconfident_and_a_view_that_sees_nothing_sends_toward_review():
    a = pred([0.7, 0.2, 0.1])
    b = pred([0.6, 0.3, 0.1])
    flat = pred([0.34, 0.33, 0.33])  # occluded: sees nothing
    both = fuse([a, b], ood_threshold=None, names=names)
    assert both.label == "box" and 0.6 < both.confidence < 0.7  # between the views: they may repeat each other
    assert fuse([a, a, a], ood_threshold=None, names=names).confidence == pytest.approx(0.7)  # one view, 3 times
    with_flat = fuse([a, flat], ood_threshold=None, names=names)
    assert with_flat.label == "box" and with_flat.confidence < 0.6


def test_one_confident_wrong_view_is_outvoted_where_max_confidence_would_follow_it():
    views = [pred([0.7, 0.25, 0.05]), pred([0.7, 0.25, 0.05]), pred([0.2, 0.75, 0.05])]
    assert max(views, key=lambda p: p.confidence).label == "bottle"  # today's rule: the most confident view
    fused = fuse(views, ood_threshold=None, names=names)
    assert fused.label == "box"


def test_a_class_no_view_ranked_first_is_named_from_the_model():
    views = [pred([0.45, 0.1, 0.45 - 1e-3]) for _ in range(1)] + [pred([0.1, 0.45, 0.45 - 1e-3])]
    fused = fuse(views, ood_threshold=None, names=names)
    assert (fused.index, fused.label, fused.sku) == (2, "can", "SKU-2")


def test_unknown_is_judged_on_the_mean_score():
    known, odd = pred([0.8, 0.1, 0.1], ood=-5.0), pred([0.4, 0.3, 0.3], ood=-1.0, unknown=True)
    assert not fuse([known, known, odd], ood_threshold=-2.5, names=names).unknown  # mean -3.67
    assert fuse([odd, odd, known], ood_threshold=-2.5, names=names).unknown  # mean -2.33
    assert fuse([odd, odd, known], ood_threshold=None, names=names).unknown  # no threshold known: most views


def test_without_log_probabilities_the_most_confident_view_decides():
    plain = [Prediction(0, "box", "SKU-0", 0.7), Prediction(1, "bottle", "SKU-1", 0.9)]
    assert fuse(plain, ood_threshold=None, names=names).label == "bottle"


def raw(item, offset, camera, *, station="dock-1", partition=0, captured=T0, value=None):
    hdrs = [("item-id", item.encode()), ("captured-at", str(captured).encode())]
    if camera:
        hdrs.append(("camera-id", camera.encode()))
    return RawFrame(Source(f"frames.{station}", partition, offset), item.encode(), value or photo(0, 0.9), tuple(hdrs))


class Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
def fused():
    routes = RoutingTable(
        default_chute="C-99",
        review_chute="REVIEW",
        min_confidence=0.8,
        routes={"SKU-0": "C-00", "SKU-1": "C-01"},
        fusion=Fusion(window_ms=150, views=3),
        stations={"single": StationOverride(fusion=Fusion(window_ms=150, views=1))},
    )
    clock, cache, model = Clock(T0 + 20), MemoryCache(), FakeModel()
    decoder = Decoder(2, max_pixels=10_000)
    pipeline = Pipeline(model, routes, cache, decoder, worker_id="w", max_payload_bytes=50_000, clock_ms=clock)
    yield pipeline, clock, cache, model
    decoder.close()


def test_views_in_different_batches_give_one_command_when_the_last_arrives(fused):
    pipeline, clock, cache, _ = fused
    first = pipeline.process([raw("a", 10, "cam-1", value=photo(0, 0.9)), raw("b", 11, "cam-1")])
    assert first.commands == [] and first.held == {("frames.dock-1", 0): 10} and first.held_frames == 2
    clock.ms += 30
    second = pipeline.process([raw("a", 12, "cam-2", value=photo(0, 0.95)), raw("a", 13, "cam-3", value=photo(0, 0.8))])
    (command,) = second.commands
    assert (command.item_id, command.label, command.views, command.cameras) == (
        "a",
        "box",
        3,
        ["cam-1", "cam-2", "cam-3"],
    )
    assert (command.frames, command.source.offset, command.camera_id) == (3, 10, "cam-1")  # the first view
    assert command.confidence > 0.75 and command.chute == "C-00"
    assert second.held == {("frames.dock-1", 0): 11}  # b still open: the commit stops before it
    cache.put_many(second.decisions)
    clock.ms += 10
    third = pipeline.process([raw("a", 14, "cam-4")])  # a view after the decision: a cache hit, as today
    assert third.commands == [] and third.cache_hits == 1


def test_a_window_that_closes_decides_with_the_views_at_hand(fused):
    pipeline, clock, _, _ = fused
    assert pipeline.process([raw("a", 1, "cam-1"), raw("a", 2, "cam-2")]).commands == []
    assert pipeline.fusion_due_in_ms() == 150
    clock.ms += 149
    assert pipeline.process([]).commands == [] and pipeline.fusion_due_in_ms() == 1
    clock.ms += 1
    assert pipeline.fusion_due_in_ms() == 0
    result = pipeline.process([])  # the worker's empty batch when nothing else comes
    (command,) = result.commands
    assert (command.views, command.frames) == (2, 2) and [i.complete for i in result.fused] == [False]
    assert result.held == {} and pipeline.fusion_due_in_ms() is None


def test_a_retaken_photo_of_one_camera_is_not_another_view(fused):
    pipeline, _, _, _ = fused
    result = pipeline.process([raw("a", 1, "cam-1"), raw("a", 2, "cam-1"), raw("a", 3, "cam-2")])
    assert result.commands == []  # two cameras of three
    again = pipeline.process([raw("a", 1, "cam-1")])  # read again (an aborted transaction): counts once
    assert again.commands == [] and again.held_frames == 3


def test_a_station_with_views_1_decides_at_once(fused):
    pipeline, _, _, _ = fused
    (command,) = pipeline.process([raw("a", 1, "cam-1", station="single")]).commands
    assert command.views is None and command.cameras is None


def test_undecodable_views_do_not_hold_an_item(fused):
    pipeline, _, _, _ = fused
    result = pipeline.process([raw("a", 1, "cam-1", value=b"junk"), raw("a", 2, "cam-2", value=b"junk")])
    assert [d.reason for d in result.dead_letters] == ["unknown_format"] * 2 and result.held == {}
    assert pipeline.fusion_due_in_ms() is None


def test_forget_drops_the_views_of_revoked_partitions(fused):
    pipeline, _, _, _ = fused
    pipeline.process([raw("a", 1, "cam-1"), raw("b", 5, "cam-1", partition=1)])
    assert pipeline.forget({("frames.dock-1", 0)}) == 1
    assert pipeline.process([]).held == {("frames.dock-1", 1): 5}


def test_a_late_view_of_an_open_item_joins_it(fused):
    pipeline, clock, _, _ = fused
    routes = pipeline.routes.model_copy(update={"decision_deadline_ms": 500, "late_chute": "RECIRC"})
    pipeline.routes, pipeline.judge_late = routes, True
    clock.ms = T0 + 100
    pipeline.process([raw("a", 1, "cam-1"), raw("a", 2, "cam-2")])
    clock.ms = T0 + 520  # cam-3's frame, captured with the others, is read past the deadline
    result = pipeline.process([raw("a", 3, "cam-3")])
    (command,) = result.commands  # one command for the item, not one for the late view and one for the rest
    assert command.reason == "late" and len(result.late) == 3  # its pass went by while it waited
    assert pipeline.fusion_due_in_ms() is None


# -- the loop (fake broker): commits never pass an open view; an item open at a stop is decided after it --


LOOP_TOPIC, LOOP_COMMANDS = "frames.dock-1", "sort.commands"


def loop_settings(**overrides):
    base = {
        "kafka": {"bootstrap_servers": "fake:9092"},
        "observe": {"enabled": False},
        "worker_id": "w-1",
        "shutdown_deadline_s": 5,
    }
    return load_settings(**(base | {k: base.get(k, {}) | v for k, v in overrides.items()}))


def _views(cluster, topic, plan):
    """plan: (item, camera) per frame, in topic order."""
    cluster.create(topic)
    for item, camera in plan:
        headers = [("item-id", item.encode()), ("captured-at", str(NOW_MS).encode()), ("camera-id", camera.encode())]
        cluster.append(topic, photo(0, 0.9), item.encode(), headers)


def _worker(cluster, cache, window_ms, delivery="at-least-once"):
    routes = RoutingTable(
        default_chute="C-99", review_chute="REVIEW", min_confidence=0.5, routes={"SKU-0": "C-00"},
        fusion=Fusion(window_ms=window_ms, views=3),
    )  # fmt: skip
    p = Pipeline(FakeModel(), routes, cache, Decoder(2, 10_000), worker_id="w-1")
    s = loop_settings(batch={"max_size": 2, "max_wait_ms": 5}, kafka={"delivery": delivery})
    w = Worker(s, p, clients=KafkaClients(cluster.consumer, cluster.producer))
    w.consumer.schedule(("assign", [(LOOP_TOPIC, 0)]))
    return w


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
def test_an_item_open_at_a_stop_is_decided_after_the_restart_and_nothing_repeats(delivery):
    cluster, cache = FakeCluster(), MemoryCache()
    # batches of 2: a's views span two batches; c is still open (2 of 3 views) when the worker stops
    plan = [("a", "cam-1"), ("c", "cam-1"), ("a", "cam-2"), ("b", "cam-1"), ("a", "cam-3"), ("b", "cam-2"),
            ("b", "cam-3"), ("c", "cam-2")]  # fmt: skip
    _views(cluster, LOOP_TOPIC, plan)
    _worker(cluster, cache, window_ms=60_000, delivery=delivery).run(idle_exit_s=0.5)
    first = [json.loads(m.value()) for m in cluster.messages(LOOP_COMMANDS)]
    assert [(c["item_id"], c["views"]) for c in first] == [("a", 3), ("b", 3)]
    assert cluster.committed[(LOOP_TOPIC, 0)] == 1  # c's first view: read again after the restart
    _worker(cluster, cache, window_ms=100, delivery=delivery).run(idle_exit_s=0.5)
    after = [json.loads(m.value()) for m in cluster.messages(LOOP_COMMANDS)][len(first) :]
    assert [(c["item_id"], c["views"], c["cameras"]) for c in after] == [("c", 2, ["cam-1", "cam-2"])]
    assert cluster.committed[(LOOP_TOPIC, 0)] == len(plan)


def test_an_item_whose_last_view_never_comes_is_decided_when_its_window_closes_with_no_traffic():
    cluster, cache = FakeCluster(), MemoryCache()
    _views(cluster, LOOP_TOPIC, [("a", "cam-1"), ("a", "cam-2")])
    w = _worker(cluster, cache, window_ms=200)
    started = time.monotonic()
    w.run(idle_exit_s=1.0)
    (command,) = [json.loads(m.value()) for m in cluster.messages(LOOP_COMMANDS)]
    assert (command["item_id"], command["views"]) == ("a", 2)
    assert command["decided_at"] - NOW_MS >= 0 and w.stats.fused_items == 1
    assert cluster.committed[(LOOP_TOPIC, 0)] == 2 and time.monotonic() - started < 5


def test_exactly_once_an_item_fused_in_an_aborted_transaction_is_decided_again_not_lost():
    """The abort rewinds the batch's own frames; the views fused from earlier batches are not among them,
    so the item is opened again and the next batch decides it."""
    cluster, cache = FakeCluster(), MemoryCache()
    _views(cluster, LOOP_TOPIC, [("a", "cam-1"), ("a", "cam-2")])
    w = _worker(cluster, cache, window_ms=200, delivery="exactly-once")
    aborted = []

    def abort_the_tick(result):
        if result.frames == 2 and not aborted:  # the batch that opened a: the next one (the tick) aborts
            aborted.append(True)
            cluster.fail_commit = [KafkaError(KafkaError._STATE, "abortable", txn_requires_abort=True)]

    w.accounting.on_batch = abort_the_tick
    w.run(idle_exit_s=1.5)
    commands = [json.loads(m.value()) for m in cluster.messages(LOOP_COMMANDS)]
    assert aborted and w.stats.aborted_batches == 1
    assert [(c["item_id"], c["views"]) for c in commands] == [("a", 2)]
    assert cluster.committed[(LOOP_TOPIC, 0)] == 2


# -- found in review --


def test_an_item_decided_at_another_station_while_open_gets_one_command_here_and_keeps_both_passes(fused):
    pipeline, clock, cache, _ = fused
    pipeline.process([raw("x", 1, "cam-1")])  # open at dock-1
    elsewhere = pipeline.process([raw("x", 2, "cam-a", station="single")])  # decided at another station
    cache.put_many(elsewhere.decisions)
    clock.ms += 10
    more = pipeline.process([raw("x", 3, "cam-2"), raw("x", 4, "cam-3")])  # dock-1's other views: into the item
    cache.put_many(more.decisions)
    clock.ms += 200
    tick = pipeline.process([])
    cache.put_many(tick.decisions)
    here = [c for r in (more, tick) for c in r.commands]
    assert [(c.station_id, c.views) for c in here] == [("dock-1", 3)]
    assert set(cache.get_many(["x"])["x"]["passes"]) == {"dock-1", "single"}


def test_a_fused_decision_past_the_station_s_deadline_sends_the_item_to_the_late_chute(fused):
    pipeline, clock, _, _ = fused
    routes = pipeline.routes.model_copy(update={"decision_deadline_ms": 500, "late_chute": "RECIRC"})
    pipeline.routes, pipeline.judge_late = routes, True
    clock.ms = T0 + 100
    assert pipeline.process([raw("a", 1, "cam-1")]).commands == []  # in time when read
    clock.ms = T0 + 600  # its window closed after the item passed the diverter
    result = pipeline.process([])
    (command,) = result.commands
    assert (command.reason, command.chute) == ("late", "RECIRC") and len(result.late) == 1


def test_a_window_longer_than_the_deadline_is_refused():
    with pytest.raises(ValueError, match=r"fusion\.window_ms"):
        RoutingTable(default_chute="C", review_chute="R", decision_deadline_ms=100, late_chute="L",
                     fusion={"window_ms": 150, "views": 3})  # fmt: skip
    with pytest.raises(ValueError, match=r"stations\.d1"):
        RoutingTable(default_chute="C", review_chute="R", fusion={"window_ms": 150, "views": 3},
                     stations={"d1": {"decision_deadline_ms": 120, "late_chute": "L"}})  # fmt: skip


def test_odd_log_probabilities_never_raise_and_a_certain_view_keeps_its_weight():
    empty = Prediction(0, "box", "SKU-0", 0.9, log_probs=())
    assert fuse([empty, empty], ood_threshold=None, names=names).label == "box"
    certain = Prediction(0, "box", "SKU-0", 1.0, log_probs=(0.0, -math.inf, -math.inf))
    unsure = pred([0.3, 0.6, 0.1])
    assert fuse([certain, unsure], ood_threshold=None, names=names).label == "box"
    nan = Prediction(1, "bottle", "SKU-1", 0.5, log_probs=(math.nan, 0.0, 0.0))
    assert fuse([nan, unsure], ood_threshold=None, names=names).label == "bottle"


def test_a_camera_s_retakes_weigh_as_one_view_and_frames_without_camera_id_count_per_partition(fused):
    pipeline, _, _, _ = fused
    retakes = [raw("a", i, "cam-1", value=photo(1, 0.9)) for i in range(1, 4)]
    result = pipeline.process([*retakes, raw("a", 4, "cam-2", value=photo(0, 0.92)), raw("a", 5, "cam-3",
                               value=photo(0, 0.9))])  # fmt: skip
    (command,) = result.commands
    assert command.label == "box" and command.views == 3  # cam-1's three retakes did not outvote two cameras
    no_ids = [raw("b", 7, None), raw("b", 7, None, partition=1), raw("b", 8, None)]
    assert pipeline.process(no_ids).commands[0].views == 3  # three frames, three cameras (no id to tell)


def test_a_straggler_of_an_earlier_lap_does_not_join_the_open_item_of_this_one(fused):
    """Lap 1 went to the late chute (a lagging partition); the item comes round, lap 2's views open it, then
    lap 1's last view arrives: it is a quiet view of lap 1, and lap 2 is decided in time from its own views."""
    pipeline, clock, cache, _ = fused
    routes = pipeline.routes.model_copy(update={"decision_deadline_ms": 500, "late_chute": "RECIRC"})
    pipeline.routes, pipeline.judge_late = routes, True
    clock.ms = T0 + 600
    lap1 = pipeline.process([raw("x", 1, "cam-1"), raw("x", 2, "cam-2")])
    assert [c.reason for c in lap1.commands] == ["late"]
    cache.put_many(lap1.decisions)
    lap2 = T0 + 60_000
    clock.ms = lap2 + 20
    assert pipeline.process([raw("x", 10, "cam-1", captured=lap2), raw("x", 11, "cam-2", captured=lap2)]).commands == []
    clock.ms += 10
    straggler = pipeline.process([raw("x", 12, "cam-3", captured=T0)])
    assert straggler.commands == [] and [h.new_pass for h in straggler.hits] == [False]
    clock.ms += 200
    (command,) = pipeline.process([]).commands
    assert (command.reason, command.captured_at, command.views) == ("classified", lap2, 2)


def test_at_a_model_swap_open_items_are_decided_by_the_model_that_saw_their_views(fused):
    pipeline, clock, cache, _ = fused
    pipeline.process([raw("x", 1, "cam-1")])  # open at dock-1, classified by fake-1
    elsewhere = pipeline.process([raw("x", 2, "cam-a", station="single")])
    cache.put_many(elsewhere.decisions)
    new = FakeModel()
    new.model_version = "fake-2"
    pipeline.swap(new)
    clock.ms += 5
    result = pipeline.process([raw("x", 3, "cam-2")])  # a view of the open item in the swapping batch: quiet
    (command,) = result.commands
    assert (command.model_version, command.views, command.station_id) == ("fake-1", 1, "dock-1")
    assert new.seen == 0 and len(result.hits) == 1
    cache.put_many(result.decisions)
    assert set(cache.get_many(["x"])["x"]["passes"]) == {"dock-1", "single"}
