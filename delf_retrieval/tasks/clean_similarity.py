"""Global-descriptor evidence for cleaning: a second chance for photos that fail RANSAC.

Spatial verification misses genuine photos across wide baselines, night and season
changes (measured on Paris photos with RootSIFT: 16 of 63 genuine photos had fewer than
11 inliers with every other photo of their landmark). A CNN global descriptor sees those
photos as close to their landmark even so. A photo that failed verification is kept when

1. its ``neighbours`` nearest photos in the whole train set (by global cosine, itself
   excluded) all carry its landmark id (a k-NN consensus: a photo moved to a wrong
   landmark has its true landmark's photos nearest; a non-landmark photo has no
   consistent neighbourhood);
2. the nearest of them was itself verified by inliers (noise cannot vouch for noise: two
   planted photos of one scene put into the same class are each other's nearest);
3. that nearest cosine is at least ``threshold``: the ``quantile`` of the cosines of the
   verified pairs of this very train set (the similarity that same-landmark photos with
   enough inliers reach), so the bar follows the descriptor and the data instead of a
   constant tuned for one model.

Only descriptors that a model computes itself count: VLAD of the same local features
that failed to match is no independent evidence (measured: with VLAD of RootSIFT the
rule kept planted photos that inliers alone removed), so :func:`delf_retrieval.tasks.clean.clean_dataset`
uses this for models with a native global descriptor only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from delf_retrieval.search.index import CosineIndex, SearchIndex

__all__ = ["MIN_VERIFIED_PAIRS", "SimilarityEvidence", "nearest_others", "similarity_evidence", "verified_pair_threshold"]

# Fewer verified pairs than this give no threshold (a quantile of a handful of cosines
# says little), and the rule is not applied.
MIN_VERIFIED_PAIRS = 10


@dataclass(frozen=True)
class SimilarityEvidence:
    """Nearest photos by global cosine of the photos that failed verification.

    Attributes
    ----------
    rows : int64 [R]
        Store rows looked up.
    neighbours : int64 [R, K]
        Their ``K`` nearest other rows, most similar first.
    cosines : float32 [R, K]
        The cosines of those neighbours.
    threshold : float
        Lowest nearest cosine that counts: a quantile of the verified pairs' cosines
        (:func:`verified_pair_threshold`).
    """

    rows: np.ndarray
    neighbours: np.ndarray
    cosines: np.ndarray
    threshold: float

    def supported(self, row_labels: np.ndarray, verified: np.ndarray) -> np.ndarray:
        """bool [R]: which looked-up rows the rule keeps.

        ``row_labels`` [N] is the landmark id of every store row ("" for unlabelled rows),
        ``verified`` bool [N] whether a row has enough inliers with a photo of its class.
        """
        if len(self.rows) == 0 or self.neighbours.shape[1] == 0:
            return np.zeros(len(self.rows), bool)
        own = row_labels[self.rows]
        consensus = np.all(row_labels[self.neighbours] == own[:, None], axis=1) & (own != "")
        nearest = self.neighbours[:, 0]
        return consensus & verified[nearest] & (self.cosines[:, 0] >= self.threshold)


def verified_pair_threshold(
    descriptors: np.ndarray,
    pairs: np.ndarray,
    inliers: np.ndarray,
    *,
    min_inliers: int,
    quantile: float,
    chunk: int = 65536,
) -> tuple[float | None, int]:
    """The ``quantile`` of the global cosines of verified pairs, and how many there are.

    ``descriptors`` float [N, D] (L2-normalised rows, may be memory-mapped), ``pairs``
    int [P, 2] rows, ``inliers`` int [P]. Returns ``(None, count)`` when fewer than
    :data:`MIN_VERIFIED_PAIRS` pairs have ``min_inliers`` or more.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    verified = np.asarray(pairs, np.int64)[np.asarray(inliers) >= min_inliers]
    if len(verified) < MIN_VERIFIED_PAIRS:
        return None, len(verified)
    cosines = np.empty(len(verified), np.float64)
    for start in range(0, len(verified), chunk):
        part = verified[start : start + chunk]
        a = np.asarray(descriptors[part[:, 0]], np.float64)
        b = np.asarray(descriptors[part[:, 1]], np.float64)
        cosines[start : start + chunk] = np.einsum("ij,ij->i", a, b)
    return float(np.quantile(cosines, quantile)), len(verified)


def nearest_others(
    descriptors: np.ndarray,
    rows: np.ndarray,
    k: int,
    *,
    index: SearchIndex | None = None,
    block_size: int = 65536,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest other rows of each of ``rows`` by inner product (exact search).

    ``descriptors`` float [N, D] (L2-normalised rows; may be memory-mapped: read in
    blocks). ``index`` searches exactly those rows in that order (e.g. a Ray-sharded
    index from :meth:`delf_retrieval.tasks.run.Runner.index`); default: an exact
    :class:`~delf_retrieval.search.index.CosineIndex` over ``descriptors`` with
    ``block_size``. Returns ``neighbours`` int64 [R, min(k, N - 1)] and ``cosines``
    float32 of the same shape, most similar first; the row itself is left out even when a
    duplicate photo ties with it.
    """
    rows = np.asarray(rows, np.int64)
    width = min(k, len(descriptors) - 1)
    if len(rows) == 0 or width <= 0:
        return np.zeros((len(rows), max(width, 0)), np.int64), np.zeros((len(rows), max(width, 0)), np.float32)
    if index is None:
        index = CosineIndex(block_size=block_size)
        index.add(descriptors)
    queries = np.asarray(descriptors[rows], np.float32)
    sims, ids = index.search(queries, width + 1)
    neighbours = np.empty((len(rows), width), np.int64)
    cosines = np.empty((len(rows), width), np.float32)
    for i, row in enumerate(rows):
        others = ids[i] != row
        neighbours[i] = ids[i][others][:width]
        cosines[i] = sims[i][others][:width]
    return neighbours, cosines


def similarity_evidence(
    descriptors: np.ndarray,
    rows: np.ndarray,
    pairs: np.ndarray,
    inliers: np.ndarray,
    *,
    min_inliers: int,
    neighbours: int = 2,
    quantile: float = 0.1,
    index: SearchIndex | None = None,
    block_size: int = 65536,
) -> tuple[SimilarityEvidence | None, str]:
    """Evidence for ``rows`` (the photos that failed verification), or None with the reason.

    ``descriptors`` float [N, D] L2-normalised global descriptors of the store's rows;
    ``pairs`` int [P, 2] and ``inliers`` int [P] the verified pairs and their counts;
    ``index`` and ``block_size`` as in :func:`nearest_others`.
    Returns ``(evidence, message)``; the message says what was used, or why nothing was.
    """
    if neighbours < 1:
        raise ValueError(f"neighbours must be >= 1, got {neighbours}")
    threshold, count = verified_pair_threshold(
        descriptors, pairs, inliers, min_inliers=min_inliers, quantile=quantile
    )
    if threshold is None:
        return None, (
            f"global similarity not used: {count} verified pairs, fewer than the "
            f"{MIN_VERIFIED_PAIRS} needed to set its threshold"
        )
    found, cosines = nearest_others(descriptors, rows, neighbours, index=index, block_size=block_size)
    if found.shape[1] < neighbours:
        return None, f"global similarity not used: {len(descriptors)} photos, fewer than {neighbours + 1}"
    evidence = SimilarityEvidence(np.asarray(rows, np.int64), found, cosines, threshold)
    return evidence, (
        f"global similarity: threshold {threshold:.4f} (quantile {quantile:g} of {count} verified pairs' "
        f"cosines), {neighbours} nearest photos looked up for {len(rows)} unverified photos"
    )
