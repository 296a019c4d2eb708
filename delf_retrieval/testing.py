"""Small stand-in models with the exact signatures of DELG and DELF, for tests and demos.

No DELG/DELF weights are reachable offline, so these builders write SavedModels whose
inputs and outputs are those of the real exports (see DESIGN.md, "The models it
wraps") but whose computation is a fixed, hand-made pipeline:

* local features: on each requested image scale, the image is converted to grey,
  blurred, and the determinant of its Hessian marks blobs; keypoints are the local
  maxima of ``sqrt(det)``, whose ``score`` is that value times a gain chosen so that the
  real thresholds (175 for DELG, 100 for DELF) keep roughly 100-1000 points on
  scikit-image's photos. Descriptors sample four blurred channels (grey, two
  colour-opponent channels, gradient magnitude) on concentric rings around the keypoint
  and keep, per ring and channel, the mean minus the centre value and the magnitudes of
  the first two angular Fourier coefficients: all unchanged by rotation. Each radial
  profile is centred and normalised, then a fixed seeded matrix projects the result to
  128 (DELG) or 40 (DELF) dimensions.
* global descriptor (DELG): per-pixel colour, blurred grey, gradient magnitudes and
  blob responses at half the scaled size, averaged onto a grid of at most 32 x 32 cells,
  mapped by seeded random Fourier features to 2048 dimensions and averaged over the grid
  (a kernel mean embedding), once per global scale. Not normalised: the caller pools.

Everything is a constant from a seeded NumPy generator, so building twice gives the
same outputs. TensorFlow is imported inside the functions: importing this module (or
the package) does not import it.
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


def _resize(image: Any, scale: Any) -> tuple[Any, Any]:
    """``image`` [H, W, 3] float resized by ``scale``; returns ([1, h, w, 3], [h, w] int32)."""
    import tensorflow as tf

    size = tf.cast(tf.shape(image)[:2], tf.float32)
    new_size = tf.maximum(tf.cast(tf.round(size * scale), tf.int32), 1)
    resized = tf.image.resize(image[tf.newaxis], new_size, method="bilinear", antialias=True)
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
    """Keypoints of one scale: centres [N, 2] (y, x) original pixels, descriptors, scores."""
    import tensorflow as tf

    rgb, new_size = _resize(image, scale)
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
    ratio = tf.cast(tf.shape(image)[:2], tf.float32) / tf.cast(new_size, tf.float32)
    centres = (tf.cast(points, tf.float32) + 0.5) * ratio - 0.5
    return centres, descriptors, scores


def _local_features(
    image: Any, scales: Any, max_num: Any, abs_thres: Any, projection: np.ndarray, gain: float
) -> tuple[Any, Any, Any, Any]:
    """All scales, strongest ``max_num`` overall: centres [N, 2] (y, x), descriptors, scales, scores."""
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
        found_at = tf.fill(tf.shape(scores), scale)
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
    count = tf.minimum(tf.maximum(max_num, 0), tf.shape(scores)[0])
    scores, order = tf.math.top_k(scores, k=count)
    return (
        tf.gather(centres, order),
        tf.gather(descriptors, order),
        tf.gather(found_at, order),
        scores,
    )


def _boxes(centres: Any, found_at: Any) -> Any:
    """DELG-style boxes [N, 4] (ymin, xmin, ymax, xmax) around ``centres`` [N, 2] (y, x)."""
    import tensorflow as tf

    half = (_BOX_HALF_SIZE / found_at)[:, tf.newaxis]
    return tf.concat([centres - half, centres + half], axis=1)


def _global_one_scale(image: Any, scale: Any, constants: _Constants) -> Any:
    """Random-Fourier-feature mean embedding [D] of per-pixel features at one scale.

    The per-pixel features are computed at half the scaled size (they are averaged
    onto a coarse grid anyway), which keeps this cheap.
    """
    import tensorflow as tf

    rgb, new_size = _resize(image, 0.5 * scale)
    rgb = rgb / 255.0
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


def _delg_outputs(
    image_uint8: Any,
    scales: Any,
    global_scales_ind: Any,
    max_num: Any | None,
    abs_thres: Any | None,
    constants: _Constants,
) -> dict[str, Any]:
    """The DELG output dict; local outputs only when ``abs_thres`` is given."""
    import tensorflow as tf

    image = tf.cast(image_uint8, tf.float32)
    global_scales = tf.gather(scales, global_scales_ind)
    outputs = {"global_descriptors": _global_descriptors(image, global_scales, constants)}
    if abs_thres is not None:
        centres, descriptors, found_at, scores = _local_features(
            image, scales, max_num, abs_thres, constants.projection, DELG_SCORE_GAIN
        )
        outputs.update(
            boxes=_boxes(centres, found_at),
            features=descriptors,
            scales=found_at,
            scores=scores,
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


def build_delg_tf2(path: str | os.PathLike, *, global_only: bool = False) -> Path:
    """Write a small DELG-like SavedModel in TF2 format and return its folder.

    The ``serving_default`` signature has the inputs ``input_image`` (uint8
    [H, W, 3]), ``input_scales`` (float32 [S]), ``input_max_feature_num`` (int32 []),
    ``input_abs_thres`` (float32 []) and ``input_global_scales_ind`` (int32 [G]), and
    the outputs ``boxes`` (float32 [N, 4], ymin, xmin, ymax, xmax in original pixels),
    ``features`` (float32 [N, 128]), ``scales`` (float32 [N]), ``scores`` (float32 [N])
    and ``global_descriptors`` (float32 [G, 2048], one raw descriptor per selected
    scale). With ``global_only`` the inputs are ``input_image``, ``input_scales`` and
    ``input_global_scales_ind`` and the only output is ``global_descriptors``.

    Parameters
    ----------
    path : folder to create (must not exist or be empty).
    global_only : build the global-only export.
    """
    import tensorflow as tf

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
                input_image, input_scales, input_global_scales_ind, None, None, constants
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
    ``scales:0``, ``scores:0`` and ``global_descriptors:0`` (one per input scale; there is
    no ``input_global_scales_ind``). The global-only export has only ``input_image:0``,
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
    (y, x) in original pixels) and ``descriptors`` (float32 [N, 40]).

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
            pixels, scales, max_num, threshold, constants.projection, DELF_SCORE_GAIN
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
