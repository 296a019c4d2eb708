"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

# --- Fixture models (delf_retrieval.testing): each built once per session. ---------------


def _build(tmp_path_factory: pytest.TempPathFactory, name: str, **kwargs: bool) -> Path:
    pytest.importorskip("tensorflow", reason="fixture models need TensorFlow")
    from delf_retrieval import testing

    builder = {
        "delg_tf2": testing.build_delg_tf2,
        "delg_tf1": testing.build_delg_tf1,
        "delf_hub": testing.build_delf_hub,
    }[name]
    folder = tmp_path_factory.mktemp("models") / name
    return builder(folder, **kwargs)


@pytest.fixture(scope="session")
def delg_tf2_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a DELG-like TF2 SavedModel (local + global)."""
    return _build(tmp_path_factory, "delg_tf2")


@pytest.fixture(scope="session")
def delg_tf2_global_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a DELG-like TF2 SavedModel (global only)."""
    return _build(tmp_path_factory, "delg_tf2", global_only=True)


@pytest.fixture(scope="session")
def delg_tf1_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a DELG-like TF1 SavedModel (local + global, Kaggle layout)."""
    return _build(tmp_path_factory, "delg_tf1")


@pytest.fixture(scope="session")
def delg_tf1_global_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a DELG-like TF1 SavedModel (global only)."""
    return _build(tmp_path_factory, "delg_tf1", global_only=True)


@pytest.fixture(scope="session")
def delf_hub_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a DELF-v1-like TF-Hub module."""
    return _build(tmp_path_factory, "delf_hub")
