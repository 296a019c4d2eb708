"""Adapters for DELG SavedModels, TF2 (``serving_default``) and TF1 (``prune``) exports.

Both adapters take the Kaggle 2020 host baseline's steps: local keypoints are box
centres, local descriptors are L2-normalised, and the global descriptor is the sum of
the per-scale descriptors, each L2-normalised, L2-normalised again. TensorFlow is
imported when an extractor is built, not when this module is imported.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..features import ImageFeatures, LocalFeatures, l2_normalize, to_original_pixels
from ..images import downscale_to_max_size
from .base import Extractor, ExtractorParams, hash_model_dir

DELG_LOCAL_DIM = 128
DELG_GLOBAL_DIM = 2048
_SCALE_TOLERANCE = 1e-4  # model outputs scales as float32; params hold Python floats


def prepare_image(image: np.ndarray, max_image_size: int | None) -> tuple[np.ndarray, float]:
    """Check an RGB uint8 image and cap its size.

    Parameters
    ----------
    image : uint8 [H, W, 3]
    max_image_size : longer side cap in pixels, or None.

    Returns
    -------
    image : uint8 [h, w, 3], C-contiguous (the input itself when no resize is needed)
    factor : float
        Original size / new size (>= 1); a point ``p`` on the returned image is at
        ``(p + 0.5) * factor - 0.5`` in the original.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ValueError(f"expected an RGB image of shape [H, W, 3], got shape {shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        return image, 1.0
    small, factor = downscale_to_max_size(image, max_image_size)
    return np.ascontiguousarray(small), factor


def pool_global(per_scale: np.ndarray) -> np.ndarray:
    """Host-baseline pooling: L2-normalise each scale's descriptor, sum, L2-normalise.

    Parameters
    ----------
    per_scale : float [G, D]

    Returns
    -------
    float32 [D]; all zeros when ``G`` is 0 or every row is zero.
    """
    per_scale = np.asarray(per_scale, dtype=np.float32)
    return l2_normalize(l2_normalize(per_scale, axis=1).sum(axis=0))


def boxes_to_keypoints(boxes: np.ndarray, factor: float = 1.0) -> np.ndarray:
    """Box centres as keypoints.

    Parameters
    ----------
    boxes : float [N, 4]
        ``(ymin, xmin, ymax, xmax)`` in pixels of the image given to the model.
    factor : float
        Original size / model-input size (see :func:`prepare_image`).

    Returns
    -------
    float32 [N, 2] ``(x, y)`` in original pixels.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    centres = np.stack([boxes[:, 1] + boxes[:, 3], boxes[:, 0] + boxes[:, 2]], axis=1) / 2.0
    return to_original_pixels(centres, factor)


def scale_union(
    image_scales: Sequence[float], global_scales: Sequence[float]
) -> tuple[list[float], list[int]]:
    """All scales to run (local ones first) and the indices of the global ones among them.

    >>> scale_union((0.7071, 1.0), (1.0, 1.4142))
    ([0.7071, 1.0, 1.4142], [1, 2])
    """
    scales = [float(s) for s in image_scales]
    indices = []
    for scale in global_scales:
        matches = [i for i, s in enumerate(scales) if abs(s - scale) <= _SCALE_TOLERANCE]
        if not matches:
            scales.append(float(scale))
            matches = [len(scales) - 1]
        indices.append(matches[0])
    return scales, indices


def select_local(
    outputs: dict[str, np.ndarray],
    image_scales: Sequence[float],
    max_feature_num: int,
    factor: float,
    dim: int,
) -> LocalFeatures:
    """Local features from DELG outputs, keeping those found at ``image_scales``.

    Parameters
    ----------
    outputs : dict with ``boxes`` float [N, 4] and ``features`` float [N, D], optionally
        ``scores`` [N] and ``scales`` [N] (zeros when absent).
    image_scales : scales whose features are kept.
    max_feature_num : the strongest this many are kept (model order when no scores).
    factor : original size / model-input size.
    dim : descriptor width, for the empty result.
    """
    boxes = np.asarray(outputs["boxes"], np.float32).reshape(-1, 4)
    count = boxes.shape[0]
    if count == 0:
        return LocalFeatures.empty(dim)
    descriptors = np.asarray(outputs["features"], np.float32).reshape(count, -1)
    scores = np.asarray(outputs.get("scores", np.zeros(count)), np.float32).reshape(count)
    found_at = np.asarray(outputs.get("scales", np.zeros(count)), np.float32).reshape(count)
    if "scales" in outputs:
        wanted = np.asarray(image_scales, np.float32)
        keep = (np.abs(found_at[:, None] - wanted[None, :]) <= _SCALE_TOLERANCE).any(axis=1)
    else:
        keep = np.ones(count, bool)
    order = np.flatnonzero(keep)
    order = order[np.argsort(-scores[order], kind="stable")][:max_feature_num]
    return LocalFeatures(
        keypoints=boxes_to_keypoints(boxes[order], factor),
        descriptors=l2_normalize(descriptors[order]),
        scores=scores[order],
        scales=found_at[order],
    )


def _empty_features(extractor: Extractor) -> ImageFeatures:
    local = LocalFeatures.empty(extractor.local_dim) if extractor.has_local else None
    global_descriptor = np.zeros(extractor.global_dim, np.float32) if extractor.has_global else None
    return ImageFeatures(local=local, global_descriptor=global_descriptor)


def _static_dim(shape: Any, default: int) -> int:
    """Last dimension of a TensorShape, or ``default`` when unknown."""
    try:
        value = shape[-1]
    except (IndexError, ValueError, TypeError):
        return default
    return int(value) if value is not None else default


_TF2_GLOBAL_INPUTS = {"input_image", "input_scales", "input_global_scales_ind"}
_TF2_LOCAL_INPUTS = {"input_max_feature_num", "input_abs_thres"}


class DelgTF2Extractor(Extractor):
    """DELG exported in TF2 format (local+global or global-only), via ``serving_default``.

    Parameters
    ----------
    path : SavedModel folder.
    params : extraction parameters; the host baseline's when None.

    Notes
    -----
    The model runs once per image on the union of ``image_scales`` and
    ``global_scales``; local features found at a global-only scale are dropped. The
    feature cap given to the model is raised in proportion to the extra scales so that
    up to ``max_feature_num`` local features remain. ``scales`` of the returned local
    features are the model scales (relative to the image after the size cap).
    """

    family = "delg-tf2"

    def __init__(self, path: str | os.PathLike, params: ExtractorParams | None = None) -> None:
        import tensorflow as tf

        path = Path(path)
        super().__init__(params or ExtractorParams(), hash_model_dir(path))
        self.path = path
        self._tf = tf
        self._model = tf.saved_model.load(str(path))
        signature = self._model.signatures.get("serving_default")
        if signature is None:
            raise ValueError(f"{path}: no 'serving_default' signature; not a DELG TF2 export")
        inputs = set(signature.structured_input_signature[1])
        outputs = signature.structured_outputs
        if not _TF2_GLOBAL_INPUTS <= inputs or "global_descriptors" not in outputs:
            raise ValueError(
                f"{path}: 'serving_default' has inputs {sorted(inputs)} and outputs "
                f"{sorted(outputs)}; a DELG export needs inputs {sorted(_TF2_GLOBAL_INPUTS)} "
                "and the output 'global_descriptors'"
            )
        # The signature's concrete function has dynamic shapes: no retracing per image size.
        self._function = signature
        self.has_local = _TF2_LOCAL_INPUTS <= inputs and {"boxes", "features"} <= set(outputs)
        self.has_global = True
        self.local_dim = (
            _static_dim(outputs["features"].shape, DELG_LOCAL_DIM) if self.has_local else 0
        )
        self.global_dim = _static_dim(outputs["global_descriptors"].shape, DELG_GLOBAL_DIM)

    def extract(self, image: np.ndarray) -> ImageFeatures:
        """Features of one RGB uint8 image ``[H, W, 3]`` (keypoints in its pixels)."""
        tf = self._tf
        params = self.params
        small, factor = prepare_image(image, params.max_image_size)
        if small.size == 0:
            return _empty_features(self)
        if self.has_local:
            scales, global_index = scale_union(params.image_scales, params.global_scales)
        else:
            scales, global_index = (
                list(params.global_scales),
                list(range(len(params.global_scales))),
            )
        feeds = {
            "input_image": tf.constant(small),
            "input_scales": tf.constant(scales, tf.float32),
            "input_global_scales_ind": tf.constant(global_index, tf.int32),
        }
        if self.has_local:
            extra = len(scales) / len(params.image_scales)
            cap = math.ceil(params.max_feature_num * extra)
            feeds["input_max_feature_num"] = tf.constant(cap, tf.int32)
            feeds["input_abs_thres"] = tf.constant(params.score_threshold, tf.float32)
        outputs = {name: value.numpy() for name, value in self._function(**feeds).items()}
        local = None
        if self.has_local:
            local = select_local(
                outputs, params.image_scales, params.max_feature_num, factor, self.local_dim
            )
        return ImageFeatures(
            local=local, global_descriptor=pool_global(outputs["global_descriptors"])
        )


_TF1_LOCAL_FETCHES = ("boxes", "features", "scales", "scores")


class DelgTF1Extractor(Extractor):
    """DELG exported in TF1 format (Kaggle ``delg-saved-models``), called through ``prune``.

    Parameters
    ----------
    path : SavedModel folder.
    params : extraction parameters; the host baseline's when None.

    Notes
    -----
    These exports have no ``input_global_scales_ind``: the global descriptor covers
    every input scale. When ``global_scales`` equals ``image_scales`` one call gives
    both; otherwise the model runs twice (local scales, then global scales).
    """

    family = "delg-tf1"

    def __init__(self, path: str | os.PathLike, params: ExtractorParams | None = None) -> None:
        import tensorflow as tf

        path = Path(path)
        super().__init__(params or ExtractorParams(), hash_model_dir(path))
        self.path = path
        self._tf = tf
        self._model = tf.saved_model.load(str(path))
        graph = getattr(self._model, "graph", None)
        if graph is None or not hasattr(self._model, "prune"):
            raise ValueError(f"{path}: not a TF1-format SavedModel (no graph to prune)")
        operations = {op.name: op.type for op in graph.get_operations()}
        placeholders = {name for name, kind in operations.items() if kind == "Placeholder"}
        needed = {"input_image", "input_scales"}
        if not needed <= placeholders or "global_descriptors" not in operations:
            raise ValueError(
                f"{path}: a DELG TF1 export needs placeholders 'input_image:0' and "
                "'input_scales:0' and a tensor 'global_descriptors:0'"
            )
        self.has_local = {"input_abs_thres", "input_max_feature_num"} <= placeholders and {
            "boxes",
            "features",
        } <= set(operations)
        self.has_global = True
        image_feeds = ["input_image:0", "input_scales:0"]
        self._global_fn = self._model.prune(image_feeds, "global_descriptors:0")
        self.global_dim = _static_dim(
            graph.get_tensor_by_name("global_descriptors:0").shape, DELG_GLOBAL_DIM
        )
        self.local_dim = 0
        if self.has_local:
            local_feeds = [*image_feeds, "input_abs_thres:0", "input_max_feature_num:0"]
            self._local_names = [name for name in _TF1_LOCAL_FETCHES if name in operations]
            local_fetches = [f"{name}:0" for name in self._local_names]
            self._local_fn = self._model.prune(local_feeds, local_fetches)
            self._both_fn = self._model.prune(local_feeds, [*local_fetches, "global_descriptors:0"])
            self.local_dim = _static_dim(
                graph.get_tensor_by_name("features:0").shape, DELG_LOCAL_DIM
            )

    def extract(self, image: np.ndarray) -> ImageFeatures:
        """Features of one RGB uint8 image ``[H, W, 3]`` (keypoints in its pixels)."""
        tf = self._tf
        params = self.params
        small, factor = prepare_image(image, params.max_image_size)
        if small.size == 0:
            return _empty_features(self)
        pixels = tf.constant(small)
        if not self.has_local:
            raw = self._global_fn(pixels, tf.constant(params.global_scales, tf.float32))
            return ImageFeatures(local=None, global_descriptor=pool_global(raw.numpy()))
        local_scales = tf.constant(params.image_scales, tf.float32)
        threshold = tf.constant(params.score_threshold, tf.float32)
        cap = tf.constant(params.max_feature_num, tf.int32)
        same_scales = len(params.image_scales) == len(params.global_scales) and all(
            abs(a - b) <= _SCALE_TOLERANCE
            for a, b in zip(params.image_scales, params.global_scales, strict=True)
        )
        if same_scales:
            *values, per_scale = self._both_fn(pixels, local_scales, threshold, cap)
        else:
            values = self._local_fn(pixels, local_scales, threshold, cap)
            per_scale = self._global_fn(pixels, tf.constant(params.global_scales, tf.float32))
        outputs = {
            name: value.numpy() for name, value in zip(self._local_names, values, strict=True)
        }
        local = select_local(
            outputs, params.image_scales, params.max_feature_num, factor, self.local_dim
        )
        return ImageFeatures(local=local, global_descriptor=pool_global(per_scale.numpy()))
