"""The fixture models follow the real exports, and the adapters read real exports right.

Reference: tensorflow/models research/delf/delf/python/training/model/
export_model_utils.py (ExtractLocalFeatures, ExtractGlobalFeatures),
export_local_and_global_model.py, export_global_model.py, the Kaggle 2020 host
baseline (TF1 ``prune`` calls) and research/delf/delf/python/extractor.py (post-
processing: box centres, L2-normalised local descriptors, per-scale L2 + sum + L2 global
descriptor). Every adapter check below calls the raw SavedModel signature directly and
applies that documented post-processing here, in the test, then compares with what the
adapter returns; no adapter is compared with itself or with another adapter.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from delf_retrieval.models import ExtractorParams, load_extractor

pytestmark = pytest.mark.slow  # builds and runs SavedModels


class _TensorFlow:
    """``tensorflow``, imported on first use, so that collecting this module for a quick
    ``-m "not slow"`` run does not import it (a missing TensorFlow still fails the run:
    see conftest.py)."""

    def __getattr__(self, name: str):
        if name.startswith("_"):  # pytest probes module globals for its own attributes
            raise AttributeError(name)
        import tensorflow

        return getattr(tensorflow, name)


tf = _TensorFlow()

# research/delf/delf/python/delg/r50delg_gldv2clean_config.pbtxt (and r101...)
OFFICIAL_SCALES = (0.25, 0.35355338, 0.5, 0.70710677, 1.0, 1.4142135, 2.0)
OFFICIAL_GLOBAL_INDICES = (3, 4, 5)
KAGGLE_SCALES = (0.70710677, 1.0, 1.4142135)  # the Kaggle 2020 host baseline
CONFIGS = {
    "official-7": (OFFICIAL_SCALES, tuple(OFFICIAL_SCALES[i] for i in OFFICIAL_GLOBAL_INDICES)),
    "kaggle-3": (KAGGLE_SCALES, KAGGLE_SCALES),
    "asymmetric": ((0.5, 1.0, 1.75), (1.0, 1.75)),
    "global-elsewhere": ((0.6, 1.3), (0.8,)),
}
THRESHOLD = 175.0
MAX_FEATURES = 400
# A non-square photo, so that a transposed size or a swapped axis shows.
IMAGE = np.ascontiguousarray(cv2.resize(data.astronaut(), (224, 160), interpolation=cv2.INTER_AREA))


def _l2(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def _reference_local(boxes, features) -> tuple[np.ndarray, np.ndarray]:
    """extractor.py / host baseline: keypoints = box centres (y, x); descriptors L2-normalised."""
    boxes = np.asarray(boxes, np.float64)
    centres_yx = (boxes[:, 0:2] + boxes[:, 2:4]) / 2.0
    return centres_yx[:, ::-1], _l2(features)  # (x, y), as the library reports them


def _reference_global(per_scale) -> np.ndarray:
    """extractor.py: l2_normalize(axis=1), reduce_sum(axis=0), l2_normalize(axis=0)."""
    return _l2(_l2(per_scale, axis=1).sum(axis=0))


def _params(config: str) -> ExtractorParams:
    local, global_ = CONFIGS[config]
    return ExtractorParams(
        image_scales=local,
        global_scales=global_,
        score_threshold=THRESHOLD,
        max_feature_num=MAX_FEATURES,
    )


@pytest.fixture(scope="module")
def tf2_serving(delg_tf2_model: Path):
    return tf.saved_model.load(str(delg_tf2_model)).signatures["serving_default"]


def _raw_tf2(serving, image, scales, global_ind, max_num=MAX_FEATURES, thres=THRESHOLD):
    out = serving(
        input_image=tf.constant(image),
        input_scales=tf.constant(list(scales), tf.float32),
        input_max_feature_num=tf.constant(max_num, tf.int32),
        input_abs_thres=tf.constant(thres, tf.float32),
        input_global_scales_ind=tf.constant(list(global_ind), tf.int32),
    )
    return {name: value.numpy() for name, value in out.items()}


@pytest.fixture(scope="module")
def official_raw(tf2_serving):
    return _raw_tf2(tf2_serving, IMAGE, OFFICIAL_SCALES, OFFICIAL_GLOBAL_INDICES)


# --- the fixture follows the export's conventions --------------------------------------------


def test_output_shapes_and_inverse_scales(official_raw):
    n = official_raw["boxes"].shape[0]
    assert 50 < n <= MAX_FEATURES
    assert official_raw["scores"].shape == (n, 1)  # tf.expand_dims(scores, 1)
    assert official_raw["features"].shape == (n, 128)
    assert official_raw["global_descriptors"].shape == (3, 2048)
    # scales = ones / scale: the inverse of the image scale each feature came from
    inverse = 1.0 / np.float32(OFFICIAL_SCALES)
    found = np.isclose(official_raw["scales"][:, None], inverse[None], rtol=1e-5)
    assert found.any(axis=1).all()
    assert found.any(axis=0).sum() >= 6  # features of (nearly) every scale survive
    # one NMS over all scales orders by score
    assert (np.diff(official_raw["scores"][:, 0]) <= 0).all()
    assert official_raw["scores"].min() >= THRESHOLD
    # boxes are in original pixels: they grow with 1 / scale and lie around the image
    sides = official_raw["boxes"][:, 2] - official_raw["boxes"][:, 0]
    np.testing.assert_allclose(
        sides / official_raw["scales"], sides[0] / official_raw["scales"][0], rtol=1e-4
    )
    centres = (official_raw["boxes"][:, :2] + official_raw["boxes"][:, 2:]) / 2
    assert (centres >= -1).all() and (centres[:, 0] <= 160).all() and (centres[:, 1] <= 224).all()


def test_one_nms_across_scales_capped_at_max_feature_num(tf2_serving, official_raw):
    capped = _raw_tf2(tf2_serving, IMAGE, OFFICIAL_SCALES, OFFICIAL_GLOBAL_INDICES, max_num=60)
    # the strongest 60 over all scales, not 60 per scale
    np.testing.assert_allclose(capped["scores"], official_raw["scores"][:60], rtol=1e-6)
    np.testing.assert_allclose(capped["boxes"], official_raw["boxes"][:60], rtol=1e-6)
    assert len(np.unique(capped["scales"])) >= 2


def test_blob_box_centre_is_in_original_pixels(tf2_serving):
    ys, xs = np.mgrid[0:96, 0:128]
    blob = 200.0 * np.exp(-((xs - 70) ** 2 + (ys - 41) ** 2) / (2 * 5.0**2))
    image = np.repeat(blob[..., None], 3, axis=2).astype(np.uint8)
    for scale in (0.5, 1.0, 2.0):
        out = _raw_tf2(tf2_serving, image, [scale], [0], max_num=1, thres=1.0)
        y, x = (out["boxes"][0, :2] + out["boxes"][0, 2:]) / 2
        assert abs(x - 70) <= 1.0 / scale and abs(y - 41) <= 1.0 / scale, scale
        assert out["scales"][0] == pytest.approx(1.0 / scale)


def test_global_descriptors_follow_the_indices_in_scale_order(tf2_serving, official_raw):
    reversed_ind = _raw_tf2(tf2_serving, IMAGE, OFFICIAL_SCALES, [5, 4, 3, 3], max_num=0)
    # ExtractGlobalFeatures walks the scale indices in order and takes each once
    np.testing.assert_allclose(
        reversed_ind["global_descriptors"], official_raw["global_descriptors"], rtol=1e-5, atol=1e-7
    )
    # each row depends on its scale only: index 4 of the 7 scales = scale 1.0 alone
    alone = _raw_tf2(tf2_serving, IMAGE, [1.0], [0], max_num=0)
    np.testing.assert_allclose(
        alone["global_descriptors"][0], official_raw["global_descriptors"][1], rtol=1e-5, atol=1e-7
    )


def test_outputs_depend_on_channel_order_size_and_scale(tf2_serving, official_raw):
    def changed(a, b):
        if a["boxes"].shape != b["boxes"].shape:
            return True
        return not np.allclose(a["features"], b["features"], atol=1e-4) or not np.allclose(
            a["global_descriptors"], b["global_descriptors"], atol=1e-6
        )

    bgr = np.ascontiguousarray(IMAGE[:, :, ::-1])
    assert changed(
        official_raw, _raw_tf2(tf2_serving, bgr, OFFICIAL_SCALES, OFFICIAL_GLOBAL_INDICES)
    )
    # a transposed resize (width and height swapped) gives another image
    squeezed = np.ascontiguousarray(cv2.resize(IMAGE, (160, 224), interpolation=cv2.INTER_LINEAR))
    assert changed(
        official_raw, _raw_tf2(tf2_serving, squeezed, OFFICIAL_SCALES, OFFICIAL_GLOBAL_INDICES)
    )
    wrong = [s * 1.1 for s in OFFICIAL_SCALES]
    assert changed(official_raw, _raw_tf2(tf2_serving, IMAGE, wrong, OFFICIAL_GLOBAL_INDICES))
    lost = _raw_tf2(tf2_serving, IMAGE, OFFICIAL_SCALES[1:], [2, 3, 4])
    assert changed(official_raw, lost)


# --- adapters against the raw signature + the documented post-processing -------------------


def _check_local(local, boxes, features, scores, scales):
    keypoints, descriptors = _reference_local(boxes, features)
    np.testing.assert_allclose(local.keypoints, keypoints, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(local.descriptors, descriptors, atol=1e-6)
    np.testing.assert_allclose(local.scores, np.reshape(scores, -1), rtol=1e-6)
    np.testing.assert_allclose(local.scales, np.reshape(scales, -1), rtol=1e-6)


@pytest.mark.parametrize("config", CONFIGS)
def test_tf2_adapter_equals_raw_signature(delg_tf2_model, tf2_serving, config):
    local_scales, global_scales = CONFIGS[config]
    features = load_extractor(delg_tf2_model, _params(config)).extract(IMAGE)
    # the reference extractor: input_scales = image_scales, input_global_scales_ind
    # = positions of the global scales among them
    indices = [i for g in global_scales for i, s in enumerate(local_scales) if s == g]
    raw = _raw_tf2(tf2_serving, IMAGE, local_scales, indices or [0])
    _check_local(features.local, raw["boxes"], raw["features"], raw["scores"], raw["scales"])
    if indices:
        per_scale = raw["global_descriptors"]
    else:  # no local scale serves the global descriptor: the global scales on their own
        per_scale = _raw_tf2(
            tf2_serving, IMAGE, global_scales, range(len(global_scales)), max_num=0
        )["global_descriptors"]
    np.testing.assert_allclose(features.global_descriptor, _reference_global(per_scale), atol=1e-6)
    # nothing is filtered by scale: every local scale is present among the features
    inverse = 1.0 / np.float32(local_scales)
    present = np.isclose(features.local.scales[:, None], inverse[None], rtol=1e-5).any(axis=0)
    assert present.all(), (config, present)


def test_tf2_global_only_adapter_equals_raw_signature(delg_tf2_global_model):
    serving = tf.saved_model.load(str(delg_tf2_global_model)).signatures["serving_default"]
    params = _params("official-7")
    features = load_extractor(delg_tf2_global_model, params).extract(IMAGE)
    raw = serving(
        input_image=tf.constant(IMAGE),
        input_scales=tf.constant(params.global_scales, tf.float32),
        input_global_scales_ind=tf.constant([0, 1, 2], tf.int32),
    )
    assert features.local is None
    np.testing.assert_allclose(
        features.global_descriptor, _reference_global(raw["global_descriptors"].numpy()), atol=1e-6
    )


@pytest.mark.parametrize("pool", ["average", "sum"])
def test_tf2_pooled_global_export(tmp_path_factory, pool):
    from delf_retrieval.models import fakes as testing

    folder = testing.build_delg_tf2(
        tmp_path_factory.mktemp("pooled") / pool,
        global_only=True,
        multi_scale_pool_type=pool,
        normalize_global_descriptor=True,
    )
    serving = tf.saved_model.load(str(folder)).signatures["serving_default"]
    raw = serving(
        input_image=tf.constant(IMAGE),
        input_scales=tf.constant(KAGGLE_SCALES, tf.float32),
        input_global_scales_ind=tf.constant([0, 1, 2], tf.int32),
    )
    assert set(raw) == {"global_descriptor"} and raw["global_descriptor"].shape == (2048,)
    vector = raw["global_descriptor"].numpy()
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    features = load_extractor(folder, _params("kaggle-3")).extract(IMAGE)
    np.testing.assert_allclose(features.global_descriptor, _l2(vector), atol=1e-6)


@pytest.mark.parametrize("config", ["kaggle-3", "asymmetric"])
def test_tf1_adapter_equals_kaggle_prune_calls(delg_tf1_model, config):
    local_scales, global_scales = CONFIGS[config]
    model = tf.saved_model.load(str(delg_tf1_model))
    # the Kaggle 2020 host baseline's two functions
    global_fn = model.prune(["input_image:0", "input_scales:0"], ["global_descriptors:0"])
    local_fn = model.prune(
        ["input_image:0", "input_scales:0", "input_max_feature_num:0", "input_abs_thres:0"],
        ["boxes:0", "features:0", "scores:0", "scales:0"],
    )
    image = tf.constant(IMAGE)
    boxes, descriptors, scores, scales = (
        value.numpy()
        for value in local_fn(
            image,
            tf.constant(local_scales, tf.float32),
            tf.constant(MAX_FEATURES),
            tf.constant(THRESHOLD),
        )
    )
    per_scale = global_fn(image, tf.constant(global_scales, tf.float32))[0].numpy()
    features = load_extractor(delg_tf1_model, _params(config)).extract(IMAGE)
    assert scores.shape == (len(boxes), 1)
    _check_local(features.local, boxes, descriptors, scores, scales)
    np.testing.assert_allclose(features.global_descriptor, _reference_global(per_scale), atol=1e-6)


def test_tf1_global_only_adapter_equals_prune(delg_tf1_global_model):
    model = tf.saved_model.load(str(delg_tf1_global_model))
    global_fn = model.prune(["input_image:0", "input_scales:0"], ["global_descriptors:0"])
    per_scale = global_fn(tf.constant(IMAGE), tf.constant(KAGGLE_SCALES, tf.float32))[0].numpy()
    features = load_extractor(delg_tf1_global_model, _params("kaggle-3")).extract(IMAGE)
    np.testing.assert_allclose(features.global_descriptor, _reference_global(per_scale), atol=1e-6)


def test_delf_hub_adapter_equals_default_signature(delf_hub_model):
    from delf_retrieval.models.delf_hub import _load_module

    signature = _load_module(delf_hub_model).signatures["default"]
    scales = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)  # the TF-Hub DELF tutorial's
    raw = signature(
        image=tf.constant(IMAGE.astype(np.float32) / 255.0),
        score_threshold=tf.constant(100.0),
        image_scales=tf.constant(scales),
        max_feature_num=tf.constant(1000),
    )
    locations = raw["locations"].numpy()
    features = load_extractor(delf_hub_model).extract(IMAGE)
    assert len(locations) > 50
    np.testing.assert_allclose(features.local.keypoints, locations[:, ::-1], atol=1e-4)
    np.testing.assert_allclose(
        features.local.descriptors, _l2(raw["descriptors"].numpy()), atol=1e-6
    )
