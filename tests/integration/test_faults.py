"""Faults a conveyor line sees: the broker unreachable at start-up and during a run, rebalances."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest
from confluent_kafka import Consumer, Producer

from sorter.services import free_port, tansu_broker
from sorter.stream.app import build_worker
from sorter.stream.kafka import ensure_topics
from tests.figures import report
from tests.integration.conftest import consume_all, produce
from tests.integration.faults import Proxy
from tests.integration.test_worker import frames_for, photos

pytestmark = pytest.mark.integration


@pytest.fixture
def cut_off_broker(tmp_path):
    """A broker that clients reach only through a proxy the test can cut (it advertises the proxy)."""
    real, front = free_port(), free_port()
    broker = tansu_broker(port=real, workdir=tmp_path)
    url = f"tcp://127.0.0.1:{front}"
    broker.argv[broker.argv.index("--advertised-listener-url") + 1] = url
    broker.start()
    proxy = Proxy(real, front)
    yield f"127.0.0.1:{front}", proxy
    proxy.down()
    broker.stop()


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_broker_unreachable_at_start_up_and_during_a_run_loses_nothing(settings_for, namespace, cut_off_broker):
    bootstrap, proxy = cut_off_broker
    settings = settings_for(
        kafka={"bootstrap_servers": bootstrap, "startup_timeout_s": 60}, batch={"max_size": 4, "max_wait_ms": 5}
    )
    topic = f"{namespace}-frames.dock-1"
    pics = photos(20, seed=8)
    holder: dict = {}

    def start() -> None:  # the broker is unreachable: start-up waits with backoff instead of crashing
        try:
            holder["worker"] = worker = build_worker(settings)
            worker.run(idle_exit_s=120)
        except BaseException as exc:  # surfaced by the assertions below
            holder["error"] = exc

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    time.sleep(3)
    assert "worker" not in holder and "error" not in holder and thread.is_alive()  # still waiting, no crash
    proxy.up()
    wait_until(lambda: "worker" in holder or "error" in holder, 60, "the worker to start")
    worker = holder["worker"]
    ensure_topics(settings.kafka, {topic: 1})
    produce(bootstrap, topic, frames_for([f"{namespace}-a{i}" for i in range(10)], pics[:10], "dock-1"))
    wait_until(lambda: worker.stats.commands >= 10, 60, "the first 10 commands")

    # the next batch is in the model when the network goes: its commands cannot be delivered for 45 s,
    # longer than message.timeout.ms (30 s); it is re-sent in place until the broker is back
    process, in_model = worker.pipeline.process, threading.Event()

    def slow(raws, *rest):
        in_model.set()
        time.sleep(1.0)
        return process(raws, *rest)

    worker.pipeline.process = slow
    produce(bootstrap, topic, frames_for([f"{namespace}-b{i}" for i in range(4)], pics[10:14], "dock-1"))
    assert in_model.wait(30)
    proxy.down()  # the network goes; frames keep coming (the cameras' producer buffers them)
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "message.timeout.ms": 120_000})
    for item, value, headers in frames_for([f"{namespace}-b{i}" for i in range(4, 10)], pics[14:], "dock-1"):
        p.produce(topic, value, item.encode(), headers=list(headers.items()))
    time.sleep(45)
    assert thread.is_alive() and "error" not in holder, holder.get("error")  # no exit while the broker is gone
    proxy.up()
    assert p.flush(60) == 0
    wait_until(lambda: worker.stats.commands >= 20, 90, "the 10 commands after the outage")
    worker.stop_event.set()
    thread.join(60)
    assert "error" not in holder, holder.get("error")

    commands = consume_all(bootstrap, settings.kafka.commands_topic, expect=20)
    counts = Counter(json.loads(m.value())["item_id"] for m in commands)
    assert set(counts) == {f"{namespace}-a{i}" for i in range(10)} | {f"{namespace}-b{i}" for i in range(10)}
    report(
        "broker cut off at start-up and for 45 s mid-run",
        items=20,
        commands=sum(counts.values()),
        duplicates=sum(counts.values()) - 20,
        lost=0,
        producer_restarts=worker.stats.producer_restarts,
    )


def test_workers_joining_and_leaving_mid_run_lose_no_item(settings_for, namespace, bootstrap):
    """Two workers share a group; a third joins and leaves while they drain: every item is routed. The
    workers run as on a line (no idle exit): the test waits for every item's command, however long the
    broker takes over each rebalance."""
    n = 400
    settings = settings_for(batch={"max_size": 8, "max_wait_ms": 5})
    topic = f"{namespace}-frames.dock-1"
    ensure_topics(settings.kafka, {topic: 6})
    pics = photos(n, seed=13)
    items = [f"{namespace}-{i}" for i in range(n)]
    produce(bootstrap, topic, frames_for(items, pics, "dock-1"))

    def worker_in_thread(name: str):
        w = build_worker(settings.model_copy(update={"worker_id": f"{namespace}-{name}"}))
        process = w.pipeline.process

        def slowed(*args):  # ~25 frames/s per worker: the backlog outlasts the rebalances
            time.sleep(0.3)
            return process(*args)

        w.pipeline.process = slowed
        t = threading.Thread(target=w.run, daemon=True)
        t.start()
        return w, t

    reader = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{namespace}-reader",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "topic.metadata.refresh.interval.ms": 1000,  # the commands topic appears when the workers start
        }
    )
    reader.subscribe([settings.kafka.commands_topic])
    counts: Counter = Counter()

    def read_commands() -> None:
        for m in reader.consume(500, 0.2):
            if m.error() is None:
                counts[json.loads(m.value())["item_id"]] += 1

    try:
        a, ta = worker_in_thread("a")
        b, tb = worker_in_thread("b")
        wait_until(lambda: a.stats.frames + b.stats.frames >= 60, 120, "the first frames")
        c, tc = worker_in_thread("c")  # joins: a rebalance
        wait_until(lambda: c.stats.frames > 0 or a.stats.frames + b.stats.frames >= n, 120, "the third worker")
        c.stop_event.set()  # leaves: another rebalance
        tc.join(60)
        assert not tc.is_alive(), "the third worker did not stop"

        def all_routed() -> bool:
            read_commands()
            return len(counts) >= n

        wait_until(all_routed, 240, "every item's command")
        for w, t in ((a, ta), (b, tb)):
            w.stop_event.set()
            t.join(60)
        end = time.monotonic() + 2.0  # catch any late repeat
        while time.monotonic() < end:
            read_commands()
    finally:
        reader.close()
    assert set(counts) == set(items)  # none lost
    duplicates = sum(counts.values()) - n
    revoked = sum(w.stats.revoked_dropped for w in (a, b, c))
    report(
        "rebalances (2 workers, a third joins and leaves)",
        items=n,
        frames_by_worker=f"{a.stats.frames}/{b.stats.frames}/{c.stats.frames}",
        commands=sum(counts.values()),
        duplicates=duplicates,
        lost=0,
    )
    assert duplicates <= revoked + 3 * settings.batch.max_size  # repeats only from work handed over


def test_single_partition_station_topics_spread_across_workers(settings_for, namespace, bootstrap):
    """8 stations, one partition each (what `simulate` creates, common on real lines), 2 workers: each owns
    4 +- 1. When one leaves, the other keeps its partitions without a pause and takes the rest."""
    settings = settings_for(batch={"max_size": 8, "max_wait_ms": 5})
    ensure_topics(settings.kafka, {f"{namespace}-frames.s{i}": 1 for i in range(8)})
    workers, threads = [], []
    for name in ("a", "b"):
        w = build_worker(settings.model_copy(update={"worker_id": f"{namespace}-{name}"}))
        workers.append(w)
        threads.append(threading.Thread(target=w.run, daemon=True))
        threads[-1].start()
    a, b = workers
    wait_until(lambda: len(a.assigned) + len(b.assigned) == 8 and a.assigned and b.assigned, 60, "both to own some")
    time.sleep(2)  # settled
    shares = sorted([len(a.assigned), len(b.assigned)])
    assert shares[0] >= 3, f"partitions per worker: {shares}"
    kept = set(a.assigned)
    revoked_before = a.stats.partitions_revoked
    b.stop_event.set()
    threads[1].join(60)
    wait_until(lambda: len(a.assigned) == 8, 60, "the survivor to take every partition")
    assert kept <= a.assigned and a.stats.partitions_revoked == revoked_before  # nothing of its own paused
    a.stop_event.set()
    threads[0].join(60)
    report("8 single-partition stations, 2 workers", partitions_per_worker=shares, survivor_revoked=0)
