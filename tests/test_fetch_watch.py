"""A partition with frames waiting on the broker that gives the worker none is said, not silent (stalls.py).

Found in a 7-minute paced soak: the local broker's fetches came back empty for good, the worker polled
on, healthy by every sign, and the stations' items stopped being routed with nothing in the logs."""

from __future__ import annotations

import threading
import time

from prometheus_client import generate_latest
from structlog.testing import capture_logs

from sorter.stream.stalls import FairShare, FetchWatch
from tests.fakes import NOW_MS, FakeCluster, FakeModel, photo
from tests.test_loop import COMMANDS, new_worker, pipeline, routed, settings

A, B = ("frames.dock-1", 0), ("frames.dock-2", 0)


def fill(cluster: FakeCluster, tp: tuple[str, int], n: int, prefix: str) -> list[str]:
    cluster.create(tp[0])
    items = [f"{prefix}{i}" for i in range(n)]
    for item in items:
        headers = [("item-id", item.encode()), ("captured-at", str(NOW_MS).encode())]
        cluster.append(tp[0], photo(0, 0.9), item.encode(), headers)
    return items


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def stalled_gauge(worker) -> float:
    for line in generate_latest(worker.metrics.registry).decode().splitlines():
        if line.startswith("sorter_stalled_partitions "):
            return float(line.split()[1])
    raise AssertionError("sorter_stalled_partitions not exported")


def test_a_partition_whose_fetches_come_back_empty_is_reported_and_its_recovery_too():
    cluster = FakeCluster()
    cluster.create(COMMANDS)
    flowing = fill(cluster, A, 6, "a")
    waiting = fill(cluster, B, 20, "b")
    w = new_worker(cluster, settings(kafka={"fetch_stall_s": 0.3}, observe={"stats_interval_ms": 100}))
    w.consumer.stuck.add(B)  # the broker answers every fetch of dock-2 with nothing
    w.consumer.stats_every_s = 0.1
    w.consumer.schedule(("assign", [A, B]))
    with capture_logs() as events:
        thread = threading.Thread(target=w.run, daemon=True)
        thread.start()
        try:
            said = lambda name: [e for e in events if e["event"] == name]  # noqa: E731
            assert wait_for(lambda: said("worker.fetch_stalled")), "a partition that gives nothing went unsaid"
            (stall,) = said("worker.fetch_stalled")
            assert stall["partition"] == "frames.dock-2[0]" and stall["waiting_frames"] == 20
            assert stall["log_level"] == "warning" and stall["quiet_s"] >= 0.3
            assert stalled_gauge(w) == 1
            assert wait_for(lambda: sorted(routed(cluster)) == sorted(flowing))  # the other station flows meanwhile
            w.consumer.stuck.clear()  # the broker answers again
            assert wait_for(lambda: said("worker.fetch_resumed"))
            assert wait_for(lambda: sorted(routed(cluster)) == sorted(flowing + waiting))
            assert stalled_gauge(w) == 0 and len(said("worker.fetch_stalled")) == 1
        finally:
            w.stop_event.set()
            thread.join(10)


def test_an_idle_line_and_a_drained_partition_are_not_stalls():
    """Nothing waiting on the broker (the partition's end is where the next fetch starts): quiet is idle."""
    cluster = FakeCluster()
    cluster.create(COMMANDS)
    items = fill(cluster, A, 4, "a")
    cluster.create(B[0])  # no frames at all
    w = new_worker(cluster, settings(kafka={"fetch_stall_s": 0.2}, observe={"stats_interval_ms": 100}))
    w.consumer.stats_every_s = 0.1
    w.consumer.schedule(("assign", [A, B]))
    with capture_logs() as events:
        w.run(idle_exit_s=1.0)
    assert sorted(routed(cluster)) == sorted(items)
    assert not [e for e in events if e["event"] == "worker.fetch_stalled"]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def stats(**partitions: tuple[int, int, int]) -> dict:
    """``name=(next_offset, hi_offset, ls_offset)`` for topics frames.<name>, partition 0."""
    return {
        "topics": {
            f"frames.{name}": {"partitions": {"0": {"next_offset": n, "hi_offset": hi, "ls_offset": ls}}}
            for name, (n, hi, ls) in partitions.items()
        }
    }


def polling(watch: FetchWatch, clock: Clock, seconds: float, step: float = 0.1) -> None:
    for _ in range(round(seconds / step)):
        clock.now += step
        watch.polled()


def test_time_the_loop_spends_on_a_batch_instead_of_polling_does_not_count():
    clock = Clock()
    watch = FetchWatch(5.0, stats_interval_s=1.0, clock=clock)
    watch.assigned([A])
    watch.polled()
    clock.now += 60  # one batch held the loop for a minute: frames were not asked for, not refused
    watch.polled()  # counted as one second (POLL_GAP_S), not sixty
    watch.on_stats(stats(**{"dock-1": (10, 500, 500)}))
    assert watch.check() == ([], [])
    polling(watch, clock, 3.5)
    watch.on_stats(stats(**{"dock-1": (10, 500, 500)}))
    assert watch.check() == ([], [])
    polling(watch, clock, 1.0)
    watch.on_stats(stats(**{"dock-1": (10, 500, 500)}))
    (stall,), _ = watch.check()
    assert stall.tp == A and stall.waiting == 490 and stall.next_offset == 10


def test_statistics_that_stopped_coming_say_nothing_and_a_frame_ends_a_stall():
    clock = Clock()
    watch = FetchWatch(1.0, stats_interval_s=1.0, clock=clock)
    watch.assigned([A])
    watch.on_stats(stats(**{"dock-1": (10, 500, 500)}))
    polling(watch, clock, 3.5)  # statistics now 3.5 intervals old
    assert watch.check() == ([], [])
    watch.on_stats(stats(**{"dock-1": (10, 500, 500)}))
    assert [s.tp for s in watch.check()[0]] == [A]
    assert watch.check() == ([], [])  # said once, not at every check
    watch.got(A)
    _, (resumed,) = watch.check()
    assert resumed.tp == A and watch.stalled == {}


def test_under_read_committed_an_open_transaction_is_not_a_stall():
    """A camera's open transaction: hi_offset is past it, the last stable offset is not."""
    clock = Clock()
    watch = FetchWatch(1.0, stats_interval_s=1.0, read_committed=True, clock=clock)
    watch.assigned([A])
    polling(watch, clock, 2.0)
    watch.on_stats(stats(**{"dock-1": (40, 90, 40)}))
    assert watch.check() == ([], [])


def test_a_revoked_partition_is_forgotten_and_zero_turns_the_watch_off():
    clock = Clock()
    watch = FetchWatch(1.0, stats_interval_s=1.0, clock=clock)
    watch.assigned([A, B])
    polling(watch, clock, 2.0)
    watch.on_stats(stats(**{"dock-1": (0, 9, 9), "dock-2": (0, 9, 9)}))
    watch.revoked([B])
    assert [s.tp for s in watch.check()[0]] == [A]
    off = FetchWatch(0, stats_interval_s=1.0, clock=clock)
    off.assigned([A])
    polling(off, clock, 2.0)
    off.on_stats(stats(**{"dock-1": (0, 9, 9)}))
    assert off.check() == ([], [])


def feed(cluster: FakeCluster, consumer, tp: tuple[str, int], stop: threading.Event, sent: list[str]) -> None:
    """A busy station: always a few frames ahead of the worker on ``tp``."""
    while not stop.is_set():
        with cluster.lock:
            if len(cluster.topics[tp[0]][tp[1]]) - consumer.position.get(tp, 0) < 64:
                sent.extend(fill(cluster, tp, 64, f"a{len(sent)}-"))
        time.sleep(0.001)


def run_starved(fair: bool) -> tuple[list[str], list[str], list[str], list, list[str]]:
    """Station A busy and always served first (librdkafka's shared queue can do that), station B with a
    backlog of 40 frames and nothing new: for 4 s, then A's feed stops and everything drains."""
    cluster = FakeCluster()
    cluster.create(COMMANDS)
    sent = fill(cluster, A, 64, "a-")  # busy from the start
    waiting = fill(cluster, B, 40, "b")
    s = settings(kafka={"fair_share": fair}, observe={"stats_interval_ms": 100})
    w = new_worker(cluster, s)
    if w.fair is not None:
        w.fair = FairShare(skew_s=1.0, hold_s=0.5)
    w.consumer.drain_first = True
    w.consumer.stats_every_s = 0.1
    w.consumer.schedule(("assign", [A, B]))
    stop = threading.Event()
    feeder = threading.Thread(target=feed, args=(cluster, w.consumer, A, stop, sent), daemon=True)
    with capture_logs() as events:
        thread = threading.Thread(target=w.run, daemon=True)
        thread.start()
        feeder.start()
        time.sleep(4)
        b_while_busy = [i for i in routed(cluster) if i.startswith("b")]
        stop.set()
        feeder.join(5)
        assert wait_for(lambda: len(routed(cluster)) == len(sent) + len(waiting), timeout=20)
        w.stop_event.set()
        thread.join(10)
    return b_while_busy, sent, waiting, events, routed(cluster)


def test_a_starved_station_is_fed_while_a_busy_one_is_held_back_and_nothing_is_lost_or_repeated():
    b_while_busy, sent, waiting, events, everything = run_starved(fair=True)
    assert sorted(b_while_busy) == sorted(waiting)  # all of B's backlog while A was still busy
    assert sorted(everything) == sorted(sent + waiting)  # each frame once: paused, resumed, none skipped
    holds = [e for e in events if e["event"] == "worker.fair_share"]
    assert holds and holds[0]["starved"] == "frames.dock-2[0]" and holds[0]["held"] == ["frames.dock-1[0]"]
    assert not [e for e in events if e["event"] == "worker.fetch_stalled"]  # held on purpose is not a stall


def test_without_the_fair_share_the_busy_station_starves_the_other():
    """The same run with ``kafka.fair_share: false``: what the fair share is for (and that the fake starves)."""
    b_while_busy, *_ = run_starved(fair=False)
    assert b_while_busy == []


def test_the_fair_share_holds_the_others_for_the_partition_furthest_behind_then_lets_go():
    clock = Clock()
    fair = FairShare(skew_s=5.0, hold_s=5.0, clock=clock)
    assert fair.decide({A: 4.0, B: 8.0}) == ([], [])  # 4 s apart: under skew_s (and half of B's 8 s)
    assert fair.decide({A: 1.0, B: 30.0}) == ([A], [])
    clock.now += 2
    fair.got(B)
    assert fair.decide({A: 0.0, B: 25.0}) == ([], [])  # held: nothing new until the hold is over
    clock.now += 3
    assert fair.decide({A: 0.0, B: 20.0}) == ([], [A])  # let go; looked at again at the next decision
    assert fair.decide({A: 0.0, B: 20.0}) == ([A], [])


def test_a_partition_that_gets_nothing_while_the_others_are_held_is_stalled_not_starved():
    """Holding the healthy stations back for a partition the broker does not serve would only slow them."""
    clock = Clock()
    fair = FairShare(skew_s=1.0, hold_s=1.0, stuck_s=10.0, clock=clock)
    assert fair.decide({A: 0.0, B: 40.0}) == ([A], [])
    clock.now += 1
    assert fair.decide({A: 0.0, B: 41.0}) == ([], [A])  # B got nothing meanwhile
    fair.got(B)  # a frame now does not make holding the others worth it again at once
    assert fair.decide({A: 0.0, B: 42.0}) == ([], [])
    clock.now += 10  # but after stuck_s it is looked at again
    assert fair.decide({A: 0.0, B: 50.0}) == ([A], [])


def test_a_partition_the_broker_serves_only_a_trickle_does_not_keep_the_others_held():
    """Found in review: a sick partition that gets the odd frame while the others are held, its backlog
    still growing, held the healthy ones 82% of the time in a 10-minute simulation."""
    clock = Clock()
    fair = FairShare(skew_s=1.0, hold_s=1.0, stuck_s=60.0, clock=clock)
    assert fair.decide({A: 0.0, B: 40.0}, capacity_fps=100) == ([A], [])
    fair.got(B)  # one frame in a hold in which the worker could take 100
    clock.now += 1
    assert fair.decide({A: 0.0, B: 45.0}, capacity_fps=100) == ([], [A])
    for _ in range(30):
        clock.now += 1
        assert fair.decide({A: 0.0, B: 50.0}, capacity_fps=100) == ([], [])


def test_a_station_arriving_faster_than_the_worker_takes_keeps_being_fed():
    """Found in review: "fed, but its backlog still grew" also describes a station busier than the whole
    worker; the hold helps it (it gets what the worker can take), so it is held for again."""
    clock = Clock()
    fair = FairShare(skew_s=1.0, hold_s=5.0, stuck_s=60.0, clock=clock)
    assert fair.decide({A: 0.0, B: 40.0}, capacity_fps=100) == ([A], [])
    for _ in range(450):  # 90 frames/s of the worker's 100
        fair.got(B)
    clock.now += 5
    assert fair.decide({A: 0.0, B: 41.0}, capacity_fps=100) == ([], [A])
    assert fair.decide({A: 0.0, B: 41.0}, capacity_fps=100) == ([A], [])


def test_the_arrival_rate_is_measured_by_librdkafka_s_clock_and_not_while_a_partition_is_held():
    """Found in review: two reports delivered in one consume() (the loop was busy) made a rate of 3.7e7
    frames/s; a paused partition's end is frozen (learnt from fetches only) and halved its rate, and the
    catch-up after it doubled it."""
    clock = Clock()
    watch = FetchWatch(30.0, stats_interval_s=5.0, clock=clock)
    watch.assigned([A])

    def report(ts_s: float, end: int, next_offset: int) -> None:
        s = stats(**{"dock-1": (next_offset, end, end)})
        watch.on_stats(s | {"ts": int(ts_s * 1e6)})

    assert watch.backlog_s() == {}  # no statistics yet: not in it
    report(100.0, 1000, 900)
    assert watch.backlog_s() == {A: 100}  # no rate yet: frames count as seconds
    report(105.0, 1750, 1000)  # 150 frames/s over 5 s of librdkafka's clock (next_offset moved: fetched)
    clock.now += 0.001  # delivered a millisecond later here: does not matter
    report(110.0, 2500, 1000)
    assert watch.rate[A] == 150.0
    assert watch.backlog_s() == {A: 1500 / 150}
    watch.hold([A])
    report(115.0, 2500, 1000)  # frozen while paused (or not fetched while the prefetch queue is full)
    assert watch.rate[A] == 150.0
    watch.release([A])
    report(120.0, 4000, 1000)  # the catch-up: taken over the whole span since the end last moved
    assert watch.rate[A] == 150.0
    report(125.0, 4750, 1000)
    assert watch.rate[A] == 150.0


class FirstSlow(FakeModel):
    """The first batch takes 1.5 s: longer than a third of a 1 s max.poll.interval, so the keep-alive runs."""

    def predict(self, images):
        if not self.seen:
            time.sleep(1.5)
        return super().predict(images)


def test_a_partition_revoked_during_a_keepalive_and_given_back_is_fetched_again():
    """The keep-alive pauses every partition and resumes those still assigned when the batch is done; one
    revoked meanwhile kept librdkafka's pause flag, and when it came back it was never fetched again (found
    in review; the fakes now keep the flag as librdkafka does)."""
    cluster = FakeCluster()
    cluster.create(COMMANDS)
    fill(cluster, A, 4, "a-early-")
    cluster.create(B[0])
    kafka = {"session_timeout_ms": 1000, "max_poll_interval_ms": 1000, "fair_share": False}
    w = new_worker(cluster, settings(kafka=kafka), pipeline(FirstSlow()))
    w.consumer.schedule(("assign", [A, B]))
    with capture_logs() as events:
        thread = threading.Thread(target=w.run, daemon=True)
        thread.start()
        try:
            assert wait_for(lambda: any(e["event"] == "worker.slow_batch" for e in events))
            w.consumer.schedule(("revoke", [A]))  # served by the keep-alive's poll
            assert wait_for(lambda: any(e["event"] == "worker.revoked" for e in events))
            assert wait_for(lambda: not w._keepalive_paused)
            w.consumer.schedule(("assign", [A]))
            assert wait_for(lambda: sum(e["event"] == "worker.assigned" for e in events) >= 2)
            late = fill(cluster, A, 5, "a-late-")
            assert wait_for(lambda: sorted(i for i in routed(cluster) if i.startswith("a-late-")) == sorted(late))
        finally:
            w.stop_event.set()
            thread.join(10)


def test_a_partition_held_by_the_fair_share_revoked_and_given_back_is_fetched_again():
    cluster = FakeCluster()
    cluster.create(COMMANDS)
    fill(cluster, A, 2, "a-early-")  # caught up
    fill(cluster, B, 60, "b")  # far behind: its fetches come back empty for now
    w = new_worker(cluster, settings(kafka={"fetch_stall_s": 30}, observe={"stats_interval_ms": 100}))
    w.fair = FairShare(skew_s=1.0, hold_s=3.0)
    w.consumer.stats_every_s = 0.1
    w.consumer.stuck.add(B)
    w.consumer.schedule(("assign", [A, B]))
    with capture_logs() as events:
        thread = threading.Thread(target=w.run, daemon=True)
        thread.start()
        try:
            assert wait_for(lambda: any(e["event"] == "worker.fair_share" for e in events))
            assert A in w.consumer.paused
            w.consumer.schedule(("revoke", [A]), ("assign", [A]))  # a rebalance moves it and gives it back
            assert wait_for(lambda: sum(e["event"] == "worker.assigned" for e in events) >= 2)
            w.consumer.stuck.clear()
            late = fill(cluster, A, 10, "a-late-")
            assert wait_for(lambda: sorted(i for i in routed(cluster) if i.startswith("a-late-")) == sorted(late))
            assert wait_for(lambda: len(routed(cluster)) == 72)  # and B's backlog, each once
            assert sorted(routed(cluster)) == sorted(set(routed(cluster)))
        finally:
            w.stop_event.set()
            thread.join(10)


def test_a_pause_for_a_slow_batch_does_not_end_a_stall():
    """Found in review: the keep-alive holds and releases every partition; releasing reset a stalled
    partition's clock, which said "resumed" (gauge back to 0) and stalled it again 30 s later."""
    clock = Clock()
    watch = FetchWatch(1.0, stats_interval_s=1.0, clock=clock)
    watch.assigned([A, B])
    polling(watch, clock, 2.0)
    watch.on_stats(stats(**{"dock-2": (0, 50, 50)}))
    assert [s.tp for s in watch.check()[0]] == [B]
    watch.hold({A, B})  # the keep-alive
    watch.release({A, B})
    watch.on_stats(stats(**{"dock-2": (0, 50, 50)}))  # still 50 waiting, no frame of B came
    assert watch.check() == ([], []) and B in watch.stalled
