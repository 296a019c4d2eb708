"""Small stand-in models with the exact signatures and conventions of DELG and DELF.

No DELG/DELF weights are reachable offline, so these builders write SavedModels whose
inputs, outputs and every observable convention are those of the real exports, while
the "network" inside is a fixed, hand-made pipeline. Conventions followed (tensorflow/
models, research/delf/delf/python/training/model/export_model_utils.py):

* ``ExtractLocalFeatures``: the uint8 image becomes ``(x - 128) / 128`` (``gld.
  NormalizeImages`` with offset and scale 128); each scale ``s`` of ``input_scales``
  resizes it to ``round(h * s), round(w * s)`` with ``tf.image.resize`` (bilinear, no
  antialiasing); features whose attention score is ``>= input_abs_thres`` are kept;
  their boxes are divided by ``s`` (original pixels, ``ymin, xmin, ymax, xmax``); their
  ``scales`` are ``1 / s``; the features of all scales then go through one non-maximum
  suppression (``box_list_ops.non_max_suppression``, IoU 1.0 as
  export_local_and_global_model.py's ``--iou`` default) capped at
  ``min(input_max_feature_num, N)``, which orders them by score; ``scores`` is [N, 1].
* ``ExtractGlobalFeatures``: one descriptor per index of ``input_scales`` that
  ``input_global_scales_ind`` names, in increasing index order (each index once), each
  computed on the image resized as above; by default not pooled and not normalised
  ([G, D], the caller pools). export_global_model.py's ``--multi_scale_pool_type``
  (``average``/``sum``: output ``global_descriptor`` [D]) and
  ``--normalize_global_descriptor`` are builder options.

The hand-made network:

* local features: on each scaled image, the grey image is blurred and the determinant
  of its Hessian marks blobs; keypoints are the local maxima of ``sqrt(det)``, whose
  ``score`` is that value times a gain chosen so that the real thresholds (175 for the
  Kaggle DELG baseline, 100 for DELF) keep roughly 100-1000 points on scikit-image's
  photos. Descriptors sample four blurred channels (grey, two colour-opponent channels,
  gradient magnitude) on concentric rings around the keypoint and keep, per ring and
  channel, the mean minus the centre value and the magnitudes of the first two angular
  Fourier coefficients: all unchanged by rotation. Each radial profile is centred and
  normalised, then a fixed seeded matrix projects the result to 128 (DELG) or 40 (DELF)
  dimensions.
* global descriptor (DELG): per-pixel colour, blurred grey, gradient magnitudes and
  blob responses at half the scaled size (a stride-2 stem), averaged onto a grid of at
  most 32 x 32 cells, mapped by seeded random Fourier features to 2048 dimensions and
  averaged over the grid (a kernel mean embedding), once per global scale.

The filters work in 0-255 intensity units (the normalised input times 128 plus 128), so
their thresholds stay readable. Grey is a weighted sum of R, G and B and the colour
channels are opponent differences, so swapping RGB for BGR changes every output, as do
a transposed resize, a wrong scale or a lost scale. Everything is a constant from a
seeded NumPy generator, so building twice gives the same outputs. TensorFlow is
imported inside the functions: importing this module (or the package) does not import
it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Calibrated on scikit-image's photos: the real thresholds keep roughly 100-1000 points.
DELG_SCORE_GAIN = 60.0
DELF_SCORE_GAIN = 35.0
DELG_LOCAL_DIM = 128
DELF_LOCAL_DIM = 40
DELG_GLOBAL_DIM = 2048

_BLOB_SIGMA = 2.0  # pixels of the scaled image
_CHANNEL_SIGMA = 1.5
_RING_RADII = (1.5, 3.0, 4.5, 6.0, 8.0, 10.0, 12.5, 15.0)
_RING_ANGLES = 16
_PROFILE_FLOOR = 4.0  # intensity units (0-255 scale)
_BOX_HALF_SIZE = 16.0  # half side of the reported "receptive field" box, scaled-image pixels
_BORDER = 3  # keypoints closer than this to the scaled image's border are dropped
_GLOBAL_GRID = 32
_GLOBAL_BANDWIDTH = 0.35
_GLOBAL_FEATURES = 9
_TFHUB_MODULE_PB = b"\x08\x03"  # ModuleDef{format: FORMAT_V3}; hub.load only checks it exists
# export_local_and_global_model.py: flags.DEFINE_float('iou', 1.0, ...), the NMS IoU.
_NMS_IOU = 1.0
# export_model_utils.py ExtractLocalFeatures / ExtractGlobalFeatures:
# gld.NormalizeImages(image, pixel_value_offset=128.0, pixel_value_scale=128.0).
_PIXEL_OFFSET = 128.0
_PIXEL_SCALE = 128.0
POOL_TYPES = ("None", "average", "sum")


@dataclass(frozen=True)
class _Constants:
    """Fixed weights of one fixture model (float32 NumPy arrays)."""

    projection: np.ndarray  # [len(_RING_RADII) * 12, local_dim]
    rff_weights: np.ndarray  # [_GLOBAL_FEATURES, DELG_GLOBAL_DIM]
    rff_phases: np.ndarray  # [DELG_GLOBAL_DIM]


def _constants(seed: int, local_dim: int) -> _Constants:
    rng = np.random.default_rng(seed)
    ring_features = len(_RING_RADII) * 4 * 3  # 4 channels x (mean, |F1|, |F2|) per ring
    projection = rng.standard_normal((ring_features, local_dim)) / np.sqrt(local_dim)
    rff_weights = rng.standard_normal((_GLOBAL_FEATURES, DELG_GLOBAL_DIM)) / _GLOBAL_BANDWIDTH
    rff_phases = rng.uniform(0.0, 2.0 * np.pi, DELG_GLOBAL_DIM)
    return _Constants(
        projection.astype(np.float32),
        rff_weights.astype(np.float32),
        rff_phases.astype(np.float32),
    )


# ---------------------------------------------------------------------------------------
# Graph pieces: plain TensorFlow ops, usable in a tf.function and in a TF1 graph alike.
# ---------------------------------------------------------------------------------------


def _gaussian_1d(sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3.0 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


def _blur(maps: Any, sigma: float) -> Any:
    """Gaussian blur of ``maps`` [1, H, W, C]; borders renormalised (no dark frame)."""
    import tensorflow as tf

    kernel = _gaussian_1d(sigma)
    size = kernel.shape[0]
    channels = maps.shape[-1]
    column = kernel.reshape(size, 1, 1, 1)
    row = kernel.reshape(1, size, 1, 1)
    blurred = tf.nn.depthwise_conv2d(
        maps, tf.constant(np.tile(column, (1, 1, channels, 1))), [1, 1, 1, 1], "SAME"
    )
    blurred = tf.nn.depthwise_conv2d(
        blurred, tf.constant(np.tile(row, (1, 1, channels, 1))), [1, 1, 1, 1], "SAME"
    )
    # The kernel mass inside the image is separable too: one 1-D pass per axis.
    shape = tf.shape(maps)
    height_ones = tf.ones(tf.stack([1, shape[1], 1, 1]))
    width_ones = tf.ones(tf.stack([1, 1, shape[2], 1]))
    weight = tf.nn.conv2d(height_ones, tf.constant(column), 1, "SAME") * tf.nn.conv2d(
        width_ones, tf.constant(row), 1, "SAME"
    )
    return blurred / weight


def _derivatives(gray: Any) -> tuple[Any, Any, Any, Any, Any]:
    """First and second central differences of ``gray`` [1, H, W, 1]."""
    import tensorflow as tf

    padded = tf.pad(gray, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")
    centre = padded[:, 1:-1, 1:-1]
    up, down = padded[:, :-2, 1:-1], padded[:, 2:, 1:-1]
    left, right = padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]
    dy = 0.5 * (down - up)
    dx = 0.5 * (right - left)
    dyy = down - 2.0 * centre + up
    dxx = right - 2.0 * centre + left
    dxy = 0.25 * (padded[:, 2:, 2:] - padded[:, 2:, :-2] - padded[:, :-2, 2:] + padded[:, :-2, :-2])
    return dx, dy, dxx, dyy, dxy


def _normalize(image_uint8: Any) -> Any:
    """The export's input step: uint8 [H, W, 3] -> float32 ``(x - 128) / 128``.

    export_model_utils.py ExtractLocalFeatures/ExtractGlobalFeatures call
    ``gld.NormalizeImages(image, pixel_value_offset=128.0, pixel_value_scale=128.0)``.
    """
    import tensorflow as tf

    return (tf.cast(image_uint8, tf.float32) - _PIXEL_OFFSET) / _PIXEL_SCALE


def _intensity(normalized: Any) -> Any:
    """Normalised pixels back to 0-255 units, the units the hand-made filters use."""
    return normalized * _PIXEL_SCALE + _PIXEL_OFFSET


def _resize(image: Any, scale: Any) -> tuple[Any, Any]:
    """``image`` [H, W, C] float resized by ``scale``; returns ([1, h, w, C], [h, w] int32).

    As export_model_utils.py ``_ProcessSingleScale`` / ``_ResizeAndExtract``:
    ``new_size = cast(round(original_size * scale), int32)`` and ``tf.image.resize``
    with its defaults (bilinear, no antialiasing). Sizes are kept >= 1 (the real export
    fails on an empty image; the fixture returns no features instead).
    """
    import tensorflow as tf

    size = tf.cast(tf.shape(image)[:2], tf.float32)
    new_size = tf.maximum(tf.cast(tf.round(size * scale), tf.int32), 1)
    resized = tf.image.resize(image[tf.newaxis], new_size, method="bilinear")
    return resized, new_size


def _gray(rgb: Any) -> Any:
    """Luma of ``rgb`` [1, H, W, 3] -> [1, H, W, 1]."""
    import tensorflow as tf

    weights = tf.constant([[0.299], [0.587], [0.114]], tf.float32)
    return tf.tensordot(rgb, weights, axes=[[3], [0]])


def _ring_offsets() -> np.ndarray:
    """Integer (dy, dx) sampling offsets [R * A, 2], ring by ring."""
    angles = 2.0 * np.pi * np.arange(_RING_ANGLES) / _RING_ANGLES
    offsets = [
        (radius * np.sin(angle), radius * np.cos(angle))
        for radius in _RING_RADII
        for angle in angles
    ]
    return np.round(np.array(offsets)).astype(np.int32)


def _ring_descriptors(channels: Any, points: Any, projection: np.ndarray) -> Any:
    """Rotation-invariant ring statistics of ``channels`` [h, w, 4] at ``points`` [N, 2] (y, x).

    Returns float32 [N, D], L2-normalised, D = ``projection.shape[1]``.
    """
    import tensorflow as tf

    rings, angles = len(_RING_RADII), _RING_ANGLES
    limit = tf.shape(channels)[:2] - 1
    offsets = tf.constant(_ring_offsets())
    where = tf.clip_by_value(points[:, tf.newaxis, :] + offsets[tf.newaxis], 0, limit)
    samples = tf.gather_nd(channels, where)  # [N, R * A, 4]
    samples = tf.reshape(samples, [-1, rings, angles, 4])
    centre = tf.gather_nd(channels, points)  # [N, 4]
    means = tf.reduce_mean(samples, axis=2) - centre[:, tf.newaxis, :]  # [N, R, 4]
    phase = 2.0 * np.pi * np.outer(np.arange(angles), [1, 2]) / angles
    cosines = tf.constant(np.cos(phase).astype(np.float32))  # [A, 2]
    sines = tf.constant(np.sin(phase).astype(np.float32))
    real = tf.einsum("nrac,ak->nrck", samples, cosines) / angles
    imag = tf.einsum("nrac,ak->nrck", samples, sines) / angles
    magnitudes = tf.sqrt(real * real + imag * imag + 1e-12)  # [N, R, 4, 2]
    profiles = tf.concat([means, tf.reshape(magnitudes, [-1, rings, 8])], axis=2)  # [N, R, 12]
    # Centre each radial profile and scale it to unit norm (faint profiles stay faint):
    # this removes the component all patches share, so unrelated patches end up far apart.
    profiles -= tf.reduce_mean(profiles, axis=1, keepdims=True)
    norms = tf.sqrt(tf.reduce_sum(profiles * profiles, axis=1, keepdims=True))
    profiles /= norms + _PROFILE_FLOOR
    raw = tf.math.l2_normalize(tf.reshape(profiles, [-1, rings * 12]), axis=1)
    return tf.math.l2_normalize(tf.matmul(raw, tf.constant(projection)), axis=1)


def _local_one_scale(
    image: Any, scale: Any, max_num: Any, abs_thres: Any, projection: np.ndarray, gain: float
) -> tuple[Any, Any, Any]:
    """Keypoints of one scale: centres [N, 2] (y, x) in original pixels, descriptors, scores.

    ``image``: normalised pixels [H, W, 3]. At most ``max_num`` per scale are described
    (the strongest); the cross-scale cap keeps at most ``max_num`` overall, so this
    changes no output, only the work done.
    """
    import tensorflow as tf

    rgb, new_size = _resize(image, scale)
    rgb = _intensity(rgb)
    gray = _gray(rgb)
    _, _, dxx, dyy, dxy = _derivatives(_blur(gray, _BLOB_SIGMA))
    response = tf.sqrt(tf.nn.relu(dxx * dyy - dxy * dxy)) * gain  # [1, h, w, 1]
    is_peak = tf.equal(response, tf.nn.max_pool2d(response, 5, 1, "SAME"))
    rows = tf.range(new_size[0])[:, tf.newaxis]
    cols = tf.range(new_size[1])[tf.newaxis, :]
    inside = (
        (rows >= _BORDER)
        & (rows < new_size[0] - _BORDER)
        & (cols >= _BORDER)
        & (cols < new_size[1] - _BORDER)
    )
    keep = is_peak[0, :, :, 0] & inside & (response[0, :, :, 0] >= abs_thres)
    candidates = tf.cast(tf.where(keep), tf.int32)  # [M, 2] (y, x)
    scores = tf.gather_nd(response[0, :, :, 0], candidates)
    count = tf.minimum(tf.maximum(max_num, 0), tf.shape(scores)[0])
    scores, order = tf.math.top_k(scores, k=count)
    points = tf.gather(candidates, order)

    smooth_gray = _blur(gray, _CHANNEL_SIGMA)
    dx, dy, _, _, _ = _derivatives(smooth_gray)
    red, green, blue = tf.unstack(rgb, axis=3)
    opponent = tf.stack([red - green, blue - 0.5 * (red + green)], axis=3) * 0.5
    channels = tf.concat(
        [smooth_gray, _blur(opponent, _CHANNEL_SIGMA), 4.0 * tf.sqrt(dx * dx + dy * dy)],
        axis=3,
    )[0]
    descriptors = _ring_descriptors(channels, points, projection)
    # ExtractLocalFeatures: rf_boxes = tf.divide(rf_boxes, scale), back to original pixels.
    centres = tf.cast(points, tf.float32) / scale
    return centres, descriptors, scores


def _local_features(
    image: Any, scales: Any, max_num: Any, abs_thres: Any, projection: np.ndarray, gain: float
) -> tuple[Any, Any, Any, Any]:
    """All scales, then one NMS capped at ``max_num``: centres [N, 2] (y, x), descriptors,
    scales [N] (= 1 / image scale) and scores [N], strongest first."""
    import tensorflow as tf

    dim = projection.shape[1]
    num_scales = tf.shape(scales)[0]
    arrays = [
        tf.TensorArray(dtype, size=num_scales, infer_shape=False, element_shape=shape)
        for dtype, shape in (
            (tf.float32, tf.TensorShape([None, 2])),
            (tf.float32, tf.TensorShape([None, dim])),
            (tf.float32, tf.TensorShape([None])),
            (tf.float32, tf.TensorShape([None])),
        )
    ]

    def body(index: Any, *arrays: Any) -> tuple[Any, ...]:
        scale = scales[index]
        centres, descriptors, scores = _local_one_scale(
            image, scale, max_num, abs_thres, projection, gain
        )
        # ExtractLocalFeatures: selected_scales = tf.ones_like(selected_scores) / scale.
        found_at = tf.fill(tf.shape(scores), 1.0 / scale)
        values = (centres, descriptors, found_at, scores)
        return (
            index + 1,
            *[array.write(index, v) for array, v in zip(arrays, values, strict=True)],
        )

    _, *arrays = tf.while_loop(lambda i, *_: i < num_scales, body, [tf.constant(0), *arrays])
    centres, descriptors, found_at, scores = [
        tf.reshape(array.concat(), shape)
        for array, shape in zip(arrays, ([-1, 2], [-1, dim], [-1], [-1]), strict=True)
    ]
    # ExtractLocalFeatures: nms_max_boxes = min(max_feature_num, num_boxes), then
    # box_list_ops.non_max_suppression(feature_boxes, iou, nms_max_boxes) over all scales.
    count = tf.minimum(tf.maximum(max_num, 0), tf.shape(scores)[0])
    order = tf.image.non_max_suppression(
        _boxes(centres, found_at), scores, max_output_size=count, iou_threshold=_NMS_IOU
    )
    return (
        tf.gather(centres, order),
        tf.gather(descriptors, order),
        tf.gather(found_at, order),
        tf.gather(scores, order),
    )


def _boxes(centres: Any, found_at: Any) -> Any:
    """DELG-style boxes [N, 4] (ymin, xmin, ymax, xmax), original pixels, around ``centres``.

    ``found_at`` [N] is the export's ``scales`` output, 1 / image scale: a box of fixed
    size on the scaled image is ``found_at`` times larger on the original.
    """
    import tensorflow as tf

    half = (_BOX_HALF_SIZE * found_at)[:, tf.newaxis]
    return tf.concat([centres - half, centres + half], axis=1)


def _global_one_scale(image: Any, scale: Any, constants: _Constants) -> Any:
    """Random-Fourier-feature mean embedding [D] of per-pixel features at one scale.

    The per-pixel features are computed at half the scaled size (they are averaged
    onto a coarse grid anyway), which keeps this cheap.
    """
    import tensorflow as tf

    resized, _ = _resize(image, scale)  # the export's resize, then a stride-2 "stem"
    half_size = tf.maximum(tf.shape(resized)[1:3] // 2, 1)
    rgb = tf.image.resize(_intensity(resized), half_size, method="area") / 255.0
    new_size = half_size
    gray = _gray(rgb)
    features = [rgb, _blur(gray, 2.0)]
    for sigma in (0.7, 1.5):
        dx, dy, dxx, dyy, dxy = _derivatives(_blur(gray, sigma))
        features.append(8.0 * sigma * tf.sqrt(dx * dx + dy * dy + 1e-12))
        features.append(32.0 * sigma * sigma * tf.sqrt(tf.nn.relu(dxx * dyy - dxy * dxy)))
    features.append(tf.abs(_blur(gray, 0.7) - _blur(gray, 3.0)) * 4.0)
    maps = tf.concat(features, axis=3)  # [1, h, w, _GLOBAL_FEATURES]
    longest = tf.cast(tf.reduce_max(new_size), tf.float32)
    shrink = tf.minimum(1.0, _GLOBAL_GRID / longest)
    grid = tf.maximum(tf.cast(tf.round(tf.cast(new_size, tf.float32) * shrink), tf.int32), 1)
    maps = tf.image.resize(maps, grid, method="area")
    pixels = tf.reshape(maps, [-1, _GLOBAL_FEATURES])
    projected = tf.matmul(pixels, tf.constant(constants.rff_weights)) + constants.rff_phases
    return tf.reduce_mean(tf.cos(projected), axis=0) * np.float32(np.sqrt(2.0 / DELG_GLOBAL_DIM))


def _global_descriptors(image: Any, scales: Any, constants: _Constants) -> Any:
    """One raw global descriptor per entry of ``scales``: [G, 2048]."""
    import tensorflow as tf

    count = tf.shape(scales)[0]
    array = tf.TensorArray(tf.float32, size=count, element_shape=[DELG_GLOBAL_DIM])

    def body(index: Any, array: Any) -> tuple[Any, Any]:
        return index + 1, array.write(index, _global_one_scale(image, scales[index], constants))

    _, array = tf.while_loop(lambda i, _: i < count, body, [tf.constant(0), array])
    return tf.reshape(array.stack(), [-1, DELG_GLOBAL_DIM])


def _selected_scales(scales: Any, global_scales_ind: Any) -> Any:
    """Scales whose index appears in ``global_scales_ind``, in increasing index order, once.

    ExtractGlobalFeatures loops ``for scale_index in tf.range(num_scales)`` and extracts
    when ``tf.reduce_any(tf.equal(global_scales_ind, scale_index))``.
    """
    import tensorflow as tf

    indices = tf.range(tf.shape(scales)[0])
    wanted = tf.reduce_any(tf.equal(global_scales_ind[:, tf.newaxis], indices[tf.newaxis]), 0)
    return tf.boolean_mask(scales, wanted)


def _pool_global(per_scale: Any, pool_type: str, normalize: bool) -> Any:
    """ExtractGlobalFeatures' ``multi_scale_pool_type`` and ``normalize_global_descriptor``."""
    import tensorflow as tf

    axis = 1
    if pool_type == "average":
        per_scale, axis = tf.reduce_mean(per_scale, axis=0), 0
    elif pool_type == "sum":
        per_scale, axis = tf.reduce_sum(per_scale, axis=0), 0
    if normalize:
        per_scale = tf.nn.l2_normalize(per_scale, axis=axis)
    return per_scale


def _delg_outputs(
    image_uint8: Any,
    scales: Any,
    global_scales_ind: Any,
    max_num: Any | None,
    abs_thres: Any | None,
    constants: _Constants,
    pool_type: str = "None",
    normalize_global: bool = False,
) -> dict[str, Any]:
    """The DELG output dict; local outputs only when ``abs_thres`` is given."""
    import tensorflow as tf

    image = _normalize(image_uint8)
    per_scale = _global_descriptors(image, _selected_scales(scales, global_scales_ind), constants)
    pooled = _pool_global(per_scale, pool_type, normalize_global)
    # export_global_model.py: 'global_descriptors' unpooled, 'global_descriptor' pooled.
    name = "global_descriptors" if pool_type == "None" else "global_descriptor"
    outputs = {name: pooled}
    if abs_thres is not None:
        centres, descriptors, found_at, scores = _local_features(
            image, scales, max_num, abs_thres, constants.projection, DELG_SCORE_GAIN
        )
        outputs.update(
            boxes=_boxes(centres, found_at),
            features=descriptors,
            scales=found_at,
            # ExtractLocalFeatures returns tf.expand_dims(scores, 1): [N, 1].
            scores=scores[:, tf.newaxis],
        )
    return outputs


# ---------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------


def _fresh_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"{path} exists and is not empty; fixture models need a new folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def build_delg_tf2(
    path: str | os.PathLike,
    *,
    global_only: bool = False,
    multi_scale_pool_type: str = "None",
    normalize_global_descriptor: bool = False,
) -> Path:
    """Write a small DELG-like SavedModel in TF2 format and return its folder.

    Like research/delf/delf/python/training/model/export_local_and_global_model.py, the
    ``serving_default`` signature has the inputs ``input_image`` (uint8 [H, W, 3]),
    ``input_scales`` (float32 [S]), ``input_max_feature_num`` (int32 []),
    ``input_abs_thres`` (float32 []) and ``input_global_scales_ind`` (int32 [G]), and
    the outputs ``boxes`` (float32 [N, 4], ymin, xmin, ymax, xmax in original pixels),
    ``features`` (float32 [N, 128]), ``scales`` (float32 [N], 1 / the image scale each
    feature came from), ``scores`` (float32 [N, 1]) and ``global_descriptors`` (float32
    [G, 2048], one raw descriptor per selected scale, in scale-index order). With
    ``global_only`` it is export_global_model.py's signature: inputs ``input_image``,
    ``input_scales`` and ``input_global_scales_ind``, output ``global_descriptors``
    (or ``global_descriptor`` [2048] with a ``multi_scale_pool_type``).

    Parameters
    ----------
    path : folder to create (must not exist or be empty).
    global_only : build the global-only export.
    multi_scale_pool_type : {"None", "average", "sum"}
        export_global_model.py ``--multi_scale_pool_type`` (global-only export only).
    normalize_global_descriptor : export_global_model.py ``--normalize_global_descriptor``
        (global-only export only).
    """
    import tensorflow as tf

    if multi_scale_pool_type not in POOL_TYPES:
        raise ValueError(f"multi_scale_pool_type must be one of {POOL_TYPES}")
    if not global_only and (multi_scale_pool_type != "None" or normalize_global_descriptor):
        raise ValueError("pooling options exist only for the global-only export")
    path = _fresh_dir(path)
    constants = _constants(seed=2020, local_dim=DELG_LOCAL_DIM)
    image_spec = tf.TensorSpec([None, None, 3], tf.uint8, name="input_image")
    scales_spec = tf.TensorSpec([None], tf.float32, name="input_scales")
    index_spec = tf.TensorSpec([None], tf.int32, name="input_global_scales_ind")
    module = tf.Module()
    if global_only:
        @tf.function(input_signature=[image_spec, scales_spec, index_spec], autograph=False)
        def serve(input_image: Any, input_scales: Any, input_global_scales_ind: Any) -> dict:
            return _delg_outputs(
                input_image,
                input_scales,
                input_global_scales_ind,
                None,
                None,
                constants,
                multi_scale_pool_type,
                normalize_global_descriptor,
            )

    else:
        @tf.function(
            autograph=False,
            input_signature=[
                image_spec,
                scales_spec,
                tf.TensorSpec([], tf.int32, name="input_max_feature_num"),
                tf.TensorSpec([], tf.float32, name="input_abs_thres"),
                index_spec,
            ],
        )
        def serve(
            input_image: Any,
            input_scales: Any,
            input_max_feature_num: Any,
            input_abs_thres: Any,
            input_global_scales_ind: Any,
        ) -> dict:
            return _delg_outputs(
                input_image,
                input_scales,
                input_global_scales_ind,
                input_max_feature_num,
                input_abs_thres,
                constants,
            )

    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={"serving_default": serve})
    return path


def _tensor_info(tensor: Any) -> Any:
    from tensorflow.core.protobuf import meta_graph_pb2

    return meta_graph_pb2.TensorInfo(
        name=tensor.name,
        dtype=tensor.dtype.as_datatype_enum,
        tensor_shape=tensor.shape.as_proto(),
    )


def _save_tf1(
    path: Path,
    graph: Any,
    inputs: dict[str, Any],
    outputs: dict[str, Any],
    *,
    signature: str,
    tags: list[str],
) -> None:
    """Save ``graph`` (constants only, no variables) with one predict signature."""
    import tensorflow as tf
    from tensorflow.core.protobuf import meta_graph_pb2

    signature_def = meta_graph_pb2.SignatureDef(
        inputs={name: _tensor_info(tensor) for name, tensor in inputs.items()},
        outputs={name: _tensor_info(tensor) for name, tensor in outputs.items()},
        method_name="tensorflow/serving/predict",
    )
    v1 = tf.compat.v1
    with graph.as_default(), v1.Session(graph=graph) as session:
        builder = v1.saved_model.Builder(str(path))
        builder.add_meta_graph_and_variables(
            session, tags, signature_def_map={signature: signature_def}, strip_default_attrs=True
        )
        builder.save()


def build_delg_tf1(path: str | os.PathLike, *, global_only: bool = False) -> Path:
    """Write a small DELG-like SavedModel in TF1 format (like Kaggle's ``delg-saved-models``).

    The graph has the placeholders ``input_image:0`` (uint8 [H, W, 3]),
    ``input_scales:0`` (float32 [S]), ``input_abs_thres:0`` (float32 []) and
    ``input_max_feature_num:0`` (int32 []) and the tensors ``boxes:0``, ``features:0``,
    ``scales:0`` (1 / image scale), ``scores:0`` ([N, 1]) and ``global_descriptors:0``
    (one per input scale; there is no ``input_global_scales_ind``), with the local and
    global conventions of :func:`build_delg_tf2`. The Kaggle 2020 host baseline calls
    ``prune(['input_image:0', 'input_scales:0'], ['global_descriptors:0'])`` and
    ``prune([... , 'input_max_feature_num:0', 'input_abs_thres:0'], ['boxes:0',
    'features:0'])``. The global-only export has only ``input_image:0``,
    ``input_scales:0`` and ``global_descriptors:0``. Load it with
    ``tf.saved_model.load`` and call ``model.prune(feeds, fetches)``; a ``serving_default``
    signature with the same names is included too.

    Parameters
    ----------
    path : folder to create (must not exist or be empty).
    global_only : build the global-only export.
    """
    import tensorflow as tf

    path = _fresh_dir(path)
    constants = _constants(seed=2020, local_dim=DELG_LOCAL_DIM)
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        image = v1.placeholder(tf.uint8, [None, None, 3], name="input_image")
        scales = v1.placeholder(tf.float32, [None], name="input_scales")
        inputs = {"input_image": image, "input_scales": scales}
        every_scale = tf.range(tf.shape(scales)[0])
        if global_only:
            raw = _delg_outputs(image, scales, every_scale, None, None, constants)
        else:
            max_num = v1.placeholder(tf.int32, [], name="input_max_feature_num")
            abs_thres = v1.placeholder(tf.float32, [], name="input_abs_thres")
            inputs.update(input_max_feature_num=max_num, input_abs_thres=abs_thres)
            raw = _delg_outputs(image, scales, every_scale, max_num, abs_thres, constants)
        outputs = {name: tf.identity(tensor, name=name) for name, tensor in raw.items()}
    _save_tf1(path, graph, inputs, outputs, signature="serving_default", tags=["serve"])
    return path


def build_delf_hub(path: str | os.PathLike) -> Path:
    """Write a small DELF-like module in TF1 Hub format, opened like ``google/delf/1``.

    ``tensorflow_hub.load(path).signatures["default"]`` takes ``image`` (float32
    [H, W, 3] in [0, 1]), ``score_threshold`` (float32 []), ``image_scales`` (float32
    [S]) and ``max_feature_num`` (int32 []) and returns ``locations`` (float32 [N, 2],
    (y, x) in original pixels: the centres of the receptive boxes divided by their
    scale, as research/delf/delf/python/feature_extractor.py CalculateKeypointCenters)
    and ``descriptors`` (float32 [N, 40]), strongest first after one cross-scale NMS
    like the DELG export's.

    Parameters
    ----------
    path : folder to create (must not exist or be empty).
    """
    import tensorflow as tf

    path = _fresh_dir(path)
    constants = _constants(seed=2019, local_dim=DELF_LOCAL_DIM)
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        image = v1.placeholder(tf.float32, [None, None, 3], name="image")
        threshold = v1.placeholder(tf.float32, [], name="score_threshold")
        scales = v1.placeholder(tf.float32, [None], name="image_scales")
        max_num = v1.placeholder(tf.int32, [], name="max_feature_num")
        pixels = tf.clip_by_value(image, 0.0, 1.0) * 255.0
        centres, descriptors, _, _ = _local_features(
            (pixels - _PIXEL_OFFSET) / _PIXEL_SCALE,
            scales,
            max_num,
            threshold,
            constants.projection,
            DELF_SCORE_GAIN,
        )
        outputs = {
            "locations": tf.identity(centres, name="locations"),
            "descriptors": tf.identity(descriptors, name="descriptors"),
        }
    inputs = {
        "image": image,
        "score_threshold": threshold,
        "image_scales": scales,
        "max_feature_num": max_num,
    }
    _save_tf1(path, graph, inputs, outputs, signature="default", tags=[])
    (path / "tfhub_module.pb").write_bytes(_TFHUB_MODULE_PB)
    return path
