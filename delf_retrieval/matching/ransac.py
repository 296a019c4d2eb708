"""RANSAC inlier counts of putative matches: one seeded function over several estimators."""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

# Points that define a model: a homography always fits its 4 sample points exactly and an
# affine map its 3, so a model supported by no more than these is no evidence at all.
_SAMPLE_SIZE = {"magsac": 4, "opencv-ransac": 4, "degensac": 4, "skimage-affine": 3}
# The estimators (``Config.RANSAC_METHOD`` accepts the same names, tests/test_settings.py).
RANSAC_METHODS = tuple(_SAMPLE_SIZE)


# Point sets whose second singular value (after centring) is below this fraction of the
# first lie on a line (or a point): no homography or affine map is determined.
_DEGENERATE_RATIO = 1e-4

# A fitted map must scale areas, at its median inlier, by a factor within these bounds
# (a 30x zoom either way) and keep orientation at every inlier. Plain nearest-neighbour
# matching sends hundreds of keypoints to a handful of points; a map that collapses them
# (area scale ~1e-6) or mirrors them would count all of them as inliers.
_MIN_AREA_SCALE, _MAX_AREA_SCALE = 1e-3, 1e3


def ransac_inliers(
    points1: np.ndarray,
    points2: np.ndarray,
    *,
    method: str = "magsac",
    max_reprojection_error: float = 4.0,
    max_iterations: int = 1000,
    confidence: float = 0.99,
    seed: int = 0,
) -> np.ndarray:
    """Inliers of a robustly fitted map from ``points1`` to ``points2``.

    Parameters
    ----------
    points1, points2 : float array [M, 2]
        Matched ``(x, y)`` pixel positions in image 1 and image 2.
    method : {"magsac", "opencv-ransac", "degensac", "skimage-affine"}
        ``"magsac"``: homography with OpenCV USAC MAGSAC++ (``cv2.USAC_MAGSAC`` settings,
        seeded through ``UsacParams.randomGeneratorState``). ``"opencv-ransac"``:
        homography with ``cv2.RANSAC`` (OpenCV seeds it with a fixed state, so ``seed`` has
        no effect; it is deterministic). ``"degensac"``: homography with
        ``pydegensac.findHomography`` (the baseline's, optional extra). ``"skimage-affine"``:
        affine map from ``points2`` to ``points1`` with ``skimage.measure.ransac``, exactly
        as the reference ``MatchFeatures`` (image_reranking.py) calls it.
    max_reprojection_error : float
        Inlier threshold, pixels (> 0).
    max_iterations : int
        Iteration cap (>= 1).
    confidence : float
        Stopping confidence in (0, 1); ``"skimage-affine"`` also takes 1.0 (scikit-image's
        default ``stop_probability``, which the reference uses).
    seed : int
        Random state (>= 0); the same seed gives the same inliers.

    Returns
    -------
    bool [M]
        For the homography methods: all False when there are fewer than 5 matches, a
        point is not finite, either point set is degenerate (all on one line), no model is
        found, the model is supported only by its own minimal sample (4 points), or the
        model is implausible: it mirrors the image, or it scales areas at its median
        inlier by less than 1/1000 or more than 1000 (a collapse of many matches onto a
        few points, which plain nearest-neighbour matching invites). For
        ``"skimage-affine"``: scikit-image's inlier mask as it is (all False when a point
        is not finite, there are fewer than 3 matches or no sample gave a model).

    Raises
    ------
    ValueError
        For shapes other than two equal ``[M, 2]``, or invalid parameters.
    ImportError
        For ``method="degensac"`` without pydegensac.
    """
    p1 = _as_points(points1, "points1")
    p2 = _as_points(points2, "points2")
    if p1.shape[0] != p2.shape[0]:
        raise ValueError(f"points1 has {p1.shape[0]} points but points2 has {p2.shape[0]}")
    if method not in RANSAC_METHODS:
        raise ValueError(f"unknown RANSAC method {method!r}; choose one of {RANSAC_METHODS}")
    if not max_reprojection_error > 0:
        raise ValueError(f"max_reprojection_error must be > 0, got {max_reprojection_error}")
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
    if not (0 < confidence < 1 or (confidence == 1 and method == "skimage-affine")):
        raise ValueError(
            f"confidence must be in (0, 1) (or 1.0 with 'skimage-affine'), got {confidence}"
        )
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if method == "degensac":
        _import_pydegensac()

    none = np.zeros(p1.shape[0], dtype=bool)
    if not (np.isfinite(p1).all() and np.isfinite(p2).all()):
        return none
    if method == "skimage-affine":
        return _skimage_affine(p1, p2, max_reprojection_error, max_iterations, confidence, seed)
    if p1.shape[0] < 5:
        return none
    if _is_degenerate(p1) or _is_degenerate(p2):
        return none
    try:
        model, mask = _ESTIMATORS[method](
            p1, p2, float(max_reprojection_error), int(max_iterations), float(confidence), int(seed)
        )
    except (np.linalg.LinAlgError, ValueError, _cv2_error()):
        return none
    if model is None or mask is None:
        return none
    mask = np.asarray(mask).reshape(-1).astype(bool)
    if mask.shape[0] != p1.shape[0] or mask.sum() <= _SAMPLE_SIZE[method]:
        return none
    if not _plausible(np.asarray(model, np.float64), p1[mask]):
        return none
    return mask


@dataclass(frozen=True)
class RansacSettings:
    """What RANSAC reads of :class:`~delf_retrieval.config.Config` (defaults: ``kaggle2020``).

    Attributes
    ----------
    method : ``RANSAC_METHOD``, the estimator (see :func:`ransac_inliers`).
    max_reprojection_error : ``MAX_REPROJECTION_ERROR``, the inlier threshold in pixels.
    max_iterations : ``MAX_RANSAC_ITERATIONS``, the iteration cap.
    confidence : ``HOMOGRAPHY_CONFIDENCE``, the stopping confidence in (0, 1] (1 only with
        ``"skimage-affine"``).
    seed : ``RANSAC_SEED``, the random state.
    """

    method: str = "magsac"
    max_reprojection_error: float = 4.0
    max_iterations: int = 1000
    confidence: float = 0.99
    seed: int = 0

    @classmethod
    def from_config(cls, config: Any) -> RansacSettings:
        return cls(
            method=config.RANSAC_METHOD,
            max_reprojection_error=config.MAX_REPROJECTION_ERROR,
            max_iterations=config.MAX_RANSAC_ITERATIONS,
            confidence=config.HOMOGRAPHY_CONFIDENCE,
            seed=config.RANSAC_SEED,
        )

    def inliers(self, points1: np.ndarray, points2: np.ndarray) -> np.ndarray:
        """:func:`ransac_inliers` of matched points [M, 2] with these settings: bool [M]."""
        return ransac_inliers(
            points1,
            points2,
            method=self.method,
            max_reprojection_error=self.max_reprojection_error,
            max_iterations=self.max_iterations,
            confidence=self.confidence,
            seed=self.seed,
        )


def _magsac(p1, p2, threshold, iterations, confidence, seed):

    # The settings cv2.USAC_MAGSAC uses, plus an explicit random state (the flag form
    # always starts from state 0 and ignores cv2.setRNGSeed).
    params = cv2.UsacParams()
    params.threshold = threshold
    params.confidence = confidence
    params.maxIterations = iterations
    params.sampler = cv2.SAMPLING_UNIFORM
    params.score = cv2.SCORE_METHOD_MAGSAC
    params.loMethod = cv2.LOCAL_OPTIM_SIGMA
    params.loSampleSize = 75
    params.loIterations = 15
    params.randomGeneratorState = seed
    return cv2.findHomography(_f32(p1), _f32(p2), params)


def _opencv_ransac(p1, p2, threshold, iterations, confidence, seed):

    return cv2.findHomography(
        _f32(p1), _f32(p2), cv2.RANSAC, threshold, maxIters=iterations, confidence=confidence
    )


def _degensac(p1, p2, threshold, iterations, confidence, seed):
    pydegensac = _import_pydegensac()
    return pydegensac.findHomography(
        np.ascontiguousarray(p1, np.float64),
        np.ascontiguousarray(p2, np.float64),
        threshold,
        confidence,
        iterations,
        seed=seed,
    )


def _skimage_affine(
    p1: np.ndarray, p2: np.ndarray, threshold: float, iterations: int, confidence: float, seed: int
) -> np.ndarray:
    """Inlier mask [M] of ``MatchFeatures``' RANSAC (image_reranking.py): index -> query."""
    # scikit-image takes about a second to import: only for RANSAC_METHOD="skimage-affine".
    from skimage.measure import ransac
    from skimage.transform import AffineTransform

    none = np.zeros(p1.shape[0], dtype=bool)
    if p1.shape[0] < 3:  # ransac needs min_samples <= M
        return none
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No inliers found" and the like
        _, inliers = ransac(
            (np.asarray(p2, np.float64), np.asarray(p1, np.float64)),
            AffineTransform,
            min_samples=3,
            residual_threshold=threshold,
            max_trials=iterations,
            stop_probability=confidence,
            **{_skimage_seed_keyword(ransac): seed},
        )
    # The reference counts sum(inliers) whatever the final refit gives; None means none.
    return none if inliers is None else np.asarray(inliers, dtype=bool).reshape(-1)


def _skimage_seed_keyword(ransac: object) -> str:
    """``rng`` (scikit-image >= 0.23) or ``random_state`` (older releases, as the reference)."""

    return "rng" if "rng" in inspect.signature(ransac).parameters else "random_state"


_ESTIMATORS = {
    "magsac": _magsac,
    "opencv-ransac": _opencv_ransac,
    "degensac": _degensac,
}


def _plausible(model: np.ndarray, inliers1: np.ndarray) -> bool:
    """Whether a 3x3 map is finite, keeps orientation at every inlier and scales areas at
    the median inlier within bounds. ``inliers1``: float64 [K, 2] points of image 1."""
    if model.shape != (3, 3) or not np.isfinite(model).all():
        return False
    # The Jacobian determinant of x -> H x (in homogeneous coordinates) at (u, v) is
    # det(H) / w**3 with w = h31 u + h32 v + h33; it is the local area scale.
    w = inliers1 @ model[2, :2] + model[2, 2]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        area = np.linalg.det(model) / w**3
    if not (np.isfinite(area).all() and (area > 0).all()):
        return False
    return bool(_MIN_AREA_SCALE <= np.median(area) <= _MAX_AREA_SCALE)


def _import_pydegensac():
    try:
        import pydegensac
    except ImportError as error:
        raise ImportError(
            "RANSAC_METHOD='degensac' needs pydegensac: pip install delf_retrieval[degensac] "
            "(or pip install pydegensac)"
        ) from error
    return pydegensac


def _cv2_error() -> type[BaseException]:
    try:
        import cv2
    except ImportError:  # pragma: no cover - OpenCV is a core dependency
        return RuntimeError
    return cv2.error


def _f32(points: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(points, dtype=np.float32)


def _is_degenerate(points: np.ndarray) -> bool:
    centred = np.asarray(points, np.float64) - np.mean(points, axis=0, dtype=np.float64)
    singular = np.linalg.svd(centred, compute_uv=False)
    return bool(singular[0] == 0 or singular[1] <= _DEGENERATE_RATIO * singular[0])


def _as_points(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"{name} must be an array [M, 2] of (x, y), got shape {array.shape}")
    return array.astype(np.float64, copy=False)
