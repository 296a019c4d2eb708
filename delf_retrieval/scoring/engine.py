"""The one recognition engine: query features in, one ``(landmark, confidence)`` per query out.

Every way of recognising photos calls :func:`recognize_queries`: the batch run
(:func:`delf_retrieval.tasks.recognition.recognize`, on one machine or with Ray), the
labels of retrieval queries, :meth:`delf_retrieval.service.recognizer.Recognizer.predict`
and the web service. The steps, each with its own module:

1. global search of the database (:class:`~delf_retrieval.search.stores.StoreSearch`:
   exact or sharded, with alpha-QE/DBA composed into it); whitening and VLAD happened
   before, when the vectors were made;
2. the non-landmark similarity of each query and candidate
   (:func:`~delf_retrieval.scoring.rerank.nonlandmark_similarity`);
3. verification of the best candidates and the landmark vote of each query
   (:func:`~delf_retrieval.scoring.candidates.recognize_candidates`: cascade, learned or
   nearest-neighbour matching, RANSAC, scores, ``VERIFIED_FIRST``);
4. over the whole query set: the frequent-landmark penalty;
5. the classifier modes (``CLASSIFIER_MODE`` ``classifier``/``fused``), when class
   probabilities are given;
6. with ``CONFIDENCE="probability"`` and a confidence model in the index: each answer's
   features (:func:`~delf_retrieval.scoring.calibration.answer_features`) -> the
   probability that it is right, which becomes the answer's confidence.

The engine reads a :class:`RecognitionSettings`, built once from the user's
:class:`~delf_retrieval.config.Config` (``RecognitionSettings.from_config(config)``); it
holds each step's own settings.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from delf_retrieval.features.containers import LocalFeatures
from delf_retrieval.matching import cascade
from delf_retrieval.matching.cascade import VerificationSettings
from delf_retrieval.scoring.calibration import ConfidenceModel, answer_features
from delf_retrieval.scoring.candidates import recognize_candidates
from delf_retrieval.scoring.classifier import classifier_prediction, fuse_knn_classifier
from delf_retrieval.scoring.rerank import (
    ScoringSettings,
    nonlandmark_similarity,
    penalize_frequent_landmarks,
    recognize_one,
    rerank,
)
from delf_retrieval.search.stores import IndexFactory, SearchSettings, StoreSearch

__all__ = ["RecognitionIndex", "RecognitionResult", "RecognitionSettings", "answer_features_of", "recognize_queries"]

# Local features of query ``row`` (None: the query has none).
QueryLocal = Callable[[int], LocalFeatures | None]


@dataclass(frozen=True)
class RecognitionSettings:
    """What the recognition engine reads of :class:`~delf_retrieval.config.Config`
    (defaults: ``kaggle2020``): one settings object per step, and the engine's own fields.

    Attributes
    ----------
    search : the global search (:class:`~delf_retrieval.search.stores.SearchSettings`:
        ``SEARCH_BLOCK_SIZE``, ``QE_*``, ``DBA_*``).
    verification : which candidates are verified, and how
        (:class:`~delf_retrieval.matching.cascade.VerificationSettings`: ``NUM_TO_RERANK``,
        ``CASCADE_*``, ``MATCHER``, the matching filters, ``RANSAC_*``, ...).
    scoring : scores and votes (:class:`~delf_retrieval.scoring.rerank.ScoringSettings`:
        ``TOP_K``, ``MAX_INLIER_SCORE``, ``MIN_INLIERS``, ``NONLANDMARK_PENALTY``,
        ``NONLANDMARK_RULE``, ``VERIFIED_FIRST``).
    nonlandmark_top_k : ``NONLANDMARK_TOP_K``, distractor neighbours averaged.
    frequent_landmark_penalty, frequent_landmark_min_count : ``FREQUENT_LANDMARK_PENALTY``
        and ``FREQUENT_LANDMARK_MIN_COUNT`` (:func:`~delf_retrieval.scoring.rerank.penalize_frequent_landmarks`).
    classifier_mode : ``CLASSIFIER_MODE``, ``"off"``, ``"classifier"`` or ``"fused"``.
    fusion_cosine_power, fusion_prob_power : ``FUSION_COSINE_POWER`` and ``FUSION_PROB_POWER``.
    confidence : ``CONFIDENCE``, ``"score"`` or ``"probability"``.
    """

    search: SearchSettings = field(default_factory=SearchSettings)
    verification: VerificationSettings = field(default_factory=VerificationSettings)
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    nonlandmark_top_k: int = 5
    frequent_landmark_penalty: float = 0.0
    frequent_landmark_min_count: int = 1
    classifier_mode: str = "off"
    fusion_cosine_power: float = 1.0
    fusion_prob_power: float = 1.0
    confidence: str = "score"

    @classmethod
    def from_config(cls, config: Any) -> RecognitionSettings:
        return cls(
            search=SearchSettings.from_config(config),
            verification=VerificationSettings.from_config(config),
            scoring=ScoringSettings.from_config(config),
            nonlandmark_top_k=config.NONLANDMARK_TOP_K,
            frequent_landmark_penalty=config.FREQUENT_LANDMARK_PENALTY,
            frequent_landmark_min_count=config.FREQUENT_LANDMARK_MIN_COUNT,
            classifier_mode=config.CLASSIFIER_MODE,
            fusion_cosine_power=config.FUSION_COSINE_POWER,
            fusion_prob_power=config.FUSION_PROB_POWER,
            confidence=config.CONFIDENCE,
        )

    @property
    def num_candidates(self) -> int:
        """Global candidates a query needs (:func:`~delf_retrieval.matching.cascade.num_candidates`)."""
        return cascade.num_candidates(self.verification, self.scoring.top_k)


@dataclass
class RecognitionResult:
    """Predictions of one recognition run.

    ``predictions`` maps query id -> (landmark id or None, confidence) after verification
    and penalties; ``global_predictions`` the same from global similarity alone.
    ``neighbours`` maps query id -> train ids in retrieval order, ``similarities`` their
    cosines (float32 [K]) and ``inliers`` the inlier counts of the verified ones (int64 [K],
    aligned with ``neighbours``). ``rows`` holds the neighbours as database rows.
    ``scores`` maps query id -> the engine's score of its answer (the confidence under
    ``CONFIDENCE="score"``); ``probabilities`` query id -> the probability that the answer
    is right, for the queries the index's confidence model was applied to (then also the
    confidence in ``predictions``); ``features`` the answers' features it read.
    """

    predictions: dict[str, tuple[str | None, float]]
    global_predictions: dict[str, tuple[str | None, float]]
    neighbours: dict[str, list[str]] = field(default_factory=dict)
    similarities: dict[str, np.ndarray] = field(default_factory=dict)
    inliers: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    query_nonlandmark: dict[str, float] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    probabilities: dict[str, float] = field(default_factory=dict)
    features: dict[str, dict[str, float]] = field(default_factory=dict)


class RecognitionIndex:
    """The labelled side of recognition: what queries are recognised against.

    Parameters
    ----------
    database : the train store as searched (a :class:`~delf_retrieval.features.store.FeatureStore`
        or a view of it, e.g. whitened): ``ids``, ``global_descriptors()`` [N, D],
        ``local_dim`` and ``local_features(id)``.
    labels : landmark of every database row (None: unlabelled), aligned with ``database.ids``.
    settings : its ``search`` builds the search; ``nonlandmark_top_k`` (with a
        ``scoring.nonlandmark_penalty`` above 0) makes the distractor similarities.
    nonlandmark : float [M, D] global descriptors of the distractor set in the same space as
        the database's (None: no non-landmark penalty).
    database_nonlandmark : float32 [N] non-landmark similarity of every database row, when
        already computed (an index folder stores it); computed from ``nonlandmark`` if None.
    index_factory : builds the search index of ``database`` (default exact and local;
        ``RayRunner.index`` shards it over Ray).
    confidence : the confidence model of answers against this index (used with
        ``CONFIDENCE="probability"``; see :mod:`delf_retrieval.scoring.leave_one_out`).
    """

    def __init__(
        self,
        database: Any,
        labels: Sequence[str | None],
        settings: RecognitionSettings,
        *,
        nonlandmark: np.ndarray | None = None,
        database_nonlandmark: np.ndarray | None = None,
        index_factory: IndexFactory | None = None,
        confidence: ConfidenceModel | None = None,
    ) -> None:
        if len(labels) != len(database.ids):
            raise ValueError(f"{len(labels)} labels for {len(database.ids)} database images")
        self.database = database
        self.labels = list(labels)
        self.confidence = confidence
        self.search = StoreSearch(database, settings.search, index_factory)
        self.nonlandmark = None
        self.database_nonlandmark = None
        if nonlandmark is not None and settings.scoring.nonlandmark_penalty > 0 and len(nonlandmark):
            self.nonlandmark = np.asarray(nonlandmark, np.float32)
            if database_nonlandmark is None:
                database_nonlandmark = nonlandmark_similarity(
                    database.global_descriptors(), self.nonlandmark, settings.nonlandmark_top_k
                )
            self.database_nonlandmark = np.asarray(database_nonlandmark, np.float32)

    @classmethod
    def from_labels(
        cls, database: Any, labels: dict[str, str], settings: RecognitionSettings, **options: Any
    ) -> RecognitionIndex:
        """An index whose labels come from an ``id -> landmark`` mapping (``train.csv``)."""
        return cls(database, [labels.get(image_id) for image_id in database.ids], settings, **options)


def store_queries(store: Any) -> QueryLocal | None:
    """``query_local`` for the queries of a store, in ``store.ids`` order (None when its
    model gives no local features)."""
    if not store.local_dim:
        return None
    ids = store.ids
    return lambda row: store.local_features(ids[row])


def recognize_queries(
    query_ids: Sequence[str],
    query_vectors: np.ndarray,
    query_local: QueryLocal | None,
    index: RecognitionIndex,
    settings: RecognitionSettings,
    *,
    verify: bool = True,
    class_probabilities: Sequence[dict[str, float]] | None = None,
    whole_query_set: bool = True,
    neighbours: tuple[np.ndarray, np.ndarray] | None = None,
    query_nonlandmark: np.ndarray | None = None,
    progress: bool = False,
) -> RecognitionResult:
    """Recognise a batch of queries: search, verify, vote, penalise (see the module doc).

    Parameters
    ----------
    query_ids : the queries' ids [Q].
    query_vectors : float [Q, D] their global descriptors in the database's space (the
        store's dtype; VLAD and whitening already applied).
    query_local : local features of query row ``i`` (None: global similarity only).
    index : the database, its labels and the distractor set (:class:`RecognitionIndex`).
    settings : the recognition settings, ``RecognitionSettings.from_config(config)``.
    verify : False predicts from global similarity only.
    class_probabilities : per query, landmark -> probability from the classifier(s); used
        by ``CLASSIFIER_MODE`` ``"classifier"`` and ``"fused"`` (required by them).
    whole_query_set : the queries are a whole query set, so ``FREQUENT_LANDMARK_PENALTY``
        (a statistic over the set) applies; False for photos recognised one by one.
    neighbours : the global search's ``(similarities [Q, K], rows [Q, K])`` when already
        done (``K >= settings.num_candidates`` or all rows).
    query_nonlandmark : float32 [Q] the queries' non-landmark similarity when already
        computed (leave-one-out: a distractor's own row left out); default computed here.
    progress : a progress bar over the queries.

    Returns
    -------
    RecognitionResult
        With ``seconds`` of ``search`` and ``verify``.
    """
    if len(query_ids) != len(query_vectors):
        raise ValueError(f"{len(query_ids)} query ids for {len(query_vectors)} query vectors")
    mode = settings.classifier_mode
    if mode != "off" and class_probabilities is None:
        raise ValueError(f"CLASSIFIER_MODE={mode!r} needs at least one classifier (model + class mapping CSV)")
    result = RecognitionResult(predictions={}, global_predictions={})
    started = time.perf_counter()
    if neighbours is None:
        neighbours = index.search.search(query_vectors, settings.num_candidates)
    similarities, rows = neighbours
    result.seconds["search"] = time.perf_counter() - started

    query_penalty = None
    if index.nonlandmark is not None and query_nonlandmark is not None:
        query_penalty = np.asarray(query_nonlandmark, np.float32)
    elif index.nonlandmark is not None:
        query_penalty = nonlandmark_similarity(query_vectors, index.nonlandmark, settings.nonlandmark_top_k)
    database = index.database
    verification, scoring = settings.verification, settings.scoring
    use_local = (
        verify and query_local is not None and verification.num_to_rerank > 0 and bool(database.local_dim)
    )
    started = time.perf_counter()
    description = "verify" if use_local else "rank"
    for row, query_id in enumerate(tqdm(query_ids, desc=description, unit="query", disable=not progress)):
        candidates = rows[row]
        cosine = similarities[row].astype(np.float64)
        candidate_labels = [index.labels[c] for c in candidates]
        # global-only reference predictions: no inliers, no non-landmark penalty
        result.global_predictions[query_id] = recognize_one(candidate_labels, cosine, None, scoring)
        label, confidence, inliers = recognize_candidates(
            query_local(row) if use_local else None,
            candidates,
            cosine,
            database,
            index.labels,
            verification,
            scoring,
            candidate_nonlandmark=index.database_nonlandmark,
            query_nonlandmark=None if query_penalty is None else float(query_penalty[row]),
            verify=use_local,
        )
        if inliers is not None:
            result.inliers[query_id] = inliers
        result.predictions[query_id] = (label, confidence)
        result.neighbours[query_id] = [database.ids[c] for c in candidates]
        result.similarities[query_id] = similarities[row]
        result.rows[query_id] = candidates
        if query_penalty is not None:
            result.query_nonlandmark[query_id] = float(query_penalty[row])
    result.seconds["verify"] = time.perf_counter() - started
    if whole_query_set and settings.frequent_landmark_penalty > 0 and result.predictions:
        ids = list(result.predictions)
        adjusted = penalize_frequent_landmarks(
            [result.predictions[i][0] for i in ids],
            np.array([result.predictions[i][1] for i in ids]),
            weight=settings.frequent_landmark_penalty,
            min_count=settings.frequent_landmark_min_count,
        )
        result.predictions = {i: (result.predictions[i][0], float(c)) for i, c in zip(ids, adjusted, strict=True)}
    if mode != "off":
        assert class_probabilities is not None
        if len(class_probabilities) != len(query_ids):
            raise ValueError(f"{len(class_probabilities)} class predictions for {len(query_ids)} queries")
        result.predictions = {
            query_id: classified_prediction(result, query_id, probabilities, index.labels, settings)
            for query_id, probabilities in zip(query_ids, class_probabilities, strict=True)
        }
    result.scores = {query_id: prediction[1] for query_id, prediction in result.predictions.items()}
    if settings.confidence == "probability" and index.confidence is not None:
        apply_confidence(result, index, scoring)
    return result


def apply_confidence(result: RecognitionResult, index: RecognitionIndex, scoring: ScoringSettings) -> None:
    """Replace each answer's confidence by the probability that it is right, where the
    index's confidence model applies (its features exist: not in a global-only run of a
    model fitted with inliers); sets ``result.features`` and ``result.probabilities``."""
    model = index.confidence
    assert model is not None
    for query_id, (label, _) in result.predictions.items():
        features = answer_features_of(result, query_id, index.labels, scoring)
        result.features[query_id] = features
        if features and model.applies_to(features):
            probability = model.probability(features)
            result.probabilities[query_id] = probability
            result.predictions[query_id] = (label, probability)


def answer_features_of(
    result: RecognitionResult, query_id: str, labels: Sequence[str | None], scoring: ScoringSettings
) -> dict[str, float]:
    """The features of one query's answer in ``result`` (its score: ``result.scores``),
    :func:`~delf_retrieval.scoring.calibration.answer_features`."""
    return answer_features(
        result.predictions[query_id][0],
        result.scores[query_id],
        [labels[row] for row in result.rows[query_id]],
        result.similarities[query_id],
        result.inliers.get(query_id),
        result.query_nonlandmark.get(query_id),
        scoring,
    )


def classified_prediction(
    result: RecognitionResult,
    query_id: str,
    probabilities: dict[str, float],
    labels: Sequence[str | None],
    settings: RecognitionSettings,
) -> tuple[str | None, float]:
    """One query's prediction under ``CLASSIFIER_MODE``: the classifier's best landmark
    (``"classifier"``), or its probabilities fused with the re-ranked neighbours
    (``"fused"``, :func:`~delf_retrieval.scoring.classifier.fuse_knn_classifier`).
    Non-landmark and frequent-landmark penalties are not applied on top."""
    if settings.classifier_mode == "classifier":
        return classifier_prediction(probabilities)
    rows = result.rows[query_id]
    cosine = np.asarray(result.similarities[query_id], np.float64)
    order, scores = rerank(cosine, result.inliers.get(query_id), settings.scoring)  # no non-landmark term
    return fuse_knn_classifier(
        [labels[rows[j]] for j in order],
        scores,
        probabilities,
        top_k=settings.scoring.top_k,
        cosine_power=settings.fusion_cosine_power,
        prob_power=settings.fusion_prob_power,
    )
