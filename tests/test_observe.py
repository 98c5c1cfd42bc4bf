"""Health from librdkafka statistics, and the metrics a batch moves (no broker needed)."""

import json

from prometheus_client import generate_latest

from sorter.stream.contracts import CommandSource, RawFrame, RoutingCommand, Source
from sorter.stream.observe import Health, Metrics
from sorter.stream.pipeline import BatchResult, DeadLetter


def stats(state: str, lag: int) -> str:
    return json.dumps(
        {
            "brokers": {
                "127.0.0.1:9092/bootstrap": {"state": "UP", "nodeid": -1},  # the bootstrap entry does not count
                "127.0.0.1:9092/1": {"state": state, "nodeid": 1},
            },
            "topics": {
                "frames.dock-1": {
                    "partitions": {"0": {"consumer_lag": lag}, "1": {"consumer_lag": -1}, "-1": {"consumer_lag": 0}}
                }
            },
        }
    )


def test_broker_state_and_lag_come_from_statistics():
    h = Health()
    h.on_stats(stats("UP", 42))
    assert h.broker_up and h.lag == {("frames.dock-1", 0): 42}  # unknown lag (-1) and the UA partition skipped
    h.on_stats(stats("DOWN", 7))
    assert not h.broker_up
    h.on_stats("not json")
    assert not h.broker_up and h.seen_stats


def sample(name: str, labels: dict, text: str) -> float:
    for line in text.splitlines():
        named = line.startswith((name + "{", name + " "))
        if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not exported")


def test_a_batch_moves_the_counters_and_histograms():
    m = Metrics()
    src = CommandSource(topic="frames.dock-1", partition=0, offset=5)
    command = RoutingCommand(
        item_id="i1",
        station_id="dock-1",
        sku="SKU-1",
        label="box",
        confidence=0.9,
        chute="C-01",
        reason="classified",
        model_version="v1",
        captured_at=1_000,
        decided_at=1_100,
        source=src,
        worker_id="w",
    )
    raw = RawFrame(Source("frames.dock-1", 0, 6), b"i2", b"", ())
    result = BatchResult(
        commands=[command],
        dead_letters=[DeadLetter(raw, "empty_payload", "FrameError", "no bytes")],
        cache_hits=1,
        frames=3,
        classified=1,
        decode_s=0.002,
        infer_s=0.03,
    )
    m.observe_batch(result, {"frames.dock-1": 3}, delivered_ms=1_180, seconds=0.05)
    text = generate_latest(m.registry).decode()
    assert sample("sorter_frames_consumed_total", {"topic": "frames.dock-1"}, text) == 3
    assert sample("sorter_frames_dead_lettered_total", {"reason": "empty_payload"}, text) == 1
    assert sample("sorter_cache_lookups_total", {"result": "hit"}, text) == 1
    assert sample("sorter_cache_lookups_total", {"result": "miss"}, text) == 1
    assert sample("sorter_commands_total", {"chute": "C-01", "reason": "classified"}, text) == 1
    assert sample("sorter_end_to_end_latency_seconds_bucket", {"le": "0.2"}, text) == 1  # 180 ms
    assert sample("sorter_end_to_end_latency_seconds_bucket", {"le": "0.15"}, text) == 0
    assert sample("sorter_batch_size_sum", {}, text) == 3
