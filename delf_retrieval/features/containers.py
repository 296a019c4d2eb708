"""Feature containers shared by every stage.

Conventions used throughout the package:

* keypoints are ``(x, y)`` in pixels of the *original* (decoded, EXIF-rotated) image,
  float32, shape ``[N, 2]``; x grows to the right, y downwards (OpenCV's convention,
  the one ``cv2.findHomography`` takes). DELF/DELG models return boxes ``(ymin, xmin,
  ymax, xmax)`` or locations ``(y, x)``; the adapters convert them.
* local descriptors are float32 ``[N, D]``, each row L2-normalised.
* a global descriptor is float32 ``[D]``, L2-normalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LocalFeatures:
    """Local features of one image.

    Attributes
    ----------
    keypoints : float32 [N, 2]
        ``(x, y)`` in original-image pixels.
    descriptors : float32 [N, D]
        L2-normalised rows (float16 when read from a float16 store).
    scores : float32 [N]
        Attention (DELF/DELG) or detector response (OpenCV); higher is stronger.
    scales : float32 [N]
        Image scale the feature was found at (DELF/DELG) or keypoint size in pixels
        (OpenCV).
    """

    keypoints: np.ndarray
    descriptors: np.ndarray
    scores: np.ndarray
    scales: np.ndarray

    def __len__(self) -> int:
        return int(self.keypoints.shape[0])

    @classmethod
    def empty(cls, dim: int) -> LocalFeatures:
        """No features, with descriptor width ``dim``."""
        return cls(
            keypoints=np.zeros((0, 2), np.float32),
            descriptors=np.zeros((0, dim), np.float32),
            scores=np.zeros((0,), np.float32),
            scales=np.zeros((0,), np.float32),
        )


@dataclass(frozen=True)
class ImageFeatures:
    """Everything an extractor returns for one image.

    ``local`` is None for global-only models; ``global_descriptor`` (float32 [D],
    L2-normalised) is None for local-only models until an aggregator (VLAD) is fitted.
    """

    local: LocalFeatures | None
    global_descriptor: np.ndarray | None


def l2_normalize(array: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """Return ``array`` divided by its L2 norm along ``axis`` (float32, zeros stay zero;
    a vector holding NaN or inf becomes NaN, quietly)."""
    array = np.asarray(array, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        norm = np.linalg.norm(array, axis=axis, keepdims=True)
        return array / np.maximum(norm, eps)


def to_original_pixels(points: np.ndarray, factor: float, *, always: bool = False) -> np.ndarray:
    """Map pixel coordinates found on an image resized by ``1 / factor`` back (float32).

    Pixel centres are aligned, not corners: a point ``p`` of the resized image is
    ``(p + 0.5) * factor - 0.5`` in the original (the convention of ``cv2.resize`` and
    ``tf.image.resize``). ``points`` is ``[N, 2]`` ``(x, y)`` (or any shape of
    coordinates); ``factor`` is original size / resized size (> 1 after downscaling).
    A factor of 1.0 returns a float32 copy of ``points`` unless ``always``: then the
    formula is applied anyway, which can move a point by one float32 ulp (the OpenCV
    extractor has always done so; its stored keypoints stay bit for bit the same).
    """
    points = np.asarray(points, dtype=np.float32)
    if factor == 1.0 and not always:
        return points.copy()
    return ((points + 0.5) * factor - 0.5).astype(np.float32)


def rescale_features(features: ImageFeatures, factor: float) -> ImageFeatures:
    """Map local keypoints found on an image downscaled by ``factor`` back to original pixels."""
    if factor == 1.0 or features.local is None:
        return features
    local = features.local
    rescaled = LocalFeatures(
        keypoints=to_original_pixels(local.keypoints, factor),
        descriptors=local.descriptors,
        scores=local.scores,
        scales=local.scales,
    )
    return ImageFeatures(local=rescaled, global_descriptor=features.global_descriptor)


def non_finite_problem(features: ImageFeatures) -> str | None:
    """Why ``features`` must not be stored (NaN or inf in any array), or None.

    One NaN descriptor turns every similarity it touches into NaN: matching then finds
    no inliers for a true pair, and search ranks are undefined. Such an image is
    recorded as a failure instead.
    """
    arrays = {"global descriptor": features.global_descriptor}
    if features.local is not None:
        local = features.local
        arrays.update(
            {
                "local keypoints": local.keypoints,
                "local descriptors": local.descriptors,
                "local scores": local.scores,
                "local scales": local.scales,
            }
        )
    bad = [name for name, array in arrays.items() if array is not None and not np.isfinite(array).all()]
    if not bad:
        return None
    return f"extraction failed: non-finite values (NaN or inf) in the {', '.join(bad)}"
