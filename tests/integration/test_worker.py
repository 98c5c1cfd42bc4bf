"""The worker against a real broker and a real Redis."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import redis
from confluent_kafka import Producer
from structlog.testing import capture_logs

from sorter.data.synth import catalog, render
from sorter.stream.app import build_worker
from sorter.stream.kafka import ensure_topics
from sorter.stream.routing import decide, load_routing_table
from tests.integration.conftest import consume_all, produce

pytestmark = pytest.mark.integration
DESIGNS = catalog(4)
NOW_MS = 1_795_700_000_000


def photos(n: int, seed: int) -> list[tuple[int, bytes]]:
    rng = np.random.default_rng(seed)
    return [(i % len(DESIGNS), render(DESIGNS[i % len(DESIGNS)], rng, size=(320, 240))) for i in range(n)]


def frames_for(items: list[str], pics: list[tuple[int, bytes]], station: str) -> list[tuple[str, bytes, dict]]:
    return [
        (item, pic, {"item-id": item, "station-id": station, "camera-id": "cam-1", "captured-at": str(NOW_MS)})
        for item, (_, pic) in zip(items, pics, strict=True)
    ]


def start(worker, **kwargs) -> threading.Thread:
    thread = threading.Thread(target=worker.run, kwargs=kwargs, daemon=True)
    thread.start()
    return thread


def test_200_frames_over_3_stations_get_one_command_each_with_the_right_chute(settings_for, namespace, bootstrap):
    settings = settings_for()
    stations = ["dock-1", "dock-2", "dock-3"]
    ensure_topics(settings.kafka, {f"{namespace}-frames.{s}": 2 for s in stations})
    pics = photos(200, seed=11)
    truth = {}
    for k, station in enumerate(stations):
        chunk = list(range(k, 200, 3))
        items = [f"{namespace}-{i}" for i in chunk]
        truth |= {item: (station, DESIGNS[pics[i][0]]) for item, i in zip(items, chunk, strict=True)}
        produce(bootstrap, f"{namespace}-frames.{station}", frames_for(items, [pics[i] for i in chunk], station))

    worker = build_worker(settings)
    start(worker, max_frames=200, idle_exit_s=60).join(120)
    assert worker.stats.frames == 200 and worker.stats.commands == 200

    messages = consume_all(bootstrap, settings.kafka.commands_topic, expect=200)
    commands = [json.loads(m.value()) for m in messages]
    assert len(commands) == 200 and len({c["item_id"] for c in commands}) == 200  # exactly one per item
    table = load_routing_table(settings.routes)
    correct = 0
    for m, c in zip(messages, commands, strict=True):
        station, design = truth[c["item_id"]]
        assert m.key().decode() == c["station_id"] == station  # keyed by station: its actuators read in order
        assert c["chute"] == decide(table, station, c["sku"], c["label"], c["confidence"]).chute
        assert c["model_version"] == "it-1" and c["captured_at"] == NOW_MS and c["schema_version"] == 1
        assert c["source"]["topic"] == f"{namespace}-frames.{station}"
        correct += c["sku"] == design.sku
    assert correct / 200 >= 0.9


def test_repeated_frames_of_an_item_give_one_command_and_count_cache_hits(
    settings_for, namespace, bootstrap, redis_url
):
    settings = settings_for(batch={"max_size": 4, "max_wait_ms": 5})
    topic = f"{namespace}-frames.dock-1"
    ensure_topics(settings.kafka, {topic: 1})
    pics = photos(3, seed=5)
    item = f"{namespace}-repeat"
    worker = build_worker(settings)
    produce(bootstrap, topic, frames_for([item], pics[:1], "dock-1"))
    thread = start(worker, max_frames=3, idle_exit_s=30)
    # the second and third photos of the same item arrive after the first one was decided
    deadline = time.monotonic() + 60
    while worker.stats.commands < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    produce(bootstrap, topic, frames_for([item, item], pics[1:3], "dock-1"))
    thread.join(90)
    assert worker.stats.frames == 3
    assert worker.stats.commands == 1 and worker.stats.cache_hits == 2
    commands = consume_all(bootstrap, settings.kafka.commands_topic, expect=1)
    assert [json.loads(m.value())["item_id"] for m in commands] == [item]
    stored = redis.Redis.from_url(redis_url).get(f"{namespace}:{item}")
    assert json.loads(stored)["chute"] == json.loads(commands[0].value())["chute"]


def test_corrupt_frames_go_to_the_dead_letter_topic_while_good_frames_flow(settings_for, namespace, bootstrap):
    # the default names: frames.dlq matches the frames pattern, and the worker must not read its own DLQ
    settings = settings_for(kafka={"dlq_topic": f"{namespace}-frames.dlq"})
    topic = f"{namespace}-frames.dock-9"
    ensure_topics(settings.kafka, {topic: 1})
    good = photos(6, seed=3)
    jpeg = good[0][1]
    bad = {
        f"{namespace}-trunc": jpeg[: len(jpeg) // 3],
        f"{namespace}-random": np.random.default_rng(0).bytes(4096),
        f"{namespace}-zero": b"",
    }
    frames = []
    for i, (_, pic) in enumerate(good):
        frames.append((f"{namespace}-good-{i}", pic, {"captured-at": str(NOW_MS)}))
        if i < len(bad):
            key, value = list(bad.items())[i]
            frames.append((key, value, {"captured-at": str(NOW_MS)}))
    frames.append(("", good[1][1], {}))  # no key, no item-id header: unidentifiable
    produce(bootstrap, topic, frames)
    worker = build_worker(settings)
    start(worker, idle_exit_s=6).join(90)
    assert worker.stats.frames == len(frames)  # the dead letters themselves were not read back
    assert sum(worker.stats.dead_letters.values()) == 4

    commands = consume_all(bootstrap, settings.kafka.commands_topic, expect=6)
    assert sorted(json.loads(m.value())["item_id"] for m in commands) == sorted(
        f"{namespace}-good-{i}" for i in range(6)
    )
    assert {json.loads(m.value())["station_id"] for m in commands} == {"dock-9"}  # from the topic name
    dead = consume_all(bootstrap, settings.kafka.dlq_topic, expect=4)
    reasons = {}
    for m in dead:
        headers = dict(m.headers())
        reasons[(m.key() or b"").decode()] = headers["dlq-reason"].decode()
        assert headers["dlq-source-topic"].decode() == topic and headers["dlq-worker-id"]
        assert headers["dlq-error-message"]
    assert reasons == {
        f"{namespace}-trunc": "corrupt_image",
        f"{namespace}-random": "unknown_format",
        f"{namespace}-zero": "empty_payload",
        "": "missing_item_id",
    }
    dead_values = {(m.key() or b"").decode(): m.value() for m in dead}
    assert dead_values[f"{namespace}-trunc"] == bad[f"{namespace}-trunc"]  # the original bytes, untouched


def test_routing_continues_while_redis_is_down_and_the_cache_recovers(settings_for, namespace, bootstrap, own_redis):
    settings = settings_for(
        redis={"url": own_redis.url, "retry_after_s": 0.2, "timeout_s": 0.2}, batch={"max_size": 8, "max_wait_ms": 5}
    )
    topic = f"{namespace}-frames.dock-1"
    ensure_topics(settings.kafka, {topic: 1})
    pics = photos(12, seed=9)
    worker = build_worker(settings)
    thread = start(worker, max_frames=12, idle_exit_s=60)

    def wait_for(n):
        deadline = time.monotonic() + 60
        while worker.stats.commands < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.stats.commands >= n

    produce(bootstrap, topic, frames_for([f"{namespace}-a{i}" for i in range(4)], pics[:4], "dock-1"))
    wait_for(4)
    assert worker.pipeline.cache.available
    own_redis.service.stop()
    produce(bootstrap, topic, frames_for([f"{namespace}-b{i}" for i in range(4)], pics[4:8], "dock-1"))
    wait_for(8)  # routed without the cache
    assert not worker.pipeline.cache.available
    own_redis.service.start()
    time.sleep(0.3)
    produce(bootstrap, topic, frames_for([f"{namespace}-c{i}" for i in range(4)], pics[8:], "dock-1"))
    thread.join(90)
    assert worker.stats.commands == 12
    assert worker.pipeline.cache.available  # recovered
    r = redis.Redis.from_url(own_redis.url)
    assert all(r.get(f"{namespace}:{namespace}-c{i}") for i in range(4))


def test_a_batch_slower_than_max_poll_interval_does_not_get_the_worker_evicted(settings_for, namespace, bootstrap):
    """A model stalled for longer than max.poll.interval.ms: the loop keeps polling, nothing repeats."""
    settings = settings_for(
        kafka={"session_timeout_ms": 6000, "max_poll_interval_ms": 6000}, batch={"max_size": 4, "max_wait_ms": 5}
    )
    topic = f"{namespace}-frames.dock-1"
    ensure_topics(settings.kafka, {topic: 1})
    items = [f"{namespace}-{i}" for i in range(12)]
    produce(bootstrap, topic, frames_for(items, photos(12, seed=2), "dock-1"))
    worker = build_worker(settings)
    process, stalled = worker.pipeline.process, []

    def stall_once(raws, *rest):
        if not stalled:
            stalled.append(True)
            time.sleep(9)  # 1.5x max.poll.interval.ms
        return process(raws, *rest)

    worker.pipeline.process = stall_once
    start(worker, max_frames=12, idle_exit_s=30).join(120)
    assert worker.stats.frames == 12 and worker.stats.slow_batches == 1
    commands = consume_all(bootstrap, settings.kafka.commands_topic, expect=12)
    assert sorted(json.loads(m.value())["item_id"] for m in commands) == sorted(items)  # each once
    assert worker.stats.revoked_dropped == 0


def test_a_partition_the_broker_stops_serving_is_said_not_silent(settings_for, namespace, bootstrap):
    """Found in a 7-minute paced soak: the worker polled on, healthy by every sign, while a station's frames
    waited on the broker and none arrived, and nothing was logged. The local broker (Tansu) answers every
    fetch of a partition empty once reading to the fetch offset takes longer than ``fetch.wait.max.ms``,
    and that time grows with the record batches the partition holds; a camera sends one frame per batch.
    Here: 8,000 one-frame batches and a 1 ms fetch wait. Whatever the broker does, the worker must not be
    silent: it reads every frame, or it says which partition gives none while frames wait."""
    n = 8_000
    settings = settings_for(kafka={"fetch_wait_max_ms": 1, "fetch_stall_s": 2}, observe={"stats_interval_ms": 500})
    topic = f"{namespace}-frames.dock-1"
    ensure_topics(settings.kafka, {topic: 1})
    camera = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "batch.num.messages": 1})
    pic = photos(1, seed=5)[0][1]
    for item, value, headers in frames_for([f"{namespace}-{i}" for i in range(n)], [(0, pic)] * n, "dock-1"):
        while True:
            try:
                camera.produce(topic, value, item.encode(), headers=list(headers.items()))
                break
            except BufferError:
                camera.poll(0.05)
        camera.poll(0)
    assert camera.flush(60) == 0
    worker = build_worker(settings)
    with capture_logs() as events:
        thread = start(worker)
        stalls = lambda: [e for e in events if e["event"] == "worker.fetch_stalled"]  # noqa: E731
        deadline = time.monotonic() + 120
        while worker.stats.frames < n and not stalls() and time.monotonic() < deadline:
            time.sleep(0.2)
        worker.stop_event.set()
        thread.join(30)
    assert worker.stats.frames == n or stalls(), "frames waited on the broker, none arrived, nothing was said"
    for stall in stalls():
        assert stall["partition"] == f"{topic}[0]" and 0 < stall["waiting_frames"] <= n - worker.stats.frames


def test_a_backlog_past_its_deadline_drains_to_the_late_chute_without_the_model(
    settings_for, namespace, bootstrap, routes, tmp_path
):
    """After an outage the frames waiting on the broker are older than the station's scan-to-divert budget:
    their items have passed the diverter. Each gets one ``late`` command to the late chute (even with two
    cameras whose views land in different batches), the model runs only for fresh frames, and fresh items
    behind the backlog are classified as usual."""
    table = tmp_path / "late-routes.yaml"
    table.write_text(routes.read_text() + "decision_deadline_ms: 5000\nlate_chute: RECIRC\n")
    settings = settings_for(routes=table, batch={"max_size": 4, "max_wait_ms": 5})
    topic = f"{namespace}-frames.dock-1"
    ensure_topics(settings.kafka, {topic: 1})
    pics = photos(4, seed=3)
    old = str(int(time.time() * 1000) - 60_000)  # a minute ago: the worker was down
    backlog = [f"{namespace}-old-{i}" for i in range(60)]
    views = [  # two cameras per item; the second camera's view three items later, so in another batch
        (item, pics[(k + cam) % 4][1], {"item-id": item, "station-id": "dock-1", "camera-id": f"cam-{cam}",
                                        "captured-at": old})
        for k, item in enumerate(backlog) for cam in (0, 1)
    ]  # fmt: skip
    views.sort(key=lambda v: backlog.index(v[0]) + 3 * int(v[2]["camera-id"][-1]))
    produce(bootstrap, topic, views)
    fresh = [f"{namespace}-new-{i}" for i in range(8)]
    produce(bootstrap, topic, [(i, p, h | {"captured-at": str(int(time.time() * 1000))})
                               for i, p, h in frames_for(fresh, pics * 2, "dock-1")])  # fmt: skip
    worker = build_worker(settings)
    start(worker, max_frames=len(views) + len(fresh), idle_exit_s=30).join(120)
    commands = [json.loads(m.value()) for m in consume_all(bootstrap, settings.kafka.commands_topic, expect=68)]
    by_item = {}
    for c in commands:
        assert c["item_id"] not in by_item, f"a second command for {c['item_id']}"
        by_item[c["item_id"]] = c
    assert {by_item[i]["reason"] for i in backlog} == {"late"} and {by_item[i]["chute"] for i in backlog} == {"RECIRC"}
    assert all(by_item[i]["label"] is None for i in backlog)
    assert {by_item[i]["reason"] for i in fresh} <= {"classified", "low_confidence", "unknown_sku"}
    # a second camera's view in a later batch is another view of a pass already commanded: a cache hit
    late, hits = worker.stats.late_frames, worker.stats.cache_hits
    assert late + hits == 120 and late >= 60 and len(by_item) == 68
    assert worker.metrics.registry.get_sample_value("sorter_late_frames_total", {"station": "dock-1"}) == late
    assert worker.metrics.registry.get_sample_value("sorter_frames_decoded_total") == 8  # the model saw only these
