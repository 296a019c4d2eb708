"""The calibrated confidence: ECE and Brier score, the two models, leave-one-out fitting
through the engine, the stored model's reload, and probabilities in batch runs and predict.

The quick tests use a synthetic global-only database (landmark clusters and distractors
around their own centre, seeded); the slow ones extract a generated demo dataset.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import delf_retrieval
from delf_retrieval.config import load_config
from delf_retrieval.demo.data import build_demo_dataset
from delf_retrieval.features.images import kaggle_image_path
from delf_retrieval.kaggle.metrics import (
    brier_score,
    evaluate_calibration,
    expected_calibration_error,
    reliability_bins,
)
from delf_retrieval.models import load_extractor
from delf_retrieval.scoring.calibration import (
    ConfidenceModel,
    answer_features,
    fit_isotonic,
    fit_model,
)
from delf_retrieval.scoring.engine import RecognitionIndex, RecognitionSettings, recognize_queries
from delf_retrieval.scoring.leave_one_out import (
    ConfidenceSettings,
    NotEnoughAnswers,
    ensure_confidence,
    fit_confidence,
    leave_one_out_answers,
)
from delf_retrieval.service.recognizer import Recognizer, percent
from delf_retrieval.tasks.manifest import read_manifest

# ----------------------------------------------------------------------------- metrics


def test_ece_and_brier_by_hand():
    confidence = np.array([0.05, 0.15, 0.95, 0.95, 0.55])
    right = np.array([False, False, True, False, True])
    counts, accuracy, mean = reliability_bins(confidence, right)
    assert counts.tolist() == [1, 1, 0, 0, 0, 1, 0, 0, 0, 2]
    assert accuracy[9] == 0.5 and mean[9] == pytest.approx(0.95) and np.isnan(accuracy[2])
    # 1/5 |0 - .05| + 1/5 |0 - .15| + 2/5 |.5 - .95| + 1/5 |1 - .55|
    assert expected_calibration_error(confidence, right) == pytest.approx(0.01 + 0.03 + 0.18 + 0.09)
    # (.05^2 + .15^2 + .05^2 + .95^2 + .45^2) / 5
    assert brier_score(confidence, right) == pytest.approx(1.1325 / 5)


def test_ece_edges():
    assert reliability_bins(np.array([1.0, 0.0]), np.array([True, False]))[0].tolist() == [1] + [0] * 8 + [1]
    assert expected_calibration_error(np.array([1.0, 0.0]), np.array([True, False])) == 0.0
    assert expected_calibration_error(np.zeros(0), np.zeros(0, bool)) == 0.0
    assert expected_calibration_error(np.array([0.25, 0.75]), np.array([False, True]), bins=1) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="not probabilities"):
        reliability_bins(np.array([1.5]), np.array([True]))


def test_evaluate_calibration_of_a_submission():
    solution = {"q1": {"7"}, "q2": {"8"}, "q3": set(), "q4": {"9"}}
    predictions = {"q1": ("007", 0.9), "q2": ("9", 0.6), "q3": ("7", 0.2), "q4": None, "x": ("1", 0.5)}
    scores = evaluate_calibration(predictions, solution)
    # answers q1 (right, .9), q2 (wrong, .6), q3 (non-landmark: wrong, .2); q4 none, x not in the solution
    assert scores["answers"] == 3 and scores["accuracy"] == pytest.approx(1 / 3)
    assert scores["Brier"] == pytest.approx((0.01 + 0.36 + 0.04) / 3)
    assert scores["ECE"] == pytest.approx((0.1 + 0.6 + 0.2) / 3)
    assert evaluate_calibration({"q1": ("7", 4.5)}, solution) is None  # scores, not probabilities


# ----------------------------------------------------------------------------- models


def test_isotonic_pool_adjacent_violators_by_hand():
    model = fit_isotonic(np.array([1.0, 2.0, 3.0, 4.0, 4.0]), np.array([0, 1, 0, 1, 1], bool))
    assert model.thresholds.tolist() == [1.0, 2.0, 4.0]
    assert model.values.tolist() == [0.0, 0.5, 1.0]
    assert model.probability({"score": 2.5}) == 0.5
    assert model.probability({"score": 0.0}) == pytest.approx(1e-3)  # floor: below every block
    assert model.probability({"score": 9.0}) == pytest.approx(1 - 1e-3)


def test_logistic_orders_by_evidence_and_reloads_bit_for_bit():
    rng = np.random.default_rng(3)
    inliers = rng.uniform(0, 4, 200)
    right = rng.uniform(size=200) < 1 / (1 + np.exp(-(3 * inliers - 6)))
    samples = [{"score": 0.0, "cosine": 0.5, "margin": float(v), "inliers": float(v), "verified": 0.0} for v in inliers]
    model = fit_model(samples, right.tolist(), "logistic")
    assert model.features == ("cosine", "margin", "inliers", "verified")  # not the score; constant ones kept
    low, high = (model.probability({**samples[0], "margin": v, "inliers": v}) for v in (0.0, 4.0))
    assert low < 0.1 and high > 0.9
    again = ConfidenceModel.from_dict(json.loads(model.to_json()))
    assert again.digest() == model.digest()
    assert all(again.probability(s) == model.probability(s) for s in samples)


def test_absent_features_are_absent_not_zero():
    labels = ["a", "b", "a"]
    cosine = np.array([0.9, 0.8, 0.7], np.float32)
    scoring = RecognitionSettings.from_config(load_config("opencv-sift")).scoring
    global_only = answer_features("a", 1.6, labels, cosine, None, None, scoring)
    assert set(global_only) == {"score", "cosine", "margin"}
    verified = answer_features("a", 2.0, labels, cosine, np.array([30, 12, 3]), 0.4, scoring)
    assert verified["verified"] == 1.0 and verified["inliers"] == pytest.approx(np.log1p(30))
    assert verified["nonlandmark"] == pytest.approx(0.4)
    # margin: best score of a (30/40 + 0.9) minus best of b (12/40 + 0.8)
    assert verified["margin"] == pytest.approx(0.75 + 0.9 - 0.3 - 0.8, abs=1e-6)
    model = fit_model([verified, {**verified, "inliers": 0.0}], [True, False], "logistic")
    assert not model.applies_to(global_only)


# ----------------------------------------------------------------------------- leave-one-out, synthetic


class VectorStore:
    """The part of a feature store the engine and the fit read, global vectors only."""

    def __init__(self, path: Path, ids: list[str], vectors: np.ndarray) -> None:
        self.path, self.ids, self._vectors = path, ids, vectors.astype(np.float32)
        self.local_dim, self.fingerprint = 0, {"family": "synthetic"}

    def global_descriptors(self) -> np.ndarray:
        return self._vectors


def synthetic(tmp_path: Path, seed: int = 0):
    """10 landmarks x 6 photos around their centres (some far out), 30 distractors."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, 32))
    vectors, labels = [], []
    for number, centre in enumerate(centres):
        for _ in range(6):
            vectors.append(centre + rng.normal(size=32) * rng.choice([0.3, 1.5]))
            labels.append(str(number))
    distractors = rng.normal(size=(30, 32)) * 1.2 + rng.normal(size=32)
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    ids = [f"t{i:03d}" for i in range(len(vectors))]
    train = VectorStore(tmp_path / "train", ids, unit(np.array(vectors)))
    nonlandmark = VectorStore(tmp_path / "nl", [f"n{i:03d}" for i in range(30)], unit(distractors))
    return train, labels, nonlandmark


@pytest.mark.parametrize("penalty", [0.0, 1.0])
def test_leave_one_out_separates_right_from_distractors(tmp_path, penalty):
    train, labels, nonlandmark = synthetic(tmp_path)
    config = load_config("kaggle2020", CONFIDENCE="probability", LANDMARK_THRESHOLD=0.5, NONLANDMARK_PENALTY=penalty)
    settings, fit = RecognitionSettings.from_config(config), ConfidenceSettings.from_config(config)
    index = RecognitionIndex(train, labels, settings, nonlandmark=nonlandmark.global_descriptors())
    features, right, names = leave_one_out_answers(index, settings, fit, nonlandmark)
    assert len(names) == 60 + 30 and all(not r for r, n in zip(right, names, strict=True) if n.startswith("distractor"))
    assert ("nonlandmark" in features[0]) == (penalty > 0)
    model = fit_confidence(index, settings, fit, nonlandmark)
    assert model.fitted_on["samples"] == 90 and model.fitted_on["right"] == sum(right)
    p = np.array([model.probability(f) for f in features])
    held_right = np.array([n.startswith("train") and r for n, r in zip(names, right, strict=True)])
    distractor = np.array([n.startswith("distractor") for n in names])
    assert p[held_right].mean() > 0.7 and p[distractor].mean() < 0.3
    # deterministic: the same fit again, to the bit
    assert fit_confidence(index, settings, fit, nonlandmark).digest() == model.digest()


def test_the_held_out_photo_is_not_its_own_candidate(tmp_path):
    train, labels, _ = synthetic(tmp_path)
    config = load_config("kaggle2020", CONFIDENCE_SAMPLES=7)
    settings, fit = RecognitionSettings.from_config(config), ConfidenceSettings.from_config(config)
    index = RecognitionIndex(train, labels, settings)
    features, right, names = leave_one_out_answers(index, settings, fit)
    assert len(names) == 7  # a sample, bounded by CONFIDENCE_SAMPLES
    # with itself among the candidates every cosine would be 1
    assert max(f["cosine"] for f in features) < 0.999


def test_engine_applies_the_model_and_caches_it(tmp_path):
    train, labels, nonlandmark = synthetic(tmp_path)
    config = load_config("kaggle2020", CONFIDENCE="probability", LANDMARK_THRESHOLD=0.5)
    settings, fit = RecognitionSettings.from_config(config), ConfidenceSettings.from_config(config)
    index = RecognitionIndex(train, labels, settings)
    index.confidence = ensure_confidence(index, settings, fit, nonlandmark, log=lambda _: None)
    cached = list((tmp_path / "train" / "derived").glob("confidence-*.json"))
    assert len(cached) == 1
    assert ensure_confidence(index, settings, fit, nonlandmark, log=print).digest() == index.confidence.digest()
    queries = nonlandmark.global_descriptors()[:3]
    result = recognize_queries(["a", "b", "c"], queries, None, index, settings)
    for query in "abc":
        assert result.predictions[query][1] == result.probabilities[query]
        assert result.probabilities[query] == index.confidence.probability(result.features[query])
    scored = recognize_queries(["a", "b", "c"], queries, None, index, replace(settings, confidence="score"))
    assert scored.predictions == {q: (result.predictions[q][0], result.scores[q]) for q in "abc"}
    assert scored.probabilities == {}


def test_config_checks_probability_settings():
    with pytest.raises(ValueError, match="CONFIDENCE"):
        load_config("kaggle2020", CONFIDENCE="percent")
    with pytest.raises(ValueError, match="CLASSIFIER_MODE"):
        load_config("knn-classifier", CONFIDENCE="probability", LANDMARK_THRESHOLD=0.5)


def test_percent():
    assert [percent(p) for p in (0.001, 0.1234, 0.87, 0.999)] == ["<1%", "12%", "87%", ">99%"]


# ----------------------------------------------------------------------------- end to end (extraction)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("confidence")
    build_demo_dataset(
        root,
        seed=5,
        landmarks=("astronaut", "rocket", "coffee", "chelsea"),
        train_views=3,
        query_views=2,
        nonlandmark_queries=("grass", "brick"),
        nonlandmark_set=("gravel", "moon", "page", "text", "cell"),
        image_size=240,
    )
    return root


@pytest.mark.slow
def test_batch_run_and_index_give_the_same_probabilities(dataset, tmp_path):
    """Right answers with many inliers get a high probability, non-landmark queries a low
    one; the index stores the model, reloads it identically and predict gives the batch's
    probabilities as equal floats."""
    sift = load_extractor("opencv-sift")
    config = load_config("opencv-sift", CONFIDENCE="probability", LANDMARK_THRESHOLD=0.5)
    run = delf_retrieval.recognize(dataset, sift, config, output=None, work_dir=tmp_path / "work", progress=False, log=lambda _: None)
    result = run.result
    truth = pd.read_csv(dataset / "solution.csv", dtype=str, keep_default_na=False).set_index("id")["landmarks"]
    assert set(result.probabilities) == set(truth.index)
    right = [q for q in truth.index if truth[q] and result.predictions[q][0] == truth[q]]
    distractor = [q for q in truth.index if not truth[q]]
    assert len(right) >= 6
    strong = [q for q in right if result.features[q]["verified"] >= 1]
    assert strong and min(result.probabilities[q] for q in strong) > 0.7
    assert max(result.probabilities[q] for q in distractor) < 0.3
    # the submission writes the probability
    assert all(0 < c < 1 for _, c in result.predictions.values())

    delf_retrieval.build_index(dataset, sift, tmp_path / "index", config=config, use_nonlandmark=True, thumbnail_size=0,
                               progress=False, log=lambda _: None)
    manifest = read_manifest(tmp_path / "index")
    stored = ConfidenceModel.from_dict(json.loads((tmp_path / "index" / manifest.confidence).read_text()))
    recognizer = Recognizer.load(tmp_path / "index", model=sift)
    assert recognizer.index.confidence.digest() == stored.digest()
    # build_index keeps the distractor set (penalty 1.0): compare with the batch run of that config
    batch = delf_retrieval.recognize(dataset, sift, recognizer.config, output=None, work_dir=tmp_path / "work",
                                     use_nonlandmark=True, progress=False, log=lambda _: None)
    for query in truth.index:
        prediction = recognizer.predict(kaggle_image_path(dataset / "test", query))
        assert (prediction.landmark_id, prediction.confidence) == batch.result.predictions[query]
        assert prediction.probability == batch.result.probabilities[query]
        assert prediction.is_landmark == (prediction.probability >= 0.5)
        assert prediction.to_dict()["verdict"].endswith("%")


def test_too_few_wrong_answers_keep_the_scores(tmp_path):
    """A confidence model needs several right and several wrong held-out answers: with a
    handful of one outcome it would rate every answer alike (the demo without its distractor
    set recognises every train photo). Tight landmarks, no distractors: all right, no fit."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(6, 32))
    vectors = np.array([c + rng.normal(size=32) * 0.05 for c in centres for _ in range(3)])
    labels = [str(n) for n in range(6) for _ in range(3)]
    train = VectorStore(tmp_path / "train", [f"t{i:03d}" for i in range(18)], vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    config = load_config("kaggle2020", CONFIDENCE="probability", LANDMARK_THRESHOLD=0.5)
    settings, fit = RecognitionSettings.from_config(config), ConfidenceSettings.from_config(config)
    index = RecognitionIndex(train, labels, settings)
    _, right, _ = leave_one_out_answers(index, settings, fit)
    assert len(right) == 18 and all(right)
    with pytest.raises(NotEnoughAnswers, match="18 right and 0 wrong"):
        fit_confidence(index, settings, fit)
    assert ensure_confidence(index, settings, fit, log=lambda _: None) is None  # the run keeps scores
