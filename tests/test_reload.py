"""Hot reload: the watcher (reload.py) and the swap between batches in the loop (fakes; the real broker and
checkpoints: tests/integration/test_reload.py)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from sorter.errors import CheckpointError
from sorter.settings import load_settings
from sorter.stream.cache import MemoryCache
from sorter.stream.kafka import KafkaClients
from sorter.stream.pipeline import Decoder, Pipeline
from sorter.stream.reload import Loaded, Reloader
from sorter.stream.routing import RoutingTable
from sorter.stream.worker import Worker
from tests.fakes import NOW_MS, FakeCluster, FakeModel, photo


class Versioned(FakeModel):
    precision = "fp32"
    meta = SimpleNamespace(backbone="fake", num_classes=3)
    runtime = SimpleNamespace(device="cpu")

    def __init__(self, version: str, input_size: int = 32) -> None:
        super().__init__()
        self.model_version, self.input_size = version, input_size


def _wait(reloader: Reloader, seconds: float = 5.0) -> Loaded | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        reloader.poll()
        if (loaded := reloader.take()) is not None:
            return loaded
        time.sleep(0.01)
    return None


def _replace(path, text: str) -> None:
    """As a model job or a volume update does: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_a_replaced_file_is_loaded_checked_and_warmed_up_in_the_background(tmp_path):
    path = tmp_path / "model.pt"
    path.write_text("v1")
    built = []

    def load(p):
        model = Versioned(p.read_text())
        built.append(model)
        return model

    reloader = Reloader(path, load, lambda m: None, poll_s=0)
    assert _wait(reloader, 0.3) is None  # unchanged: nothing loaded
    _replace(path, "v2")
    loaded = _wait(reloader)
    assert loaded is not None and loaded.model.model_version == "v2" and loaded.model.seen == 1  # warmed up
    assert _wait(reloader, 0.3) is None and len(built) == 1  # once per change


def test_a_bad_file_is_refused_once_and_the_next_good_one_is_loaded(tmp_path):
    path = tmp_path / "model.pt"
    path.write_text("v1")
    refused = []

    def load(p):
        if p.read_text() == "garbage":
            raise CheckpointError(f"checkpoint {p} fails its integrity check")
        return Versioned(p.read_text(), input_size=64 if p.read_text() == "wide" else 32)

    def check(model):
        if model.input_size != 32:
            raise CheckpointError("its input size is 64 px")

    reloader = Reloader(path, load, check, poll_s=0, on_refused=refused.append)
    _replace(path, "garbage")
    assert _wait(reloader, 0.5) is None and refused == [f"checkpoint {path} fails its integrity check"]
    _replace(path, "wide")
    assert _wait(reloader, 0.5) is None and refused[-1] == "its input size is 64 px"
    assert len(refused) == 2  # polled again and again, refused once each
    _replace(path, "v3")
    assert _wait(reloader).model.model_version == "v3"


def test_the_loop_swaps_between_batches_no_batch_mixes_models_and_nothing_is_lost():
    cluster = FakeCluster()
    topic = "frames.dock-1"
    cluster.create(topic)
    for i in range(60):
        headers = [("item-id", f"i{i}".encode()), ("captured-at", str(NOW_MS).encode())]
        cluster.append(topic, photo(0, 0.9), f"i{i}".encode(), headers)
    routes = RoutingTable(default_chute="C-99", review_chute="R", min_confidence=0.5)
    pipeline = Pipeline(Versioned("v1", 32), routes, MemoryCache(), Decoder(2, 10_000), worker_id="w")
    pipeline.model.delay_s = 0.01
    s = load_settings(kafka={"bootstrap_servers": "fake:9092"}, batch={"max_size": 4, "max_wait_ms": 5},
                      observe={"enabled": False}, worker_id="w", shutdown_deadline_s=5)  # fmt: skip
    batches = []
    w = Worker(s, pipeline, clients=KafkaClients(cluster.consumer, cluster.producer), on_batch=batches.append)

    class OneReload:  # hands over a new model once a few batches have run
        def poll(self):
            pass

        def take(self):
            if len(batches) == 5 and not getattr(self, "done", False):
                self.done = True
                return Loaded(Versioned("v2"), "model.pt", 0.1)
            return None

    w.reloader = OneReload()
    w.consumer.schedule(("assign", [(topic, 0)]))
    w.run(idle_exit_s=0.5)
    commands = [json.loads(m.value()) for m in cluster.messages("sort.commands")]
    assert sorted(c["item_id"] for c in commands) == sorted(f"i{i}" for i in range(60))  # each once
    versions = [c["model_version"] for c in commands]
    switch = versions.index("v2")
    assert switch > 0 and set(versions[:switch]) == {"v1"} and set(versions[switch:]) == {"v2"}
    assert all(len({c.model_version for c in b.commands}) <= 1 for b in batches)  # no batch mixes models
    assert w.metrics.reloads.labels("loaded")._value.get() == 1
    assert pipeline.model.model_version == "v2"


@pytest.mark.parametrize("fused", [True, False])
def test_an_item_waiting_for_views_at_a_swap_is_decided_by_the_model_that_classified_them(fused):
    from sorter.stream.contracts import RawFrame, Source

    routes = RoutingTable(default_chute="C-99", review_chute="R", min_confidence=0.5,
                          fusion={"window_ms": 60_000, "views": 3} if fused else None)  # fmt: skip
    pipeline = Pipeline(Versioned("v1"), routes, MemoryCache(), Decoder(2, 10_000), worker_id="w")
    headers = (("item-id", b"a"), ("captured-at", str(NOW_MS).encode()), ("camera-id", b"cam-1"))
    first = pipeline.process([RawFrame(Source("frames.dock-1", 0, 1), b"a", photo(0, 0.9), headers)])
    pipeline.swap(Versioned("v2"))
    second = pipeline.process([])
    commands = first.commands + second.commands
    assert [c.model_version for c in commands] == ["v1"] and pipeline.model.model_version == "v2"


def test_an_item_closed_at_a_swap_is_named_by_the_model_that_classified_it_even_one_with_more_classes():
    """Found in review: the fused class was named from the new model's labels (a wrong chute), and a new
    model with fewer classes raised in the batch (the worker stopped)."""
    import math

    from sorter.stream.contracts import RawFrame, Source
    from sorter.stream.inference import Prediction

    class Old(Versioned):
        labels = ("box", "bottle", "can")

        def names(self, i):
            return self.labels[i], f"SKU-{self.labels[i]}"

        def predict(self, images):  # class c at 0.45, 'can' at 0.449: fused, 'can' wins though no view ranks it
            out = []
            for image in images:
                c = round(int(image[0, 0, 0]) / 60)
                p = [0.1, 0.1, 0.449]
                p[c] = 0.45
                out.append(Prediction(c, self.labels[c], f"SKU-{self.labels[c]}", 0.45,
                                      log_probs=tuple(map(math.log, p))))  # fmt: skip
            return out

    class Fewer(Old):
        labels = ("jar", "bag")

    routes = RoutingTable(default_chute="C-99", review_chute="R", min_confidence=0.1,
                          fusion={"window_ms": 60_000, "views": 3})  # fmt: skip
    pipeline = Pipeline(Old("v1"), routes, MemoryCache(), Decoder(2, 10_000), worker_id="w", clock_ms=lambda: NOW_MS)

    def raw(offset, camera, cls):
        headers = (("item-id", b"a"), ("captured-at", str(NOW_MS).encode()), ("camera-id", camera.encode()))
        return RawFrame(Source("frames.dock-1", 0, offset), b"a", photo(cls, 0.9), headers)

    assert pipeline.process([raw(1, "cam-1", 0), raw(2, "cam-2", 1)]).commands == []
    pipeline.swap(Fewer("v2"))
    (command,) = pipeline.process([]).commands
    assert (command.label, command.sku, command.model_version) == ("can", "SKU-can", "v1")


def test_a_file_replaced_while_the_worker_started_is_loaded_at_the_first_poll(tmp_path):
    from sorter.stream.reload import signature

    path = tmp_path / "model.pt"
    path.write_text("v1")
    before = signature(path)  # taken before start-up read the file
    _replace(path, "v2")  # a model job renamed a new one over it during the broker wait
    reloader = Reloader(path, lambda p: Versioned(p.read_text()), lambda m: None, poll_s=0, serving=before)
    assert _wait(reloader).model.model_version == "v2"


@pytest.mark.parametrize(
    "value, why",
    [
        (b'{"action": "load", "checkpoint": "/models/m7.pt", "version": "v7"}', None),
        (b'{"action": "load", "checkpoint": "/models/m7.pt"}', None),
        (b"not json", "not JSON"),
        (b'{"action": "unload", "checkpoint": "/m.pt"}', "action"),
        (b'{"action": "load"}', "checkpoint"),
        (b'{"action": "load", "checkpoint": "/m.pt", "version": ""}', "version"),
        (b'{"action": "load", "checkpoint": "/m.pt", "force": true}', "force"),
        (None, "not JSON"),
        (b'{"action": "load", "checkpoint": "/m.pt", "x": "' + b"y" * 100_000 + b'"}', "too large"),
    ],
)
def test_control_messages_are_requests_or_ignored_with_a_reason(value, why):
    from sorter.stream.control import LoadRequest, parse

    parsed = parse(value)
    if why is None:
        assert isinstance(parsed, LoadRequest) and parsed.checkpoint.name == "m7.pt"
    else:
        assert isinstance(parsed, str) and why in parsed


def test_a_control_request_is_served_only_if_the_file_holds_the_version_it_names(tmp_path):
    watched = tmp_path / "model.pt"
    watched.write_text("v1")
    other = tmp_path / "m7.pt"
    other.write_text("v7")
    refused = []
    reloader = Reloader(watched, lambda p: Versioned(p.read_text()), lambda m: None, poll_s=0, watch=False,
                        on_refused=refused.append)  # fmt: skip
    reloader.request(other, "v8")
    assert _wait(reloader, 0.5) is None and refused == [f"the control message asked for model v8; {other} holds v7"]
    reloader.request(other, "v7")
    loaded = _wait(reloader)
    assert loaded.model.model_version == "v7" and loaded.path == other


def test_a_control_message_nested_too_deep_for_json_is_ignored_not_a_crash():
    from sorter.stream.control import parse

    assert "not JSON" in parse(b"[" * 20_000)  # json.loads raises RecursionError


def _load_request(version: str) -> bytes:
    return json.dumps({"action": "load", "checkpoint": f"/models/{version}.pt", "version": version}).encode()


def test_a_new_pod_acts_only_on_the_latest_control_message_not_on_each_of_the_history():
    from sorter.stream.control import ControlReader

    cluster = FakeCluster()
    cluster.create("sort.control")
    for i in range(250):  # weeks of rollouts and rollbacks
        cluster.append("sort.control", _load_request(f"v{i}"))
    reader = ControlReader(cluster.consumer({"enable.partition.eof": True}), "sort.control")
    asked = [r.version for _ in range(20) if (r := reader.poll()) is not None]
    assert asked == ["v249"]
    cluster.append("sort.control", _load_request("v250"))  # live from here on
    asked = [r.version for _ in range(5) if (r := reader.poll()) is not None]
    assert asked == ["v250"]


def test_a_control_topic_with_several_partitions_is_caught_up_by_publish_time():
    from sorter.stream.control import ControlReader

    cluster = FakeCluster()
    cluster.create("sort.control", partitions=2)
    for version, partition, at in [("v1", 0, 1_000), ("v4", 0, 4_000), ("v2", 1, 2_000), ("v3", 1, 3_000)]:
        cluster.append("sort.control", _load_request(version), partition=partition)._timestamp = at
    reader = ControlReader(cluster.consumer({"enable.partition.eof": True}), "sort.control")
    assert [r.version for _ in range(20) if (r := reader.poll()) is not None] == ["v4"]


def test_a_load_superseded_while_it_loads_is_never_served(tmp_path):
    """An operator rolls v7 out, then back to v6 (serving) while v7 still loads: v6 must stay."""
    import threading

    gate = threading.Event()

    def load(p):
        if p.name == "v7.pt":
            gate.wait(5)
        return Versioned(p.stem)

    reloader = Reloader(tmp_path / "model.pt", load, lambda m: None, poll_s=0, watch=False)
    reloader.request(tmp_path / "v7.pt", "v7")
    reloader.poll()  # v7 loading
    reloader.cancel()  # the rollback to what serves
    gate.set()
    assert _wait(reloader, 0.5) is None
    reloader.request(tmp_path / "v7.pt", "v7")
    reloader.poll()
    reloader.request(tmp_path / "v8.pt", "v8")  # a newer release while v7 loads: only v8 serves
    assert _wait(reloader).model.model_version == "v8" and _wait(reloader, 0.3) is None


def _loop_with_control(control, n: int = 20):
    cluster = FakeCluster()
    topic = "frames.dock-1"
    cluster.create(topic)
    for i in range(n):
        headers = [("item-id", f"i{i}".encode()), ("captured-at", str(NOW_MS).encode())]
        cluster.append(topic, photo(0, 0.9), f"i{i}".encode(), headers)
    routes = RoutingTable(default_chute="C-99", review_chute="R", min_confidence=0.5)
    pipeline = Pipeline(Versioned("v1", 32), routes, MemoryCache(), Decoder(2, 10_000), worker_id="w")
    s = load_settings(kafka={"bootstrap_servers": "fake:9092"}, batch={"max_size": 4, "max_wait_ms": 5},
                      observe={"enabled": False}, worker_id="w", shutdown_deadline_s=5)  # fmt: skip
    batches = []
    w = Worker(s, pipeline, clients=KafkaClients(cluster.consumer, cluster.producer), on_batch=batches.append)
    w.control = control
    return cluster, w, batches


def test_a_control_topic_that_fails_to_read_never_stops_the_worker():
    from structlog.testing import capture_logs

    class Broken:
        def poll(self):
            raise RuntimeError("KafkaError{code=_TRANSPORT}")

        def close(self):
            raise RuntimeError("closed twice")

    cluster, w, _ = _loop_with_control(Broken())
    w.reloader = Reloader(Path("model.pt"), Versioned, lambda m: None, poll_s=60, watch=False)
    w.consumer.schedule(("assign", [("frames.dock-1", 0)]))
    with capture_logs() as logs:
        w.run(idle_exit_s=0.3)  # closes the worker (and the control reader) at the end
    assert len(cluster.messages("sort.commands")) == 20
    events = [e["event"] for e in logs]
    assert events.count("control.failed") == 1 and "control.close_failed" in events  # once, not once per loop


def test_a_rollback_published_while_the_new_model_loads_keeps_the_old_one():
    class Requests:
        def __init__(self):
            self.queue = [("v7", 0), ("v1", 1)]  # v7 asked, then back to v1 (serving) one loop later
            self.calls = 0

        def poll(self):
            self.calls += 1
            from sorter.stream.control import LoadRequest

            if self.queue and self.calls > self.queue[0][1]:
                version = self.queue.pop(0)[0]
                return LoadRequest(action="load", checkpoint=Path(f"/m/{version}.pt"), version=version)
            return None

        def close(self):
            pass

    def load(p):
        time.sleep(0.05)
        return Versioned(p.stem)

    cluster, w, _ = _loop_with_control(Requests(), n=80)
    w.reloader = Reloader(Path("model.pt"), load, lambda m: None, poll_s=60, watch=False)
    w.pipeline.model.delay_s = 0.02  # the frames outlast the load
    w.consumer.schedule(("assign", [("frames.dock-1", 0)]))
    w.run(idle_exit_s=0.5)
    assert len(cluster.messages("sort.commands")) == 80
    assert {json.loads(m.value())["model_version"] for m in cluster.messages("sort.commands")} == {"v1"}


def test_catching_up_one_partition_follows_its_order_not_the_publishers_clocks():
    """v7 from a host whose clock runs 5 minutes fast, then the rollback to v6: a new pod serves v6, as the
    running pods do (they act in arrival order)."""
    from sorter.stream.control import ControlReader

    cluster = FakeCluster()
    cluster.create("sort.control")
    cluster.append("sort.control", _load_request("v7"))._timestamp = NOW_MS + 300_000
    cluster.append("sort.control", _load_request("v6"))._timestamp = NOW_MS + 60_000
    reader = ControlReader(cluster.consumer({"enable.partition.eof": True}), "sort.control")
    asked = [r.version for _ in range(10) if (r := reader.poll()) is not None]
    assert asked == ["v6"]


def test_the_same_request_again_while_it_loads_does_not_start_it_over():
    """A model job that retries its publish faster than the load takes: the load still finishes and serves."""
    loads = []

    def load(p):
        loads.append(p)
        time.sleep(0.3)
        return Versioned(p.stem)

    reloader = Reloader(Path("/m/model.pt"), load, lambda m: None, poll_s=60, watch=False)
    served, last, deadline = None, 0.0, time.monotonic() + 3.0
    while time.monotonic() < deadline and served is None:
        if time.monotonic() - last > 0.1:
            reloader.request(Path("/m/v7.pt"), "v7")
            last = time.monotonic()
        reloader.poll()
        served = reloader.take()
        time.sleep(0.01)
    assert served is not None and served.model.model_version == "v7" and len(loads) == 1


def test_a_load_nobody_wants_any_more_is_not_counted_as_refused_when_it_fails():
    import threading

    refused, gate = [], threading.Event()

    def load(p):
        gate.wait(5)
        raise RuntimeError("bad file")

    reloader = Reloader(Path("/m/model.pt"), load, lambda m: None, poll_s=60, watch=False, on_refused=refused.append)
    reloader.request(Path("/m/v7.pt"), "v7")
    reloader.poll()
    reloader.cancel()  # rolled back to what serves while v7 loaded
    gate.set()
    assert _wait(reloader, 0.3) is None and refused == []


def test_a_broker_that_refuses_to_create_a_topic_stops_start_up_with_one_line(monkeypatch):
    from concurrent.futures import Future

    from confluent_kafka import KafkaError, KafkaException

    import sorter.stream.kafka as kafka
    from sorter.errors import SorterError

    class Admin:
        def __init__(self, conf):
            pass

        def list_topics(self, timeout=None):
            return SimpleNamespace(topics={})

        def create_topics(self, topics, operation_timeout=None):
            out = {}
            for t in topics:
                f = Future()
                f.set_exception(KafkaException(KafkaError(KafkaError.POLICY_VIOLATION, "retention.ms=-1 not allowed")))
                out[t.topic] = f
            return out

    monkeypatch.setattr(kafka, "AdminClient", Admin)
    s = load_settings(kafka={"bootstrap_servers": "x:9092"})
    with pytest.raises(SorterError, match=r"sort\.control.*retention\.ms=-1 not allowed"):
        kafka.ensure_topics(s.kafka, {"sort.control": 1}, configs={"sort.control": {"retention.ms": "-1"}})
