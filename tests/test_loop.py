"""The Kafka loop with in-memory fakes at the seams (tests/fakes.py): rebalances inside consume(), delivery
failures, outages, shutdown. Real broker and Redis: tests/integration."""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import replace

import pytest
from confluent_kafka import KafkaError
from prometheus_client import generate_latest

from sorter.settings import load_settings
from sorter.stream.cache import MemoryCache
from sorter.stream.delivery import TransactionAborted, TransactionalProducer
from sorter.stream.kafka import KafkaClients
from sorter.stream.pipeline import Decoder, Pipeline
from sorter.stream.routing import RoutingTable
from sorter.stream.timeline import STAGES
from sorter.stream.worker import Worker
from tests.fakes import NOW_MS, FakeCluster, FakeModel, photo

TOPIC = "frames.dock-1"
COMMANDS = "sort.commands"


def settings(**overrides):
    base = {
        "kafka": {"bootstrap_servers": "fake:9092"},
        "batch": {"max_size": 4, "max_wait_ms": 5},
        "observe": {"enabled": False},
        "worker_id": "w-1",
        "shutdown_deadline_s": 5,
    }
    for key, value in overrides.items():
        base[key] = base[key] | value if isinstance(base.get(key), dict) else value
    return load_settings(**base)


def pipeline(model=None, cache=None) -> Pipeline:
    routes = RoutingTable(
        default_chute="C-99", review_chute="REVIEW", min_confidence=0.5, routes={"SKU-0": "C-00", "SKU-1": "C-01"}
    )
    return Pipeline(model or FakeModel(), routes, cache or MemoryCache(), Decoder(2, 10_000), worker_id="w-1")


def new_worker(cluster: FakeCluster, s, p=None, **kwargs) -> Worker:
    """A worker whose consumer and producers are the cluster's fakes."""
    return Worker(s, p or pipeline(), clients=KafkaClients(cluster.consumer, cluster.producer), **kwargs)


def backlog(cluster: FakeCluster, n: int, topic: str = TOPIC, prefix: str = "i") -> list[str]:
    cluster.create(topic)
    items = [f"{prefix}{i}" for i in range(n)]
    for i, item in enumerate(items):
        headers = [("item-id", item.encode()), ("captured-at", str(NOW_MS).encode())]
        cluster.append(topic, photo(i % 2, 0.9), item.encode(), headers)
    return items


def routed(cluster: FakeCluster) -> list[str]:
    return [json.loads(m.value())["item_id"] for m in cluster.messages(COMMANDS)]


@pytest.mark.parametrize("strategy", ["range", "cooperative-sticky"])
@pytest.mark.parametrize("mid_collect", [False, True], ids=["between-batches", "mid-collect"])
def test_a_partition_revoked_and_given_back_inside_one_consume_loses_no_frame(strategy, mid_collect):
    """A rebalance (rolling update, KEDA, a new station topic) that revokes the partition and assigns it
    back, then fetches from the committed offset, all in one consume(). Frames collected before the
    revocation are dropped (read again); those fetched after it are kept: every item routed, once."""
    cluster = FakeCluster()
    items = backlog(cluster, 40)
    rebalanced = []

    def rebalance_once(_result):
        if not rebalanced:
            rebalanced.append(True)
            w.consumer.schedule(("revoke", [(TOPIC, 0)]), ("assign", [(TOPIC, 0)]), after_calls=int(mid_collect))

    w = new_worker(
        cluster, settings(kafka={"assignment_strategy": strategy}, batch={"max_size": 8, "max_wait_ms": 50}),
        on_batch=rebalance_once,
    )  # fmt: skip
    w.consumer.max_per_call = 3
    w.consumer.schedule(("assign", [(TOPIC, 0)]))
    w.run(idle_exit_s=0.3)
    assert rebalanced and (w.stats.revoked_dropped > 0) == mid_collect
    assert sorted(routed(cluster)) == sorted(items)  # none lost, none twice
    assert cluster.committed[(TOPIC, 0)] == 40


def test_after_a_failed_batch_the_next_batch_in_flight_sends_nothing():
    """Batch k cannot be delivered (not retriable: the topic is not ours to write); batch k+1, already in
    flight, must not send its commands, or a station's commands arrive out of order after the restart."""
    cluster = FakeCluster()
    items = backlog(cluster, 24)
    poison = items[9]  # in the third batch of 4
    cluster.reject = lambda topic, key, value: (
        KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "not authorized")
        if topic == COMMANDS and poison.encode() in value
        else None
    )
    w = new_worker(cluster, settings(), pipeline(FakeModel(delay_s=0.05)))
    w.consumer.schedule(("assign", [(TOPIC, 0)]))
    with pytest.raises(Exception, match=r"not authorized|TOPIC_AUTHORIZATION"):
        w.run(idle_exit_s=0.5)
    sent = routed(cluster)
    assert items[:8] == sent[:8]  # the batches before the failed one
    assert not set(sent) & set(items[12:]), "a batch after the failed one sent its commands"
    assert cluster.committed.get((TOPIC, 0), 0) == 8  # the failed batch is the next to be read


def test_a_broker_outage_longer_than_the_message_timeout_is_waited_out_not_fatal():
    """Deliveries time out (message.timeout.ms passed) while the broker is away: the batch is re-sent in
    place with backoff until it is back; the worker neither exits nor loses an item; not ready meanwhile."""
    cluster = FakeCluster()
    items = backlog(cluster, 12)
    outage: dict = {}

    def cut_after_first(_result):
        if "start" not in outage:
            outage["start"] = time.monotonic()
            cluster.down = True

    w = new_worker(cluster, settings(), on_batch=cut_after_first)
    w.consumer.schedule(("assign", [(TOPIC, 0)]))
    errors: list[BaseException] = []

    def run():
        try:
            w.run(idle_exit_s=1.0)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while cluster.flushes_while_down < 2 and time.monotonic() < deadline and not errors:
        time.sleep(0.01)
    assert not errors, errors
    from sorter.stream.observe import readiness

    assert any("deliver" in p for p in readiness(w)), readiness(w)
    cluster.down = False
    thread.join(20)
    assert not errors, errors
    assert sorted(set(routed(cluster))) == sorted(items)
    assert cluster.committed[(TOPIC, 0)] == 12


def test_exactly_once_an_aborted_transaction_leaves_no_error_for_the_next_one():
    cluster = FakeCluster()
    p = TransactionalProducer({"transactional.id": "t"}, factory=cluster.producer)
    raw = p._producer
    raw.fail_commit = [KafkaError(KafkaError._STATE, "abortable", txn_requires_abort=True)]
    p.begin()
    p.produce(COMMANDS, b"a", b"k")
    with pytest.raises(TransactionAborted):
        p.commit([], "meta")
    assert raw.transactions[-1] == "abort"
    p.begin()
    p.produce(COMMANDS, b"b", b"k")
    p.commit([], "meta")  # must not raise the purged messages of the aborted transaction
    assert raw.transactions[-1] == "commit"


def test_exactly_once_a_commit_that_times_out_is_resumed_until_the_broker_answers_not_left_open():
    """A timed-out commit_transaction is resumed by calling it again (librdkafka's contract; an abort would
    only conflict with it), with a backoff, while the worker reports itself blocked."""
    cluster = FakeCluster()
    waits = []
    p = TransactionalProducer({"transactional.id": "t"}, factory=cluster.producer, on_wait=waits.append)
    raw = p._producer
    raw.fail_commit = [KafkaError(KafkaError._TIMED_OUT, "slow", retriable=True)] * 3
    p.begin()
    p.produce(COMMANDS, b"a", b"k")
    p.commit([], "meta")
    assert raw.transactions[-1] == "commit" and "abort" not in raw.transactions and len(waits) == 3
    assert [m.value() for m in cluster.messages(COMMANDS)] == [b"a"]


def test_exactly_once_a_stop_ends_the_wait_for_a_commit():
    from sorter.stream.delivery import DeliveryInterrupted

    cluster = FakeCluster()
    stopping = []
    p = TransactionalProducer({"transactional.id": "t"}, factory=cluster.producer, stop=lambda: bool(stopping))
    p._producer.fail_commit = [KafkaError(KafkaError._TIMED_OUT, "slow", retriable=True)] * 100
    p.begin()
    p.produce(COMMANDS, b"a", b"k")
    threading.Timer(0.3, lambda: stopping.append(True)).start()
    with pytest.raises(DeliveryInterrupted):
        p.commit([], "meta")
    assert cluster.messages(COMMANDS) == []  # nothing visible; the broker aborts it after transaction.timeout.ms


def test_exactly_once_transactional_id_is_stable_across_restarts(monkeypatch):
    """A replaced pod must fence its predecessor: same id for the same slot, whatever the process id."""
    cluster = FakeCluster()
    ids = []
    for pid in (101, 202):
        monkeypatch.setattr("os.getpid", lambda pid=pid: pid)
        s = settings(kafka={"delivery": "exactly-once"}, worker_id=None)
        config = new_worker(cluster, s).delivery.config
        ids.append(config["transactional.id"])
        assert int(config["transaction.timeout.ms"]) < 60_000
    assert ids[0] == ids[1]


def test_stop_with_a_wedged_batch_returns_within_the_shutdown_deadline_and_closes_pools():
    cluster = FakeCluster()
    backlog(cluster, 8)

    class ClosingCache(MemoryCache):
        closed = False

        def close(self):
            self.closed = True

    cache = ClosingCache()
    p = pipeline(FakeModel(delay_s=6), cache)
    w = new_worker(cluster, settings(shutdown_deadline_s=1.0), p)
    w.consumer.schedule(("assign", [(TOPIC, 0)]))
    thread = threading.Thread(target=w.run, daemon=True)
    thread.start()
    time.sleep(0.5)  # the first batch is in the model now
    stopped = time.monotonic()
    w.stop_event.set()
    thread.join(10)
    took = time.monotonic() - stopped
    assert not thread.is_alive() and took < 1.0 + 1.0, f"stop took {took:.1f} s"
    assert p.decoder.pool._shutdown and cache.closed
    assert cluster.committed.get((TOPIC, 0), 0) == 0  # the wedged batch was not committed


def test_dead_letters_over_the_size_limits_go_out_without_their_payload_and_nothing_stops():
    """A 25 MB frame, a 1.2 MB corrupt one, a 300 KB corrupt one the broker's topic limit refuses, a 0-byte
    frame and a frame with a 2 MB camera-id header, among good frames: every good frame is routed, every
    bad one dead-lettered (payload omitted where it cannot fit, with its size and SHA-256), no exception."""
    import hashlib

    cluster = FakeCluster()
    cluster.max_message_bytes["frames.dlq"] = 250_000  # the broker's limit for that topic, below ours
    cluster.create(TOPIC)
    ok = [("captured-at", str(NOW_MS).encode())]
    bad = {
        "huge": b"\xff\xd8\xff" + b"\0" * 25_000_000,
        "corrupt-1m2": photo(0, 0.9)[:40] + b"\x17" * 1_200_000,
        "corrupt-300k": photo(0, 0.9)[:40] + b"\x17" * 300_000,
        "zero": b"",
        "camera": photo(1, 0.9),
    }
    good = []
    for i, (key, value) in enumerate(bad.items()):
        good.append(f"good-{i}")
        cluster.append(TOPIC, photo(i % 2, 0.9), f"good-{i}".encode(), ok)
        headers = ok + ([("camera-id", b"c" * 2_000_000)] if key == "camera" else [])
        cluster.append(TOPIC, value, key.encode(), headers)
    s = settings(batch={"max_payload_bytes": 20_000_000})
    w = new_worker(cluster, s)
    w.consumer.schedule(("assign", [(TOPIC, 0)]))
    w.run(idle_exit_s=0.5)
    assert sorted(routed(cluster)) == sorted(good)
    dead = {m.key().decode() if m.key() else None: m for m in cluster.messages("frames.dlq")}
    assert set(dead) == set(bad)
    for key, m in dead.items():
        h = dict(m.headers())
        assert h["dlq-reason"] and h["dlq-source-offset"]
        original = bad[key]
        if len(original) >= 250_000 or key == "camera":
            assert h["dlq-payload-omitted"] == b"true" and not m.value()
            assert int(h["dlq-payload-size"]) == len(original)
            assert h["dlq-payload-sha256"].decode() == hashlib.sha256(original).hexdigest()
        else:
            assert m.value() == original
    assert cluster.committed[(TOPIC, 0)] == 10


def test_a_fatal_producer_error_recreates_the_producer_and_sends_what_was_not_delivered():
    """E.g. an idempotent producer the broker forgot after a restart: a new producer, the batch re-sent."""
    cluster = FakeCluster()
    cluster.fatal_producers = 1
    items = backlog(cluster, 8)
    w = new_worker(cluster, settings())
    w.consumer.schedule(("assign", [(TOPIC, 0)]))
    w.run(idle_exit_s=0.5)
    assert sorted(routed(cluster)) == sorted(items)  # each once: nothing of the dead producer arrived
    assert len(cluster.producers) == 2 and w.stats.producer_restarts == 1
    assert cluster.committed[(TOPIC, 0)] == 8


def test_frames_collected_from_a_partition_handed_to_another_worker_are_read_by_it_not_lost():
    """Cooperative rebalance: dock-2 moves to another worker while frames of it sit in the batch being
    collected. They are dropped here, uncommitted; the new owner reads them from the committed offset.
    dock-1 stays and keeps flowing."""
    cluster = FakeCluster()
    one = backlog(cluster, 20, TOPIC, "a")
    two = backlog(cluster, 20, "frames.dock-2", "b")
    moved, owned = [], []

    def move_dock2(_result):
        owned.append((set(w.assigned), list(w.consumer.assigned)))
        if not moved:
            moved.append(True)  # in the second consume() of the next batch: frames of dock-2 are in it
            w.consumer.schedule(("revoke", [("frames.dock-2", 0)]), after_calls=1)

    s = settings(batch={"max_size": 8, "max_wait_ms": 50})
    w = new_worker(cluster, s, on_batch=move_dock2)
    w.consumer.max_per_call = 2
    assert w.consumer.config["partition.assignment.strategy"] == "cooperative-sticky"
    w.consumer.schedule(("assign", [(TOPIC, 0), ("frames.dock-2", 0)]))
    w.run(idle_exit_s=0.3)
    assert moved and owned[-1] == ({(TOPIC, 0)}, [(TOPIC, 0)])  # incremental: dock-1 was never unassigned
    assert w.stats.revoked_dropped > 0  # frames of dock-2 were in the batch being collected
    first = routed(cluster)
    assert set(one) <= set(first)
    handed = cluster.committed.get(("frames.dock-2", 0), 0)
    assert [i for i in first if i.startswith("b")] == two[:handed]  # nothing past the committed offset

    other = new_worker(cluster, s.model_copy(update={"worker_id": "w-2"}))
    other.consumer.schedule(("assign", [("frames.dock-2", 0)]))
    other.run(idle_exit_s=0.3)
    assert sorted(routed(cluster)) == sorted(one + two)  # each once
    assert cluster.committed[("frames.dock-2", 0)] == 20


def test_lost_partitions_are_delivered_but_not_committed():
    """The group moved on without us (session timed out): offsets are not ours to commit."""
    cluster = FakeCluster()
    items = backlog(cluster, 8)
    lost = []

    def lose(_result):
        if not lost:
            lost.append(True)
            w.consumer.schedule(("lost", [(TOPIC, 0)]))

    w = new_worker(cluster, settings(batch={"max_size": 2}), pipeline(FakeModel(delay_s=0.05)), on_batch=lose)
    w.consumer.schedule(("assign", [(TOPIC, 0)]))
    w.run(idle_exit_s=0.3)
    assert lost and not w.assigned
    sent = routed(cluster)
    assert sent == items[: len(sent)] and len(sent) >= 4  # the batch in flight at the loss was delivered
    assert cluster.committed[(TOPIC, 0)] == 2  # only the batch before the loss


def test_a_stop_while_the_broker_is_away_ends_within_the_deadline_uncommitted():
    cluster = FakeCluster()
    backlog(cluster, 8)
    cluster.down = True
    w = new_worker(cluster, settings(shutdown_deadline_s=1.5))
    w.consumer.schedule(("assign", [(TOPIC, 0)]))
    thread = threading.Thread(target=w.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while cluster.flushes_while_down < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    stopped = time.monotonic()
    w.stop_event.set()
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - stopped < 1.5 + 0.5
    assert routed(cluster) == [] and cluster.committed.get((TOPIC, 0), 0) == 0
    assert w.stats.unfinished_batches >= 1


def test_exactly_once_a_dead_letter_the_broker_refuses_for_its_size_is_sent_slim_in_a_new_transaction():
    cluster = FakeCluster()
    cluster.max_message_bytes["frames.dlq"] = 100_000
    cluster.create(TOPIC)
    cluster.append(TOPIC, photo(0, 0.9), b"good", [("captured-at", str(NOW_MS).encode())])
    cluster.append(TOPIC, b"\x17" * 300_000, b"bad", [("captured-at", str(NOW_MS).encode())])
    w = new_worker(cluster, settings(kafka={"delivery": "exactly-once"}))
    w.consumer.schedule(("assign", [(TOPIC, 0)]))
    w.run(idle_exit_s=0.5)
    assert routed(cluster) == ["good"]
    (dead,) = cluster.messages("frames.dlq")
    assert dict(dead.headers())["dlq-payload-omitted"] == b"true"
    assert cluster.producers[0].transactions.count("abort") == 1
    assert cluster.committed[(TOPIC, 0)] == 2 and w.stats.aborted_batches == 0


# -- found in review ---------------------------------------------------------------------------------
def test_a_header_name_that_is_not_utf8_is_a_dead_letter_not_a_crash_loop():
    """confluent-kafka raises inside Message.headers() for such a name: the frame is dead-lettered
    (bad_header, its headers left out), the frames around it routed."""
    cluster = FakeCluster()
    items = backlog(cluster, 2)
    bad = cluster.append(TOPIC, photo(0, 0.9), b"hostile", [("item-id", b"hostile")])
    bad.unreadable_headers = True
    cluster.append(TOPIC, photo(1, 0.9), b"after", [("item-id", b"after")])
    w = new_worker(cluster, settings())
    w.consumer.schedule(("assign", [(TOPIC, 0)]))
    w.run(idle_exit_s=0.5)
    assert sorted(routed(cluster)) == sorted([*items, "after"])
    (dead,) = cluster.messages("frames.dlq")
    h = dict(dead.headers())
    assert h["dlq-reason"] == b"bad_header" and h["dlq-headers-omitted"].startswith(b"unreadable")
    assert dead.value() == photo(0, 0.9) and cluster.committed[(TOPIC, 0)] == 4


def test_a_dead_letter_the_topic_refuses_even_without_its_payload_goes_with_only_the_dlq_headers():
    """The DLQ topic's limit (250 kB) is below dlq_max_bytes and the frame's own headers alone exceed
    it: the full form and the slim form are refused; the minimal one gets through."""
    cluster = FakeCluster()
    cluster.max_message_bytes["frames.dlq"] = 250_000
    items = backlog(cluster, 2)
    cluster.append(TOPIC, b"\x17" * 400_000, b"big", [("item-id", b"big"), ("note", b"n" * 500_000)])
    w = new_worker(cluster, settings())
    w.consumer.schedule(("assign", [(TOPIC, 0)]))
    w.run(idle_exit_s=0.5)
    assert sorted(routed(cluster)) == sorted(items)
    (dead,) = cluster.messages("frames.dlq")
    h = dict(dead.headers())
    assert "note" not in h and h["dlq-headers-omitted"].startswith(b"2 headers")
    assert h["dlq-payload-omitted"] == b"true" and int(h["dlq-payload-size"]) == 400_000
    assert cluster.committed[(TOPIC, 0)] == 3


def test_a_keepalive_does_not_stash_an_unbounded_backlog_of_a_partition_assigned_meanwhile():
    cluster = FakeCluster()
    backlog(cluster, 4, TOPIC, "a")
    backlog(cluster, 200, "frames.dock-2", "b")
    s = settings(kafka={"session_timeout_ms": 1000, "max_poll_interval_ms": 1000})
    model = FakeModel(delay_s=1.0)  # > max.poll.interval / 3: the keep-alive polls
    sizes, peak = [], [0]
    w = new_worker(cluster, s, pipeline(model), on_batch=lambda r: sizes.append(r.frames))
    w.consumer.schedule(("assign", [(TOPIC, 0)]))

    def driver():
        while w.stats.slow_batches == 0:
            time.sleep(0.005)
        w.consumer.schedule(("assign", [("frames.dock-2", 0)]))  # a member left, or a new station topic
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            peak[0] = max(peak[0], len(w._stash))
            time.sleep(0.01)
        model.delay_s = 0

    threading.Thread(target=driver, daemon=True).start()
    w.run(idle_exit_s=1.0)
    assert max(sizes) <= 4 and peak[0] <= 4, (peak, sizes[:4])
    assert len(set(routed(cluster))) == 204


def test_exactly_once_an_abort_keeps_frames_stashed_from_partitions_it_does_not_rewind():
    cluster = FakeCluster()
    backlog(cluster, 4, TOPIC, "a")
    two = backlog(cluster, 6, "frames.dock-2", "b")
    s = settings(kafka={"delivery": "exactly-once", "session_timeout_ms": 1000, "max_poll_interval_ms": 1000})
    model = FakeModel(delay_s=0.8)
    w = new_worker(cluster, s, pipeline(model))
    cluster.fail_commit = [KafkaError(KafkaError._STATE, "abortable", txn_requires_abort=True)]
    w.consumer.schedule(("assign", [(TOPIC, 0), ("frames.dock-2", 0)]))
    w.consumer.max_per_call = 4
    w.settings.batch.max_size = 4  # the first batch holds dock-1 only (the fake fetches round-robin per call)

    def driver():
        while w.stats.aborted_batches == 0:
            time.sleep(0.005)
        model.delay_s = 0

    threading.Thread(target=driver, daemon=True).start()
    w.run(idle_exit_s=1.5)
    assert w.stats.aborted_batches == 1
    assert set(two) <= set(routed(cluster))
    assert cluster.committed[("frames.dock-2", 0)] == 6


def test_a_partial_timeout_re_sends_the_station_s_later_commands_too():
    """librdkafka may deliver messages 4-5 after 2-3 timed out: 2-5 are sent again, in order, so a
    station's log ends in the order its commands were made."""
    cluster = FakeCluster()
    items = backlog(cluster, 5)
    failed = []

    def once(topic, key, value):
        if topic == COMMANDS and b'"i1"' in value and not failed:
            failed.append(True)
            return KafkaError(KafkaError._MSG_TIMED_OUT, "Local: Message timed out")
        return None

    cluster.reject = once
    w = new_worker(cluster, settings(batch={"max_size": 5, "max_wait_ms": 20}))
    w.consumer.schedule(("assign", [(TOPIC, 0)]))
    w.run(idle_exit_s=1.0)
    sent = routed(cluster)
    assert sent[-4:] == items[1:], sent  # the log ends in order
    assert set(sent) == set(items)


def test_exactly_once_waits_for_the_coordinator_instead_of_exiting():
    """init_transactions times out while the broker is away (after a fatal error recreated the producer,
    or at start-up): the worker waits, not ready, and goes on when it answers."""
    cluster = FakeCluster()
    items = backlog(cluster, 4)
    cluster.fail_init = [KafkaError(KafkaError._TIMED_OUT, "coordinator not available", retriable=True)] * 3
    w = new_worker(cluster, settings(kafka={"delivery": "exactly-once"}))
    w.consumer.schedule(("assign", [(TOPIC, 0)]))
    w.run(idle_exit_s=1.0)
    assert sorted(routed(cluster)) == sorted(items) and w.delivery.retries >= 3


def test_exactly_once_fenced_once_recreates_fenced_again_at_once_stops():
    """Fenced once (the coordinator timed out our transaction during an outage): a new producer, the batch
    again. Fenced again right after: another live worker has our transactional.id; fencing it back would
    make the two take turns, so this one stops, saying why."""
    from sorter.stream.delivery import TransactionFenced

    fenced = KafkaError(KafkaError.PRODUCER_FENCED, "fenced", fatal=True)
    cluster = FakeCluster()
    items = backlog(cluster, 8)
    w = new_worker(cluster, settings(kafka={"delivery": "exactly-once"}, batch={"max_size": 4}))
    w.consumer.schedule(("assign", [(TOPIC, 0)]))
    orig = cluster.producer

    def producer(config):
        p = orig(config)
        if len(cluster.producers) == 1:
            p.fail_commit = [fenced]  # the first producer is fenced at its first commit
        return p

    w.delivery.factory = producer
    w.run(idle_exit_s=1.5)
    assert sorted(routed(cluster)) == sorted(items)
    assert len(cluster.producers) == 2 and w.stats.producer_restarts == 1

    cluster2 = FakeCluster()
    backlog(cluster2, 8)
    w2 = new_worker(cluster2, settings(kafka={"delivery": "exactly-once"}, batch={"max_size": 4}))
    w2.consumer.schedule(("assign", [(TOPIC, 0)]))
    orig2 = cluster2.producer

    def always_fenced(config):
        p = orig2(config)
        p.fail_commit = [fenced]
        return p

    w2.delivery.factory = always_fenced
    with pytest.raises(TransactionFenced, match=r"transactional\.id"):
        w2.run(idle_exit_s=1.5)
    assert len(cluster2.producers) == 2 and w2.consumer.closed
    assert cluster2.committed.get((TOPIC, 0), 0) == 0


def test_exactly_once_a_permanent_error_fails_the_batch_instead_of_looping():
    cluster = FakeCluster()
    backlog(cluster, 4)
    cluster.reject = lambda topic, key, value: (
        KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "not authorized") if topic == COMMANDS else None
    )
    w = new_worker(cluster, settings(kafka={"delivery": "exactly-once"}))
    w.consumer.schedule(("assign", [(TOPIC, 0)]))
    with pytest.raises(Exception, match="TOPIC_AUTHORIZATION"):
        w.run(idle_exit_s=1.0)
    assert w.stats.aborted_batches == 0 and cluster.committed.get((TOPIC, 0), 0) == 0


def test_exactly_once_dead_letters_refused_locally_then_by_the_broker_go_minimal():
    """The full form is over the client's message.max.bytes (swapped locally), the slim form over the
    topic's limit (refused by the broker, which purges the rest of the transaction): minimal forms go."""
    cluster = FakeCluster()
    cluster.max_message_bytes["frames.dlq"] = 100_000
    items = backlog(cluster, 2)
    for i in range(6):
        headers = [("item-id", f"big{i}".encode()), ("n", b"n" * 150_000)]
        cluster.append(TOPIC, b"\x17" * 700_000, f"big{i}".encode(), headers)
    s = settings(kafka={"delivery": "exactly-once", "client": {"message.max.bytes": "600000"}}, batch={"max_size": 8})
    w = new_worker(cluster, s)
    w.consumer.schedule(("assign", [(TOPIC, 0)]))
    w.run(idle_exit_s=1.0)
    assert sorted(routed(cluster)) == sorted(items)
    dead = cluster.messages("frames.dlq")
    assert len(dead) == 6 and all("dlq-headers-omitted" in dict(m.headers()) for m in dead)
    assert cluster.committed[(TOPIC, 0)] == 8


def test_exactly_once_waiting_for_the_coordinator_is_not_sticky():
    """After a wait ends, the worker is ready again and a wedged model is caught by liveness as usual;
    nothing waits at start-up (the producer is made at the first batch)."""
    from sorter.stream.observe import liveness, readiness

    cluster = FakeCluster()
    cluster.fail_init = [KafkaError(KafkaError._TIMED_OUT, "coordinator not available", retriable=True)]
    items = backlog(cluster, 4)
    w = new_worker(cluster, settings(kafka={"delivery": "exactly-once"}))
    assert cluster.producers == []  # nothing made (nor waited for) at start-up
    w.consumer.schedule(("assign", [(TOPIC, 0)]))
    w.run(idle_exit_s=1.0)
    assert sorted(routed(cluster)) == sorted(items) and w.delivery.retries == 1
    assert w.blocked_s is None and not any("deliver" in p for p in readiness(w))
    w.last_progress -= 100
    assert liveness(w, 60)


def test_a_nan_confidence_goes_to_review_and_stops_nothing():
    class NaNModel(FakeModel):
        def predict(self, images):
            out = super().predict(images)
            return [replace(p, confidence=float("nan")) if p.label == "bottle" else p for p in out]

    cluster = FakeCluster()
    items = backlog(cluster, 4)
    w = new_worker(cluster, settings(), pipeline(NaNModel()))
    w.consumer.schedule(("assign", [(TOPIC, 0)]))
    w.run(idle_exit_s=0.5)
    chutes = {json.loads(m.value())["item_id"]: json.loads(m.value())["chute"] for m in cluster.messages(COMMANDS)}
    assert set(chutes) == set(items) and chutes["i1"] == "REVIEW" and chutes["i0"] == "C-00"


def test_idle_exit_counts_from_the_assignment_not_from_start_up():
    """A group join takes seconds; --idle-exit must not end the run before the worker got any partition."""
    cluster = FakeCluster()
    items = backlog(cluster, 4)
    w = new_worker(cluster, settings())
    w.consumer.schedule(("assign", [(TOPIC, 0)]), after_calls=60)  # joins after ~0.3 s of polling
    w.run(idle_exit_s=0.1)
    assert sorted(routed(cluster)) == sorted(items)


def test_idle_exit_with_no_partition_ever_assigned_is_an_error_that_says_what_to_check():
    from sorter.errors import SorterError

    cluster = FakeCluster()
    w = new_worker(cluster, settings())
    w.consumer.schedule(("assign", []))  # joined, but the pattern matched nothing (or others own it all)
    with pytest.raises(SorterError, match=r"no partition.*FRAMES_PATTERN"):
        w.run(idle_exit_s=0.2)


def test_idle_exit_waits_out_a_rebalance_that_hands_a_backlog_over():
    """A cooperative handover on a slow coordinator: this worker is idle, the group rebalances (an empty
    incremental assignment first), and a partition with a backlog (left by a worker that went away) arrives
    later than --idle-exit after the last frame but sooner than it after the rebalance began. Exiting in
    between would leave that backlog to nobody."""
    cluster = FakeCluster()
    cluster.create(TOPIC, 2)
    mine = [f"i{i}" for i in range(3)]
    theirs = [f"j{i}" for i in range(4)]
    for partition, batch in ((0, mine), (1, theirs)):
        for item in batch:
            headers = [("item-id", item.encode()), ("captured-at", str(NOW_MS).encode())]
            cluster.append(TOPIC, photo(0, 0.9), item.encode(), headers, partition=partition)
    w = new_worker(cluster, settings())
    w.consumer.schedule(("assign", [(TOPIC, 0)]))
    w.consumer.schedule(("assign", []), after_s=0.6)  # the rebalance begins: nothing changes here yet
    w.consumer.schedule(("assign", [(TOPIC, 1)]), after_s=1.3)  # the handover completes
    w.run(idle_exit_s=1.0)
    assert sorted(routed(cluster)) == sorted(mine + theirs)


def test_idle_exit_when_the_group_never_answers_is_an_error_not_a_hang():
    """No assignment at all (coordinator not ready, no group ACL): a run with --idle-exit must end, with
    a message, after the idle time plus one session timeout."""
    from sorter.errors import SorterError

    cluster = FakeCluster()
    cluster.create(TOPIC)  # the pattern matches a topic: the group is what did not answer
    w = new_worker(cluster, settings(kafka={"session_timeout_ms": 1000, "metadata_refresh_ms": 100}))
    started = time.monotonic()
    with pytest.raises(SorterError, match=r"group 'sorter' assigned this worker nothing.*group ACL"):
        w.run(idle_exit_s=0.2)
    assert time.monotonic() - started < 10
    assert w.consumer.closed  # the clients are closed on the way out


def test_idle_exit_when_no_topic_matches_the_pattern_says_so():
    """librdkafka joins only once the pattern matches a topic: the usual cause, named as such."""
    from sorter.errors import SorterError

    cluster = FakeCluster()
    cluster.create("cameras.dock-1")  # not frames.*
    w = new_worker(cluster, settings(kafka={"session_timeout_ms": 1000, "metadata_refresh_ms": 100}))
    with pytest.raises(SorterError, match=r"no topic matches SORTER_KAFKA__FRAMES_PATTERN"):
        w.run(idle_exit_s=0.2)


def test_every_millisecond_of_an_item_has_a_stage():
    """The latency breakdown (timeline.py): every routed item's stages are all there, none negative, the
    ones up to delivery add up to captured -> delivered, and a slow model shows up as ``infer``."""
    cluster = FakeCluster()
    cluster.create(TOPIC)
    captured = int(time.time() * 1000) - 100  # photographed 100 ms before it reached the broker
    for i in range(6):
        headers = [("item-id", f"i{i}".encode()), ("captured-at", str(captured).encode())]
        cluster.append(TOPIC, photo(i % 2, 0.9), f"i{i}".encode(), headers)
    results = []
    w = new_worker(cluster, settings(), pipeline(FakeModel(delay_s=0.05)), on_batch=results.append)
    w.consumer.schedule(("assign", [(TOPIC, 0)]))
    w.run(max_frames=6)
    assert sum(len(r.commands) for r in results) == 6
    for r in results:
        t = r.times
        assert t.closed <= t.started <= t.looked_up <= t.decoded <= t.inferred <= t.routed <= t.delivered
        assert t.delivered <= t.committed
        for c in r.commands:
            stages = t.stages(c.captured_at, c.source.key)
            assert set(stages) == set(STAGES) and min(stages.values()) >= 0
            to_actuator = sum(ms for stage, ms in stages.items() if stage != "commit")
            assert to_actuator == pytest.approx(t.delivered - c.captured_at, abs=0.01)
            assert stages["broker"] >= 100 and stages["infer"] >= 50
    scraped = generate_latest(w.metrics.registry).decode()
    assert 'sorter_item_stage_seconds_count{stage="infer"} 6.0' in scraped


def test_a_batch_closes_when_the_model_is_free_not_while_it_is_busy():
    """Steady traffic (a frame every 25 ms) into a slow model (200 ms a batch). A batch closed while the
    model still runs the one before would only queue behind it, and the frames arriving meanwhile would
    wait a whole model run more: the batch keeps collecting and starts the moment the model is free."""
    cluster = FakeCluster()
    cluster.create(TOPIC)
    results, decode_started = [], {}
    p = pipeline(FakeModel(delay_s=0.2))
    predecode = p.predecode

    def spy(raw):
        decode_started[raw.source.offset] = time.time_ns() / 1e6
        return predecode(raw)

    p.predecode = spy
    w = new_worker(cluster, settings(batch={"max_size": 32, "max_wait_ms": 5}), p, on_batch=results.append)
    w.consumer.schedule(("assign", [(TOPIC, 0)]))

    def camera():
        for i in range(48):
            headers = [("item-id", f"i{i}".encode()), ("captured-at", str(int(time.time() * 1000)).encode())]
            cluster.append(TOPIC, photo(i % 2, 0.9), f"i{i}".encode(), headers)
            time.sleep(0.025)

    threading.Thread(target=camera, daemon=True).start()
    w.run(max_frames=48, idle_exit_s=2)
    assert sum(r.frames for r in results) == 48
    for before, batch in itertools.pairwise(results):
        assert batch.times.closed >= before.times.inferred  # closed once the model was free ...
        assert batch.times.started - batch.times.closed < 50  # ... so it did not queue behind another
    assert max(r.frames for r in results) >= 5  # frames that arrived during a run went into the next batch
    for r in results:  # each photo started decoding when fetched, during the model's run on the batch before
        assert all(decode_started[offset] <= r.times.closed for _, _, offset in r.times.fetched)


def test_the_latency_budget_cuts_the_wait_for_more_frames_by_the_measured_model_time():
    cluster = FakeCluster()
    budget = new_worker(cluster, settings(batch={"max_size": 32, "max_wait_ms": 20, "latency_budget_ms": 150}))
    assert budget._wait_s() == pytest.approx(0.02)  # nothing measured yet: the configured wait
    budget._frame_cost_s = 0.004  # a full batch: 128 ms of the 150
    assert budget._wait_s() == pytest.approx(0.02)  # 22 ms left: the configured 20 is the cap
    budget._frame_cost_s = 0.0045  # 144 ms: 6 ms left for waiting
    assert budget._wait_s() == pytest.approx(0.006)
    budget._frame_cost_s = 0.01  # a full batch alone is over budget: no waiting at all
    assert budget._wait_s() == 0
    plain = new_worker(cluster, settings(batch={"max_size": 32, "max_wait_ms": 20}))
    plain._frame_cost_s = 0.01
    assert plain._wait_s() == pytest.approx(0.02)  # no budget set: the configured wait
