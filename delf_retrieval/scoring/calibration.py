"""A calibrated probability that a recognition answer is right: the answer's features and
the small models that map them to a probability.

Features of one answer (query -> predicted landmark ``L``), from what the engine already
computed (:func:`answer_features`)::

    score       the engine's confidence (the host-baseline order: summed candidate
                scores, penalties, VERIFIED_FIRST's offset)
    cosine      the best global cosine of a candidate labelled L (the weakest candidate's
                cosine when no candidate is labelled L)
    margin      the best candidate score of L minus the best candidate score of any other
                landmark among the candidates (scores of :func:`.rerank.candidate_scores`
                without the non-landmark penalty; the weakest candidate's score stands in
                for "another landmark" when no other landmark is among the candidates)
    inliers     log(1 + the most inliers of a candidate labelled L)        verified runs only
    verified    how many candidates labelled L have >= max(MIN_INLIERS, 1) inliers
                                                                           verified runs only
    nonlandmark the query's non-landmark similarity       runs with a distractor penalty only

A feature that does not exist for a run (no inliers in a global-only run, no distractor
set) is absent, not zero: the model is fitted on the features that exist and is applied
only where the same ones exist (:meth:`ConfidenceModel.applies_to`).

Two models (``Config.CONFIDENCE_MODEL``), both fitted by
:mod:`delf_retrieval.scoring.leave_one_out`:

* ``"logistic"``: L2-regularised logistic regression on the standardised evidence
  features (:data:`LOGISTIC_FEATURES`: all but ``score``), fitted by Newton's method
  (IRLS) in NumPy: ``p = 1 / (1 + exp(-(b + w . z)))`` with ``z = (x - mean) / std``; the
  penalty ``LOGISTIC_L2 / 2 * |w|^2`` (not on ``b``). The score is left out: it is a
  hand-made sum of the same evidence with steps in it (``VERIFIED_FIRST``'s offset, the
  ``MIN_INLIERS`` gate), and with it the probabilities calibrated worse on both dev sets
  (ECE 0.054 vs 0.047 on paris-dev, 0.036 vs 0.040 on gldv2-mini-dev, GAP equal or lower;
  ``benchmarks/calibration.py``). ``LOGISTIC_L2 = 0.3`` was chosen among 0.1, 0.3, 1, 3,
  10 on the same two sets (fitting sets of 34 and 73 answers: a stronger penalty pulls
  every probability towards the base rate).
* ``"isotonic"``: isotonic regression (pool-adjacent-violators) of correctness on the
  single ``score``; a new score gets the value of the last fitted block starting at or
  below it (a step function, so equal probabilities are possible).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from delf_retrieval.scoring.rerank import ScoringSettings, candidate_scores

__all__ = [
    "FEATURES",
    "ConfidenceModel",
    "answer_features",
    "feature_names",
    "fit_isotonic",
    "fit_logistic",
    "fit_model",
    "method_key",
]

FEATURES = ("score", "cosine", "margin", "inliers", "verified", "nonlandmark")
LOGISTIC_FEATURES = ("cosine", "margin", "inliers", "verified", "nonlandmark")
LOGISTIC_L2 = 0.3  # on standardised features (see the module doc)
NEWTON_STEPS = 50
# Probabilities are kept inside [PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR]: a few hundred
# held-out photos cannot tell 0.999 from 0.9999.
PROBABILITY_FLOOR = 1e-3
MODEL_VERSION = 1


def method_key(kind: str) -> str:
    """What fitting a model of ``kind`` means in this version (features, penalty): part of
    the record a cached model is checked against."""
    if kind == "isotonic":
        return f"v{MODEL_VERSION}:isotonic:score"
    return f"v{MODEL_VERSION}:logistic:{','.join(LOGISTIC_FEATURES)}:l2={LOGISTIC_L2!r}:steps={NEWTON_STEPS}"


def feature_names(verified: bool, nonlandmark: bool) -> tuple[str, ...]:
    """The features that exist for a run: all but ``inliers``/``verified`` without
    verification and ``nonlandmark`` without a distractor penalty (in :data:`FEATURES` order)."""
    absent = set()
    if not verified:
        absent |= {"inliers", "verified"}
    if not nonlandmark:
        absent.add("nonlandmark")
    return tuple(name for name in FEATURES if name not in absent)


def answer_features(
    label: str | None,
    score: float,
    candidate_labels: Sequence[str | None],
    cosine: np.ndarray,
    inliers: np.ndarray | None,
    query_nonlandmark: float | None,
    settings: ScoringSettings,
) -> dict[str, float]:
    """The features of one answer (see the module doc); absent ones are not in the dict.

    Parameters
    ----------
    label : the predicted landmark (None: no answer, returns ``{}``).
    score : the engine's confidence of that answer.
    candidate_labels : landmark of each candidate [R], retrieval order.
    cosine : float [R] their global cosines.
    inliers : int [R] their inlier counts (None: not verified).
    query_nonlandmark : the query's non-landmark similarity (None: no distractor penalty).
    settings : ``min_inliers``, ``max_inlier_score`` (candidate scores, without a
        non-landmark penalty).

    Returns
    -------
    dict name -> float64 value, in :data:`FEATURES` order.
    """
    if label is None or len(candidate_labels) == 0:
        return {}
    cos = np.asarray(cosine, np.float64)
    scores = candidate_scores(cos, inliers, settings).astype(np.float64)
    mine = np.array([name == label for name in candidate_labels], bool)
    others = np.array([name is not None and name != label for name in candidate_labels], bool)
    features = {"score": float(score)}
    features["cosine"] = float(cos[mine].max()) if mine.any() else float(cos.min())
    best = float(scores[mine].max()) if mine.any() else float(scores.min())
    features["margin"] = best - (float(scores[others].max()) if others.any() else float(scores.min()))
    if inliers is not None:
        counts = np.asarray(inliers, np.float64)
        features["inliers"] = math.log1p(float(counts[mine].max())) if mine.any() else 0.0
        features["verified"] = float(np.sum(mine & (counts >= max(settings.min_inliers, 1))))
    if query_nonlandmark is not None:
        features["nonlandmark"] = float(query_nonlandmark)
    return features


def _sigmoid(value: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * value))  # exact for large |value|, no overflow


@dataclass(frozen=True, eq=False)  # compare models by digest()
class ConfidenceModel:
    """A fitted confidence model: features of an answer -> probability that it is right.

    Attributes
    ----------
    kind : ``"logistic"`` or ``"isotonic"``.
    features : names of the features it reads (``("score",)`` for isotonic).
    mean, std : float64 [F] standardisation (logistic).
    weights : float64 [F] (logistic), ``bias`` its intercept.
    thresholds, values : float64 [B] block starts (ascending scores) and block
        probabilities (isotonic).
    fitted_on : what it was fitted on (a fingerprint record, see
        :func:`delf_retrieval.scoring.leave_one_out.fit_record`) and how many samples.
    """

    kind: str
    features: tuple[str, ...]
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    std: np.ndarray = field(default_factory=lambda: np.ones(0))
    weights: np.ndarray = field(default_factory=lambda: np.zeros(0))
    bias: float = 0.0
    thresholds: np.ndarray = field(default_factory=lambda: np.zeros(0))
    values: np.ndarray = field(default_factory=lambda: np.zeros(0))
    fitted_on: Mapping[str, Any] = field(default_factory=dict)

    def applies_to(self, features: Mapping[str, float]) -> bool:
        """Whether every feature the model reads is present."""
        return all(name in features for name in self.features)

    def probability(self, features: Mapping[str, float]) -> float:
        """Probability that the answer with these features is right (KeyError if one is absent)."""
        if self.kind == "isotonic":
            position = int(np.searchsorted(self.thresholds, features["score"], side="right")) - 1
            value = float(self.values[max(position, 0)])
        else:
            x = np.array([features[name] for name in self.features], np.float64)
            z = (x - self.mean) / self.std
            value = float(_sigmoid(np.array(self.bias + float(np.dot(self.weights, z))))[()])
        return min(max(value, PROBABILITY_FLOOR), 1.0 - PROBABILITY_FLOOR)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; floats as ``float.hex`` so a reload is bit-identical."""

        def hexes(array: np.ndarray) -> list[str]:
            return [float(v).hex() for v in np.asarray(array, np.float64)]

        return {
            "version": MODEL_VERSION,
            "kind": self.kind,
            "features": list(self.features),
            "mean": hexes(self.mean),
            "std": hexes(self.std),
            "weights": hexes(self.weights),
            "bias": float(self.bias).hex(),
            "thresholds": hexes(self.thresholds),
            "values": hexes(self.values),
            "fitted_on": dict(self.fitted_on),
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ConfidenceModel:
        """Inverse of :meth:`to_dict` (ValueError for another version)."""
        if values.get("version") != MODEL_VERSION:
            raise ValueError(f"confidence model version {values.get('version')!r}, this version reads {MODEL_VERSION}")

        def array(name: str) -> np.ndarray:
            return np.array([float.fromhex(v) for v in values[name]], np.float64)

        return cls(
            kind=str(values["kind"]),
            features=tuple(values["features"]),
            mean=array("mean"),
            std=array("std"),
            weights=array("weights"),
            bias=float.fromhex(values["bias"]),
            thresholds=array("thresholds"),
            values=array("values"),
            fitted_on=dict(values.get("fitted_on", {})),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    def digest(self) -> str:
        """Short hash of the fitted parameters."""
        return hashlib.sha1(self.to_json().encode()).hexdigest()[:16]

    def describe(self) -> str:
        """One line for run logs."""
        count = self.fitted_on.get("samples", "?")
        right = self.fitted_on.get("right", "?")
        if self.kind == "isotonic":
            return f"confidence: isotonic on the score, {len(self.values)} steps, from {count} answers ({right} right)"
        parts = ", ".join(f"{n} {w:+.2f}" for n, w in zip(self.features, self.weights, strict=True))
        return f"confidence: logistic ({parts}; standardised), from {count} answers ({right} right)"


def fit_logistic(x: np.ndarray, y: np.ndarray, features: Sequence[str], l2: float = LOGISTIC_L2) -> ConfidenceModel:
    """L2-regularised logistic regression by Newton's method (IRLS).

    Parameters
    ----------
    x : float64 [S, F] features of S answers (columns named by ``features``).
    y : bool [S] whether each answer was right.
    l2 : penalty on the weights of the standardised features (not on the intercept).

    Returns
    -------
    ConfidenceModel of kind ``"logistic"``.
    """
    x = np.asarray(x, np.float64)
    target = np.asarray(y, np.float64)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)  # a constant feature keeps weight 0
    design = np.hstack([np.ones((x.shape[0], 1)), (x - mean) / std])
    penalty = np.full(design.shape[1], float(l2))
    penalty[0] = 1e-6  # the intercept: (almost) free, still well-posed when all answers agree
    theta = np.zeros(design.shape[1])
    for _ in range(NEWTON_STEPS):
        p = _sigmoid(design @ theta)
        gradient = design.T @ (p - target) + penalty * theta
        hessian = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty)
        step = np.linalg.solve(hessian, gradient)
        theta = theta - step
        if float(np.max(np.abs(step))) < 1e-10:
            break
    return ConfidenceModel("logistic", tuple(features), mean=mean, std=std, weights=theta[1:], bias=float(theta[0]))


def fit_isotonic(score: np.ndarray, y: np.ndarray) -> ConfidenceModel:
    """Isotonic (non-decreasing) regression of correctness on the score, by
    pool-adjacent-violators; equal scores are pooled first.

    Parameters
    ----------
    score : float64 [S] the answers' scores; y : bool [S] right or not.

    Returns
    -------
    ConfidenceModel of kind ``"isotonic"``: ``thresholds`` the first score of each block,
    ``values`` its fraction of right answers.
    """
    score = np.asarray(score, np.float64)
    unique, group = np.unique(score, return_inverse=True)  # tied scores: one block from the start
    group_sums = np.bincount(group, weights=np.asarray(y, np.float64), minlength=len(unique))
    group_counts = np.bincount(group, minlength=len(unique)).astype(np.float64)
    starts: list[float] = []
    sums: list[float] = []
    counts: list[float] = []
    for value, right, count in zip(unique.tolist(), group_sums.tolist(), group_counts.tolist(), strict=True):
        starts.append(value)
        sums.append(right)
        counts.append(count)
        while len(sums) > 1 and sums[-2] / counts[-2] >= sums[-1] / counts[-1]:
            last_sum, last_count = sums.pop(), counts.pop()
            sums[-1] += last_sum
            counts[-1] += last_count
            starts.pop()
    values = np.array(sums) / np.array(counts)
    return ConfidenceModel("isotonic", ("score",), thresholds=np.array(starts, np.float64), values=values)


def fit_model(samples: Sequence[Mapping[str, float]], right: Sequence[bool], kind: str) -> ConfidenceModel:
    """Fit a model of ``kind`` on answers' feature dicts (those every sample has are used).

    ValueError with fewer than 2 samples; a sample set that is all right or all wrong
    still fits (the probabilities go to that side).
    """
    if len(samples) < 2:
        raise ValueError(f"a confidence model needs at least 2 answers to fit on, got {len(samples)}")
    y = np.asarray(right, bool)
    if kind == "isotonic":
        return fit_isotonic(np.array([s["score"] for s in samples]), y)
    if kind != "logistic":
        raise ValueError(f"unknown confidence model {kind!r}")
    names = [name for name in LOGISTIC_FEATURES if all(name in s for s in samples)]
    x = np.array([[s[name] for name in names] for s in samples], np.float64)
    return fit_logistic(x, y, names)
