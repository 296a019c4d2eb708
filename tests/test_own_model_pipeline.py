"""Your own Keras model through whole runs: CLI composition, classifier and fused modes, whitening."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import delf_retrieval
from delf_retrieval.cli.main import main
from delf_retrieval.config import load_config
from delf_retrieval.demo.data import build_demo_dataset
from delf_retrieval.features.images import kaggle_image_path, load_image
from delf_retrieval.kaggle.submission import validate_submission
from delf_retrieval.models import load_extractor
from delf_retrieval.scoring.classifier import load_classifier


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("own_model_data")
    build_demo_dataset(
        root,
        seed=5,
        landmarks=("astronaut", "rocket", "coffee", "chelsea"),
        train_views=2,
        query_views=2,
        nonlandmark_queries=("grass",),
        nonlandmark_set=("gravel", "moon"),
        image_size=240,
    )
    return root


def test_cli_composite_and_keras_alone(dataset: Path, keras_classifier: Path, tmp_path: Path, capsys) -> None:
    model = str(keras_classifier / "model.keras")
    work = tmp_path / "w"
    common = ["--preprocess", "tf", "--image-size", "64", "--work-dir", str(work), "--no-progress"]
    out = tmp_path / "s.csv"
    assert main(["recognize", str(dataset), "--global-model", model, "--local-model", "opencv-sift", "-o", str(out), *common]) == 0
    printed = capsys.readouterr().out
    assert "MUTUAL_NEAREST_NEIGHBOR = True" in printed  # the local model (RootSIFT) picks the preset
    assert validate_submission(out, dataset / "sample_submission.csv") == []
    assert [p.name.split("-")[0] for p in work.iterdir()] == ["keras+opencv"]
    assert main(["recognize", str(dataset), "--model", model, "-o", str(out), *common]) == 0
    assert validate_submission(out, dataset / "sample_submission.csv") == []
    assert sorted(p.name.split("-")[0] for p in work.iterdir()) == ["keras", "keras+opencv"]
    # Classifier presets need a class mapping; options need a Keras model.
    assert main(["recognize", str(dataset), "--model", model, "--config", "classifier", "-o", str(out), *common]) == 2
    assert "needs a classifier" in capsys.readouterr().err
    assert main(["recognize", str(dataset), "--model", "opencv-sift", "--layer", "gmp", "-o", str(out), "--work-dir", str(work)]) == 2
    assert "apply to Keras/TF models only" in capsys.readouterr().err


def _probabilities(model_file: Path, image: np.ndarray) -> np.ndarray:
    """The softmax output computed without the adapter: cv2 area resize to 64, [-1, 1]."""
    import keras

    model = keras.models.load_model(model_file, compile=False)
    x = cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32) / 127.5 - 1.0
    return np.asarray(model.predict(x[None], verbose=0))[0]


def test_classifier_mode_predicts_the_head_argmax(dataset: Path, keras_classifier: Path, tmp_path: Path) -> None:
    options = {"preprocess": "tf", "image_size": 64}
    extractor = load_extractor(keras_classifier / "model.keras", **options)
    classifier = load_classifier(keras_classifier / "model.keras", keras_classifier / "classes.csv", **options)
    kwargs = dict(output=None, work_dir=tmp_path / "w", progress=False, log=lambda _: None, classifiers=[classifier])
    run = delf_retrieval.recognize(dataset, extractor, load_config("classifier"), **kwargs)
    assert run.problems == []
    queries = pd.read_csv(dataset / "sample_submission.csv", dtype=str).id.tolist()
    for query in queries[:4]:
        probabilities = _probabilities(keras_classifier / "model.keras", load_image(kaggle_image_path(dataset / "test", query)))
        label, confidence = run.result.predictions[query]
        assert label == str(1000 + int(np.argmax(probabilities)))
        assert confidence == pytest.approx(float(probabilities.max()), abs=1e-5)
    # Fused: the classifier probability of each neighbour's landmark weighs its cosine.
    fused = delf_retrieval.recognize(dataset, extractor, load_config("knn-classifier"), **kwargs)
    query = queries[0]
    probabilities = _probabilities(keras_classifier / "model.keras", load_image(kaggle_image_path(dataset / "test", query)))
    labels = pd.read_csv(dataset / "train.csv", dtype=str).set_index("id").landmark_id
    neighbours = fused.result.neighbours[query][:5]
    cosine = fused.result.similarities[query][:5].astype(np.float64)
    sums: dict[str, float] = {}
    for neighbour, similarity in zip(neighbours, cosine, strict=True):
        landmark = labels[neighbour]
        sums[landmark] = sums.get(landmark, 0.0) + max(similarity, 0) * probabilities[int(landmark) - 1000]
    best = max(sums, key=sums.get)
    assert fused.result.predictions[query][0] == best
    assert fused.result.predictions[query][1] == pytest.approx(sums[best], abs=1e-4)


@pytest.mark.slow  # a whole run (RootSIFT extraction)
def test_whitening_runs_on_vlad_and_caches_the_fit(dataset: Path, tmp_path: Path) -> None:
    logged: list[str] = []
    config = load_config("opencv-sift").replace(WHITENING_DIM=4)
    run = delf_retrieval.recognize(dataset, "opencv-sift", config, output=None, work_dir=tmp_path / "w", progress=False, log=logged.append)
    assert run.problems == []
    assert any("whitening: 8192 -> 4 dims" in line for line in logged)
    assert (run.stores["train"].path / "derived" / "whitening.npz").is_file()
    assert run.stores["test"].read_derived("whitened")[0].shape == (len(run.stores["test"].ids), 4)
