import hashlib
import json

import cv2
import numpy as np

from sorter.data.synth import catalog, generate, write_dataset


def _digest(items):
    return hashlib.sha256(b"".join(data for _, _, data in items)).hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes():
    a = list(generate(3, 2, seed=7, size=(160, 120)))
    b = list(generate(3, 2, seed=7, size=(160, 120)))
    c = list(generate(3, 2, seed=8, size=(160, 120)))
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_classes_do_not_depend_on_seed_or_count():
    assert catalog(5) == catalog(12)[:5]
    labels = [d.label for d in catalog(60)]
    assert len(set(labels)) == 60
    assert len({d.sku for d in catalog(60)}) == 60
    assert len({d.kind for d in catalog(8)}) == 8  # small catalogs differ by shape first


def test_photos_are_jpegs_of_the_requested_size_and_vary():
    photos = [cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR) for _, _, d in generate(1, 3, size=(320, 240))]
    assert all(p.shape == (240, 320, 3) for p in photos)
    assert np.abs(photos[0].astype(int) - photos[1].astype(int)).mean() > 5


def test_imagefolder_layout_with_skus(tmp_path):
    designs = write_dataset(tmp_path, classes=3, per_class=2, size=(96, 64))
    for d in designs:
        assert sorted(p.name for p in (tmp_path / d.label).iterdir()) == [
            f"{d.label}-00000.jpg",
            f"{d.label}-00001.jpg",
        ]
    assert json.loads((tmp_path / "skus.json").read_text()) == {d.label: d.sku for d in designs}
