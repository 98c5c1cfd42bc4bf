"""Simulator, replay schedule, inspect and diff, without a broker."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from sorter.cli import app
from sorter.traffic.diff import diff_commands, load_commands
from sorter.traffic.recording import Reader, Record, Writer
from sorter.traffic.replay import ReplayPlan, _renamed, parse_topic_map, scheduled, survey
from sorter.traffic.simulate import Simulator
from sorter.traffic.summary import summarize
from tests.failures import failure_message


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "sim.sorterrec"
    sim = Simulator(["dock-1", "dock-2"], 5.0, frames_per_item=(2, 2), classes=4, size=(160, 120), run_id="r1")
    sim.record(Writer(path), duration_s=3.0, start_ms=1_795_700_000_000)
    return path, sim


def test_the_simulator_writes_unique_items_with_k_frames_and_jittered_spacing(simulated):
    path, sim = simulated
    recs = list(Reader.open(path).records())
    assert len(recs) == sim.frames_sent == 2 * sim.items_sent
    per_item = Counter(r.header("item-id") for r in recs)
    assert set(per_item.values()) == {2} and len(per_item) == sim.items_sent
    assert all(item.startswith(("dock-1-r1-", "dock-2-r1-")) for item in per_item)
    for r in recs:
        assert r.header("station-id") == r.topic.removeprefix("frames.")
        assert int(r.header("captured-at")) == r.timestamp_ms
        assert r.header("camera-id") in ("cam-1", "cam-2") and r.value[:3] == b"\xff\xd8\xff"
    firsts = [r.timestamp_ms for r in recs if r.topic == "frames.dock-1" and r.header("camera-id") == "cam-1"]
    gaps = np.diff(firsts) / 1000
    assert np.all((gaps >= 0.75 / 5 - 0.05) & (gaps <= 1.25 / 5 + 0.05)) and gaps.std() > 0.005  # spaced, not fixed
    assert 12 <= sim.items_sent <= 34  # ~5 items/s x 2 stations x 3 s


def test_inspect_reports_stations_items_span_and_extracts_decodable_images(simulated, tmp_path):
    path, sim = simulated
    s = summarize(Reader.open(path), extract_to=tmp_path / "frames", limit=5).as_dict()
    assert s["records"] == sim.frames_sent and s["items"] == sim.items_sent and s["frames_per_item"] == 2
    assert set(s["stations"]) == {"dock-1", "dock-2"} and 2.0 < s["span_s"] <= 3.0
    assert s["damage"] is None and s["value_bytes"]["min"] > 1000
    files = sorted((tmp_path / "frames").rglob("*.jpg"))
    assert len(files) == 5
    assert all(cv2.imread(str(f)) is not None for f in files)


def test_the_schedule_scales_time_keeps_order_filters_stations_and_renames_loops(simulated):
    path, _ = simulated
    reader = Reader.open(path)
    recs = list(reader.records())
    info = survey(reader)
    plan = ReplayPlan(speed=10.0, loops=2, stations=frozenset({"dock-2"}))
    out = list(scheduled(reader, plan, info, allow_damaged=False))
    mine = [r for r in recs if r.header("station-id") == "dock-2"]
    assert [r for _, loop, r in out if loop == 0] == mine  # same records, same order
    for due, _, r in out[: len(mine)]:
        assert due == pytest.approx((r.timestamp_ms - info.first_ms) / 1000 / 10)
    second = [due for due, loop, _ in out if loop == 1]
    assert min(second) > max(due for due, loop, _ in out if loop == 0)  # loops back to back
    renamed = _renamed(mine[0], 1, "staging.frames.dock-2", restamp_ms=123)
    assert renamed.key == mine[0].key + b":r2" and renamed.header("item-id") == mine[0].header("item-id") + ":r2"
    assert renamed.header("captured-at") == "123" and renamed.topic == "staging.frames.dock-2"


def test_topic_map_and_plan_arguments_are_checked():
    assert parse_topic_map(["frames.a=frames.b"]) == {"frames.a": "frames.b"}
    assert ReplayPlan(topic_map={"a": "b"}, topic_prefix="staging.").topic("a") == "staging.b"
    with pytest.raises(Exception, match="OLD=NEW"):
        parse_topic_map(["nonsense"])
    with pytest.raises(Exception, match="speed"):
        ReplayPlan(speed=0)


def command(item, chute, label="box", confidence=0.9, version="v1"):
    return {
        "item_id": item,
        "station_id": "dock-1",
        "chute": chute,
        "label": label,
        "confidence": confidence,
        "reason": "classified",
        "model_version": version,
    }


def test_diff_reports_agreement_changes_and_one_sided_items(tmp_path):
    a = [command("i1", "C-1"), command("i2", "C-2"), command("i3", "C-3"), command("i3", "C-3"), command("i4", "C-4")]
    b = [command("i1", "C-1", version="v2"), command("i2", "C-9", "can", 0.6, "v2"), command("i3", "C-3", version="v2")]
    b.append(command("i5", "C-5", version="v2"))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(c) + "\n" for c in a))
    with Writer(tmp_path / "b.sorterrec") as w:  # a recording of a commands topic works as well
        for i, c in enumerate(b):
            w.write(Record("sort.commands", 0, i, None, b"dock-1", (), json.dumps(c).encode()))
    ca, dup_a = load_commands(tmp_path / "a.jsonl")
    cb, dup_b = load_commands(tmp_path / "b.sorterrec")
    assert (dup_a, dup_b) == (1, 0)
    d = diff_commands(ca, cb)
    assert d.common == 3 and d.same_chute == 2 and d.chute_agreement == pytest.approx(2 / 3)
    assert d.only_a == ["i4"] and d.only_b == ["i5"] and d.versions_b == ["v2"]
    assert d.changed == [
        {
            "item_id": "i2",
            "station_id": "dock-1",
            "chute": ["C-2", "C-9"],
            "label": ["box", "can"],
            "confidence": [0.9, 0.6],
            "reason": ["classified", "classified"],
        }
    ]
    result = CliRunner().invoke(app, ["diff", str(tmp_path / "a.jsonl"), str(tmp_path / "b.sorterrec"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["changed"] == 1
    failing = CliRunner().invoke(
        app, ["diff", str(tmp_path / "a.jsonl"), str(tmp_path / "b.sorterrec"), "--fail-under", "0.9"]
    )
    assert failing.exit_code == 1
    assert "66.67% is below --fail-under 90.00%" in failing.output  # says why it failed


def test_diff_refuses_a_file_that_holds_no_commands(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"item_id": "a"}\nnot json\n')
    with pytest.raises(Exception, match=r"x.jsonl, line 2: not a routing command"):
        load_commands(tmp_path / "x.jsonl")


def test_inspect_on_a_damaged_recording_fails_with_where_unless_allowed(simulated, tmp_path):
    path, _ = simulated
    cut = tmp_path / "cut.sorterrec"
    cut.write_bytes(path.read_bytes()[:-1000])
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "sorter", "inspect", str(cut)], capture_output=True, text=True)
    assert run.returncode == 2 and "truncated record at byte" in run.stderr and "intact record(s)" in run.stderr
    ok = CliRunner().invoke(app, ["inspect", str(cut), "--allow-damaged", "--json"])
    assert ok.exit_code == 0
    assert json.loads(ok.stdout.strip().splitlines()[-1])["intact_before_damage"] > 0


def test_record_against_an_unreachable_broker_fails_clearly(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    proc = subprocess.run(
        [sys.executable, "-m", "sorter", "record", "--out", str(tmp_path / "r.sorterrec"),
         "--bootstrap-servers", f"127.0.0.1:{port}", "--duration", "3", "--broker-wait", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert failure_message(proc).startswith("no Kafka broker answered")
    assert not (tmp_path / "r.sorterrec").exists()  # no empty recording left behind


def test_inspect_a_recording_of_the_commands_topic_reads_items_and_stations_from_the_commands(tmp_path):
    with Writer(tmp_path / "cmd.sorterrec") as w:  # key = station, value = the command
        for i, item in enumerate(["i1", "i2", "i3", "i3"]):
            w.write(Record("sort.commands", 0, i, None, b"dock-7", (), json.dumps(command(item, "C-1")).encode()))
    s = summarize(Reader.open(tmp_path / "cmd.sorterrec"))
    assert s.items == 3 and dict(s.stations) == {"dock-1": 4}


@pytest.mark.parametrize("command", ["simulate", "replay"])
def test_simulate_and_replay_against_an_unreachable_broker_fail_in_one_line(command, tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    args = ["--duration", "2", "--stations", "1"]
    if command == "replay":
        recording = tmp_path / "r.sorterrec"
        made = CliRunner().invoke(app, ["simulate", "--out", str(recording), "--duration", "1", "--width", "64"])
        assert made.exit_code == 0, made.output
        args = [str(recording)]
    proc = subprocess.run(
        [sys.executable, "-m", "sorter", command, *args,
         "--bootstrap-servers", f"127.0.0.1:{port}", "--broker-wait", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert failure_message(proc).startswith("no Kafka broker answered"), proc.stderr


def test_tools_read_headers_as_the_worker_does():
    """One header rule for the worker, replay --station and inspect: the last value of a repeated
    header, trimmed; a value that is not UTF-8 names nothing (the worker dead-letters that frame)."""
    from sorter.stream.contracts import parse_frame

    headers = (("station-id", b"dock-1"), ("item-id", b"a-1"), ("station-id", b" dock-2 "))
    r = Record("frames.dock-9", 0, 7, 1_795_700_000_000, b"k", headers, b"jpeg")
    frame = parse_frame(r.to_raw(), "frames.")
    assert (frame.station_id, frame.item_id) == ("dock-2", "a-1")
    assert r.station() == frame.station_id and r.header("item-id") == frame.item_id
    assert replace(r, headers=(("camera-id", b"\xff"),)).header("camera-id") is None
    assert ReplayPlan(stations=frozenset({"dock-2"})).station(r) == "dock-2"


def test_loop_suffixes_go_on_the_id_the_worker_reads():
    """A padded id keeps routing on every loop (trimmed, then suffixed); a blank one stays blank."""
    from sorter.stream.contracts import parse_frame
    from sorter.traffic.replay import _renamed

    padded = Record(
        "frames.dock-1", 0, 0, 1, b" a-1 ", (("item-id", b" a-1 "), ("captured-at", b"1795700000000")), b"x"
    )
    again = _renamed(padded, 1, "frames.dock-1", None)
    assert parse_frame(again.to_raw()).item_id == "a-1:r2" and again.key == b"a-1:r2"
    blank = Record("frames.dock-1", 0, 1, 1, None, (("item-id", b" "),), b"x")
    assert _renamed(blank, 1, "frames.dock-1", None).headers == (("item-id", b" "),)


def test_a_direct_replay_judges_no_frame_late_however_old_the_recording(simulated):
    """A recording's capture times are hours old by the time a model comparison replays it: with the line's
    routing table (a decision deadline in it) every item would go to the late chute and the diff would
    compare nothing. ``replay --direct`` has no queue to be late in, so it classifies every frame."""
    from sorter.stream.cache import MemoryCache
    from sorter.stream.inference import Prediction
    from sorter.stream.pipeline import Decoder, Pipeline
    from sorter.stream.routing import RoutingTable
    from sorter.traffic.replay import replay_direct

    class Model:  # any photo: a confident box
        input_size, model_version = 32, "m-1"

        def predict(self, images):
            return [Prediction(0, "box", "SKU-0", 0.9) for _ in images]

    path, sim = simulated
    table = RoutingTable(default_chute="C-99", review_chute="R", decision_deadline_ms=800, late_chute="RECIRC")
    decoder = Decoder(2, max_pixels=10**6)
    pipeline = Pipeline(Model(), table, MemoryCache(), decoder, worker_id="w", topic_prefix="frames.")
    try:
        results = list(replay_direct(Reader.open(path), pipeline, ReplayPlan()))
    finally:
        decoder.close()
    commands = [c for r in results for c in r.commands]
    assert len(commands) == sim.items_sent and not any(r.late for r in results)
    assert {c.reason for c in commands} <= {"classified", "low_confidence", "unknown_sku"}


def test_the_simulator_sends_a_share_of_products_outside_the_trained_catalog_when_asked():
    from itertools import islice

    from sorter.data.synth import catalog

    known = {d.label for d in catalog(4)}
    sim = Simulator(["dock-1"], 5.0, classes=4, size=(64, 48), unknown_fraction=0.3, seed=1)
    designs = [p.design.label for p in islice(sim.photos(0), 200)]
    unknown = [d for d in designs if d not in known]
    assert set(unknown) <= {d.label for d in catalog(6)[4:]} and 0.2 < len(unknown) / 200 < 0.4
    plain = Simulator(["dock-1"], 5.0, classes=4, size=(64, 48), seed=1)
    assert all(p.design.label in known for p in islice(plain.photos(0), 50))
    with pytest.raises(Exception, match="unknown fraction"):
        Simulator(["dock-1"], 5.0, unknown_fraction=1.0)


@pytest.mark.parametrize("views", [2, 3], ids=["every-camera-came", "windows-close"])
def test_a_direct_replay_fuses_an_item_s_views_across_batches_on_the_recording_s_clock(simulated, views):
    """Two cameras per item, batches of 3 (views split across them): one command per item, from both views;
    with 3 expected views the windows close on the recording's clock, the last items at the end."""
    from sorter.stream.cache import MemoryCache
    from sorter.stream.inference import Prediction
    from sorter.stream.pipeline import Decoder, Pipeline
    from sorter.stream.routing import RoutingTable
    from sorter.traffic.replay import replay_direct

    class Model:
        input_size, model_version = 32, "m-1"

        def predict(self, images):
            return [Prediction(0, "box", "SKU-0", 0.9) for _ in images]

    path, sim = simulated
    table = RoutingTable(default_chute="C-99", review_chute="R", fusion={"window_ms": 150, "views": views})
    decoder = Decoder(2, max_pixels=10**6)
    pipeline = Pipeline(Model(), table, MemoryCache(), decoder, worker_id="w", topic_prefix="frames.")
    try:
        results = list(replay_direct(Reader.open(path), pipeline, ReplayPlan(), batch_size=3))
    finally:
        decoder.close()
    commands = [c for r in results for c in r.commands]
    assert sorted(c.item_id for c in commands) == sorted({c.item_id for c in commands})  # one each
    assert len(commands) == sim.items_sent and {c.views for c in commands} == {2}
    assert all(c.cameras == ["cam-1", "cam-2"] for c in commands)
    assert pipeline.fusion_due_in_ms() is None


def test_camera_poses_render_each_camera_s_own_view_of_the_item():
    from itertools import islice

    from sorter.model.preprocess import load_for_model

    plain = Simulator(["t-1"], 5.0, frames_per_item=(3, 3), classes=4, size=(160, 120), run_id="r")
    posed = Simulator(["t-1"], 5.0, frames_per_item=(3, 3), classes=4, size=(160, 120), run_id="r", camera_poses=True)
    a, b = list(islice(plain.photos(0), 6)), list(islice(posed.photos(0), 6))
    assert [dict(p.headers)["camera-id"] for p in b] == [b"cam-1", b"cam-2", b"cam-3"] * 2
    assert a[0].design == b[0].design  # the same first item, seen otherwise
    assert all(x.value != y.value for x, y in zip(a, b, strict=True))
    assert all(load_for_model(p.value, 32).shape == (32, 32, 3) for p in b)
