"""The batch logic with in-memory fakes at the seams (no broker, no Redis, no real model)."""

from typing import ClassVar

import cv2
import numpy as np
import pytest

from sorter.stream.cache import MemoryCache
from sorter.stream.contracts import RawFrame, Source
from sorter.stream.inference import Prediction
from sorter.stream.pipeline import Decoder, Pipeline
from sorter.stream.routing import RoutingTable

LABELS = ["box", "bottle", "can"]


def photo(cls: int, confidence: float) -> bytes:
    """A solid PNG whose colour encodes what the fake model will say: R = class * 60, G = confidence."""
    img = np.zeros((48, 64, 3), np.uint8)
    img[..., 2] = cls * 60  # OpenCV writes BGR: channel 2 is red
    img[..., 1] = round(confidence * 250)
    return cv2.imencode(".png", img)[1].tobytes()


class FakeModel:
    input_size = 32
    model_version = "fake-1"

    def __init__(self):
        self.seen = 0

    def predict(self, images):
        self.seen += len(images)
        out = []
        for image in images:
            cls, conf = round(int(image[0, 0, 0]) / 60), image[0, 0, 1] / 250
            out.append(Prediction(cls, LABELS[cls], f"SKU-{cls}", float(conf)))
        return out


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


class FlakyProducer:
    """Stands in for CheckedProducer: the first instance fails fatally at flush, later ones deliver."""

    instances: ClassVar[list["FlakyProducer"]] = []

    def __init__(self, config, on_error=None):
        self.config = config
        self.sent: list[tuple[str, bytes]] = []
        FlakyProducer.instances.append(self)

    def produce(self, topic, value, key, headers=None):
        self.sent.append((topic, value))

    def flush(self, timeout):
        from confluent_kafka import KafkaError

        from sorter.stream.kafka import DeliveryError

        if self is FlakyProducer.instances[0]:
            raise DeliveryError([KafkaError(KafkaError._FENCED, "producer fenced", fatal=True)], fatal=True)


def test_a_fatal_producer_error_recreates_the_producer_and_resends_the_whole_batch(setup, monkeypatch):
    """E.g. an idempotent producer the broker forgot after a restart: recreate, re-send, then commit."""
    from sorter.settings import load_settings
    from sorter.stream import worker as worker_module

    pipeline, _, _ = setup
    monkeypatch.setattr(worker_module, "CheckedProducer", FlakyProducer)
    FlakyProducer.instances = []
    w = worker_module.Worker(load_settings(kafka={"bootstrap_servers": "127.0.0.1:9"}), pipeline)
    result = pipeline.process([frame("a", photo(0, 0.9)), frame("b", photo(1, 0.9), offset=1), frame("c", b"")])
    w._deliver(result)
    first, second = FlakyProducer.instances
    assert len(second.sent) == len(first.sent) == 3  # 2 commands + 1 dead letter, all sent again
    assert w.producer is second and w.stats.producer_restarts == 1
    w.consumer.close()


def test_a_failed_batch_stops_later_batches_from_committing_past_it(setup, monkeypatch):
    """Batch k's delivery fails while k+1 is already in flight: k+1 must not commit (it would skip k)."""
    from concurrent.futures import Future

    from confluent_kafka import KafkaError

    from sorter.settings import load_settings
    from sorter.stream import worker as worker_module
    from sorter.stream.kafka import DeliveryError

    pipeline, _, _ = setup
    monkeypatch.setattr(worker_module, "CheckedProducer", FlakyProducer)
    w = worker_module.Worker(load_settings(kafka={"bootstrap_servers": "127.0.0.1:9"}), pipeline)
    committed = []
    monkeypatch.setattr(w, "_commit", committed.append)
    failed, later = Future(), Future()
    failed.set_exception(DeliveryError([KafkaError(KafkaError._MSG_TIMED_OUT, "timed out")], fatal=False))
    later.set_result((pipeline.process([frame("b", photo(1, 0.9), offset=9)]), 0))
    w._inflight.extend([worker_module.InFlight(failed, ["k"], 0.0), worker_module.InFlight(later, ["k+1"], 0.0)])
    with pytest.raises(DeliveryError):
        w._drain()
    assert committed == [] and not w._inflight
    w.consumer.close()
