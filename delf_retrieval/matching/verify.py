"""Geometric verification: putative descriptor matches, then RANSAC inliers.

The Kaggle 2020 host baseline looks every descriptor of the *query* image up in a KD-tree
of the *train* image's descriptors (``cKDTree(train).query(test, distance_upper_bound=...)``)
and fits a homography with pydegensac from query to train keypoints. Here image 1 plays
the query and image 2 the train/index image, in that same direction, but the nearest
neighbours come from one matrix product of L2-normalised descriptors
(``distance**2 = 2 - 2 * similarity``), and RANSAC defaults to OpenCV's seeded MAGSAC++.

``RANSAC_METHOD="skimage-affine"`` is the reference re-ranking of tensorflow/models
``research/delf/delf/python/detect_to_retrieve/image_reranking.py MatchFeatures`` (and
the TF-Hub DELF tutorial): ``skimage.measure.ransac`` with an affine model fitted from
the *index* image's points to the *query*'s, ``min_samples=3``, the given residual
threshold and trial count, ``stop_probability`` = HOMOGRAPHY_CONFIDENCE (the reference
leaves scikit-image's default 1.0: all trials run unless every match is an inlier),
and no filter on the result: the count is ``sum(inliers)``, 0 when RANSAC finds none.
The reference returns 0 for 3 putative matches or fewer (``MIN_MATCHES=3``; preset
``delf-matchfeatures``). scikit-image >= 0.23 takes the seed as ``rng=`` (older versions:
``random_state=``); both seed ``numpy.random.default_rng(seed)`` there.

Tie rule: a descriptor whose nearest neighbour is tied picks the smaller index.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from delf_retrieval.core.threads import bounded_blas_threads
from delf_retrieval.features.containers import LocalFeatures, l2_normalize
from delf_retrieval.matching import learned as learned_matching
from delf_retrieval.matching.kernels import numba_available
from delf_retrieval.matching.nn import match_batch, match_products, match_products_threaded
from delf_retrieval.matching.ransac import RansacSettings, _as_points, ransac_inliers

__all__ = [
    "MatchingSettings",
    "bounded_blas_threads",
    "count_inliers",
    "count_inliers_many",
    "match_and_verify",
    "putative_matches",
    "ransac_inliers",
]


@dataclass(frozen=True)
class MatchingSettings:
    """What verifying a pair reads of :class:`~delf_retrieval.config.Config` (defaults:
    ``kaggle2020``); built once from the user's config (:meth:`from_config`).

    Attributes
    ----------
    matcher : ``MATCHER``: ``"nn"`` (nearest neighbours) or a learned matcher,
        ``"lightglue"`` / ``"lighterglue"`` (:mod:`delf_retrieval.matching.learned`).
    matcher_features : ``MATCHER_FEATURES``, the learned matcher's weights (``""`` with ``"nn"``).
    match_confidence : ``MATCH_CONFIDENCE``, learned matches below this confidence (in
        [0, 1]) are dropped.
    max_distance : ``MAX_DESCRIPTOR_DISTANCE``, L2 bound of a nearest-neighbour match
        between unit descriptors (``inf``: none).
    mutual : ``MUTUAL_NEAREST_NEIGHBOR``.
    ratio : ``RATIO_TEST``, Lowe's ratio in (0, 1] (1: off).
    min_matches : ``MIN_MATCHES``, pairs with this many putative matches or fewer count 0
        inliers (no RANSAC).
    dtype : ``MATCH_DTYPE``, precision of :func:`count_inliers_many`'s descriptor products.
    device : ``MATCH_DEVICE``, where those products run (``"cpu"``, ``"gpu"``, ``"auto"``).
    workers : ``WORKERS``, threads of :func:`count_inliers_many` (0: all cores).
    ransac : the ``RANSAC_*`` fields, ``MAX_REPROJECTION_ERROR``, ``MAX_RANSAC_ITERATIONS``
        and ``HOMOGRAPHY_CONFIDENCE`` (:class:`~delf_retrieval.matching.ransac.RansacSettings`).
    """

    matcher: str = "nn"
    matcher_features: str = ""
    match_confidence: float = 0.1
    max_distance: float = 0.9
    mutual: bool = False
    ratio: float = 1.0
    min_matches: int = 4
    dtype: str = "float32"
    device: str = "cpu"
    workers: int = 0
    ransac: RansacSettings = field(default_factory=RansacSettings)

    @classmethod
    def from_config(cls, config: Any) -> MatchingSettings:
        return cls(
            matcher=config.MATCHER,
            matcher_features=config.MATCHER_FEATURES,
            match_confidence=config.MATCH_CONFIDENCE,
            max_distance=config.MAX_DESCRIPTOR_DISTANCE,
            mutual=config.MUTUAL_NEAREST_NEIGHBOR,
            ratio=config.RATIO_TEST,
            min_matches=config.MIN_MATCHES,
            dtype=config.MATCH_DTYPE,
            device=config.MATCH_DEVICE,
            workers=config.WORKERS,
            ransac=RansacSettings.from_config(config),
        )

    @property
    def learned(self) -> bool:
        """Whether a learned matcher finds the matches (extra ``[learned]``)."""
        return self.matcher != "nn"

    def nearest_neighbours(self) -> MatchingSettings:
        """The same settings with nearest-neighbour matching (the cascade's cheap stage)."""
        return dataclasses.replace(self, matcher="nn", matcher_features="")


def putative_matches(
    descriptors1: np.ndarray,
    descriptors2: np.ndarray,
    *,
    max_distance: float = float("inf"),
    mutual: bool = False,
    ratio: float = 1.0,
) -> np.ndarray:
    """Nearest-neighbour matches from image 1 (query) to image 2 (train/index).

    Every descriptor of image 1 is matched to its nearest descriptor of image 2 (L2
    distance between L2-normalised rows), like the baseline's KD-tree query with
    ``distance_upper_bound=max_distance``; optional filters drop some matches.

    Parameters
    ----------
    descriptors1 : float array [N1, D]
        Query-image descriptors (float16 is fine). Rows are L2-normalised here, so the
        result depends only on their directions; an all-zero row is at distance
        ``sqrt(2)`` from everything.
    descriptors2 : float array [N2, D]
        Train/index-image descriptors.
    max_distance : float
        Keep a match only if its L2 distance is strictly below this (``inf``: no bound).
    mutual : bool
        Keep a match only if the descriptor of image 1 is also the nearest neighbour, in
        image 1, of its match (mutual nearest neighbours); when several descriptors of
        image 1 are equally near to it, only the one with the smallest index is kept.
    ratio : float
        Lowe's ratio test: keep a match only if its distance is strictly below ``ratio``
        times the distance to the second nearest descriptor. ``1.0`` disables the test.
        With a single descriptor in image 2 the test passes.

    Rows holding NaN or inf are left out, as if they had not been extracted: they match
    nothing and nothing matches them (indices still refer to the full arrays).

    Returns
    -------
    int64 [M, 2]
        ``(index into descriptors1, index into descriptors2)``, sorted by the first column.
    """
    d1 = _as_descriptors(descriptors1, "descriptors1")
    d2 = _as_descriptors(descriptors2, "descriptors2")
    if d1.shape[1] != d2.shape[1]:
        raise ValueError(f"descriptor widths differ: {d1.shape[1]} and {d2.shape[1]}")
    _check_match_params(max_distance, ratio)
    (d1, rows1), (d2, rows2) = _finite_rows(l2_normalize(d1)), _finite_rows(l2_normalize(d2))
    if d1.shape[0] == 0 or d2.shape[0] == 0:
        return np.zeros((0, 2), np.int64)
    return _original_rows(_match_normalized(d1, d2, max_distance, mutual, ratio), rows1, rows2)


def match_and_verify(
    keypoints1: np.ndarray,
    descriptors1: np.ndarray,
    keypoints2: np.ndarray,
    descriptors2: np.ndarray,
    settings: MatchingSettings | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Putative matches and their RANSAC inlier mask, per ``settings`` (for drawing).

    Parameters
    ----------
    keypoints1 : float array [N1, 2]
        Query-image ``(x, y)`` pixels.
    descriptors1 : float array [N1, D]
    keypoints2 : float array [N2, 2]
        Train/index-image ``(x, y)`` pixels.
    descriptors2 : float array [N2, D]
    settings : MatchingSettings, optional
        ``MatchingSettings.from_config(config)``; default ``MatchingSettings()``
        (kaggle2020). Uses the nearest-neighbour filters, ``min_matches`` and ``ransac``;
        a learned ``matcher`` finds the matches instead
        (:func:`delf_retrieval.matching.learned.learned_matches`), keeping those of
        ``match_confidence`` or more.

    Returns
    -------
    matches : int64 [M, 2]
        ``(index into image 1, index into image 2)``.
    inliers : bool [M]
        All False when ``M <= settings.min_matches``.
    """
    settings = MatchingSettings() if settings is None else settings
    k1, d1 = _as_features(keypoints1, descriptors1, "1")
    k2, d2 = _as_features(keypoints2, descriptors2, "2")
    return _verify_pair(_local(k1, d1), _local(k2, d2), settings)


def count_inliers(
    keypoints1: np.ndarray,
    descriptors1: np.ndarray,
    keypoints2: np.ndarray,
    descriptors2: np.ndarray,
    settings: MatchingSettings | None = None,
) -> int:
    """Number of RANSAC inliers between two images, as the baseline's ``get_num_inliers``.

    Same arguments as :func:`match_and_verify`; 0 when there are ``settings.min_matches``
    putative matches or fewer.
    """
    _, inliers = match_and_verify(keypoints1, descriptors1, keypoints2, descriptors2, settings)
    return int(inliers.sum())


def count_inliers_many(
    query: LocalFeatures,
    candidates: Sequence[LocalFeatures],
    settings: MatchingSettings | None = None,
) -> np.ndarray:
    """Inlier counts of one query image against several candidates, in parallel.

    Matching is batched: the candidates' descriptors are stacked and multiplied with the
    query's in one product per group, then nearest neighbours, mutual and ratio tests are
    taken per candidate segment (:func:`delf_retrieval.matching.nn.match_batch`, precision
    ``settings.dtype`` on ``settings.device``); RANSAC follows per pair. With
    ``settings.workers`` threads (0 = ``os.cpu_count()``) and float32 on the CPU with Numba,
    the threads share every candidate's product in 256-row tiles and run RANSAC on a
    candidate as soon as its matches are known
    (:func:`delf_retrieval.matching.nn.match_products_threaded`); otherwise the candidates
    are split between threads that each match and verify their share. BLAS is held to one
    thread meanwhile (``threadpoolctl``; restored on return) so the two levels do not
    over-subscribe the cores. Every pair is seeded the same way: with float32 the result
    equals calling :func:`count_inliers` in a loop. A learned matcher verifies pair by pair
    (as :func:`match_and_verify`).

    Parameters
    ----------
    query : LocalFeatures
        Image 1 of every pair.
    candidates : sequence of LocalFeatures, length C
        Image 2 of each pair.
    settings : MatchingSettings, optional
        As for :func:`match_and_verify`, plus ``workers``, ``dtype`` and ``device``.

    Returns
    -------
    int64 [C]
    """
    settings = MatchingSettings() if settings is None else settings
    if len(candidates) == 0:
        return np.zeros(0, np.int64)
    if settings.learned:  # no batching: pair by pair
        return np.array([int(_verify_pair(query, c, settings)[1].sum()) for c in candidates], np.int64)
    k1, d1 = _as_features(query.keypoints, query.descriptors, "of the query")
    (d1, k1), _ = _finite_features(k1, l2_normalize(d1))
    checked = []
    for candidate in candidates:
        k2, d2 = _as_features(candidate.keypoints, candidate.descriptors, "of a candidate")
        if d2.shape[1] != d1.shape[1]:
            raise ValueError(f"descriptor widths differ: {d1.shape[1]} and {d2.shape[1]}")
        checked.append((k2, d2))

    def prepared(position: int) -> tuple[np.ndarray, np.ndarray]:
        (d2, k2), _ = _finite_features(checked[position][0], l2_normalize(checked[position][1]))
        return k2, d2

    def inlier_count(k2: np.ndarray, matches: np.ndarray) -> int:
        return int(_inliers(matches, k1, k2, settings).sum())

    def share(positions: range) -> list[int]:
        if d1.shape[0] == 0:
            return [0] * len(positions)
        features = {p: prepared(p) for p in positions}  # in the job: in parallel
        found = match_batch(
            d1,
            [features[p][1] for p in positions],
            max_distance=settings.max_distance,
            mutual=settings.mutual,
            ratio=settings.ratio,
            dtype=settings.dtype,
            device=settings.device,
        )
        return [inlier_count(features[p][0], matches) for p, matches in zip(positions, found, strict=True)]

    workers = min(settings.workers or os.cpu_count() or 1, len(candidates))
    if workers <= 1:
        return np.asarray(share(range(len(candidates))), dtype=np.int64)
    if settings.dtype == "float32" and settings.device == "cpu" and numba_available() and d1.shape[0]:
        sizes = [len(descriptors) for _, descriptors in checked]
        return _count_tiled(d1, sizes, prepared, inlier_count, settings, workers)
    # Jobs are taken by whichever thread is free and the call waits for the last one, so
    # float32 without Numba runs one candidate per job (measured: 8.8 against 9.6 ms per
    # pair with two shares per thread on 2 cores, benchmarks/verification.py pairs); the
    # other dtypes quantise the query once per job, so they keep two shares per thread.
    per_worker = len(candidates) if settings.dtype == "float32" else 2
    step = max(1, -(-len(candidates) // (per_worker * workers)))
    shares = [range(s, min(s + step, len(candidates))) for s in range(0, len(candidates), step)]
    with bounded_blas_threads(1):
        counts = [c for part in _thread_pool(workers).map(share, shares) for c in part]
    return np.asarray(counts, dtype=np.int64)


def _count_tiled(
    d1: np.ndarray,
    sizes: list[int],
    prepared: Callable[[int], tuple[np.ndarray, np.ndarray]],
    inlier_count: Callable[[np.ndarray, np.ndarray], int],
    settings: MatchingSettings,
    workers: int,
) -> np.ndarray:
    """count_inliers_many's float32 path on several threads: the threads share every
    candidate's product tile by tile (:func:`delf_retrieval.matching.nn.match_products_threaded`)
    and run RANSAC on a candidate as soon as its matches are known. ``prepared(p)`` gives
    candidate p's (keypoints, unit descriptors), ``inlier_count(keypoints, matches)`` its
    RANSAC count."""
    counts = np.zeros(len(sizes), np.int64)
    keypoints: list = [None] * len(sizes)

    def prepare(position: int) -> np.ndarray:
        keypoints[position], descriptors = prepared(position)
        return descriptors

    def consume(position: int, matches: np.ndarray) -> None:
        counts[position] = inlier_count(keypoints[position], matches)

    pool = _thread_pool(workers)
    with bounded_blas_threads(1):
        match_products_threaded(
            d1,
            sizes,
            prepare,
            max_distance=settings.max_distance,
            mutual=settings.mutual,
            ratio=settings.ratio,
            workers=workers,
            run=lambda worker, count: list(pool.map(worker, range(count))),
            consume=consume,
        )
    return counts


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers`` threads for count_inliers_many (starting one
    costs about 4 ms, per query otherwise). Its jobs never wait on other jobs, so callers
    on several threads may share it."""
    with _POOLS_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="delf-verify")
        return _POOLS[workers]


# --- matching ------------------------------------------------------------------------------


def _verify_pair(
    query: LocalFeatures, candidate: LocalFeatures, settings: MatchingSettings
) -> tuple[np.ndarray, np.ndarray]:
    """Matches ``[M, 2]`` of one pair and their inlier mask ``[M]``: the one place where
    the matcher is chosen (:func:`count_inliers_many` batches nearest neighbours itself)."""
    if settings.learned:  # extra [learned]
        matches, confidence = learned_matching.learned_matches(
            query, candidate, settings.matcher, settings.matcher_features
        )
        matches = matches[confidence >= settings.match_confidence]
        return matches, _inliers(matches, query.keypoints, candidate.keypoints, settings)
    k1, d1, k2, d2 = query.keypoints, query.descriptors, candidate.keypoints, candidate.descriptors
    if d1.shape[1] != d2.shape[1]:
        raise ValueError(f"descriptor widths differ: {d1.shape[1]} and {d2.shape[1]}")
    (d1, k1), rows1 = _finite_features(k1, l2_normalize(d1))
    (d2, k2), rows2 = _finite_features(k2, l2_normalize(d2))
    if d1.shape[0] == 0 or d2.shape[0] == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, bool)
    matches = _match_normalized(d1, d2, settings.max_distance, settings.mutual, settings.ratio)
    inliers = _inliers(matches, k1, k2, settings)
    return _original_rows(matches, rows1, rows2), inliers


def _inliers(
    matches: np.ndarray, keypoints1: np.ndarray, keypoints2: np.ndarray, settings: MatchingSettings
) -> np.ndarray:
    """RANSAC inlier mask of ``matches`` [M, 2] between the keypoints; all False when
    ``M <= min_matches``."""
    if matches.shape[0] <= settings.min_matches:
        return np.zeros(matches.shape[0], bool)
    return settings.ransac.inliers(keypoints1[matches[:, 0]], keypoints2[matches[:, 1]])


def _match_normalized(
    d1: np.ndarray, d2: np.ndarray, max_distance: float, mutual: bool, ratio: float
) -> np.ndarray:
    """Matches between non-empty, L2-normalised float32 descriptor arrays."""
    # No row of image 1 is more similar to j than i: a column maximum is cheaper than an
    # argmax along axis 0; the rules keep the smallest i of several tied rows.
    return match_products(d1, d2, np.array([0, len(d2)]), max_distance, mutual, ratio)[0]


def _finite_rows(descriptors: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``(rows holding no NaN or inf, their indices)``; indices None when every row is
    finite. A non-finite row is left out of matching as if it had not been extracted:
    kept, one NaN row would make every column maximum NaN and void the mutual test."""
    finite = np.isfinite(descriptors).all(axis=1)
    if finite.all():
        return descriptors, None
    rows = np.flatnonzero(finite)
    return descriptors[rows], rows


def _finite_features(
    keypoints: np.ndarray, descriptors: np.ndarray
) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray | None]:
    """As :func:`_finite_rows`, also leaving out rows whose keypoint is not finite (RANSAC
    would reject the whole pair for one such point). Returns ``((descriptors, keypoints),
    indices or None)``."""
    finite = np.isfinite(descriptors).all(axis=1) & np.isfinite(keypoints).all(axis=1)
    if finite.all():
        return (descriptors, keypoints), None
    rows = np.flatnonzero(finite)
    return (descriptors[rows], keypoints[rows]), rows


def _original_rows(matches: np.ndarray, rows1: np.ndarray | None, rows2: np.ndarray | None) -> np.ndarray:
    """Map ``matches`` ``[M, 2]`` between the finite rows back to the original indices."""
    if rows1 is not None:
        matches[:, 0] = rows1[matches[:, 0]]
    if rows2 is not None:
        matches[:, 1] = rows2[matches[:, 1]]
    return matches


# --- input checks --------------------------------------------------------------------------


def _as_descriptors(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D], got shape {array.shape}")
    return array.astype(np.float32, copy=False)


def _as_features(keypoints: np.ndarray, descriptors: np.ndarray, which: str):
    k = _as_points(keypoints, f"keypoints {which}")
    d = _as_descriptors(descriptors, f"descriptors {which}")
    if k.shape[0] != d.shape[0]:
        raise ValueError(f"image {which}: {k.shape[0]} keypoints but {d.shape[0]} descriptors")
    return k, d


def _local(keypoints: np.ndarray, descriptors: np.ndarray) -> LocalFeatures:
    count = keypoints.shape[0]
    return LocalFeatures(keypoints, descriptors, np.zeros(count, np.float32), np.ones(count, np.float32))


def _check_match_params(max_distance: float, ratio: float) -> None:
    if not max_distance > 0:
        raise ValueError(f"max_distance must be > 0, got {max_distance}")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
