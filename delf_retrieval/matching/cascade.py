"""Verification cascade: a cheap matcher picks which candidates the learned matcher sees.

A learned matcher (LightGlue, LighterGlue; :mod:`.learned_matching`) costs 0.5-3 s per
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

import numpy as np

from delf_retrieval.config import Config
from delf_retrieval.features.containers import LocalFeatures
from delf_retrieval.matching.verify import count_inliers_many

__all__ = ["cascade_active", "cascade_choice", "num_candidates", "verify_candidates"]


def cascade_active(config: Config) -> bool:
    """Whether ``config`` verifies with the cascade: a learned ``MATCHER`` and
    ``CASCADE_CANDIDATES > NUM_TO_RERANK``."""
    return config.MATCHER != "nn" and config.CASCADE_CANDIDATES > config.NUM_TO_RERANK > 0


def num_candidates(config: Config) -> int:
    """Global candidates a recognition query needs: ``max(NUM_TO_RERANK, TOP_K)``, or
    ``CASCADE_CANDIDATES`` when larger and the cascade is active."""
    width = max(config.NUM_TO_RERANK, config.TOP_K)
    return max(width, config.CASCADE_CANDIDATES) if cascade_active(config) else width


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
    config: Config,
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
    config : Config
        Without the cascade (:func:`cascade_active`), the first ``NUM_TO_RERANK`` are
        verified with ``MATCHER``; with it, see the module docstring.

    Returns
    -------
    int64 [R]
        Inliers of the verified candidates, 0 for the others.
    """
    inliers = np.zeros(size, np.int64)
    if not cascade_active(config):
        verified = min(config.NUM_TO_RERANK, size)
        if verified:
            inliers[:verified] = count_inliers_many(query, [candidate(p) for p in range(verified)], config)
        return inliers
    width = min(config.CASCADE_CANDIDATES, size)
    features = [candidate(p) for p in range(width)]
    cheap = count_inliers_many(query, features, config.replace(MATCHER="nn", MATCHER_FEATURES=""))
    chosen = np.sort(cascade_choice(cheap, config.NUM_TO_RERANK, config.CASCADE_MIN_INLIERS))
    inliers[chosen] = count_inliers_many(query, [features[p] for p in chosen], config)
    return inliers
