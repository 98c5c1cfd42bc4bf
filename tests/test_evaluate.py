"""`sorter evaluate` scores photos the model never saw, and the operating curve a line manager needs."""

from __future__ import annotations

import numpy as np
import pytest

from sorter.data.folder import photo_digest, scan
from sorter.errors import DatasetError
from sorter.model.checkpoint import ModelMeta, save_checkpoint
from sorter.model.classifier import build_classifier
from sorter.train.evaluate import evaluate_folder
from sorter.train.metrics import risk_coverage
from tests.test_folder import _tree


def _checkpoint(path, seen):
    model, _ = build_classifier("mobilenet_v2", 2, pretrained=False)
    meta = ModelMeta(
        backbone="mobilenet_v2", classes=["a", "b"], skus=["A", "B"], image_size=32, mean=(0.5,) * 3,
        std=(0.25,) * 3, model_version="t-1", seen=sorted(seen),
    )  # fmt: skip
    save_checkpoint(path, model, meta)
    return path


def test_photos_that_trained_or_tuned_the_model_are_left_out_unless_asked(tmp_path):
    _tree(tmp_path / "data", {"a": 6, "b": 6})
    _, samples = scan(tmp_path / "data")
    # the tree's colours repeat (40 * i % 255), so content digests are per distinct photo: use them as such
    digests = {photo_digest(s.path) for s in samples}
    held_out = {photo_digest(s.path) for s in samples if s.path.stem in ("5",)}
    ckpt = _checkpoint(tmp_path / "m.pt", digests - held_out)
    score = evaluate_folder(tmp_path / "data", ckpt, device="cpu")
    assert score.evaluation.n == 2 and score.skipped_seen == 10  # only the two photos it never saw
    assert evaluate_folder(tmp_path / "data", ckpt, device="cpu", include_seen=True).evaluation.n == 12


def test_a_folder_entirely_seen_is_refused_and_a_tree_without_test_is_explained(tmp_path):
    _tree(tmp_path / "data", {"a": 3, "b": 3})
    _, samples = scan(tmp_path / "data")
    ckpt = _checkpoint(tmp_path / "m.pt", {photo_digest(s.path) for s in samples})
    with pytest.raises(DatasetError, match="--include-seen"):
        evaluate_folder(tmp_path / "data", ckpt, device="cpu")
    _tree(tmp_path / "split" / "train", {"a": 2, "b": 2})
    _tree(tmp_path / "split" / "val", {"a": 1, "b": 1})
    with pytest.raises(DatasetError, match="no test/"):
        evaluate_folder(tmp_path / "split", ckpt, device="cpu")


def test_risk_coverage_suggests_the_lowest_threshold_meeting_the_target_error():
    # 10 items, all predicted class 0: the two least confident are wrong
    conf = np.array([0.52, 0.55, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99])
    probs = np.stack([conf, 1 - conf], axis=1)
    labels = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    rc = risk_coverage(probs, labels, target_error=0.0)
    s = rc["suggested_min_confidence"]
    assert s["threshold"] == pytest.approx(0.56, abs=0.006) and s["review_share"] == pytest.approx(0.2)
    first = rc["curve"][0]
    assert first["review_share"] == 0 and first["routed_error"] == pytest.approx(0.2)


def test_pictures_go_into_folders_that_do_not_exist_yet(tmp_path):
    """`evaluate --confusion reports/m.png`, `explain --out out/why.png`: a path is never a traceback."""
    import numpy as np

    from sorter.train.plots import plot_confusion

    out = tmp_path / "reports" / "2026" / "m.confusion.png"
    plot_confusion(np.array([[3, 1], [0, 4]]), ["a", "b"], out, title="t")
    assert out.stat().st_size > 0


def test_unknown_photos_that_are_known_or_missing_are_refused_before_anything_is_scored(tmp_path):
    _tree(tmp_path / "data", {"a": 3, "b": 3})
    _, samples = scan(tmp_path / "data")
    ckpt = _checkpoint(tmp_path / "m.pt", set())
    among = r"0 of its photos trained or tuned this model and [1-9]\d* are among the known"
    with pytest.raises(DatasetError, match=among):
        evaluate_folder(tmp_path / "data", ckpt, device="cpu", unknown=tmp_path / "data")  # the test folder itself
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no photos in it"):
        evaluate_folder(tmp_path / "data", ckpt, device="cpu", unknown=tmp_path / "empty")
    with pytest.raises(DatasetError, match="is not a folder"):
        evaluate_folder(tmp_path / "data", ckpt, device="cpu", unknown=tmp_path / "nope")
    trained = _checkpoint(tmp_path / "t.pt", {photo_digest(samples[0].path)})
    _tree(tmp_path / "other", {"a": 1})
    with pytest.raises(DatasetError, match=r"[1-9]\d* of its photos trained or tuned this model"):
        evaluate_folder(tmp_path / "data", trained, device="cpu", unknown=tmp_path / "other")
