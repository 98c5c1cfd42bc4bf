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


def test_hard_catalogue_is_families_that_differ_only_in_print():
    designs = catalog(12, hard=True)
    assert len({d.label for d in designs}) == 12 and len({d.sku for d in designs}) == 12
    for first, by_ink, by_pattern in zip(designs[::3], designs[1::3], designs[2::3], strict=True):
        assert first.kind == by_ink.kind == by_pattern.kind and first.colour == by_ink.colour == by_pattern.colour
        assert by_ink.pattern == first.pattern and by_ink.ink not in (None, first.colour)
        assert by_pattern.pattern != first.pattern and by_pattern.ink is None
    assert catalog(4, hard=True) == catalog(12, hard=True)[:4]
    assert catalog(4) != catalog(4, hard=True)  # the plain catalogue is unchanged by the option


def test_hard_photos_are_deterministic_and_not_the_plain_ones():
    a = list(generate(3, 2, seed=7, size=(160, 120), hard=True))
    assert _digest(a) == _digest(generate(3, 2, seed=7, size=(160, 120), hard=True))
    assert _digest(a) != _digest(generate(3, 2, seed=8, size=(160, 120), hard=True))


def test_back_pose_hides_the_pattern_but_not_the_print_colour():
    from sorter.data.synth import _paint_product

    first, by_ink, by_pattern = catalog(3, hard=True)

    def back(design):
        return _paint_product(design, 120, 90, np.random.default_rng(0), pose="back")

    def face(design):
        return _paint_product(design, 120, 90, np.random.default_rng(0))

    assert np.array_equal(back(first), back(by_pattern))  # upside down, flavours by pattern look alike
    assert not np.array_equal(back(first), back(by_ink))  # ... the label's print colour still tells
    assert not np.array_equal(face(first), face(by_pattern))


def test_hard_photos_show_neighbours_at_the_frame_edges():
    """Plain photos keep the frame's left and right edges empty belt; hard ones carry neighbouring parcels there."""

    def edge_activity(hard):
        values = []
        for _, _, data in generate(3, 12, seed=1, size=(320, 240), hard=hard):
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).astype(int)
            rails = 240 // 20 + 2
            strip = np.concatenate([img[rails:-rails, :12], img[rails:-rails, -12:]], axis=1)
            values.append(np.abs(strip - np.median(strip, axis=(0, 1))).mean())
        return np.mean(values)

    assert edge_activity(True) > 1.5 * edge_activity(False)


def test_glare_saturates_part_of_the_item_and_nothing_else():
    from sorter.data.synth import _glare

    frame = np.full((120, 160, 3), 100, np.float32)
    alpha = np.zeros((120, 160), np.float32)
    cv2.circle(alpha, (80, 60), 30, 1.0, -1)
    out = np.clip(_glare(frame.copy(), alpha, np.random.default_rng(3)), 0, 255)
    assert (out[alpha > 0] >= 250).any()  # a saturated highlight on the item
    assert np.array_equal(out[alpha == 0], frame[alpha == 0])  # the belt is matte
