"""The int8 CPU path: ``sorter quantize`` writes a checked int8 copy inside the checkpoint, and the
worker, evaluate and bench serve it where asked for or where it measures faster."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sorter.data.synth import write_dataset
from sorter.errors import CheckpointError, ConfigError, DatasetError
from sorter.model import int8
from sorter.model.checkpoint import _digest, read_checkpoint, save_checkpoint
from sorter.model.preprocess import load_for_model
from sorter.model.runtime import make_runtime
from sorter.stream.inference import Classifier
from sorter.train.evaluate import evaluate_folder
from sorter.train.quantize import QuantizeConfig, quantize_checkpoint
from sorter.train.trainer import TrainConfig, train

pytest.importorskip("openvino", reason="the int8 extra (CI installs it)")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model trained on synthetic photos, with a held-out test/ split it never saw."""
    root = tmp_path_factory.mktemp("int8")
    write_dataset(root / "data" / "train", classes=4, per_class=24, seed=1, size=(160, 120))
    write_dataset(root / "data" / "test", classes=4, per_class=12, seed=3, size=(160, 120))
    cfg = TrainConfig(backbone="mobilenet_v2", image_size=64, batch_size=16, device="cpu", precision="fp32", epochs=4)
    train(root / "data", root / "model.pt", cfg)
    return root


@pytest.fixture(scope="module")
def quantised(trained):
    out = trained / "model.int8.pt"
    # 48 held-out photos: one changed label is 2 points; the 0.5-point default is measured on real photos
    report = quantize_checkpoint(trained / "model.pt", trained / "data", out, QuantizeConfig(photos=48, max_drop=0.1))
    return out, report


def _photos(root, n=16):
    files = sorted((root / "data" / "test").rglob("*.png"))[:n] or sorted((root / "data" / "test").rglob("*.jpg"))[:n]
    return [load_for_model(f.read_bytes(), 64) for f in files]


def test_quantize_checks_the_int8_model_on_held_out_photos_and_stores_it(trained, quantised):
    out, report = quantised
    checkpoint = read_checkpoint(out)
    assert checkpoint.int8 is not None and checkpoint.int8_report == report
    assert report["scored_photos"] == 48 and report["calibration_photos"] == 48
    assert {"fp32_ece", "int8_ece", "mean_confidence_change", "openvino"} <= set(report)
    assert report["fp32_accuracy"] >= 0.75  # chance is 0.25: the check scored a model that learned something
    assert report["drop"] <= 0.1 and report["agreement"] >= 0.9
    # the original is untouched, and its weights are the int8 checkpoint's torch weights
    original = read_checkpoint(trained / "model.pt")
    assert original.int8 is None and original.meta == checkpoint.meta
    assert all(torch.equal(original.state[k], checkpoint.state[k]) for k in original.state)


def test_a_sorter_that_knows_no_int8_still_verifies_and_serves_the_fp32_weights(quantised):
    """Rolling a fleet back after quantising must keep working: the int8 section leaves the metadata and
    the checkpoint's own digest as they were (what the previous sorter checks), and stands beside them."""
    out, _ = quantised
    payload = torch.load(out, weights_only=True)
    assert "int8" not in payload["meta"]
    assert payload["sha256"] == _digest(payload["meta"], payload["state_dict"])


def test_the_worker_serves_the_int8_model_with_the_decisions_of_the_fp32_one(trained, quantised):
    out, _ = quantised
    photos = _photos(trained)
    fp32 = Classifier(out, device="cpu", precision="fp32")
    q = Classifier(out, device="cpu", precision="int8")
    assert q.precision == "int8" and isinstance(q.model, int8.Int8Model) and fp32.precision == "fp32"
    a, b = fp32.predict(photos), q.predict(photos)
    assert np.mean([x.label == y.label for x, y in zip(a, b, strict=True)]) >= 0.9
    assert max(abs(x.confidence - y.confidence) for x, y in zip(a, b, strict=True)) < 0.15
    assert [p.label for p in q.predict(photos[:1])] == [b[0].label]  # a batch of one, a new shape
    assert evaluate_folder(trained / "data", out, device="cpu", precision="int8").evaluation.n == 48


def test_auto_serves_whichever_the_cpu_runs_faster(trained, quantised, monkeypatch):
    out, _ = quantised
    for faster, expected in (("int8", "int8"), ("torch", "fp32")):

        def rates(forwards, x, rounds=3, errors=None, faster=faster):
            assert set(forwards) == {"torch", "int8"}
            return {name: 2.0 if name == faster else 1.0 for name in forwards}

        monkeypatch.setattr(int8, "time_forwards", rates)
        model = Classifier(out, device="cpu", precision="auto")
        assert model.precision in (expected, "bf16" if expected == "fp32" else expected)
        assert set(model.precision_probe) >= {"torch", "int8"}
    # a checkpoint without an int8 model: auto measures nothing about int8 and serves torch
    plain = Classifier(trained / "model.pt", device="cpu", precision="auto")
    assert plain.precision != "int8" and "int8" not in plain.precision_probe


def test_int8_without_an_int8_model_or_on_a_gpu_stops_at_start_up_with_what_to_do(trained, monkeypatch):
    with pytest.raises(ConfigError, match="sorter quantize"):
        Classifier(trained / "model.pt", device="cpu", precision="int8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="CPU path"):
        make_runtime("cuda", "int8")


def test_a_tampered_or_malformed_int8_section_is_refused_with_one_line(quantised, tmp_path):
    out, _ = quantised

    def edited(change):
        payload = torch.load(out, weights_only=True)
        change(payload)
        torch.save(payload, tmp_path / "edited.pt")
        return tmp_path / "edited.pt"

    def flip(p):
        p["int8"]["bin"][100] ^= 0xFF

    def report(p):
        p["int8"]["report"] = p["int8"]["report"].replace('"drop"', '"dr0p"')

    def grafted(p):  # an int8 model moved onto other weights (whose file has no unknown-product section)
        p["state_dict"]["head.bias"] += 1
        p["sha256"] = _digest(p["meta"], p["state_dict"])
        p.pop("ood", None)

    for change in (flip, report, grafted):
        checkpoint = read_checkpoint(edited(change))  # the fp32 weights verify: they still serve
        assert checkpoint.int8 is None and "int8 model fails its integrity check" in checkpoint.int8_problem
    for change in (lambda p: p["int8"].update(xml="text"), lambda p: p.update(int8=[1, 2])):
        assert "malformed int8 section" in read_checkpoint(edited(change)).int8_problem
    # only precision int8 needs it: it stops with the one line; fp32 and auto serve the fp32 weights
    path = edited(flip)
    with pytest.raises(CheckpointError, match="int8 model fails its integrity check"):
        Classifier(path, device="cpu", precision="int8")
    assert Classifier(path, device="cpu", precision="fp32").precision == "fp32"
    assert Classifier(path, device="cpu", precision="auto").precision != "int8"
    # a later sorter may add keys to the section: they are not read, and not a crash
    assert read_checkpoint(edited(lambda p: p["int8"].update(extra={"a": 1}))).int8 is not None


def test_an_int8_model_openvino_cannot_load_is_one_line_or_under_auto_a_warning(quantised, tmp_path, monkeypatch):
    out, _ = quantised
    broken = torch.load(out, weights_only=True)
    from sorter.model.checkpoint import _int8_digest

    xml = bytearray(broken["int8"]["xml"].numpy().tobytes().replace(b"<net ", b"<nett "))
    broken["int8"]["xml"] = torch.frombuffer(xml, dtype=torch.uint8)
    model8 = {"xml": broken["int8"]["xml"], "bin": broken["int8"]["bin"]}
    broken["int8"]["sha256"] = _int8_digest(broken["sha256"], broken["int8"]["report"], model8)
    torch.save(broken, tmp_path / "unloadable.pt")
    with pytest.raises(ConfigError, match="cannot load the checkpoint's int8 model"):
        Classifier(tmp_path / "unloadable.pt", device="cpu", precision="int8")
    assert Classifier(tmp_path / "unloadable.pt", device="cpu", precision="auto").precision != "int8"


def test_a_drop_above_the_limit_writes_nothing(trained, tmp_path, monkeypatch):
    real = int8.Int8Model

    class Worse(real):  # an int8 model that gets every photo of class 0 wrong
        def __call__(self, x):
            logits = super().__call__(x)
            wrong = logits.argmax(1) == 0
            logits[wrong, 1] = logits[wrong, 0] + 1
            return logits

    monkeypatch.setattr(int8, "Int8Model", Worse)
    out = tmp_path / "refused.pt"
    with pytest.raises(DatasetError, match="nothing written"):
        quantize_checkpoint(trained / "model.pt", trained / "data", out, QuantizeConfig(photos=16))
    assert not out.exists()


def test_a_checkpoint_without_int8_keeps_the_layout_it_always_had(tmp_path):
    from sorter.model.checkpoint import ModelMeta
    from sorter.model.classifier import build_classifier

    model, _ = build_classifier("mobilenet_v2", 2, pretrained=False)
    meta = ModelMeta(
        backbone="mobilenet_v2", classes=["a", "b"], skus=["A", "B"], image_size=32, mean=(0.5,) * 3,
        std=(0.25,) * 3, model_version="t-1",
    )  # fmt: skip
    save_checkpoint(tmp_path / "m.pt", model, meta)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert ("int8" not in payload and "int8" not in payload["meta"]) or payload["meta"]["int8"] == {}
    assert payload["sha256"] == _digest(payload["meta"], payload["state_dict"])
