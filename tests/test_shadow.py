"""Shadow model (shadow.py): a candidate decides the same items after the live commands are delivered, on its own
topic, and its agreement is counted; it never slows, stops or changes the live path (fakes; the real broker and
checkpoints: tests/integration/test_shadow.py)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from sorter.settings import load_settings
from sorter.stream.cache import MemoryCache
from sorter.stream.kafka import KafkaClients
from sorter.stream.pipeline import Decoder, Pipeline
from sorter.stream.routing import RoutingTable
from sorter.stream.shadow import Agreement, Shadow, ShadowProducer, sampled
from sorter.stream.worker import Worker
from tests.fakes import LABELS, NOW_MS, FakeCluster, FakeModel, photo

ROUTES = RoutingTable(default_chute="C-99", review_chute="R", min_confidence=0.5,
                      routes={"box": "C-1", "bottle": "C-2", "can": "C-3"})  # fmt: skip


class Candidate(FakeModel):
    """Says "can" where the live model says "bottle"; agrees otherwise."""

    model_version = "fake-2"

    def __init__(self, fail: bool = False, gate: threading.Event | None = None, **kw) -> None:
        super().__init__(**kw)
        self.fail, self.gate = fail, gate

    def predict(self, images):
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        out = super().predict(images)
        for i, p in enumerate(out):
            if p.label == "bottle":
                out[i] = type(p)(2, LABELS[2], "SKU-2", p.confidence, log_probs=p.log_probs[::-1])
        return out


def _worker(cluster: FakeCluster, candidate, n: int = 30, *, fraction: float = 1.0, max_queued: int = 4):
    topic = "frames.dock-1"
    cluster.create(topic)
    for i in range(n):
        headers = [("item-id", f"i{i}".encode()), ("captured-at", str(NOW_MS).encode())]
        cluster.append(topic, photo(i % 3, 0.9), f"i{i}".encode(), headers)
    live = Pipeline(FakeModel(), ROUTES, MemoryCache(), Decoder(2, 10_000), worker_id="w")
    s = load_settings(kafka={"bootstrap_servers": "fake:9092"}, batch={"max_size": 4, "max_wait_ms": 5},
                      observe={"enabled": False}, worker_id="w", shutdown_deadline_s=5)  # fmt: skip
    w = Worker(s, live, clients=KafkaClients(cluster.consumer, cluster.producer))
    errors = []
    pipeline = Pipeline(candidate, ROUTES, MemoryCache(max_items=1000), Decoder(1, 10_000), worker_id="w")
    producer = ShadowProducer(cluster.producer, {}, errors.append)
    w.shadow = Shadow(pipeline, producer, "sort.shadow", w.metrics, fraction=fraction, max_queued_batches=max_queued)
    w.consumer.schedule(("assign", [(topic, 0)]))
    return w, errors


def _compared(w) -> dict[tuple[str, str], float]:
    out = {}
    for metric in w.metrics.shadow_compared.collect():
        for s in metric.samples:
            if s.name.endswith("_total") and s.value:
                out[(s.labels["chute"], s.labels["agreement"])] = s.value
    return out


def test_the_candidate_decides_every_item_on_its_own_topic_and_its_agreement_is_counted():
    cluster = FakeCluster()
    w, errors = _worker(cluster, Candidate(), max_queued=100)  # room for every batch: none skipped
    w.run(idle_exit_s=0.5)
    live = {c["item_id"]: c for c in (json.loads(m.value()) for m in cluster.messages("sort.commands"))}
    shadow = [json.loads(m.value()) for m in cluster.messages("sort.shadow")]
    assert len(live) == 30 and all(not c["shadow"] and c["model_version"] == "fake-1" for c in live.values())
    assert sorted(c["item_id"] for c in shadow) == sorted(live)  # one each
    assert all(c["shadow"] and c["model_version"] == "fake-2" for c in shadow)
    for c in shadow:
        expected = "C-3" if live[c["item_id"]]["label"] == "bottle" else live[c["item_id"]]["chute"]
        assert c["chute"] == expected
    assert _compared(w) == {("C-1", "same"): 10, ("C-2", "other_chute"): 10, ("C-3", "same"): 10}
    assert errors == [] and w.metrics.shadow_commands.labels("dock-1", "classified")._value.get() == 30


def test_a_slow_candidate_never_holds_the_live_line_and_what_it_could_not_take_is_counted():
    cluster = FakeCluster()
    gate = threading.Event()  # the candidate is stuck for a second
    w, _ = _worker(cluster, Candidate(gate=gate), n=60, max_queued=1)
    at_release = []

    def release():
        at_release.append(len(cluster.messages("sort.commands")))
        gate.set()

    threading.Timer(1.0, release).start()
    w.run(idle_exit_s=1.5)  # closes the shadow too: it finishes what it holds
    assert at_release == [60]  # every live command was out while the candidate was stuck
    skipped = w.metrics.shadow_skipped._value.get()
    shadowed = len(cluster.messages("sort.shadow"))
    assert skipped > 0 and shadowed + skipped == 60 and shadowed >= 4  # what it held was finished


def test_a_candidate_that_fails_is_counted_and_said_and_the_live_commands_go_on(capsys):
    from structlog.testing import capture_logs

    cluster = FakeCluster()
    w, _ = _worker(cluster, Candidate(fail=True))
    with capture_logs() as logs:
        w.run(idle_exit_s=0.5)
    assert len(cluster.messages("sort.commands")) == 30 and cluster.messages("sort.shadow") == []
    assert w.metrics.shadow_errors._value.get() > 0
    assert any(e["event"] == "shadow.batch_failed" and "illegal memory" in e["error"] for e in logs)


def test_a_sampled_share_takes_whole_items_the_same_in_every_pod():
    cluster = FakeCluster()
    w, _ = _worker(cluster, Candidate(), n=200, fraction=0.25, max_queued=100)
    w.run(idle_exit_s=0.5)
    shadow = {json.loads(m.value())["item_id"] for m in cluster.messages("sort.shadow")}
    assert shadow == {f"i{i}" for i in range(200) if sampled(f"i{i}", 0.25)}
    assert 25 <= len(shadow) <= 75  # about a quarter
    assert sum(_compared(w).values()) == len(shadow)  # the unsampled live commands are not waiting for a pair


def test_agreement_pairs_either_order_and_forgets_the_oldest_unpaired():
    from sorter.stream.contracts import CommandSource, RoutingCommand

    pairs = []
    a = Agreement(lambda station, live, cand: pairs.append((live.item_id, live.chute, cand.chute)), limit=2)

    def cmd(item, chute):
        return RoutingCommand(item_id=item, station_id="s", sku=None, label=None, confidence=0.9, chute=chute,
                              reason="classified", model_version="v", captured_at=None, decided_at=NOW_MS,
                              source=CommandSource(topic="t", partition=0, offset=0), worker_id="w")  # fmt: skip

    a.add("candidate", cmd("x", "C-1"))
    a.add("live", cmd("x", "C-2"))
    for item in ("p", "q", "r"):
        a.add("live", cmd(item, "C-1"))
    a.add("candidate", cmd("p", "C-1"))  # forgotten: only the newest two wait
    a.add("candidate", cmd("r", "C-1"))
    assert pairs == [("x", "C-2", "C-1"), ("r", "C-1", "C-1")]


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_sampling_at_the_ends(fraction):
    assert all(sampled(f"item-{i}", fraction) == (fraction == 1.0) for i in range(100))


def test_the_shadow_series_are_exported_only_with_a_shadow_model():
    from sorter.stream.observe import Metrics

    def names(metrics) -> set[str]:
        return {f.name for f in metrics.registry.collect() if f.name.startswith("sorter_shadow")}

    assert names(Metrics()) == set()
    w, _ = _worker(FakeCluster(), Candidate(), n=0)
    assert names(w.metrics) == {"sorter_shadow_compared", "sorter_shadow_commands", "sorter_shadow_batch_seconds",
                                "sorter_shadow_skipped_frames", "sorter_shadow_errors"}  # fmt: skip
    w.shadow.close(timeout=1)


def test_frames_the_live_side_sent_to_the_late_chute_are_not_given_to_the_candidate():
    """A backlog: the live side recirculates its late items without a model; the candidate must not decide them
    (its chute would be compared against 'late', and wait unpaired forever)."""
    routes = RoutingTable(default_chute="C-99", review_chute="R", min_confidence=0.5, decision_deadline_ms=800,
                          late_chute="RECIRC", routes={"box": "C-1", "bottle": "C-2", "can": "C-3"})  # fmt: skip
    cluster = FakeCluster()
    cluster.create("frames.dock-1")
    now = time.time_ns() // 1_000_000
    for i in range(20):  # the first 10 captured 5 s ago (late), the rest just now
        at = now - 5000 if i < 10 else now
        headers = [("item-id", f"i{i}".encode()), ("captured-at", str(at).encode())]
        cluster.append("frames.dock-1", photo(i % 3, 0.9), f"i{i}".encode(), headers)
    live = Pipeline(FakeModel(), routes, MemoryCache(), Decoder(2, 10_000), worker_id="w")
    s = load_settings(kafka={"bootstrap_servers": "fake:9092"}, batch={"max_size": 4, "max_wait_ms": 5},
                      observe={"enabled": False}, worker_id="w", shutdown_deadline_s=5)  # fmt: skip
    w = Worker(s, live, clients=KafkaClients(cluster.consumer, cluster.producer))
    side = Pipeline(FakeModel(), routes, MemoryCache(max_items=1000), Decoder(1, 10_000), worker_id="w")
    side.judge_late = False
    w.shadow = Shadow(side, ShadowProducer(cluster.producer, {}, print), "sort.shadow", w.metrics,
                      max_queued_batches=100)  # fmt: skip
    w.consumer.schedule(("assign", [("frames.dock-1", 0)]))
    w.run(idle_exit_s=0.5)
    live_reasons = {json.loads(m.value())["item_id"]: json.loads(m.value())["reason"]
                    for m in cluster.messages("sort.commands")}  # fmt: skip
    shadowed = {json.loads(m.value())["item_id"] for m in cluster.messages("sort.shadow")}
    assert sum(r == "late" for r in live_reasons.values()) == 10
    assert shadowed == {i for i, r in live_reasons.items() if r != "late"}
    assert not w.shadow.agreement._waiting["candidate"] and not w.shadow.agreement._waiting["live"]


def test_a_revocation_is_applied_after_the_batches_offered_before_it():
    """Views of a partition offered before its revocation join the candidate's open items and are then forgotten
    (the new owner shadows them): this pod's candidate never decides them."""
    from sorter.stream.contracts import RawFrame, Source
    from sorter.stream.fusion import Fusion
    from sorter.stream.observe import Metrics
    from sorter.stream.pipeline import BatchResult

    routes = RoutingTable(default_chute="C-99", review_chute="R", min_confidence=0.5, routes=ROUTES.routes,
                          fusion=Fusion(window_ms=300, views=2))  # fmt: skip
    gate = threading.Event()
    cluster = FakeCluster()
    side = Pipeline(Candidate(gate=gate), routes, MemoryCache(max_items=1000), Decoder(1, 10_000), worker_id="w")
    side.judge_late = False
    shadow = Shadow(side, ShadowProducer(cluster.producer, {}, print), "sort.shadow", Metrics())

    def raw(item, partition, offset):
        headers = (("item-id", item.encode()), ("camera-id", b"c1"), ("captured-at", str(NOW_MS).encode()))
        return RawFrame(Source("frames.dock-1", partition, offset), item.encode(), photo(0, 0.9), headers)

    shadow.offer([raw("busy", 1, 0)], BatchResult())  # the candidate is busy with an earlier batch
    time.sleep(0.1)
    shadow.offer([raw("x", 0, 5)], BatchResult())  # a view of x, offered before its partition is revoked
    shadow.forget({("frames.dock-1", 0)})
    gate.set()
    time.sleep(0.8)  # x's window (300 ms) has long closed
    shadow.close(1)
    assert "x" not in {json.loads(m.value())["item_id"] for m in cluster.messages("sort.shadow")}


@pytest.mark.parametrize("topic", ["sort.commands", "frames.dlq", "frames.shadow", "sort.control"])
def test_a_shadow_topic_that_is_another_of_sorters_topics_stops_start_up_with_one_line(topic):
    from sorter.errors import ConfigError
    from sorter.stream.app import check_shadow_topic

    with pytest.raises(ConfigError, match=r"shadow\.topic"):
        check_shadow_topic(load_settings(shadow={"checkpoint": "/m.pt", "topic": topic}))
    check_shadow_topic(load_settings(shadow={"checkpoint": "/m.pt"}))  # sort.shadow: fine


def test_a_later_view_of_a_pass_the_live_side_sent_to_the_late_chute_is_not_given_to_the_candidate():
    from sorter.stream.contracts import RawFrame, Source
    from sorter.stream.observe import Metrics

    routes = RoutingTable(default_chute="C-99", review_chute="R", min_confidence=0.5, decision_deadline_ms=800,
                          late_chute="RECIRC", routes=ROUTES.routes)  # fmt: skip
    now = time.time_ns() // 1_000_000

    def raw(offset, at):
        return RawFrame(Source("frames.dock-1", 0, offset), b"X", photo(1, 0.9),
                        (("item-id", b"X"), ("captured-at", str(at).encode())))  # fmt: skip

    live = Pipeline(FakeModel(), routes, MemoryCache(), Decoder(1, 10_000), worker_id="w")
    side = Pipeline(FakeModel(), routes, MemoryCache(max_items=1000), Decoder(1, 10_000), worker_id="w")
    side.judge_late = False
    cluster = FakeCluster()
    shadow = Shadow(side, ShadowProducer(cluster.producer, {}, print), "sort.shadow", Metrics())
    commands = []
    for batch in ([raw(0, now - 5000)], [raw(1, now - 4990)]):  # two views of one late pass, one batch each
        result = live.process(batch)
        live.cache.put_many(result.decisions)
        commands += [(c.item_id, c.reason) for c in result.commands]
        shadow.offer(batch, result)
    time.sleep(0.5)
    shadow.close(1)
    assert commands == [("X", "late")] and cluster.messages("sort.shadow") == []
    live.close()
