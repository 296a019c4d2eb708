"""Classifier heads: class mappings, multi-classifier merging, kNN fusion on hand-made arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from delf_retrieval.scoring.classifier import (
    Classifier,
    classifier_prediction,
    fuse_knn_classifier,
    landmark_probabilities,
    load_classifier,
    read_class_mapping,
    top_classes,
)


def test_read_class_mapping_with_and_without_header(tmp_path: Path) -> None:
    with_header = tmp_path / "a.csv"
    with_header.write_text("class_index,landmark_id\n1,77\n0,12\n2,5\n")
    assert read_class_mapping(with_header) == ["12", "77", "5"]
    plain = tmp_path / "b.csv"
    plain.write_text("0,9\n1,9\n")
    assert read_class_mapping(plain) == ["9", "9"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("class_index,landmark_id\n0,1\n2,3\n", r"must be 0..1, each once"),
        ("0,1\n0,2\n", r"must be 0..1, each once"),
        ("class_index\n0\n", "two columns"),
        ("class_index,landmark_id\n", "is empty"),
    ],
)
def test_bad_class_mappings(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_class_mapping(path)


def test_mapping_that_does_not_fit_the_head(keras_classifier: Path, tmp_path: Path) -> None:
    three = tmp_path / "three.csv"
    three.write_text("0,1\n1,2\n2,3\n")
    with pytest.raises(ValueError, match="the class mapping has 3 classes but the model's softmax head outputs 5"):
        load_classifier(keras_classifier / "model.keras", three)
    classifier = load_classifier(keras_classifier / "model.keras", keras_classifier / "classes.csv")
    assert classifier.landmarks == ["1000", "1001", "1002", "1003", "1004"]


@pytest.mark.slow  # builds a Keras model (TensorFlow)
def test_model_without_a_head_is_not_a_classifier(tmp_path: Path) -> None:
    import keras
    inputs = keras.Input((None, None, 3))
    path = tmp_path / "metric.keras"
    keras.Model(inputs, keras.layers.GlobalMaxPooling2D()(keras.layers.Conv2D(4, 3)(inputs))).save(path)
    mapping = tmp_path / "m.csv"
    mapping.write_text("0,1\n")
    with pytest.raises(ValueError, match="no softmax classification head"):
        load_classifier(path, mapping)


def test_top_classes_best_first() -> None:
    indices, probabilities = top_classes(np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]), top=2)
    np.testing.assert_array_equal(indices, [[1, 2], [0, 2]])
    np.testing.assert_allclose(probabilities, [[0.6, 0.3], [0.5, 0.3]])


def test_several_classifiers_the_most_confident_wins() -> None:
    first = (np.array([0, 1]), np.array([0.7, 0.2]), ["A", "B"])  # classifier over A, B
    second = (np.array([1, 0]), np.array([0.6, 0.3]), ["C", "D"])  # classifier over C, D
    merged = landmark_probabilities([first, second])  # class 1 of the second is D
    assert merged == pytest.approx({"A": 0.7, "B": 0.2, "D": 0.6, "C": 0.3})
    assert classifier_prediction(merged) == ("A", pytest.approx(0.7))
    overlapping = (np.array([0]), np.array([0.9]), ["B"])  # a landmark two classifiers share: the larger
    assert landmark_probabilities([first, overlapping])["B"] == pytest.approx(0.9)
    assert classifier_prediction(landmark_probabilities([first, overlapping])) == ("B", pytest.approx(0.9))
    assert classifier_prediction({}) == (None, 0.0)


def test_fusion_sums_cosine_power_times_probability_power() -> None:
    config = dict(top_k=4, cosine_power=2.0, prob_power=0.5)
    labels = ["A", "B", "A", "C", "B"]  # the fifth is beyond TOP_K
    scores = np.array([0.9, 0.8, 0.5, 0.7, 0.95])
    probabilities = {"A": 0.04, "B": 0.36, "C": 0.81}
    # A: (0.81 + 0.25) * 0.2 = 0.212; B: 0.64 * 0.6 = 0.384; C: 0.49 * 0.9 = 0.441
    label, score = fuse_knn_classifier(labels, scores, probabilities, **config)
    assert label == "C" and score == pytest.approx(0.441)
    # A landmark the classifier does not know gets nothing; negative scores count as 0.
    label, score = fuse_knn_classifier(["Z", "A", None], np.array([0.99, -0.5, 0.9]), {"A": 1.0}, **config)
    assert (label, score) == ("Z", 0.0)  # all zero: the first seen, with confidence 0
    assert fuse_knn_classifier([None], np.array([0.5]), {}, **config) == (None, 0.0)


def test_fusion_with_powers_one_is_the_probability_weighted_vote() -> None:
    label, score = fuse_knn_classifier(["A", "B", "A"], np.array([0.5, 0.9, 0.4]), {"A": 0.5, "B": 0.4}, top_k=3)
    assert label == "A" and score == pytest.approx(0.45)  # A: 0.9 * 0.5 = 0.45 > B: 0.9 * 0.4 = 0.36


def test_classifier_key_changes_with_mapping(keras_classifier: Path, tmp_path: Path) -> None:
    classifier = load_classifier(keras_classifier / "model.keras", keras_classifier / "classes.csv")
    other = Classifier(classifier.extractor, list(reversed(classifier.landmarks)))
    assert classifier.key() != other.key()
