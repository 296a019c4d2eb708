"""One query's recognition from its search result: verify the best candidates, vote landmarks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from delf_retrieval.features.containers import LocalFeatures
from delf_retrieval.features.store import FeatureStore
from delf_retrieval.matching import cascade
from delf_retrieval.matching.cascade import VerificationSettings
from delf_retrieval.scoring.rerank import ScoringSettings, recognize_one


def recognize_candidates(
    query: LocalFeatures | None,
    candidates: np.ndarray,
    cosine: np.ndarray,
    database: FeatureStore,
    labels: Sequence[str | None],
    verification: VerificationSettings,
    scoring: ScoringSettings,
    *,
    candidate_nonlandmark: np.ndarray | None = None,
    query_nonlandmark: float | None = None,
    verify: bool = True,
) -> tuple[str | None, float, np.ndarray | None]:
    """One query's recognition from its search result: the per-query step of the engine
    (:func:`delf_retrieval.scoring.engine.recognize_queries`).

    Parameters
    ----------
    query : local features of the query (descriptors in the store's dtype), or None.
    candidates : int64 [R] database rows by cosine, best first.
    cosine : float [R] their similarities.
    database : the train store (local features of the verified candidates are read).
    labels : landmark of every database row (None: unlabelled).
    verification : which candidates are verified, and how (:func:`.cascade.verify_candidates`).
    scoring : scores and votes (:func:`.rerank.recognize_one`).
    candidate_nonlandmark : float32 [N] non-landmark similarity of every database row.
    query_nonlandmark : the query's non-landmark similarity.

    Returns
    -------
    label, confidence : from :func:`.rerank.recognize_one`.
    inliers : int64 [R] (zeros for candidates not verified), or None when not verified.
    """
    ids = database.ids
    candidate_labels = [labels[c] for c in candidates]
    candidate_nl = None if candidate_nonlandmark is None else candidate_nonlandmark[candidates]
    inliers = None
    if verify and verification.num_to_rerank > 0 and query is not None and database.local_dim:
        inliers = cascade.verify_candidates(
            query, lambda p: database.local_features(ids[candidates[p]]), len(candidates), verification
        )
    label, confidence = recognize_one(
        candidate_labels, np.asarray(cosine, np.float64), inliers, scoring, candidate_nl, query_nonlandmark
    )
    return label, confidence, inliers
