import pytest
import torch

from sorter.errors import CheckpointError
from sorter.model.checkpoint import ModelMeta, _digest, load_checkpoint, read_checkpoint, save_checkpoint
from sorter.model.classifier import build_classifier


def _meta(**overrides) -> ModelMeta:
    fields = dict(
        backbone="mobilenet_v2",
        classes=["a", "b", "c"],
        skus=["SKU-A", "SKU-B", "SKU-C"],
        image_size=64,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        model_version="test-1",
        metrics={"val_accuracy": 0.9},
    )
    return ModelMeta(**(fields | overrides))


@pytest.fixture
def saved(tmp_path):
    model, _ = build_classifier("mobilenet_v2", 3, pretrained=False)
    model.temperature.fill_(1.7)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, _meta())
    return path, model.eval()


def test_round_trip_keeps_weights_metadata_and_outputs(saved):
    path, model = saved
    loaded, meta = load_checkpoint(path)
    assert meta == _meta().model_copy(update={"created_at": meta.created_at})
    assert meta.skus == ["SKU-A", "SKU-B", "SKU-C"] and meta.num_classes == 3
    assert not loaded.training
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x))
    assert float(loaded.temperature) == pytest.approx(1.7)


def _rewrite(path, mutate, *, fix_digest=False):
    payload = torch.load(path, weights_only=True)
    mutate(payload)
    if fix_digest:
        payload["sha256"] = _digest(payload["meta"], payload["state_dict"])
    torch.save(payload, path)


def test_tampered_weights_are_rejected(saved):
    path, _ = saved
    _rewrite(path, lambda p: p["state_dict"]["head.weight"].add_(0.01))
    with pytest.raises(CheckpointError, match="integrity check"):
        load_checkpoint(path)


def test_tampered_metadata_is_rejected(saved):
    path, _ = saved
    _rewrite(path, lambda p: p["meta"]["skus"].reverse())
    with pytest.raises(CheckpointError, match="integrity check"):
        read_checkpoint(path)


def test_truncated_file_is_rejected(saved):
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot be read safely: it is not a torch file"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_metadata_are_rejected(saved):
    path, _ = saved

    def four_classes(p):
        p["meta"]["classes"].append("d")
        p["meta"]["skus"].append("SKU-D")

    _rewrite(path, four_classes, fix_digest=True)
    with pytest.raises(CheckpointError, match="do not fit a mobilenet_v2 classifier with 4 classes"):
        load_checkpoint(path)


def test_invalid_metadata_is_rejected_with_the_field(saved):
    path, _ = saved
    _rewrite(path, lambda p: p["meta"].update(image_size=5), fix_digest=True)
    with pytest.raises(CheckpointError, match="image_size"):
        load_checkpoint(path)


def test_pickled_code_is_never_run(tmp_path):
    path = tmp_path / "evil.pt"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": "sorter-checkpoint", "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="never executes pickled code"):
        load_checkpoint(path)


def test_other_files_and_versions_are_named(tmp_path, saved):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a sorter checkpoint"):
        load_checkpoint(other)
    path, _ = saved
    _rewrite(path, lambda p: p.update(format_version=99))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist; train one"):
        load_checkpoint(tmp_path / "missing.pt")


def test_metadata_validation():
    with pytest.raises(ValueError, match="2 skus for 3 classes"):
        _meta(skus=["x", "y"])
    with pytest.raises(ValueError, match="unknown backbone"):
        _meta(backbone="alexnet")


def test_the_unknown_product_threshold_is_a_section_an_older_sorter_skips_and_edits_are_refused(tmp_path):
    """Found in review: with the threshold inside the metadata, the sorter before it (whose metadata model
    forbids unknown fields) refused every new checkpoint, so a rollback of the worker stopped start-up."""
    from sorter.model.ood import OodMeta

    model, _ = build_classifier("mobilenet_v2", 3, pretrained=False)
    ood = OodMeta(score="energy", threshold=-2.5, false_review=0.02, fitted_on="calib", photos=120)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, _meta(ood=ood))
    payload = torch.load(path, weights_only=True)
    assert "ood" not in payload["meta"]  # what an older sorter validates is what it always was
    assert set(ModelMeta.model_fields) - {"ood"} >= set(payload["meta"])
    assert read_checkpoint(path).meta.ood == ood and load_checkpoint(path)[1].ood == ood
    save_checkpoint(path, model, _meta())
    assert read_checkpoint(path).meta.ood is None and "ood" not in torch.load(path, weights_only=True)
    save_checkpoint(path, model, _meta(ood=ood))
    _rewrite(path, lambda p: p["ood"]["meta"].update(threshold=5.0))  # "fewer reviews, please"
    with pytest.raises(CheckpointError, match="unknown-product threshold fails its integrity check"):
        read_checkpoint(path)
