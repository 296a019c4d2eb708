"""Classifier heads: predict landmarks from softmax outputs, alone or fused with kNN.

A classifier is a Keras/TF model ending in a softmax over classes plus a CSV mapping
class index -> landmark_id (``class_index,landmark_id``, one row per class). Several
classifiers, each over its own subset of landmarks, combine by taking for every landmark
the largest probability any of them gives it, so the most confident answer wins.

Modes (``Config.CLASSIFIER_MODE``, presets ``classifier`` and ``knn-classifier``):

* ``"classifier"``: the landmark with the largest probability, confidence = that probability;
* ``"fused"`` (the Kaggle 2020 recognition 3rd place fusion, as described in issue 11):
  for each landmark ``l`` among the ``TOP_K`` best re-ranked candidates::

      score(l) = sum over those candidates j of landmark l of  s_j ** a * p(l) ** b

  with ``s_j`` the candidate's score (global cosine, plus the inlier term when verified;
  negatives count as 0), ``p(l)`` the classifier probability of ``l``,
  ``a = FUSION_COSINE_POWER`` and ``b = FUSION_PROB_POWER``; the best score wins.

Queries' class probabilities are computed in a pass over the query images (the kNN store
keeps only descriptors) and cached, as their ``CLASSIFIER_TOP`` best classes, in the query
store's derived data.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from delf_retrieval.features.images import ImageDecodeError, ImageSource, list_images
from delf_retrieval.features.store import fingerprint_key
from delf_retrieval.models.extract import decode_for_model, iter_decoded
from delf_retrieval.models.loader import load_extractor
from delf_retrieval.scoring.rerank import aggregate_landmarks, best_entry

CLASSIFIER_TOP = 100  # best classes kept per query (probabilities of the others count as 0)
MODES = ("off", "classifier", "fused")


def read_class_mapping(path: str | os.PathLike) -> list[str]:
    """Landmark id of every class index from a CSV ``class_index,landmark_id``.

    A header row is optional. Every index ``0 .. C-1`` must appear exactly once.

    Returns
    -------
    list of str, ``result[i]`` = landmark id of class ``i``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"class mapping {path} does not exist")
    frame = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
    if frame.shape[1] < 2:
        raise ValueError(f"class mapping {path} needs two columns: class_index,landmark_id")
    if frame.shape[0] and not frame.iloc[0, 0].strip().lstrip("-").isdigit():
        frame = frame.iloc[1:]  # header
    try:
        indices = frame.iloc[:, 0].astype(int).to_numpy()
    except ValueError as error:
        raise ValueError(f"class mapping {path}: the first column must hold class indices ({error})") from error
    if len(indices) == 0:
        raise ValueError(f"class mapping {path} is empty")
    expected = np.arange(len(indices))
    if not np.array_equal(np.sort(indices), expected):
        raise ValueError(
            f"class mapping {path}: class indices must be 0..{len(indices) - 1}, each once "
            f"(got {len(np.unique(indices))} distinct values from {indices.min()} to {indices.max()})"
        )
    landmarks = [""] * len(indices)
    for index, landmark in zip(indices, frame.iloc[:, 1].str.strip(), strict=True):
        landmarks[int(index)] = landmark
    return landmarks


@dataclass
class Classifier:
    """A model with a softmax head (``class_probabilities``) and its class -> landmark map."""

    extractor: Any  # KerasExtractor (anything with class_probabilities, num_classes, fingerprint)
    landmarks: list[str]

    def __post_init__(self) -> None:
        heads = int(getattr(self.extractor, "num_classes", 0))
        if heads == 0:
            raise ValueError(
                f"{self.extractor!r} has no softmax classification head (a final Dense layer with "
                "softmax; for a SavedModel name the probabilities output with head=...)"
            )
        if heads != len(self.landmarks):
            raise ValueError(
                f"the class mapping has {len(self.landmarks)} classes but the model's softmax head "
                f"outputs {heads}; it does not fit this model"
            )

    def key(self) -> str:
        """Short hash of the model, its options and the mapping (names cached predictions)."""
        text = fingerprint_key(self.extractor.fingerprint()) + "\n".join(self.landmarks)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


def load_classifier(model: str | os.PathLike, classes_csv: str | os.PathLike, **options: Any) -> Classifier:
    """:class:`Classifier` from a Keras/TF model and its mapping CSV (options as :func:`load_extractor`)."""

    return Classifier(load_extractor(model, **options), read_class_mapping(classes_csv))


def top_classes(probabilities: np.ndarray, top: int = CLASSIFIER_TOP) -> tuple[np.ndarray, np.ndarray]:
    """The ``top`` best classes per row: ``(indices int32 [N, t], probabilities float32 [N, t])``, best first."""
    probabilities = np.asarray(probabilities, np.float32)
    top = min(top, probabilities.shape[1])
    part = np.argpartition(-probabilities, top - 1, axis=1)[:, :top]
    values = np.take_along_axis(probabilities, part, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1).astype(np.int32), np.take_along_axis(values, order, axis=1)


def query_class_predictions(
    classifier: Classifier,
    store: Any,
    sources: Sequence[ImageSource],
    *,
    decode_threads: int = 2,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Top classes of every image of ``store`` (rows in ``store.ids`` order), cached in the store.

    Returns ``(indices int32 [N, t], probabilities float32 [N, t])``. Images are decoded
    again from ``sources`` (the ones in the store) and run through the classifier.
    """

    name = f"classifier-{classifier.key()}"
    cached_indices, cached_probs = store.read_derived(f"{name}-indices"), store.read_derived(f"{name}-probs")
    if cached_indices is not None and cached_probs is not None:
        return np.asarray(cached_indices[0]), np.asarray(cached_probs[0])
    ids = store.ids
    by_id = {source.id: source for source in sources}
    missing = [image_id for image_id in ids if image_id not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} stored images have no source to classify, e.g. {missing[0]}")
    top = min(CLASSIFIER_TOP, len(classifier.landmarks))
    indices = np.zeros((len(ids), top), np.int32)
    probs = np.zeros((len(ids), top), np.float32)
    batch = max(1, int(getattr(classifier.extractor, "batch_size", 32)))
    max_size = classifier.extractor.params.max_image_size
    rows: list[int] = []
    images: list[np.ndarray] = []

    def run() -> None:
        if rows:
            indices[rows], probs[rows] = top_classes(classifier.extractor.class_probabilities(images), top)
        rows.clear()
        images.clear()

    bar = tqdm(total=len(ids), desc="classify", unit="img", disable=not progress)
    prepare = getattr(classifier.extractor, "prepare_image", None)
    todo = [by_id[i] for i in ids]
    for row, decoded in enumerate(iter_decoded(todo, max_size=max_size, threads=decode_threads, prepare=prepare)):
        if decoded.error is not None:
            raise ValueError(f"{decoded.source.id}: {decoded.error}")
        rows.append(row)
        images.append(decoded.image)
        if len(rows) >= batch:
            bar.update(len(rows))
            run()
    bar.update(len(rows))
    run()
    bar.close()
    store.write_derived(f"{name}-indices", indices)
    store.write_derived(f"{name}-probs", probs)
    return indices, probs


def landmark_probabilities(
    predictions: Sequence[tuple[np.ndarray, np.ndarray, Sequence[str]]],
) -> dict[str, float]:
    """One query's probability per landmark over several classifiers (the largest wins).

    Parameters
    ----------
    predictions : per classifier ``(class indices [t], probabilities [t], landmarks)`` with
        ``landmarks[i]`` the landmark of class ``i``.
    """
    result: dict[str, float] = {}
    for indices, probabilities, landmarks in predictions:
        for index, probability in zip(np.asarray(indices).tolist(), np.asarray(probabilities).tolist(), strict=True):
            landmark = landmarks[index]
            if probability > result.get(landmark, -1.0):
                result[landmark] = float(probability)
    return result


def classifier_prediction(probabilities: dict[str, float]) -> tuple[str | None, float]:
    """The most probable landmark and its probability (first seen wins ties); ``(None, 0.0)`` if none."""
    return best_entry(probabilities)


def fuse_knn_classifier(
    cand_labels: Sequence[str | None],
    cand_scores: np.ndarray,
    probabilities: dict[str, float],
    *,
    top_k: int,
    cosine_power: float = 1.0,
    prob_power: float = 1.0,
) -> tuple[str | None, float]:
    """Fuse re-ranked neighbours with classifier probabilities (see the module docstring).

    Parameters
    ----------
    cand_labels : landmark of each candidate, best first (None: no vote).
    cand_scores : float [R], the candidates' scores in that order.
    probabilities : landmark -> classifier probability for this query (absent = 0).
    top_k : the first ``top_k`` candidates vote (``TOP_K``).
    cosine_power, prob_power : ``a`` (``FUSION_COSINE_POWER``) and ``b`` (``FUSION_PROB_POWER``).

    Returns
    -------
    ``(landmark, score)`` with the largest fused score (first seen wins ties); ``(None, 0.0)``
    when no candidate has a label.
    """
    scores = np.asarray(cand_scores, np.float64)
    if len(cand_labels) != scores.shape[0]:
        raise ValueError(f"{len(cand_labels)} labels but {scores.shape[0]} scores")
    terms = [
        0.0 if label is None
        else max(score, 0.0) ** cosine_power * probabilities.get(label, 0.0) ** prob_power
        for label, score in zip(cand_labels, scores.tolist(), strict=True)
    ]
    return aggregate_landmarks(list(cand_labels), np.asarray(terms, np.float64), top_k)


def store_class_probabilities(
    classifiers: Sequence[Classifier],
    queries: Any,
    query_images: str | os.PathLike | Sequence[ImageSource],
    *,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Per query of the store ``queries`` (``queries.ids`` order), landmark -> probability
    over all ``classifiers`` (:func:`landmark_probabilities`): what the recognition engine
    takes for ``CLASSIFIER_MODE`` ``classifier``/``fused``.

    ``query_images`` are the store's images (anything :func:`~delf_retrieval.features.images.list_images`
    takes); each classifier's top classes are cached in the store (:func:`query_class_predictions`).
    """
    if not classifiers:
        raise ValueError("a classifier mode needs at least one classifier (model + class mapping CSV)")
    sources = list_images(query_images) if isinstance(query_images, (str, os.PathLike)) else query_images
    per_classifier = [
        (*query_class_predictions(classifier, queries, sources, progress=progress), classifier.landmarks)
        for classifier in classifiers
    ]
    return [
        landmark_probabilities([(indices[row], probs[row], marks) for indices, probs, marks in per_classifier])
        for row in range(len(queries.ids))
    ]


def image_class_probabilities(
    classifiers: Sequence[Classifier], photo: bytes | np.ndarray, name: str = "photo"
) -> dict[str, float]:
    """Landmark -> probability of one photo (encoded bytes or RGB uint8 [H, W, 3]) over all
    ``classifiers``, as :func:`store_class_probabilities` gives it for a stored image: the
    same decoding (:func:`~delf_retrieval.models.extract.decode_for_model` with each
    classifier's size cap and ``prepare_image``), then its top classes."""
    if not classifiers:
        raise ValueError("a classifier mode needs at least one classifier (model + class mapping CSV)")
    predictions = []
    for classifier in classifiers:
        extractor = classifier.extractor
        decoded = decode_for_model(
            photo,
            ImageSource(id=name, path=name),
            extractor.params.max_image_size,
            prepare=getattr(extractor, "prepare_image", None),
        )
        if decoded.error is not None:
            raise ImageDecodeError(decoded.error)
        top = min(CLASSIFIER_TOP, len(classifier.landmarks))
        indices, probs = top_classes(extractor.class_probabilities([decoded.image]), top)
        predictions.append((indices[0], probs[0], classifier.landmarks))
    return landmark_probabilities(predictions)
