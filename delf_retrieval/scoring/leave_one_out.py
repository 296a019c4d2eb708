"""Fit the confidence model of an index by leave-one-out, through the one recognition engine.

No labelled query is needed. Every train photo of a landmark with at least two photos
(a seeded sample of ``CONFIDENCE_SAMPLES`` of them at scale) is recognised as a query
against the rest of the train set: :func:`~delf_retrieval.scoring.engine.recognize_queries`
on its own vector and local features, with its own row dropped from its candidate list
(the search asks for one candidate more, so every query keeps as many as a real query).
Its answer is right when it names the photo's landmark. The photos of the distractor set
(another sample of at most ``CONFIDENCE_SAMPLES``), run as queries, are wrong answers by
definition; their non-landmark similarity leaves their own row out. The answers' features
(:func:`~delf_retrieval.scoring.calibration.answer_features`) and rightness fit the model
(:func:`~delf_retrieval.scoring.calibration.fit_model`, ``CONFIDENCE_MODEL``).

What stays approximate: the held-out photo still takes part where the database is
transformed as a whole (the whitening fit, DBA, the VLAD codebook, the distractor
similarity of its neighbours) and in alpha-QE's expansion of itself.

The fitted model is cached as JSON in the database store's ``derived/`` folder, keyed by
:func:`fit_record` (store ids and fingerprint, labels, distractor ids, the config fields
that change answers), so a rerun reloads it bit for bit (:func:`ensure_confidence`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from delf_retrieval.core.atomic import atomic_write_bytes
from delf_retrieval.features.store import fingerprint_key, ids_hash
from delf_retrieval.scoring.calibration import ConfidenceModel, fit_model, method_key
from delf_retrieval.scoring.engine import (
    RecognitionIndex,
    RecognitionSettings,
    answer_features_of,
    recognize_queries,
)
from delf_retrieval.search.index import cosine_topk

__all__ = [
    "ConfidenceSettings",
    "NotEnoughAnswers",
    "ensure_confidence",
    "fit_confidence",
    "fit_record",
    "leave_one_out_answers",
]

SEED = 0
# Config fields that do not change an answer or its features: they stay out of the record.
NOT_IN_RECORD = (
    "WORKERS",
    "SEARCH_BLOCK_SIZE",
    "RETRIEVAL_TOP",
    "RETRIEVAL_NUM_TO_RERANK",
    "RETRIEVAL_LABEL_BOOST",
    "FREQUENT_LANDMARK_PENALTY",  # a statistic over a query set: not applied to held-out photos
    "FREQUENT_LANDMARK_MIN_COUNT",
    "LANDMARK_THRESHOLD",
    "CONFIDENCE",
    "MATCH_DEVICE",
)

# Fewest right and fewest wrong held-out answers a confidence model is fitted on. A model fitted
# on one outcome only (a train set whose photos are all recognised, with no distractor set, as
# the demo's run without distractors) rates every answer alike: its order is no better than ties.
MIN_ANSWERS_EACH = 1


class NotEnoughAnswers(ValueError):
    """Fewer than two held-out answers: no confidence model can be fitted."""


Answers = tuple[list[dict[str, float]], list[bool], list[str]]


def _digest(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ConfidenceSettings:
    """What fitting the confidence model reads of :class:`~delf_retrieval.config.Config`.

    Attributes
    ----------
    answers_key : digest of the config fields that change answers (every field but
        :data:`NOT_IN_RECORD`, ``WHITENING_DIM`` and the extraction preset included), part
        of :func:`fit_record`.
    model : ``CONFIDENCE_MODEL``, ``"logistic"`` or ``"isotonic"``.
    samples : ``CONFIDENCE_SAMPLES``, at most this many held-out train photos (and as many
        distractors).
    """

    answers_key: str
    model: str = "logistic"
    samples: int = 2000

    @classmethod
    def from_config(cls, config: Any) -> ConfidenceSettings:
        fields = {k: v for k, v in config.to_dict().items() if k not in NOT_IN_RECORD}
        return cls(answers_key=_digest(fields), model=config.CONFIDENCE_MODEL, samples=config.CONFIDENCE_SAMPLES)


def fit_record(index: RecognitionIndex, fit: ConfidenceSettings, distractors: Any | None) -> dict[str, Any]:
    """What a confidence model is fitted on: the database's ids and feature fingerprint,
    its labels, the distractor set's ids, the config fields that change answers
    (``fit.answers_key``) and the fitting method (:func:`.calibration.method_key`). Equal
    records give equal models."""
    database = index.database
    return {
        "method": method_key(fit.model),
        "ids_hash": ids_hash(database.ids),
        "labels_hash": _digest([label or "" for label in index.labels]),
        "features": _digest(json.loads(fingerprint_key(database.fingerprint))),
        "vectors": hashlib.sha1(np.ascontiguousarray(database.global_descriptors()[:64], np.float32).tobytes()).hexdigest()[:16],
        "distractors": ids_hash(distractors.ids) if distractors is not None else "",
        "config": fit.answers_key,
    }


def _sample(count: int, limit: int, seed: int) -> np.ndarray:
    """Sorted positions of a seeded sample of at most ``limit`` of ``count`` items."""
    if count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, limit, replace=False))


def _local_of(store: Any, ids: Sequence[str]) -> Callable[[int], Any] | None:
    if not store.local_dim:
        return None
    return lambda row: store.local_features(ids[row])


def leave_one_out_answers(
    index: RecognitionIndex,
    settings: RecognitionSettings,
    fit: ConfidenceSettings,
    distractors: Any | None = None,
    *,
    progress: bool = False,
) -> Answers:
    """Features and rightness of the held-out train photos' and the distractors' answers.

    Parameters
    ----------
    index : the database and its labels (``index.confidence`` is not used).
    settings : the run's recognition settings (answers are made with confidence ``"score"``).
    fit : ``fit.samples`` bounds each of the two sets.
    distractors : store-like of the distractor set in the searched space (``ids``,
        ``global_descriptors()`` [M, D], ``local_dim``, ``local_features``), or None; when
        the index has a distractor penalty, the same set as ``index.nonlandmark``.

    Returns
    -------
    features : list of dict, one per answer (answers without a landmark are left out).
    right : list of bool, aligned.
    ids : the query ids, aligned (``train:<id>`` / ``distractor:<id>``).
    """
    settings = dataclasses.replace(settings, confidence="score")
    scoring = settings.scoring
    database = index.database
    labels = index.labels
    counts: dict[str, int] = {}
    for label in labels:
        if label is not None:
            counts[label] = counts.get(label, 0) + 1
    # Rows in id order, so the sample and the fit do not depend on the store's row order.
    by_id = sorted(range(len(labels)), key=lambda row: database.ids[row])
    eligible = np.array([row for row in by_id if labels[row] is not None and counts[labels[row]] >= 2], np.int64)
    held_out = eligible[_sample(len(eligible), fit.samples, SEED)]
    features: list[dict[str, float]] = []
    right: list[bool] = []
    names: list[str] = []
    if len(held_out) and len(database.ids) > 1:
        vectors = np.asarray(database.global_descriptors()[held_out])
        width = settings.num_candidates
        similarities, rows = index.search.search(vectors, width + 1)
        keep = rows != held_out[:, None]
        keep[keep.all(axis=1), -1] = False  # own row not found: drop the last candidate instead
        shape = (len(held_out), rows.shape[1] - 1)
        neighbours = (similarities[keep].reshape(shape), rows[keep].reshape(shape))
        ids = [database.ids[row] for row in held_out]
        result = recognize_queries(
            ids, vectors, _local_of(database, ids), index, settings, neighbours=neighbours,
            whole_query_set=False, progress=progress,
        )
        for row, image_id, answer in zip(held_out, ids, (answer_features_of(result, i, index.labels, scoring) for i in ids), strict=True):
            if answer:
                features.append(answer)
                right.append(result.predictions[image_id][0] == labels[row])
                names.append(f"train:{image_id}")
    if distractors is not None and len(distractors.ids):
        in_order = np.array(sorted(range(len(distractors.ids)), key=lambda row: distractors.ids[row]), np.int64)
        chosen = in_order[_sample(len(in_order), fit.samples, SEED + 1)]
        ids = [distractors.ids[i] for i in chosen]
        vectors = np.asarray(distractors.global_descriptors()[chosen])
        own = None
        if index.nonlandmark is not None and len(index.nonlandmark) == len(distractors.ids):  # the same set
            own = _nonlandmark_without_self(index.nonlandmark, chosen, settings.nonlandmark_top_k)
        result = recognize_queries(
            ids, vectors, _local_of(distractors, ids), index, settings, query_nonlandmark=own,
            whole_query_set=False, progress=progress,
        )
        for image_id, answer in zip(ids, (answer_features_of(result, i, index.labels, scoring) for i in ids), strict=True):
            if answer:
                features.append(answer)
                right.append(False)
                names.append(f"distractor:{image_id}")
    return features, right, names


def _nonlandmark_without_self(nonlandmark: np.ndarray, rows: np.ndarray, top_k: int) -> np.ndarray:
    """float32 [len(rows)]: mean of the ``top_k`` largest cosines of distractor ``rows`` to
    the distractor set without their own row (as
    :func:`~delf_retrieval.scoring.rerank.nonlandmark_similarity` for a photo not in it)."""
    similarity, found = cosine_topk(nonlandmark[rows], nonlandmark, top_k + 1, block_size=len(nonlandmark), normalize=True)
    keep = found != rows[:, None]
    keep[keep.all(axis=1), -1] = False
    others = similarity[keep].reshape(len(rows), similarity.shape[1] - 1)[:, :top_k]
    if others.shape[1] == 0:
        return np.zeros(len(rows), np.float32)
    return others.mean(axis=1, dtype=np.float64).astype(np.float32)


def fit_confidence(
    index: RecognitionIndex,
    settings: RecognitionSettings,
    fit: ConfidenceSettings,
    distractors: Any | None = None,
    *,
    progress: bool = False,
) -> ConfidenceModel:
    """The confidence model of ``index`` (``fit.model``) fitted on
    :func:`leave_one_out_answers`; ``fitted_on`` holds :func:`fit_record` and the counts.

    :class:`NotEnoughAnswers` when fewer than :data:`MIN_ANSWERS_EACH` right or wrong answers
    can be made (few landmarks with two train photos, or no wrong answers without a
    distractor set).
    """
    features, right, names = leave_one_out_answers(index, settings, fit, distractors, progress=progress)
    order = sorted(range(len(names)), key=names.__getitem__)  # the same fit whatever the row order
    features, right = [features[i] for i in order], [right[i] for i in order]
    wrong = len(right) - int(sum(right))
    if min(int(sum(right)), wrong) < MIN_ANSWERS_EACH:
        raise NotEnoughAnswers(
            f"cannot fit a confidence model on {int(sum(right))} right and {wrong} wrong held-out answer(s): it "
            f"needs at least {MIN_ANSWERS_EACH} of each (landmarks with at least two train photos, and wrong "
            "answers, which a distractor set (nonlandmark.csv) gives); use CONFIDENCE=score"
        )
    model = fit_model(features, right, fit.model)
    record = {**fit_record(index, fit, distractors), "samples": len(features), "right": int(sum(right))}
    return ConfidenceModel(**{**vars(model), "fitted_on": record})


def ensure_confidence(
    index: RecognitionIndex,
    settings: RecognitionSettings,
    fit: ConfidenceSettings,
    distractors: Any | None = None,
    *,
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> ConfidenceModel | None:
    """:func:`fit_confidence`, cached in the database store's ``derived/`` folder
    (``confidence-<record hash>.json``): reloaded when the record matches. None (and a
    log line) when there is nothing to fit on: the confidences stay scores."""
    record = fit_record(index, fit, distractors)
    path = index.database.path / "derived" / f"confidence-{_digest(record)}.json"
    if path.is_file():
        try:
            model = ConfidenceModel.from_dict(json.loads(path.read_text()))
            if all(model.fitted_on.get(k) == v for k, v in record.items()):
                return model
        except (ValueError, KeyError, json.JSONDecodeError):
            pass  # damaged or another version: fit again
    try:
        model = fit_confidence(index, settings, fit, distractors, progress=progress)
    except NotEnoughAnswers as error:
        log(f"confidence: {error}; the confidences stay scores")
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, model.to_json().encode())
    log(model.describe())
    return model
