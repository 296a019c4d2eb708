"""Adapters for DELG SavedModels, TF2 (``serving_default``) and TF1 (``prune``) exports.

What the exports return (tensorflow/models research/delf/delf/python/training/model/
export_model_utils.py, ``ExtractLocalFeatures`` / ``ExtractGlobalFeatures``): local
features of *every* ``input_scales`` entry, merged by one NMS capped at
``input_max_feature_num`` and ordered by score, with ``boxes`` in original pixels,
``scales`` = 1 / the image scale of each feature and ``scores`` [N, 1]; global
descriptors for the scale indices in ``input_global_scales_ind``, unpooled, in index
order. The post-processing here is the reference extractor's (research/delf/delf/python/
extractor.py ``MakeExtractor`` without PCA, and the Kaggle 2020 host baseline): local
keypoints are box centres, local descriptors are L2-normalised, and the global
descriptor is the sum of the per-scale descriptors, each L2-normalised, L2-normalised
again. Keypoints are reported as ``(x, y)`` (the reference's are ``(y, x)``).
TensorFlow is imported when an extractor is built, not when this module is imported.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from delf_retrieval.features.containers import (
    ImageFeatures,
    LocalFeatures,
    l2_normalize,
    to_original_pixels,
)
from delf_retrieval.features.images import downscale_to_max_size
from delf_retrieval.models.base import Extractor, ExtractorParams, hash_model_dir

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


def global_scale_indices(
    image_scales: Sequence[float], global_scales: Sequence[float]
) -> list[int] | None:
    """Indices of ``global_scales`` in ``image_scales`` (the export's
    ``input_global_scales_ind``), or None when one of them is not among ``image_scales``.

    >>> global_scale_indices((0.25, 0.5, 0.7071, 1.0, 1.4142), (0.7071, 1.0, 1.4142))
    [2, 3, 4]
    >>> global_scale_indices((1.0,), (0.5,)) is None
    True
    """
    indices = []
    for scale in global_scales:
        matches = [i for i, s in enumerate(image_scales) if abs(s - scale) <= _SCALE_TOLERANCE]
        if not matches:
            return None
        indices.append(matches[0])
    return indices


def local_from_outputs(
    outputs: dict[str, np.ndarray], max_feature_num: int, factor: float, dim: int
) -> LocalFeatures:
    """Local features from the export's outputs, as the reference extractor post-processes them.

    Parameters
    ----------
    outputs : dict with ``boxes`` float [N, 4] (ymin, xmin, ymax, xmax, pixels of the
        image given to the model) and ``features`` float [N, D], optionally ``scores``
        [N] or [N, 1] and ``scales`` [N] (zeros when absent).
    max_feature_num : the strongest this many are kept (the export already caps).
    factor : original size / model-input size (see :func:`prepare_image`).
    dim : descriptor width, for the empty result.

    Returns
    -------
    LocalFeatures with keypoints = box centres ``(x, y)`` in original pixels, descriptors
    L2-normalised, scores [N] and scales [N] as the export reports them (1 / image
    scale), strongest first. Every feature is kept: the export's ``scales`` are inverse
    scales and never a filter.
    """
    boxes = np.asarray(outputs["boxes"], np.float32).reshape(-1, 4)
    count = boxes.shape[0]
    if count == 0:
        return LocalFeatures.empty(dim)
    descriptors = np.asarray(outputs["features"], np.float32).reshape(count, -1)
    scores = np.asarray(outputs.get("scores", np.zeros(count)), np.float32).reshape(count)
    found_at = np.asarray(outputs.get("scales", np.zeros(count)), np.float32).reshape(count)
    order = np.argsort(-scores, kind="stable")[: max(max_feature_num, 0)]
    return LocalFeatures(
        keypoints=boxes_to_keypoints(boxes[order], factor),
        descriptors=l2_normalize(descriptors[order]),
        scores=scores[order],
        scales=found_at[order],
    )


def global_from_outputs(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """The pooled global descriptor [D] from an export's ``global_descriptors`` [G, D]
    (pooled as :func:`pool_global`) or an already pooled ``global_descriptor`` [D]
    (export_global_model.py ``--multi_scale_pool_type``; only L2-normalised here)."""
    if "global_descriptors" in outputs:
        return pool_global(
            np.asarray(outputs["global_descriptors"]).reshape(
                -1, np.shape(outputs["global_descriptors"])[-1]
            )
        )
    return l2_normalize(np.asarray(outputs["global_descriptor"], np.float32).reshape(-1))


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
_GLOBAL_OUTPUTS = ("global_descriptors", "global_descriptor")
_TF2_LOCAL_INPUTS = {"input_max_feature_num", "input_abs_thres"}


class DelgTF2Extractor(Extractor):
    """DELG exported in TF2 format (local+global or global-only), via ``serving_default``.

    Parameters
    ----------
    path : SavedModel folder.
    params : extraction parameters; the host baseline's when None.

    Notes
    -----
    When every ``global_scales`` entry is one of ``image_scales`` (the official configs:
    global indices 3, 4, 5 of the 7 scales; the Kaggle baseline: all 3), the model runs
    once with ``input_scales = image_scales`` and ``input_global_scales_ind`` = their
    indices, exactly as the reference extractor. Otherwise it runs twice: local features
    on ``image_scales``, global descriptors on ``global_scales`` (the export gives local
    features for every input scale, so a scale cannot be used for the global descriptor
    only). ``scales`` of the returned local features are the export's, 1 / image scale
    (relative to the image after the ``max_image_size`` cap).
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
        global_name = next((name for name in _GLOBAL_OUTPUTS if name in outputs), None)
        if not _TF2_GLOBAL_INPUTS <= inputs or global_name is None:
            raise ValueError(
                f"{path}: 'serving_default' has inputs {sorted(inputs)} and outputs "
                f"{sorted(outputs)}; a DELG export needs inputs {sorted(_TF2_GLOBAL_INPUTS)} "
                "and the output 'global_descriptors' (or a pooled 'global_descriptor')"
            )
        # The signature's concrete function has dynamic shapes: no retracing per image size.
        self._function = signature
        self.has_local = _TF2_LOCAL_INPUTS <= inputs and {"boxes", "features"} <= set(outputs)
        self.has_global = True
        self.local_dim = (
            _static_dim(outputs["features"].shape, DELG_LOCAL_DIM) if self.has_local else 0
        )
        self.global_dim = _static_dim(outputs[global_name].shape, DELG_GLOBAL_DIM)

    def _call(
        self,
        image: np.ndarray,
        scales: Sequence[float],
        global_index: Sequence[int],
        max_feature_num: int | None = None,
    ) -> dict[str, np.ndarray]:
        """One call of ``serving_default``; ``max_feature_num`` only for local+global."""
        tf = self._tf
        feeds = {
            "input_image": tf.constant(image),
            "input_scales": tf.constant(list(scales), tf.float32),
            "input_global_scales_ind": tf.constant(list(global_index), tf.int32),
        }
        if self.has_local:
            feeds["input_max_feature_num"] = tf.constant(max_feature_num or 0, tf.int32)
            feeds["input_abs_thres"] = tf.constant(self.params.score_threshold, tf.float32)
        return {name: value.numpy() for name, value in self._function(**feeds).items()}

    def extract(self, image: np.ndarray) -> ImageFeatures:
        """Features of one RGB uint8 image ``[H, W, 3]`` (keypoints in its pixels)."""
        params = self.params
        small, factor = prepare_image(image, params.max_image_size)
        if small.size == 0:
            return _empty_features(self)
        every_global = range(len(params.global_scales))
        if not self.has_local:
            outputs = self._call(small, params.global_scales, every_global)
            return ImageFeatures(local=None, global_descriptor=global_from_outputs(outputs))
        index = global_scale_indices(params.image_scales, params.global_scales)
        if index is not None:
            outputs = self._call(small, params.image_scales, index, params.max_feature_num)
            per_scale = outputs
        else:
            outputs = self._call(small, params.image_scales, [0], params.max_feature_num)
            per_scale = self._call(small, params.global_scales, every_global, 0)
        local = local_from_outputs(outputs, params.max_feature_num, factor, self.local_dim)
        return ImageFeatures(local=local, global_descriptor=global_from_outputs(per_scale))


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
    every input scale. When ``global_scales`` equals ``image_scales`` (the Kaggle
    baseline) one call gives both; otherwise the model runs twice (local scales, then
    global scales), as the baseline's two ``prune``d functions do. Local conventions are
    those of the TF2 export (see :class:`DelgTF2Extractor`).
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
        local = local_from_outputs(outputs, params.max_feature_num, factor, self.local_dim)
        return ImageFeatures(local=local, global_descriptor=pool_global(per_scale.numpy()))
