"""Model adapters (DELG TF2/TF1, DELF TF-Hub) on the fixture models, via load_extractor."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from delf_retrieval.features.containers import ImageFeatures, LocalFeatures
from delf_retrieval.models import Extractor, ExtractorParams, list_models, load_extractor
from delf_retrieval.models.delf_hub import HubModuleNotCachedError, hub_cache_folder
from delf_retrieval.models.delg import (
    boxes_to_keypoints,
    global_from_outputs,
    global_scale_indices,
    local_from_outputs,
    pool_global,
)
from delf_retrieval.models.loader import detect_format

# --- pure helpers: exact values on hand-made arrays (no TensorFlow) ----------------------


def test_boxes_to_keypoints_takes_centres_as_x_y() -> None:
    boxes = np.array([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 1.0, 3.0]])
    np.testing.assert_array_equal(boxes_to_keypoints(boxes), [[40.0, 20.0], [1.5, 0.5]])
    # Downscaled by 2: pixel centres map as (p + 0.5) * 2 - 0.5.
    np.testing.assert_array_equal(boxes_to_keypoints(boxes, 2.0), [[80.5, 40.5], [3.5, 1.5]])
    assert boxes_to_keypoints(np.zeros((0, 4))).shape == (0, 2)


def test_pool_global_normalises_each_scale_then_the_sum() -> None:
    per_scale = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 10.0]])
    expected = np.array([0.6, 0.8, 1.0]) / np.sqrt(2.0)
    np.testing.assert_allclose(pool_global(per_scale), expected, rtol=1e-6)
    assert pool_global(per_scale).dtype == np.float32
    np.testing.assert_array_equal(pool_global(np.zeros((0, 3))), np.zeros(3))


def test_global_scale_indices_point_into_the_local_scales() -> None:
    official = (0.25, 0.35355338, 0.5, 0.70710677, 1.0, 1.4142135, 2.0)
    assert global_scale_indices(official, (0.70710677, 1.0, 1.4142135)) == [3, 4, 5]
    assert global_scale_indices((0.7071, 1.0, 1.4142), (0.7071, 1.0, 1.4142)) == [0, 1, 2]
    assert global_scale_indices((0.5, 1.0), (1.00001,)) == [1]
    assert global_scale_indices((0.5, 1.0), (0.75,)) is None


def test_local_from_outputs_keeps_every_scale_strongest_first() -> None:
    # the export's conventions: scores [N, 1], scales = 1 / image scale (2.0 = found at 0.5)
    outputs = {
        "boxes": np.array([[0, 0, 2, 2], [4, 4, 6, 6], [8, 8, 10, 10]], np.float32),
        "features": np.array([[3, 4], [1, 0], [0, 2]], np.float32),
        "scores": np.array([[5.0], [9.0], [7.0]], np.float32),
        "scales": np.array([1.0, 2.0, 0.5], np.float32),
    }
    local = local_from_outputs(outputs, max_feature_num=5, factor=1.0, dim=2)
    np.testing.assert_array_equal(local.keypoints, [[5.0, 5.0], [9.0, 9.0], [1.0, 1.0]])
    np.testing.assert_allclose(local.descriptors, [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    np.testing.assert_array_equal(local.scores, [9.0, 7.0, 5.0])
    np.testing.assert_array_equal(local.scales, [2.0, 0.5, 1.0])
    capped = local_from_outputs(outputs, max_feature_num=1, factor=1.0, dim=2)
    np.testing.assert_array_equal(capped.keypoints, [[5.0, 5.0]])
    empty = {"boxes": np.zeros((0, 4)), "features": np.zeros((0, 2))}
    assert local_from_outputs(empty, 10, 1.0, dim=2).descriptors.shape == (0, 2)


def test_global_from_outputs_pools_per_scale_or_normalises_pooled() -> None:
    per_scale = {"global_descriptors": np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 10.0]])}
    expected = np.array([0.6, 0.8, 1.0]) / np.sqrt(2.0)
    np.testing.assert_allclose(global_from_outputs(per_scale), expected, rtol=1e-6)
    pooled = {"global_descriptor": np.array([0.0, 3.0, 4.0])}
    np.testing.assert_allclose(global_from_outputs(pooled), [0.0, 0.6, 0.8], rtol=1e-6)


# --- fixture models ------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    fixture: str
    family: str
    has_local: bool
    has_global: bool
    local_dim: int


VARIANTS = {
    "delg-tf2": Variant("delg_tf2_model", "delg-tf2", True, True, 128),
    "delg-tf2-global": Variant("delg_tf2_global_model", "delg-tf2", False, True, 0),
    "delg-tf1": Variant("delg_tf1_model", "delg-tf1", True, True, 128),
    "delg-tf1-global": Variant("delg_tf1_global_model", "delg-tf1", False, True, 0),
    "delf-hub": Variant("delf_hub_model", "delf-hub", True, False, 40),
}
LOCAL_VARIANTS = [name for name, v in VARIANTS.items() if v.has_local]
GLOBAL_VARIANTS = [name for name, v in VARIANTS.items() if v.has_global]


def _rotate(image: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2 - 0.5, height / 2 - 0.5), degrees, 1.0)
    rotated = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR)
    return rotated, np.vstack([matrix, [0.0, 0.0, 1.0]])


def _rot90(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # np.rot90 (counter-clockwise): pixel (x, y) moves to (y, W - 1 - x).
    width = image.shape[1]
    transform = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, width - 1.0], [0.0, 0.0, 1.0]])
    return np.ascontiguousarray(np.rot90(image)), transform


def _scale(image: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    height, width = image.shape[:2]
    size = (round(width * factor), round(height * factor))
    scaled = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    sx, sy = size[0] / width, size[1] / height
    transform = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])
    return scaled, transform


def _crop(image: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    height, width = image.shape[:2]
    top, left = int(height * (1 - fraction) / 2), int(width * (1 - fraction) / 2)
    cropped = image[top : top + int(height * fraction), left : left + int(width * fraction)]
    transform = np.array([[1.0, 0.0, -left], [0.0, 1.0, -top], [0.0, 0.0, 1.0]])
    return np.ascontiguousarray(cropped), transform


BASE = data.astronaut()
COPIES = {
    "rotated-10": _rotate(BASE, 10.0),
    "rotated-90": _rot90(BASE),
    "scaled-0.75": _scale(BASE, 0.75),
    "cropped-80": _crop(BASE, 0.8),
}
UNRELATED = {"chelsea": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket()}
IMAGES = {"base": BASE, **{name: image for name, (image, _) in COPIES.items()}, **UNRELATED}


class Loaded:
    """Extractors (default params) and their features, computed once per module."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request
        self._extractors: dict[str, Extractor] = {}
        self._features: dict[tuple[str, str], ImageFeatures] = {}

    def path(self, variant: str) -> Path:
        return self._request.getfixturevalue(VARIANTS[variant].fixture)

    def extractor(self, variant: str) -> Extractor:
        if variant not in self._extractors:
            self._extractors[variant] = load_extractor(self.path(variant))
        return self._extractors[variant]

    def features(self, variant: str, name: str) -> ImageFeatures:
        key = (variant, name)
        if key not in self._features:
            self._features[key] = self.extractor(variant).extract(IMAGES[name])
        return self._features[key]


@pytest.fixture(scope="module")
def loaded(request: pytest.FixtureRequest) -> Loaded:
    return Loaded(request)


@pytest.mark.parametrize("variant", VARIANTS)
def test_load_detects_family(loaded: Loaded, variant: str) -> None:
    expected = VARIANTS[variant]
    extractor = loaded.extractor(variant)
    assert detect_format(loaded.path(variant)) == expected.family
    assert extractor.family == expected.family
    assert (extractor.has_local, extractor.has_global) == (expected.has_local, expected.has_global)
    assert extractor.local_dim == expected.local_dim
    assert extractor.global_dim == (2048 if expected.has_global else 0)
    assert extractor.model_id == extractor.fingerprint()["model_id"] != ""


@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_shapes_dtypes_and_norms(loaded: Loaded, variant: str) -> None:
    expected = VARIANTS[variant]
    extractor = loaded.extractor(variant)
    features = loaded.features(variant, "base")
    if expected.has_global:
        vector = features.global_descriptor
        assert vector.dtype == np.float32 and vector.shape == (2048,)
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    else:
        assert features.global_descriptor is None
    if not expected.has_local:
        assert features.local is None
        return
    local = features.local
    count = len(local)
    assert 100 <= count <= extractor.params.max_feature_num
    assert local.keypoints.dtype == np.float32 and local.keypoints.shape == (count, 2)
    assert local.descriptors.dtype == np.float32
    assert local.descriptors.shape == (count, expected.local_dim)
    assert local.scores.dtype == np.float32 and local.scores.shape == (count,)
    assert local.scales.dtype == np.float32 and local.scales.shape == (count,)
    np.testing.assert_allclose(np.linalg.norm(local.descriptors, axis=1), 1.0, atol=1e-5)
    height, width = BASE.shape[:2]
    assert (local.keypoints >= 0).all()
    assert (local.keypoints[:, 0] <= width - 1).all() and (
        local.keypoints[:, 1] <= height - 1
    ).all()
    if expected.family == "delf-hub":
        # DELF v1's "default" signature returns no scores or scales: documented zeros.
        assert not local.scores.any() and not local.scales.any()
        assert extractor.params.image_scales == (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
        assert extractor.params.score_threshold == 100.0
    else:
        assert (local.scores >= extractor.params.score_threshold).all()
        assert (np.diff(local.scores) <= 0).all()
        found_at = np.abs(local.scales[:, None] - np.array([0.7071, 1.0, 1.4142])) < 1e-4
        assert found_at.any(axis=1).all() and found_at.any(axis=0).all()


@pytest.mark.parametrize("variant", LOCAL_VARIANTS)
def test_max_feature_num_keeps_the_strongest(loaded: Loaded, variant: str) -> None:
    default = loaded.extractor(variant)
    full = loaded.features(variant, "base").local
    params = ExtractorParams(
        image_scales=default.params.image_scales,
        global_scales=default.params.global_scales,
        score_threshold=default.params.score_threshold,
        max_feature_num=40,
    )
    capped = load_extractor(loaded.path(variant), params).extract(BASE).local
    assert len(capped) == 40
    np.testing.assert_allclose(capped.keypoints, full.keypoints[:40], atol=1e-4)
    none = load_extractor(loaded.path(variant), ExtractorParams(max_feature_num=0))
    assert len(none.extract(BASE).local) == 0


@pytest.mark.parametrize("variant", ["delg-tf2", "delg-tf1"])
def test_score_threshold_drops_weak_features(loaded: Loaded, variant: str) -> None:
    strict = load_extractor(loaded.path(variant), ExtractorParams(score_threshold=400.0))
    local = strict.extract(BASE).local
    assert 0 < len(local) < len(loaded.features(variant, "base").local)
    assert local.scores.min() >= 400.0


def test_single_blob_is_found_where_it_is(delg_tf2_model: Path) -> None:
    # A bright Gaussian blob centred on pixel (x=40, y=25) of a dark 64 x 96 image.
    ys, xs = np.mgrid[0:64, 0:96]
    blob = 200.0 * np.exp(-((xs - 40) ** 2 + (ys - 25) ** 2) / (2 * 3.0**2))
    image = np.repeat(blob[..., None], 3, axis=2).astype(np.uint8)
    params = ExtractorParams(image_scales=(1.0,), global_scales=(1.0,), max_feature_num=1)
    local = load_extractor(delg_tf2_model, params).extract(image).local
    np.testing.assert_allclose(local.keypoints, [[40.0, 25.0]], atol=1e-4)
    np.testing.assert_array_equal(local.scales, [1.0])


def _mutual_matches(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    similarity = first @ second.T
    forward = similarity.argmax(axis=1)
    backward = similarity.argmax(axis=0)
    rows = np.flatnonzero(backward[forward] == np.arange(len(first)))
    return rows, forward[rows]


def _consistent_matches(
    first: LocalFeatures, second: LocalFeatures, transform: np.ndarray, tolerance: float = 3.0
) -> int:
    """Mutual nearest neighbours whose keypoints agree with ``transform`` (3 x 3, first -> second)."""
    rows, cols = _mutual_matches(first.descriptors, second.descriptors)
    points = np.c_[first.keypoints[rows], np.ones(len(rows))] @ transform.T
    errors = np.linalg.norm(points[:, :2] - second.keypoints[cols], axis=1)
    return int((errors < tolerance).sum())


@pytest.mark.parametrize("copy", COPIES)
@pytest.mark.parametrize("variant", LOCAL_VARIANTS)
def test_local_features_match_transformed_copy_not_unrelated(
    loaded: Loaded, variant: str, copy: str
) -> None:
    base = loaded.features(variant, "base").local
    transform = COPIES[copy][1]
    matched = _consistent_matches(base, loaded.features(variant, copy).local, transform)
    unrelated = [
        _consistent_matches(base, loaded.features(variant, name).local, transform)
        for name in UNRELATED
    ]
    assert matched >= 400
    assert max(unrelated) <= 5


@pytest.mark.parametrize("copy", COPIES)
@pytest.mark.parametrize("variant", GLOBAL_VARIANTS)
def test_global_descriptor_closer_to_copy_than_unrelated(
    loaded: Loaded, variant: str, copy: str
) -> None:
    base = loaded.features(variant, "base").global_descriptor
    to_copy = float(base @ loaded.features(variant, copy).global_descriptor)
    to_unrelated = [
        float(base @ loaded.features(variant, name).global_descriptor) for name in UNRELATED
    ]
    assert to_copy > 0.95
    assert to_copy > max(to_unrelated) + 0.2


def test_tf1_and_tf2_exports_agree(loaded: Loaded) -> None:
    tf2 = loaded.features("delg-tf2", "base")
    tf1 = loaded.features("delg-tf1", "base")
    np.testing.assert_allclose(tf1.local.keypoints, tf2.local.keypoints, atol=1e-3)
    np.testing.assert_allclose(tf1.global_descriptor, tf2.global_descriptor, atol=1e-5)
    only = loaded.features("delg-tf2-global", "base").global_descriptor
    np.testing.assert_allclose(only, tf2.global_descriptor, atol=1e-5)


@pytest.mark.parametrize("variant", ["delg-tf2", "delg-tf1"])
def test_separate_global_scales(loaded: Loaded, variant: str) -> None:
    split = ExtractorParams(image_scales=(1.0,), global_scales=(0.7071, 1.4142))
    features = load_extractor(loaded.path(variant), split).extract(BASE)
    np.testing.assert_array_equal(np.unique(features.local.scales), [1.0])
    assert len(features.local) > 100
    same = ExtractorParams(image_scales=(0.7071, 1.4142), global_scales=(0.7071, 1.4142))
    reference = load_extractor(loaded.path(variant), same).extract(BASE)
    np.testing.assert_allclose(features.global_descriptor, reference.global_descriptor, atol=1e-5)


@pytest.mark.parametrize("variant", LOCAL_VARIANTS)
def test_max_image_size_reports_original_pixels(loaded: Loaded, variant: str) -> None:
    default = loaded.extractor(variant).params
    capped = ExtractorParams(
        image_scales=default.image_scales,
        global_scales=default.global_scales,
        score_threshold=default.score_threshold,
        max_feature_num=default.max_feature_num,
        max_image_size=256,
    )
    extractor = load_extractor(loaded.path(variant), capped)
    local = extractor.extract(BASE).local
    small = cv2.resize(BASE, (256, 256), interpolation=cv2.INTER_AREA)
    on_small = loaded.extractor(variant).extract(small).local
    np.testing.assert_allclose(local.keypoints, (on_small.keypoints + 0.5) * 2.0 - 0.5, atol=1e-4)
    assert local.keypoints.max() > 300 and local.keypoints.max() <= 511


@pytest.mark.parametrize("variant", VARIANTS)
def test_empty_and_tiny_images(loaded: Loaded, variant: str) -> None:
    expected = VARIANTS[variant]
    extractor = loaded.extractor(variant)
    features = extractor.extract(np.zeros((0, 7, 3), np.uint8))
    if expected.has_local:
        assert features.local.descriptors.shape == (0, expected.local_dim)
    if expected.has_global:
        np.testing.assert_array_equal(features.global_descriptor, np.zeros(2048, np.float32))
    rng = np.random.default_rng(0)
    for shape in [(1, 1, 3), (2, 9, 3), (2, 300, 3)]:
        # Noise, but every pixel lies in the 3-pixel border band at every scale: no keypoints.
        tiny = extractor.extract(rng.integers(0, 256, shape, dtype=np.uint8))
        if expected.has_local:
            assert tiny.local.descriptors.shape == (0, expected.local_dim)
        if expected.has_global:
            assert np.linalg.norm(tiny.global_descriptor) == pytest.approx(1.0, abs=1e-5)


def test_bad_images_raise(loaded: Loaded) -> None:
    extractor = loaded.extractor("delg-tf2")
    with pytest.raises(ValueError, match="uint8"):
        extractor.extract(BASE.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        extractor.extract(BASE[..., 0])


# --- TF-Hub handles: offline cache only ----------------------------------------------------

DELF_URL = "https://tfhub.dev/google/delf/1"


@pytest.mark.slow
def test_hub_cache_folder_matches_tensorflow_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    from tensorflow_hub import compressed_module_resolver as resolver
    assert hub_cache_folder(DELF_URL) == Path(resolver._module_dir(DELF_URL))
    assert hub_cache_folder(DELF_URL).name == "333559635dbfa88957ed2e7ed45bdbfe3353e356"


@pytest.mark.parametrize("handle", ["google/delf/1", DELF_URL])
def test_hub_handle_resolves_from_cache(
    delf_hub_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handle: str
) -> None:
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    cached = tmp_path / hashlib.sha1(DELF_URL.encode()).hexdigest()
    shutil.copytree(delf_hub_model, cached)
    extractor = load_extractor(handle)
    assert extractor.family == "delf-hub"
    assert extractor.path == cached
    assert len(extractor.extract(BASE).local) > 50


def test_uncached_hub_handle_raises_with_instructions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    with pytest.raises(HubModuleNotCachedError, match="TFHUB_CACHE_DIR") as error:
        load_extractor("google/delf/1")
    assert "333559635dbfa88957ed2e7ed45bdbfe3353e356" in str(error.value)
    assert "hub.load('https://tfhub.dev/google/delf/1')" in str(error.value)
    assert isinstance(error.value, FileNotFoundError)
    assert list(tmp_path.iterdir()) == []


# --- detection errors and names ------------------------------------------------------------


@pytest.mark.slow
def test_detection_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a file, folder or known name"):
        load_extractor(tmp_path / "missing")
    with pytest.raises(ValueError, match="no saved_model.pb"):
        load_extractor(tmp_path)
    (tmp_path / "saved_model.pb").write_bytes(b"\xff\xff not a protobuf")
    with pytest.raises(ValueError, match="could not be parsed"):
        load_extractor(tmp_path)
    with pytest.raises(ValueError, match="not a folder"):
        load_extractor(tmp_path / "saved_model.pb")
    with pytest.raises(ValueError, match="empty model name"):
        load_extractor("")


@pytest.mark.slow
def test_unknown_signature_is_rejected(tmp_path: Path) -> None:
    import tensorflow as tf
    module = tf.Module()
    module.serve = tf.function(lambda x: {"y": x * 2.0}, input_signature=[tf.TensorSpec([None])])
    tf.saved_model.save(
        module, str(tmp_path / "other"), signatures={"serving_default": module.serve}
    )
    with pytest.raises(
        ValueError, match=r"unrecognised SavedModel.*serving_default\(x\).*Supported"
    ):
        load_extractor(tmp_path / "other")


@pytest.mark.parametrize("name", ["opencv-sift", "sift", "OpenCV"])
def test_sift_names(name: str) -> None:
    extractor = load_extractor(name)
    assert extractor.family == "opencv-sift"
    assert "opencv-sift" in list_models()


@pytest.mark.slow
def test_importing_models_does_not_import_tensorflow() -> None:
    code = (
        "import sys, delf_retrieval.models, delf_retrieval.models.fakes, delf_retrieval.models.delg, "
        "delf_retrieval.models.delf_hub; print('tensorflow' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
