"""Verification cascade: a cheap matcher picks which candidates the learned matcher sees.

A learned matcher (LightGlue, LighterGlue; :mod:`.learned`) costs 0.5-3 s per
pair on a CPU, so it verifies only ``NUM_TO_RERANK`` candidates; a true database photo
that the global descriptor ranks lower is never seen. With ``CASCADE_CANDIDATES = W >
NUM_TO_RERANK`` and a learned ``MATCHER``, the first ``W`` candidates by global
similarity are first verified by mutual nearest neighbours (``MUTUAL_NEAREST_NEIGHBOR``,
``RATIO_TEST``, ``MAX_DESCRIPTOR_DISTANCE``) + RANSAC (the same ``RANSAC_*`` settings),
about 0.01-0.1 s per pair, and the ``NUM_TO_RERANK`` of them with the most cheap inliers
go to the learned matcher::

    evidence_j = cheap_inliers_j if cheap_inliers_j >= CASCADE_MIN_INLIERS else 0
    chosen     = first NUM_TO_RERANK candidates by evidence_j descending, ties (in
                 particular all candidates without evidence) in global order

So without cheap evidence the learned matcher sees exactly the candidates it would see
without the cascade. The inlier counts returned are the learned matcher's for the chosen
candidates and 0 for the others (cheap counts live on another scale and are not mixed
in); scoring and voting (:mod:`.rerank`) then run over all ``W`` candidates as usual, the
ones not chosen keeping their global similarity as score.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from delf_retrieval.features.containers import LocalFeatures
from delf_retrieval.matching.verify import MatchingSettings, count_inliers_many

__all__ = ["VerificationSettings", "cascade_active", "cascade_choice", "num_candidates", "verify_candidates"]


@dataclass(frozen=True)
class VerificationSettings:
    """Which candidates of a recognition query are verified, and how: what this step reads
    of :class:`~delf_retrieval.config.Config` (defaults: ``kaggle2020``).

    Attributes
    ----------
    matching : how a pair is verified (:class:`~delf_retrieval.matching.verify.MatchingSettings`:
        ``MATCHER``, the nearest-neighbour filters, ``MIN_MATCHES``, ``RANSAC_*``, ...).
    num_to_rerank : ``NUM_TO_RERANK``, candidates verified per query (by global similarity,
        or chosen by the cascade).
    cascade_candidates : ``CASCADE_CANDIDATES``, candidates the cascade's cheap stage verifies.
    cascade_min_inliers : ``CASCADE_MIN_INLIERS``, cheap inlier counts below this are no evidence.
    """

    matching: MatchingSettings = field(default_factory=MatchingSettings)
    num_to_rerank: int = 3
    cascade_candidates: int = 0
    cascade_min_inliers: int = 12

    @classmethod
    def from_config(cls, config: Any) -> VerificationSettings:
        return cls(
            matching=MatchingSettings.from_config(config),
            num_to_rerank=config.NUM_TO_RERANK,
            cascade_candidates=config.CASCADE_CANDIDATES,
            cascade_min_inliers=config.CASCADE_MIN_INLIERS,
        )


def cascade_active(settings: VerificationSettings) -> bool:
    """Whether verification runs the cascade: a learned matcher and ``cascade_candidates >
    num_to_rerank``."""
    return settings.matching.learned and settings.cascade_candidates > settings.num_to_rerank > 0


def num_candidates(settings: VerificationSettings, top_k: int) -> int:
    """Global candidates a recognition query needs: ``max(num_to_rerank, top_k)`` (``top_k``:
    ``TOP_K``, the candidates that vote), or ``cascade_candidates`` when larger and the
    cascade is active."""
    width = max(settings.num_to_rerank, top_k)
    return max(width, settings.cascade_candidates) if cascade_active(settings) else width


def cascade_choice(cheap_inliers: np.ndarray, count: int, min_inliers: int) -> np.ndarray:
    """Positions of the ``count`` candidates the learned matcher verifies.

    Parameters
    ----------
    cheap_inliers : int array [W]
        Inlier counts of the cheap matcher, candidates in global order (best first).
    count : int
        How many to choose (``NUM_TO_RERANK``); ``min(count, W)`` are returned.
    min_inliers : int
        Counts below this are no evidence (treated as 0).

    Returns
    -------
    int64 [min(count, W)]
        Positions into ``cheap_inliers``, by evidence descending, ties in global order.
    """
    counts = np.asarray(cheap_inliers, np.int64)
    if counts.ndim != 1:
        raise ValueError(f"cheap_inliers must be one-dimensional, got shape {counts.shape}")
    evidence = np.where(counts >= min_inliers, counts, 0)
    return np.argsort(-evidence, kind="stable")[: max(count, 0)].astype(np.int64)


def verify_candidates(
    query: LocalFeatures,
    candidate: Callable[[int], LocalFeatures],
    size: int,
    settings: VerificationSettings,
) -> np.ndarray:
    """Inlier counts of one query's candidates, as recognition uses them.

    Parameters
    ----------
    query : LocalFeatures
        The query image.
    candidate : callable
        ``candidate(p)`` returns the local features of the candidate at position ``p``
        (global order); only the positions that are verified are read.
    size : int
        Number of candidates R.
    settings : VerificationSettings
        Without the cascade (:func:`cascade_active`), the first ``num_to_rerank`` are
        verified with ``settings.matching``; with it, see the module docstring.

    Returns
    -------
    int64 [R]
        Inliers of the verified candidates, 0 for the others.
    """
    inliers = np.zeros(size, np.int64)
    matching = settings.matching
    if not cascade_active(settings):
        verified = min(settings.num_to_rerank, size)
        if verified:
            inliers[:verified] = count_inliers_many(query, [candidate(p) for p in range(verified)], matching)
        return inliers
    width = min(settings.cascade_candidates, size)
    features = [candidate(p) for p in range(width)]
    cheap = count_inliers_many(query, features, matching.nearest_neighbours())
    chosen = np.sort(cascade_choice(cheap, settings.num_to_rerank, settings.cascade_min_inliers))
    inliers[chosen] = count_inliers_many(query, [features[p] for p in chosen], matching)
    return inliers
