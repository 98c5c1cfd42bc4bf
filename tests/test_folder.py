import json
from collections import Counter

import cv2
import numpy as np
import pytest

from sorter.data.folder import DecodedImages, load_splits, read_skus, scan
from sorter.errors import DatasetError


def _tree(root, counts, *, gray=False):
    for label, n in counts.items():
        (root / label).mkdir(parents=True)
        for i in range(n):
            img = np.full((30, 40) if gray else (30, 40, 3), 40 * i % 255, np.uint8)
            cv2.imwrite(str(root / label / f"{i}.png"), img)


def test_stratified_split_keeps_every_class_in_validation(tmp_path):
    _tree(tmp_path, {"a": 20, "b": 10, "c": 4})
    splits = load_splits(tmp_path, val_fraction=0.2, seed=0, test_fraction=0)
    assert splits.classes == ["a", "b", "c"]
    assert Counter(s.label for s in splits.val) == {0: 2, 1: 1, 2: 1}  # early stopping sees every class
    assert Counter(s.label for s in splits.calib) == {0: 2, 1: 1}
    assert len(splits.train) + len(splits.val) + len(splits.calib) == 34
    assert not {s.path for s in splits.train} & {s.path for s in splits.val + splits.calib}


def test_train_and_val_folders_are_used_as_given(tmp_path):
    _tree(tmp_path / "train", {"a": 3, "b": 3})
    _tree(tmp_path / "val", {"a": 1, "b": 2})
    splits = load_splits(tmp_path)
    assert (len(splits.train), len(splits.val), len(splits.calib), len(splits.test)) == (6, 2, 1, 0)


def test_val_with_a_label_train_lacks_is_an_error(tmp_path):
    _tree(tmp_path / "train", {"a": 3, "b": 3})
    _tree(tmp_path / "val", {"a": 1, "zebra": 1})
    with pytest.raises(DatasetError, match="zebra"):
        load_splits(tmp_path)


def test_a_folder_without_classes_is_explained(tmp_path):
    _tree(tmp_path, {"only": 3})
    with pytest.raises(DatasetError, match="at least 2 class folders"):
        scan(tmp_path)


def test_grayscale_photos_become_rgb_tensors(tmp_path):
    _tree(tmp_path, {"a": 2, "b": 2}, gray=True)
    _, samples = scan(tmp_path)
    images = DecodedImages(samples, 32)
    image, label = images[3]
    assert image.shape == (3, 32, 32) and label == 1
    assert images.cache is not None


def test_unreadable_photo_names_the_file(tmp_path):
    _tree(tmp_path, {"a": 1, "b": 1})
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    _, samples = scan(tmp_path)
    with pytest.raises(DatasetError, match=r"broken\.jpg"):
        DecodedImages(samples, 32)


def test_skus_file_maps_labels(tmp_path):
    (tmp_path / "skus.json").write_text(json.dumps({"a": "SKU-1"}))
    assert read_skus(tmp_path, ["a", "b"]) == ["SKU-1", "b"]
    (tmp_path / "skus.json").write_text("{nope")
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_skus(tmp_path, ["a"])


def test_a_test_folder_is_held_out_and_the_tuning_splits_come_from_train(tmp_path):
    """DATA/train + DATA/test: test photos are never trained or tuned on; validation (early stopping) and
    calibration (temperature) are carved from train, apart from each other."""
    _tree(tmp_path / "train", {"a": 20, "b": 20})
    _tree(tmp_path / "test", {"a": 4, "b": 4})
    splits = load_splits(tmp_path, val_fraction=0.2, seed=0)
    assert splits.classes == ["a", "b"]
    assert {s.path.parent.parent.name for s in splits.test} == {"test"} and len(splits.test) == 8
    parts = [splits.train, splits.val, splits.calib]
    assert all({s.path.parent.parent.name for s in p} == {"train"} for p in parts)
    assert sum(len(p) for p in parts) == 40 and len(splits.val) == len(splits.calib) == 4
    paths = [{s.path for s in p} for p in parts]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])


def test_a_flat_tree_keeps_a_test_split_apart_the_same_way_every_time(tmp_path):
    _tree(tmp_path, {"a": 30, "b": 30})
    first, again = load_splits(tmp_path, seed=3), load_splits(tmp_path, seed=3)
    assert [s.path for s in first.test] == [s.path for s in again.test]
    assert Counter(s.label for s in first.test) == {0: 3, 1: 3}  # 10%, every class
    held = {s.path for s in first.test}
    assert not held & {s.path for s in first.train + first.val + first.calib}
    assert load_splits(tmp_path, seed=3, test_fraction=0).test == []  # asked for none: none
