from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sorter.data.synth import write_dataset


@pytest.fixture(autouse=True)
def offline_torch_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test sees an empty torchvision cache and cannot download: tests never touch the network."""
    home = tmp_path_factory.mktemp("torch_home")
    monkeypatch.setenv("TORCH_HOME", str(home))

    def no_download(*args, **kwargs):
        raise AssertionError("a test tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return home


@pytest.fixture(scope="session")
def synth_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic ImageFolder: 4 products x 24 photos (train) and x 10 (val), 160x120 px."""
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root / "train", classes=4, per_class=24, seed=1, size=(160, 120))
    write_dataset(root / "val", classes=4, per_class=10, seed=2, size=(160, 120))
    (root / "skus.json").write_text((root / "train" / "skus.json").read_text())
    return root


def pytest_terminal_summary(terminalreporter) -> None:
    from tests.figures import FIGURES

    if FIGURES:
        terminalreporter.section("reliability figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
