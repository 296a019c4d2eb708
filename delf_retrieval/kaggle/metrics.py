"""Kaggle metrics: Global Average Precision (recognition) and mAP@100 (retrieval), and
the calibration of recognition confidences that are probabilities (expected calibration
error and Brier score, :func:`evaluate_calibration`; not Kaggle metrics).

Equal to Google's reference code for GLDv2 on every well-formed file:
``research/delf/delf/python/datasets/google_landmarks_dataset/metrics.py``
(``GlobalAveragePrecision``, ``MeanAveragePrecision``) with the file reading of
``dataset_file_io.py`` (``ReadSolution``, ``ReadPredictions``):

* GAP = (1/M) * sum_i P(i) rel(i) over all predictions sorted by confidence descending,
  equal confidences ordered by query id, then landmark id, ascending (the reference's
  two sorts; ``tie_break="input"`` keeps the given order instead). M = number of solution
  queries that show a landmark. A query without a prediction adds nothing to the list; a
  prediction on a non-landmark query is wrong but stays in it.
* Landmark ids are compared as integers, as ``ReadSolution``/``ReadPredictions`` parse
  them with ``int()``: ``007`` equals ``7``, and ties order ``9`` before ``10``. Ids that
  are not integers (not well-formed for the reference) are compared as text.
* mAP@k = (1/Q) * sum_q (1 / min(m_q, k)) * sum_{i<=k} P_q(i) rel_q(i), over the Q
  solution queries that are not ``Ignored``. A query without a prediction scores 0, and so
  does a solution row with no relevant image (the reference reads its empty cell as the
  one relevant id ``''``, which no prediction names). A repeated index id in one list
  counts once but still takes up its position.

Where the reference raises on a well-formed file we return a value instead:

* a split with no landmark query (GAP) or no query at all (mAP): 0.0 (the reference
  divides by zero);
* predictions for ids that are not in the solution split: ignored (the reference raises
  ``test_id ... is unrecognized``), which is how the Public, Private and All scores are
  computed from one submission.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from delf_retrieval.kaggle.submission import (
    Solution,
    parse_recognition_submission,
    parse_retrieval_submission,
    parse_solution,
    read_csv_text,
)

RecognitionPredictions = Mapping[str, tuple[str | None, float] | None] | pd.DataFrame
RetrievalPredictions = Mapping[str, Sequence[str] | None] | pd.DataFrame
SolutionLike = Mapping[str, Iterable[str] | str | None] | pd.DataFrame | Solution

TIE_BREAKS = ("id", "input")


def canonical_landmark_id(label: str) -> str:
    """A landmark id as the reference compares it: ``str(int(label))`` when it is an integer.

    ``ReadSolution`` and ``ReadPredictions`` (dataset_file_io.py) parse landmark ids with
    ``int()``, so ``"007"``, ``"+7"`` and ``"7"`` are one landmark. Text that is not an
    integer is returned unchanged.

    >>> canonical_landmark_id("007"), canonical_landmark_id("a7")
    ('7', 'a7')
    """
    text = str(label).strip()
    try:
        return str(int(text))
    except ValueError:
        return text


def _label_order(label: str) -> tuple[int, int | float, str]:
    """Sort key of a canonical landmark id: integers by value first, then other text."""
    try:
        return (0, int(label), "")
    except ValueError:
        return (1, 0, label)


def _truth(solution: SolutionLike, kind: str) -> dict[str, frozenset[str]]:
    """Solution -> {id: labels}; tables and Solution objects drop ``Ignored`` rows."""
    if isinstance(solution, pd.DataFrame):
        solution = parse_solution(solution, kind)
    if isinstance(solution, Solution):
        return solution.split(None)
    result = {}
    for key, value in solution.items():
        if value is None:
            labels: frozenset[str] = frozenset()
        elif isinstance(value, str):
            labels = frozenset(value.split())
        else:
            labels = frozenset(str(label) for label in value)
        result[str(key)] = labels
    return result


def _recognition(predictions: RecognitionPredictions) -> dict[str, tuple[str | None, float]]:
    if isinstance(predictions, pd.DataFrame):
        return parse_recognition_submission(predictions)
    result = {}
    for key, entry in predictions.items():
        if entry is None or entry[0] is None or str(entry[0]) == "":
            result[str(key)] = (None, 0.0)
            continue
        confidence = float(entry[1])
        if math.isnan(confidence):
            raise ValueError(f"prediction for {key} has a NaN confidence")
        result[str(key)] = (str(entry[0]), confidence)
    return result


def _retrieval(predictions: RetrievalPredictions) -> dict[str, list[str]]:
    if isinstance(predictions, pd.DataFrame):
        return parse_retrieval_submission(predictions)
    result = {}
    for key, entry in predictions.items():
        if isinstance(entry, str):
            raise ValueError(f"prediction for {key} must be a sequence of ids, not a string")
        result[str(key)] = [str(image) for image in (entry or ())]
    return result


def global_average_precision(
    predictions: RecognitionPredictions,
    solution: SolutionLike,
    tie_break: str = "id",
) -> float:
    """Kaggle's Global Average Precision (micro-AP) of recognition predictions.

    Parameters
    ----------
    predictions : mapping id -> (label or None, confidence), or DataFrame
        One prediction per query, or a submission table ``id,landmarks``. None labels
        (empty cells) are no prediction.
    solution : mapping id -> set of str, DataFrame or Solution
        True landmark ids per query (empty = non-landmark query), or a table
        ``id,landmarks[,Usage]`` whose ``Ignored`` rows are dropped.
    tie_break : {"id", "input"}
        Order of equal confidences. ``"id"`` (default): by query id, then landmark id as
        an integer, ascending, as the reference ``GlobalAveragePrecision`` does.
        ``"input"``: a stable sort keeps the order the predictions were given in.

    Returns
    -------
    gap : float
        In [0, 1]; 0.0 when no solution query shows a landmark (the reference divides by
        zero there).
    """
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")
    truth = {
        key: frozenset(canonical_landmark_id(label) for label in labels)
        for key, labels in _truth(solution, "recognition").items()
    }
    positives = sum(1 for labels in truth.values() if labels)
    if positives == 0:
        return 0.0
    entries = [
        (key, canonical_landmark_id(label), confidence)
        for key, (label, confidence) in _recognition(predictions).items()
        if label is not None and key in truth
    ]
    if tie_break == "id":
        # metrics.py GlobalAveragePrecision: sort by (id, class), then by score (stable).
        entries.sort(key=lambda entry: (entry[0], _label_order(entry[1])))
    entries.sort(key=lambda entry: entry[2], reverse=True)  # stable
    total, correct = 0.0, 0
    for rank, (key, label, _) in enumerate(entries, start=1):
        if label in truth[key]:
            correct += 1
            total += correct / rank
    return total / positives


def mean_average_precision_at_k(
    predictions: RetrievalPredictions,
    solution: SolutionLike,
    k: int = 100,
) -> float:
    """Kaggle's mAP@k of retrieval predictions (k = 100 in the competitions).

    Parameters
    ----------
    predictions : mapping id -> list of index ids (best first), or DataFrame
        Or a submission table ``id,images``.
    solution : mapping id -> set of str, DataFrame or Solution
        Relevant index ids per query, or a table ``id,images[,Usage]`` whose ``Ignored``
        rows are dropped. A query with no relevant image counts, with AP 0, as in the
        reference ``MeanAveragePrecision``.
    k : int
        Positions scored per query.

    Returns
    -------
    map : float
        Mean over the solution's queries of AP@k / min(#relevant, k); 0.0 when the
        solution has no query (the reference divides by zero there).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    truth = _truth(solution, "retrieval")
    if not truth:
        return 0.0
    ranked = _retrieval(predictions)
    total = 0.0
    for key, relevant in truth.items():
        if not relevant:
            continue  # ReadSolution reads it as [''], which no index id equals: AP 0
        seen: set[str] = set()
        correct, precision_sum = 0, 0.0
        for rank, image in enumerate(ranked.get(key, [])[:k], start=1):
            if image in seen:
                continue
            seen.add(image)
            if image in relevant:
                correct += 1
                precision_sum += correct / rank
        total += precision_sum / min(len(relevant), k)
    return total / len(truth)


def _solution(solution: SolutionLike | str | os.PathLike, kind: str) -> Solution:
    if isinstance(solution, Solution):
        return solution
    if isinstance(solution, pd.DataFrame):
        return parse_solution(solution, kind)
    if isinstance(solution, Mapping):
        return Solution(_truth(solution, kind))
    return parse_solution(read_csv_text(solution), kind)


def _submission(submission: Any) -> Any:
    if isinstance(submission, (Mapping, pd.DataFrame)):
        return submission
    return read_csv_text(submission)


def _by_usage(score: Any, predictions: Any, solution: Solution, **options: Any) -> dict:
    results = {
        usage: score(predictions, solution.split(usage), **options) for usage in solution.usages
    }
    results["All"] = score(predictions, solution.split(None), **options)
    return results


def evaluate_recognition(
    submission: RecognitionPredictions | str | os.PathLike,
    solution: SolutionLike | str | os.PathLike,
    tie_break: str = "id",
) -> dict[str, float]:
    """GAP per leaderboard split.

    Parameters
    ----------
    submission : DataFrame, path or mapping
        ``id,landmarks`` table or file, or predictions as for
        :func:`global_average_precision`.
    solution : DataFrame, path, Solution or mapping
        ``id,landmarks,Usage`` table or file (``solution.csv``).
    tie_break : {"id", "input"}
        See :func:`global_average_precision`.

    Returns
    -------
    scores : dict
        ``{"Public": x, "Private": y, "All": z}``; a split absent from the solution is left
        out (only ``"All"`` without a ``Usage`` column). ``Ignored`` rows count nowhere.
    """
    predictions = _submission(submission)
    if isinstance(predictions, pd.DataFrame):
        predictions = parse_recognition_submission(predictions)
    return _by_usage(
        global_average_precision,
        predictions,
        _solution(solution, "recognition"),
        tie_break=tie_break,
    )


def evaluate_retrieval(
    submission: RetrievalPredictions | str | os.PathLike,
    solution: SolutionLike | str | os.PathLike,
    k: int = 100,
) -> dict[str, float]:
    """mAP@k per leaderboard split.

    Parameters
    ----------
    submission : DataFrame, path or mapping
        ``id,images`` table or file, or predictions as for
        :func:`mean_average_precision_at_k`.
    solution : DataFrame, path, Solution or mapping
        ``id,images,Usage`` table or file (``retrieval_solution.csv``).
    k : int
        Positions scored per query.

    Returns
    -------
    scores : dict
        As :func:`evaluate_recognition`.
    """
    predictions = _submission(submission)
    if isinstance(predictions, pd.DataFrame):
        predictions = parse_retrieval_submission(predictions)
    return _by_usage(
        mean_average_precision_at_k, predictions, _solution(solution, "retrieval"), k=k
    )


def answer_correctness(
    predictions: RecognitionPredictions | str | os.PathLike, solution: SolutionLike | str | os.PathLike
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Each answered solution query's confidence and whether its landmark is right.

    A query counts when it is in the solution (not ``Ignored``) and has a prediction; a
    prediction on a non-landmark query is wrong. Landmark ids compare as in GAP
    (:func:`canonical_landmark_id`).

    Returns
    -------
    confidence : float64 [A]; right : bool [A]; ids : the A query ids (sorted).
    """
    truth = {
        key: frozenset(canonical_landmark_id(label) for label in labels)
        for key, labels in _truth(_solution(solution, "recognition"), "recognition").items()
    }
    answers = _recognition(_submission(predictions))
    ids = sorted(key for key, (label, _) in answers.items() if label is not None and key in truth)
    confidence = np.array([answers[key][1] for key in ids], np.float64)
    right = np.array([canonical_landmark_id(str(answers[key][0])) in truth[key] for key in ids], bool)
    return confidence, right, ids


def reliability_bins(
    confidence: np.ndarray, right: np.ndarray, bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Answers grouped into ``bins`` equal-width confidence bins over [0, 1]
    (bin ``b`` holds ``b/bins <= c < (b+1)/bins``, the last one also ``c = 1``).

    Parameters
    ----------
    confidence : float [A] probabilities (ValueError outside [0, 1]); right : bool [A].

    Returns
    -------
    counts : int64 [bins]; accuracy : float64 [bins] fraction right; mean_confidence :
    float64 [bins] (both NaN for an empty bin).
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    confidence = np.asarray(confidence, np.float64)
    right = np.asarray(right, bool)
    if confidence.shape != right.shape or confidence.ndim != 1:
        raise ValueError(f"confidence {confidence.shape} and right {right.shape} must be equal 1-D shapes")
    if confidence.size and (np.any(~np.isfinite(confidence)) or confidence.min() < 0 or confidence.max() > 1):
        raise ValueError("confidences are not probabilities (outside [0, 1]); CONFIDENCE=probability writes them")
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(which, weights=right.astype(np.float64), minlength=bins) / counts
        mean = np.bincount(which, weights=confidence, minlength=bins) / counts
    return counts, accuracy, mean


def expected_calibration_error(confidence: np.ndarray, right: np.ndarray, bins: int = 10) -> float:
    """ECE = sum over the ``bins`` equal-width bins of ``|bin| / A * |accuracy(bin) -
    mean confidence(bin)|`` over the A answers (:func:`reliability_bins`); 0.0 for none."""
    counts, accuracy, mean = reliability_bins(confidence, right, bins)
    total = counts.sum()
    if total == 0:
        return 0.0
    used = counts > 0
    return float(np.sum(counts[used] / total * np.abs(accuracy[used] - mean[used])))


def brier_score(confidence: np.ndarray, right: np.ndarray) -> float:
    """Mean of ``(confidence - right)^2`` over the answers (0 best, 1 worst); 0.0 for none."""
    confidence = np.asarray(confidence, np.float64)
    right = np.asarray(right, np.float64)
    if confidence.shape != right.shape:
        raise ValueError(f"confidence {confidence.shape} and right {right.shape} differ in shape")
    return float(np.mean((confidence - right) ** 2)) if confidence.size else 0.0


def evaluate_calibration(
    submission: RecognitionPredictions | str | os.PathLike,
    solution: SolutionLike | str | os.PathLike,
    bins: int = 10,
) -> dict[str, float] | None:
    """ECE (``bins`` bins) and Brier score of a recognition submission whose confidences
    are probabilities, over every answered query of the solution (all splits together);
    also ``answers`` and ``accuracy``. None when a confidence lies outside [0, 1] (the
    submission holds scores, not probabilities)."""
    predictions = _submission(submission)
    if isinstance(predictions, pd.DataFrame):
        predictions = parse_recognition_submission(predictions)
    confidence, right, _ = answer_correctness(predictions, solution)
    if confidence.size and (confidence.min() < 0 or confidence.max() > 1):
        return None
    return {
        "ECE": expected_calibration_error(confidence, right, bins),
        "Brier": brier_score(confidence, right),
        "answers": float(confidence.size),
        "accuracy": float(right.mean()) if right.size else 0.0,
    }
