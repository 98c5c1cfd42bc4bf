"""The command line end to end: synth -> train -> evaluate --json -> explain, and its error paths."""

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from sorter.cli import app
from tests.failures import failure_message

runner = CliRunner()


def _ok(args):
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.slow
def test_synth_train_evaluate_explain(tmp_path):
    data, ckpt = tmp_path / "data", tmp_path / "m.pt"
    _ok(
        [
            "synth",
            str(data),
            "--classes",
            "3",
            "--per-class",
            "12",
            "--val-per-class",
            "6",
            "--test-per-class",
            "4",
            "--width",
            "160",
            "--height",
            "120",
            "--seed",
            "3",
        ]
    )
    assert sorted(p.name for p in (data / "val").iterdir()) == sorted(p.name for p in (data / "train").iterdir())
    _ok(
        [
            "train",
            str(data),
            "--out",
            str(ckpt),
            "--backbone",
            "mobilenet_v2",
            "--epochs",
            "2",
            "--image-size",
            "64",
            "--device",
            "cpu",
        ]
    )
    result = _ok(["evaluate", str(data), "--checkpoint", str(ckpt), "--json", "--device", "cpu"])
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["n"] == 12  # the held-out test/ split: 3 classes x 4 (val/ tuned the model)
    assert {"accuracy", "macro_f1", "ece", "n"} <= set(summary) and summary["skipped_seen"] == 0
    assert (tmp_path / "m.risk-coverage.png").stat().st_size > 5_000
    assert summary["suggested_min_confidence"] is None or 0 <= summary["suggested_min_confidence"]["threshold"] < 1
    assert 0 <= summary["ece"] <= 1 and len(summary["per_class"]) == 3
    assert (tmp_path / "m.confusion.png").stat().st_size > 5_000
    # products it was never trained on: how the checkpoint's fitted threshold treats them
    from sorter.data.synth import catalog, render

    others = tmp_path / "others" / "deep"
    others.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, design in enumerate(catalog(6)[3:]):  # designs after the three it knows
        (others / f"{i}.jpg").write_bytes(render(design, rng, size=(160, 120)))
    result = _ok(["evaluate", str(data), "-c", str(ckpt), "--json", "--device", "cpu", "--unknown", str(others.parent)])
    unknown = json.loads(result.stdout.strip().splitlines()[-1])["unknown"]
    assert (unknown["unknown_photos"], unknown["known_photos"]) == (3, 12) and set(unknown["auroc"]) == {
        "energy", "max_logit", "msp"
    }  # fmt: skip
    fitted = unknown["fitted"]
    assert fitted["score"] == "energy" and fitted["fitted_on"] == "calib" and 0 <= fitted["unknown_caught"] <= 1
    photo = next((data / "val").glob("*/*.jpg"))
    result = _ok(
        [
            "explain",
            str(photo),
            "--checkpoint",
            str(ckpt),
            "--out",
            str(tmp_path / "x.png"),
            "--top-k",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert (tmp_path / "x.png").stat().st_size > 10_000
    assert "attention map" in result.stdout


def test_bad_checkpoint_stops_with_a_message_and_exit_code_2(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    (tmp_path / "img.jpg").write_bytes(b"x")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sorter",
            "explain",
            str(tmp_path / "img.jpg"),
            "-c",
            str(bad),
            "-o",
            str(tmp_path / "o.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "cannot be read safely" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_resnet18_without_offline_weights_explains_the_fix(tmp_path):
    data = tmp_path / "d"
    _ok(["synth", str(data), "--classes", "2", "--per-class", "2", "--width", "64", "--height", "48"])
    proc = subprocess.run(
        [sys.executable, "-m", "sorter", "train", str(data), "--out", str(tmp_path / "m.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    message = failure_message(proc)  # one line, naming the flags that fix it, the offline backbone first
    assert "--backbone mobilenet_v2" in message and "--no-pretrained" in message and "--weights" in message


def _fails_in_one_line(*args: str, timeout: float = 120) -> str:
    proc = subprocess.run([sys.executable, "-m", "sorter", *args], capture_output=True, text=True, timeout=timeout)
    return failure_message(proc)


def test_a_failure_is_a_json_event_with_json_logs_and_plain_text_on_a_console(tmp_path):
    """`kubectl logs` merges stdout and stderr: with JSON logs the last line must parse too."""
    args = ["synth", str(tmp_path / "s"), "--classes", "0"]
    as_json = subprocess.run([sys.executable, "-m", "sorter", *args], capture_output=True, text=True, timeout=120)
    assert as_json.stderr.startswith("{") and "--classes" in failure_message(as_json)
    console = subprocess.run(
        [sys.executable, "-m", "sorter", "--log-format", "console", *args], capture_output=True, text=True, timeout=120
    )
    assert console.stderr.startswith("error: --classes 0") and "--classes" in failure_message(console)


def test_user_mistakes_are_one_line_and_exit_2(tmp_path):
    from tests.test_evaluate import _checkpoint

    ckpt = _checkpoint(tmp_path / "m.pt", set())
    assert "nope.jpg" in _fails_in_one_line(
        "explain", str(tmp_path / "nope.jpg"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o.png")
    )
    assert "--classes" in _fails_in_one_line("synth", str(tmp_path / "s"), "--classes", "0")
    assert "rate" in _fails_in_one_line(
        "simulate", "--rate", "0", "--out", str(tmp_path / "x.sorterrec"), "--duration", "1"
    )
    data = tmp_path / "d"
    _ok(["synth", str(data), "--classes", "2", "--per-class", "2", "--width", "64", "--height", "48"])
    assert "unknown backbone" in _fails_in_one_line(
        "train", str(data), "--out", str(tmp_path / "m.pt"), "--backbone", "x"
    )
    assert "--epochs" in _fails_in_one_line("train", str(data), "--out", str(tmp_path / "m.pt"), "--epochs", "0")


def test_version():
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and version("sorter") in result.output


def test_a_busy_metrics_port_is_one_message_before_the_model_loads(tmp_path):
    import socket

    from sorter.errors import ConfigError
    from sorter.settings import load_settings
    from sorter.stream.app import build_worker

    routes = tmp_path / "routes.yaml"
    routes.write_text("default_chute: C-99\nreview_chute: REVIEW\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = load_settings(
            observe={"host": "127.0.0.1", "port": port},
            routes=routes,
            model={"checkpoint": tmp_path / "not-loaded-yet.pt"},
        )
        with pytest.raises(ConfigError, match=rf"port {port}.*--metrics-port"):
            build_worker(settings)


def test_help_groups_the_commands_and_every_command_shows_an_example_and_no_bool_placeholder():
    top = runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    for panel in ("Model", "Stream", "Traffic", "Measure"):
        assert f"─ {panel} " in top, top
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert len(names) >= 14
    for name in names:
        text = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"}).output
        assert "Example: sorter" in text and name in text.split("Example:")[1], (name, text)
        flags = [line for line in text.splitlines() if "<bool>" in line and "--help" not in line]
        assert not flags, (name, flags)
        assert "{out_dir}" not in text and "{data_dir}" not in text


def test_a_port_left_in_time_wait_by_the_previous_process_is_not_taken(tmp_path):
    """A container restarted in the same pod finds its old connections to the metrics port in TIME_WAIT
    (the server closes every probe connection): the port is free for a server, so start-up must go on."""
    import threading
    import urllib.request
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from sorter.settings import load_settings
    from sorter.stream.app import _check_port

    class Ok(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    previous = ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    port = previous.server_address[1]
    threading.Thread(target=previous.serve_forever, daemon=True).start()
    urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=5).read()
    previous.shutdown()
    previous.server_close()
    _check_port(load_settings(observe={"host": "127.0.0.1", "port": port}))  # no ConfigError


def test_a_bad_checkpoint_or_strict_route_stops_start_up_before_the_broker_wait(tmp_path):
    """With the broker down too, what is wrong with the files must not hide behind a 60 s broker wait."""
    import socket
    import time

    from sorter.errors import SorterError
    from sorter.settings import load_settings
    from sorter.stream.app import build_worker
    from tests.test_evaluate import _checkpoint

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    good = _checkpoint(tmp_path / "m.pt", set())
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:-100])  # truncated
    routes = tmp_path / "routes.yaml"
    routes.write_text("default_chute: C-99\nreview_chute: REVIEW\nroutes: {no-such-label: C-01}\n")
    base = {
        "kafka": {"bootstrap_servers": f"127.0.0.1:{port}", "startup_timeout_s": 60},
        "redis": {"enabled": False},
        "observe": {"enabled": False},
        "routes": routes,
    }
    for checkpoint, strict, expected in ((bad, False, r"bad\.pt"), (good, True, "no-such-label")):
        started = time.monotonic()
        with pytest.raises(SorterError, match=expected):
            build_worker(load_settings(**base, model={"checkpoint": checkpoint, "device": "cpu"}, strict_routes=strict))
        assert time.monotonic() - started < 20


def test_synth_hard_writes_the_fine_grained_catalogue(tmp_path):
    import json

    out = tmp_path / "hard"
    _ok(["synth", str(out), "--hard", "--classes", "3", "--per-class", "1", "--width", "96", "--height", "72"])
    labels = sorted(json.loads((out / "skus.json").read_text()))
    assert labels == sorted(p.name for p in out.iterdir() if p.is_dir())
    assert any(label.endswith("-ink") for label in labels)  # a family member told apart by its print colour
