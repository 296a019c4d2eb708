"""Scoring after search and verification: re-ranking, landmark votes, non-landmark penalties.

Pure functions over NumPy arrays; ``search`` and ``verify`` produce their inputs. For one
query the candidates ``0 .. R-1`` come in retrieval order (global cosine similarity,
best first), and every per-candidate array is aligned with that order.

Scores (Kaggle 2020 host baseline, extended as the 2020 winners did)::

    inlier_term_j = min(inliers_j, MAX_INLIER_SCORE) / MAX_INLIER_SCORE
                    (0 when inliers_j < MIN_INLIERS)
    score_j       = inlier_term_j + cosine_j - NONLANDMARK_PENALTY * nl_j
    confidence    = sum of score_j over the winning landmark's candidates among the
                    TOP_K best, - NONLANDMARK_PENALTY * nl_query
                    (VERIFIED_FIRST: - unverified_offset when none of those
                    candidates is verified)

where ``nl`` is :func:`nonlandmark_similarity` of the train image (``nl_j``) or of the
query (``nl_query``). With ``NONLANDMARK_RULE="unverified"`` the penalty applies only where
there is no geometric landmark evidence: to candidates with fewer than ``max(MIN_INLIERS,
1)`` inliers, and to a query whose predicted landmark has no such verified candidate
among its votes. Global similarities to a distractor set track how "generic" a photo is
as much as whether it shows a landmark (with VLAD the query's distractor similarity and
its best train cosine move together), so subtracting them reorders verified, correct
predictions when the distractor set is unlike the queries; verified matches are left
alone by this rule. Subtracting keeps confidences comparable across queries (GAP
sorts them), so a query that looks like the distractor set drops down the list instead
of being dropped; confidences may become negative, which submissions and GAP accept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from delf_retrieval.search.index import cosine_topk

Label = str


@dataclass(frozen=True)
class ScoringSettings:
    """What scoring and voting read of :class:`~delf_retrieval.config.Config` (defaults:
    ``kaggle2020``); see the module docstring for the formulas.

    Attributes
    ----------
    top_k : ``TOP_K``, candidates whose scores are summed per landmark.
    max_inlier_score : ``MAX_INLIER_SCORE``, inlier counts are clipped here before scaling
        to [0, 1].
    min_inliers : ``MIN_INLIERS``, fewer inliers give no inlier term; ``max(min_inliers, 1)``
        inliers make a candidate verified.
    nonlandmark_penalty : ``NONLANDMARK_PENALTY``, weight of the non-landmark similarity
        (0: off).
    nonlandmark_rule : ``NONLANDMARK_RULE``, ``"subtract"``, ``"unverified"`` or ``"excess"``.
    verified_first : ``VERIFIED_FIRST``, every verified prediction above every unverified one.
    """

    top_k: int = 3
    max_inlier_score: int = 20
    min_inliers: int = 0
    nonlandmark_penalty: float = 0.0
    nonlandmark_rule: str = "subtract"
    verified_first: bool = False

    @classmethod
    def from_config(cls, config: Any) -> ScoringSettings:
        return cls(
            top_k=config.TOP_K,
            max_inlier_score=config.MAX_INLIER_SCORE,
            min_inliers=config.MIN_INLIERS,
            nonlandmark_penalty=config.NONLANDMARK_PENALTY,
            nonlandmark_rule=config.NONLANDMARK_RULE,
            verified_first=config.VERIFIED_FIRST,
        )


def _vector(values: Any, name: str, dtype: Any = np.float64) -> np.ndarray:
    array = np.asarray(values, dtype=dtype)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _same_length(reference: np.ndarray, other: np.ndarray, name: str) -> None:
    if other.shape[0] != reference.shape[0]:
        raise ValueError(
            f"{name} has {other.shape[0]} entries but there are {reference.shape[0]} candidates"
        )


def _inlier_counts(inliers: Any, size: int) -> np.ndarray:
    counts = _vector(inliers, "inliers")
    if counts.shape[0] != size:
        raise ValueError(f"inliers has {counts.shape[0]} entries but there are {size} candidates")
    if np.any(counts < 0) or np.any(counts != np.round(counts)):
        raise ValueError("inliers must be non-negative integers")
    return counts


def _labels(labels: Any, name: str) -> list[Label | None]:
    if isinstance(labels, str):
        raise ValueError(f"{name} must be a sequence of labels, not a single string")
    array = np.asarray(labels, dtype=object)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return [None if label is None else str(label) for label in array]


def candidate_scores(
    cosine: np.ndarray,
    inliers: np.ndarray | None,
    settings: ScoringSettings,
    nonlandmark: np.ndarray | None = None,
) -> np.ndarray:
    """Score candidates as the host baseline does, with the optional gates and penalty.

    Parameters
    ----------
    cosine : float array [R]
        Global cosine similarity of the query to each candidate.
    inliers : int array [R] or None
        RANSAC inlier count of each candidate; None scores by ``cosine`` alone.
    settings : ScoringSettings
        Uses ``max_inlier_score``, ``min_inliers``, ``nonlandmark_penalty`` and
        ``nonlandmark_rule``.
    nonlandmark : float array [R] or None
        Non-landmark similarity of each candidate's train image
        (:func:`nonlandmark_similarity`); subtracted times ``NONLANDMARK_PENALTY``
        (``NONLANDMARK_RULE="unverified"``: only for candidates with fewer than
        ``max(MIN_INLIERS, 1)`` inliers; ``"excess"``: only its excess over the
        candidate's cosine, ``max(nonlandmark - cosine, 0)``).

    Returns
    -------
    scores : float32 [R]
        ``min(inliers, MAX_INLIER_SCORE) / MAX_INLIER_SCORE + cosine
        - NONLANDMARK_PENALTY * nonlandmark``; the inlier term is 0 for candidates with
        fewer than ``MIN_INLIERS`` inliers.
    """
    cos = _vector(cosine, "cosine")
    scores = cos.copy()
    verified = np.zeros(cos.shape[0], bool)
    if inliers is not None:
        counts = _inlier_counts(inliers, cos.shape[0])
        verified = counts >= max(settings.min_inliers, 1)
        term = np.minimum(counts, settings.max_inlier_score) / settings.max_inlier_score
        if settings.min_inliers > 0:
            term = np.where(counts < settings.min_inliers, 0.0, term)
        scores += term
    if nonlandmark is not None and settings.nonlandmark_penalty > 0:
        similarity = _vector(nonlandmark, "nonlandmark")
        _same_length(cos, similarity, "nonlandmark")
        if settings.nonlandmark_rule == "unverified":
            similarity = np.where(verified, 0.0, similarity)
        elif settings.nonlandmark_rule == "excess":
            similarity = np.maximum(similarity - cos, 0.0)
        scores -= settings.nonlandmark_penalty * similarity
    return scores.astype(np.float32)


def rerank(
    cosine: np.ndarray,
    inliers: np.ndarray | None,
    settings: ScoringSettings,
    nonlandmark: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sort candidates by :func:`candidate_scores`, best first.

    Parameters
    ----------
    cosine : float array [R]
        Global cosine similarities, in retrieval order.
    inliers : int array [R] or None
        Inlier counts; None ranks by global similarity only (predictions before
        verification).
    settings : ScoringSettings
        See :func:`candidate_scores`.
    nonlandmark : float array [R] or None
        Non-landmark similarity of each candidate's train image.

    Returns
    -------
    order : int64 [R]
        Candidate indices by score descending; the sort is stable, so equal scores keep
        the retrieval order (as the baseline's ``sorted(..., reverse=True)``).
    scores : float32 [R]
        The scores in that order: ``scores[i]`` belongs to candidate ``order[i]``.
    """
    scores = candidate_scores(cosine, inliers, settings, nonlandmark)
    order = np.argsort(-scores, kind="stable").astype(np.int64)
    return order, scores[order]


def aggregate_landmarks(
    labels: Sequence[Label | None], scores: np.ndarray, top_k: int
) -> tuple[Label | None, float]:
    """Vote for a landmark as the host baseline's ``get_prediction_map``.

    Parameters
    ----------
    labels : sequence of str [K]
        Landmark of each re-ranked candidate, best first. None entries (a candidate
        without a label) cast no vote.
    scores : float array [K]
        Score of each candidate, aligned with ``labels``.
    top_k : int
        Only the first ``top_k`` candidates vote.

    Returns
    -------
    label : str or None
        The landmark with the largest summed score; on equal sums the landmark seen first
        wins. None when nothing votes.
    confidence : float
        That sum (float64 arithmetic, summed in candidate order); 0.0 when nothing votes.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    names = _labels(labels, "labels")
    values = _vector(scores, "scores")
    if len(names) != values.shape[0]:
        raise ValueError(f"labels has {len(names)} entries but scores has {values.shape[0]}")
    sums: dict[Label, float] = {}
    for label, score in zip(names[:top_k], values[:top_k].tolist(), strict=True):
        if label is not None:
            sums[label] = sums.get(label, 0.0) + score
    return best_entry(sums)


def best_entry(totals: dict[Label, float]) -> tuple[Label | None, float]:
    """The key with the largest value (on equal values the first inserted wins) and that
    value; ``(None, 0.0)`` for an empty dict."""
    best_label, best_value = None, 0.0
    for label, total in totals.items():  # insertion order: the first seen wins ties
        if best_label is None or total > best_value:
            best_label, best_value = label, total
    return best_label, float(best_value)


def nonlandmark_similarity(
    vectors: np.ndarray,
    nonlandmark: np.ndarray,
    top_k: int,
    block_size: int | None = None,
) -> np.ndarray:
    """Mean of the ``top_k`` largest cosine similarities of each vector to a distractor set.

    Parameters
    ----------
    vectors : float array [N, D]
        Global descriptors (train images or queries); rows are L2-normalised here, so
        the similarities are exact cosines even for unnormalised input.
    nonlandmark : float array [M, D]
        Global descriptors of images that show no landmark.
    top_k : int
        Neighbours averaged; ``min(top_k, M)`` are used.
    block_size : int or None
        Rows of ``vectors`` per matrix product (bounds memory to ``block_size * M``
        floats); None picks about 2**24 similarities per block.

    Returns
    -------
    similarity : float32 [N]
        Exact mean top-k cosine similarity; zeros when ``M == 0``.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    queries = np.asarray(vectors, dtype=np.float32)
    distractors = np.asarray(nonlandmark, dtype=np.float32)
    if queries.ndim != 2 or distractors.ndim != 2:
        raise ValueError(
            f"vectors and nonlandmark must be 2-D, got {queries.shape} and {distractors.shape}"
        )
    if queries.shape[1] != distractors.shape[1]:
        raise ValueError(
            f"descriptor widths differ: vectors {queries.shape[1]}, "
            f"nonlandmark {distractors.shape[1]}"
        )
    count, size = queries.shape[0], distractors.shape[0]
    if count == 0 or size == 0:
        return np.zeros(count, np.float32)
    if block_size is None:
        block_size = max(1, (1 << 24) // size)
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    # The distractor set is one database block; queries go block_size rows at a time.
    similarity, _ = cosine_topk(
        queries, distractors, top_k, block_size=size, query_block_size=block_size, normalize=True
    )
    return similarity.mean(axis=1, dtype=np.float64).astype(np.float32)


def penalize_frequent_landmarks(
    labels: Sequence[Label | None], confidences: np.ndarray, *, weight: float, min_count: int = 1
) -> np.ndarray:
    """Lower the confidence of landmarks predicted for implausibly many queries.

    Rule: with ``n`` the number of queries whose prediction is landmark ``l``, each of
    them loses ``w * max(0, ln(n / c))`` where ``w = FREQUENT_LANDMARK_PENALTY`` and
    ``c = FREQUENT_LANDMARK_MIN_COUNT``. A landmark shows up in only a few queries of a
    GLDv2 test set; one predicted for many is usually a distractor magnet (a class whose
    train photos resemble the non-landmark queries). The logarithm keeps the penalty on
    the scale of the scores while still growing with the count. ``w = 0`` (default)
    returns the confidences unchanged.

    Parameters
    ----------
    labels : sequence of str or None [Q]
        Predicted landmark per query; None (no prediction) is neither counted nor changed.
    confidences : float array [Q]
        Confidence per query.
    weight : float
        ``w``, ``FREQUENT_LANDMARK_PENALTY``.
    min_count : int
        ``c``, ``FREQUENT_LANDMARK_MIN_COUNT`` (>= 1).

    Returns
    -------
    confidences : float64 [Q]
        A new array with the penalties applied.
    """
    names = _labels(labels, "labels")
    values = _vector(confidences, "confidences")
    if len(names) != values.shape[0]:
        raise ValueError(f"labels has {len(names)} entries but confidences has {values.shape[0]}")
    result = values.copy()
    if weight == 0 or not names:
        return result
    counts: dict[Label, int] = {}
    for label in names:
        if label is not None:
            counts[label] = counts.get(label, 0) + 1
    for i, label in enumerate(names):
        if label is not None:
            excess = np.log(counts[label] / min_count)
            result[i] -= weight * max(0.0, float(excess))
    return result


def recognize_one(
    cand_labels: Sequence[Label | None],
    cand_cosine: np.ndarray,
    cand_inliers: np.ndarray | None,
    settings: ScoringSettings,
    cand_nonlandmark: np.ndarray | None = None,
    query_nonlandmark: float | None = None,
) -> tuple[Label | None, float]:
    """Predict one query's landmark: score, re-rank, vote, penalise.

    Parameters
    ----------
    cand_labels : sequence of str [R]
        Landmark of each candidate train image, in retrieval order.
    cand_cosine : float array [R]
        Global cosine similarity of each candidate.
    cand_inliers : int array [R] or None
        Inlier counts; None predicts from global similarity only.
    settings : ScoringSettings
        ``top_k`` candidates vote; see :func:`candidate_scores` for the rest.
    cand_nonlandmark : float array [R] or None
        Non-landmark similarity of each candidate's train image.
    query_nonlandmark : float or None
        Non-landmark similarity of the query; the confidence loses
        ``NONLANDMARK_PENALTY * query_nonlandmark`` (``NONLANDMARK_RULE="unverified"``:
        only when none of the predicted landmark's voting candidates has
        ``max(MIN_INLIERS, 1)`` inliers; ``"excess"``: only ``max(query_nonlandmark -
        max(cand_cosine), 0)``, by how much the query is nearer to the distractor set
        than to its best candidate).

    Returns
    -------
    label : str or None
        Predicted landmark; None when there is no candidate.
    confidence : float
        Summed score of that landmark minus the query penalty; 0.0 without a prediction.
        With ``VERIFIED_FIRST`` and inlier counts, a landmark none of whose voting
        candidates has ``max(MIN_INLIERS, 1)`` inliers loses :func:`unverified_offset`
        more, which ranks it below every verified prediction (GAP sorts all queries by
        confidence, so an unverified guess no longer outranks a verified answer).
    """
    names = _labels(cand_labels, "cand_labels")
    cosine = _vector(cand_cosine, "cand_cosine")
    if len(names) != cosine.shape[0]:
        raise ValueError(
            f"cand_labels has {len(names)} entries but cand_cosine has {cosine.shape[0]}"
        )
    order, scores = rerank(cosine, cand_inliers, settings, cand_nonlandmark)
    label, confidence = aggregate_landmarks([names[i] for i in order], scores, settings.top_k)
    if label is None:
        return None, 0.0
    verified = _label_verified(label, names, order, cand_inliers, settings)
    if query_nonlandmark is not None and settings.nonlandmark_penalty > 0:
        if not np.isfinite(query_nonlandmark):
            raise ValueError("query_nonlandmark must be finite")
        penalty = float(query_nonlandmark)
        if settings.nonlandmark_rule == "unverified" and verified:
            penalty = 0.0
        elif settings.nonlandmark_rule == "excess":
            penalty = max(penalty - float(cosine.max()), 0.0)
        confidence -= settings.nonlandmark_penalty * penalty
    if settings.verified_first and cand_inliers is not None and not verified:
        confidence -= unverified_offset(settings)
    return label, confidence


def unverified_offset(settings: ScoringSettings) -> float:
    """What ``VERIFIED_FIRST`` subtracts from the confidence of an unverified prediction.

    ``S = 2 * TOP_K * (1 + 2 * P) + 2 * P`` with ``P = NONLANDMARK_PENALTY``: the smallest
    round bound that puts every unverified prediction below every verified one. A score
    (:func:`candidate_scores`) is at most ``1 + 1`` and at least ``-1 - 2P`` (cosine ``-1``,
    a non-landmark term of at most 2 under any rule); an unverified prediction has no
    inlier term, so its sum is at most ``TOP_K``, while a verified one sums at least one
    positive inlier term and ``TOP_K`` scores of at least ``-1 - 2P``, minus a query
    penalty of at most ``2P``. So ``TOP_K - S < -TOP_K * (1 + 2P) - 2P <`` any verified
    confidence. (:func:`penalize_frequent_landmarks`, applied later, can still reorder.)
    """
    penalty = settings.nonlandmark_penalty
    return 2.0 * settings.top_k * (1.0 + 2.0 * penalty) + 2.0 * penalty


def _label_verified(
    label: Label, names: list[Label | None], order: np.ndarray, inliers: np.ndarray | None, settings: ScoringSettings
) -> bool:
    """Whether a voting candidate (first ``TOP_K`` of ``order``) of ``label`` is verified."""
    if inliers is None:
        return False
    counts = np.asarray(inliers)
    gate = max(settings.min_inliers, 1)
    return any(names[i] == label and counts[i] >= gate for i in order[: settings.top_k])


def rerank_retrieval(
    cand_cosine: np.ndarray,
    cand_inliers: np.ndarray | None,
    cand_labels: Sequence[Label | None] | None,
    query_label: Label | None,
    settings: ScoringSettings,
    *,
    num_to_rerank: int = 20,
    label_boost: float = 0.5,
) -> np.ndarray:
    """Re-order a retrieval list by verification and landmark agreement.

    The first ``n = min(num_to_rerank, R)`` candidates are sorted by::

        candidate_scores(cosine, inliers) + label_boost * [label_j == query_label]

    (stable: equal scores keep the retrieval order); the other ``R - n`` follow in their
    input (retrieval) order. The boost rewards index images whose predicted landmark is the
    query's predicted landmark; the default 0.5 makes agreement worth half a fully
    verified match (``MAX_INLIER_SCORE`` inliers), so a strongly verified image of another
    landmark can still outrank an unverified agreeing one; values above 3 (the whole range
    of the score) put every agreeing image first.

    Parameters
    ----------
    cand_cosine : float array [R]
        Global cosine similarity of each index image, in retrieval order.
    cand_inliers : int array [R] or [n] or None
        Inlier counts; only the first ``n`` are used. None: no verification term.
    cand_labels : sequence of str or None [R], or None
        Predicted landmark of each index image (None entries never agree).
    query_label : str or None
        Predicted landmark of the query; None disables the boost.
    settings : ScoringSettings
        The fields of :func:`candidate_scores` (no non-landmark penalty applies here).
    num_to_rerank : int
        ``RETRIEVAL_NUM_TO_RERANK``.
    label_boost : float
        ``RETRIEVAL_LABEL_BOOST`` (0: off).

    Returns
    -------
    order : int64 [R]
        Candidate indices, best first.
    """
    cosine = _vector(cand_cosine, "cand_cosine")
    size = cosine.shape[0]
    head = min(num_to_rerank, size)
    inliers = None
    if cand_inliers is not None:
        inliers = _vector(cand_inliers, "cand_inliers")
        if inliers.shape[0] not in (head, size):
            raise ValueError(
                f"cand_inliers has {inliers.shape[0]} entries; expected {head} or {size}"
            )
        inliers = inliers[:head]
    scores = candidate_scores(cosine[:head], inliers, settings)
    scores = scores.astype(np.float64)
    if cand_labels is not None:
        names = _labels(cand_labels, "cand_labels")
        if len(names) != size:
            raise ValueError(f"cand_labels has {len(names)} entries but there are {size}")
        if query_label is not None and label_boost > 0:
            query = str(query_label)
            agree = np.array([name == query for name in names[:head]], dtype=bool)
            scores += label_boost * agree
    order = np.argsort(-scores, kind="stable")
    return np.concatenate([order, np.arange(head, size)]).astype(np.int64)
