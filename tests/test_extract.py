"""Extraction runner: failures recorded, resume after a kill, identical results."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from delf_retrieval.demo.data import bundled_photo, random_view
from delf_retrieval.features.containers import ImageFeatures, LocalFeatures
from delf_retrieval.features.images import ImageSource, kaggle_image_path, list_images
from delf_retrieval.features.store import FeatureStore
from delf_retrieval.models.extract import MIN_IMAGE_SIDE, extract_to_store, iter_decoded
from delf_retrieval.models.opencv_sift import OpenCVSiftExtractor

REPO = Path(__file__).resolve().parents[1]


def write_views(folder: Path, count: int, size: int = 320, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    photos = [bundled_photo(name) for name in ("astronaut", "rocket", "coffee", "chelsea")]
    ids = []
    for index in range(count):
        image_id = f"{index:04x}{rng.integers(1 << 30):08x}"
        view = random_view(photos[index % len(photos)], rng, size=size)
        path = kaggle_image_path(folder, image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), cv2.cvtColor(view, cv2.COLOR_RGB2BGR))
        ids.append(image_id)
    return ids


def assert_same_store(a: FeatureStore, b: FeatureStore) -> None:
    assert a.ids == b.ids
    assert a.failures() == b.failures()
    for image_id in a.ids:
        left, right = a.local_features(image_id), b.local_features(image_id)
        for field in ("keypoints", "descriptors", "scores", "scales"):
            np.testing.assert_array_equal(getattr(left, field), getattr(right, field))


def test_bad_images_are_recorded_and_the_run_goes_on(tmp_path):
    ids = write_views(tmp_path / "img", 3)
    (tmp_path / "img" / "empty.jpg").write_bytes(b"")
    (tmp_path / "img" / "text.jpg").write_text("hello")
    good = (tmp_path / "img").rglob(f"{ids[0]}.jpg").__next__().read_bytes()
    (tmp_path / "img" / "cut.jpg").write_bytes(good[: len(good) // 3])
    sources = list_images(tmp_path / "img") + [ImageSource("gone", str(tmp_path / "gone.jpg"))]
    extractor = OpenCVSiftExtractor()
    store = FeatureStore(tmp_path / "store", extractor.fingerprint())
    summary = extract_to_store(extractor, sources, store, batch_size=2, progress=False)
    assert (summary.total, summary.extracted, summary.failed, summary.skipped) == (7, 3, 4, 0)
    failures = store.failures()
    assert set(failures) == {"empty", "text", "cut", "gone"}
    assert "empty file" in failures["empty"] and "not an image" in failures["text"]
    assert "truncated" in failures["cut"] and "missing file" in failures["gone"]
    assert store.ids == sorted(ids)
    assert all(len(store.local_features(i)) > 30 for i in ids)
    again = extract_to_store(extractor, sources, FeatureStore(tmp_path / "store", extractor.fingerprint()), progress=False)
    assert (again.extracted, again.skipped) == (0, 7)


def test_decoding_keeps_input_order():
    sources = [ImageSource(str(i), f"/nonexistent/{i}.jpg") for i in range(40)]
    decoded = list(iter_decoded(sources, threads=4, prefetch=8))
    assert [d.source.id for d in decoded] == [str(i) for i in range(40)]
    assert all(d.error and "missing file" in d.error for d in decoded)


def test_max_image_size_keeps_keypoints_in_original_pixels(tmp_path):
    ids = write_views(tmp_path / "img", 1, size=600)
    sources = list_images(tmp_path / "img")
    capped = OpenCVSiftExtractor()
    capped = type(capped)(capped.params.__class__(**{**capped.params.to_dict(), "max_image_size": 300,
                                                     "image_scales": (1.0,), "global_scales": (1.0,)}))
    store = FeatureStore(tmp_path / "store", capped.fingerprint())
    extract_to_store(capped, sources, store, progress=False)
    keypoints = store.local_features(ids[0]).keypoints
    height, width = cv2.imread(sources[0].path).shape[:2]
    assert keypoints[:, 0].max() > 0.8 * width and keypoints[:, 1].max() > 0.8 * height
    assert keypoints[:, 0].max() < width and keypoints[:, 1].max() < height


RUNNER = textwrap.dedent(
    """
    import sys
    from delf_retrieval.models.extract import extract_to_store
    from delf_retrieval.features.images import list_images
    from delf_retrieval.models.opencv_sift import OpenCVSiftExtractor
    from delf_retrieval.features.store import FeatureStore
    extractor = OpenCVSiftExtractor()
    store = FeatureStore(sys.argv[2], extractor.fingerprint(), dtype="float16")
    extract_to_store(extractor, list_images(sys.argv[1]), store, batch_size=2, progress=False)
    """
)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path):
    write_views(tmp_path / "img", 24, size=640)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", RUNNER, str(tmp_path / "img")]
    # Uninterrupted reference run.
    subprocess.run(command + [str(tmp_path / "ref")], check=True, env=env, timeout=300)
    # Run killed (SIGKILL, no cleanup) once a few chunks are on disk.
    process = subprocess.Popen(command + [str(tmp_path / "run")], env=env)
    chunks = tmp_path / "run" / "chunks"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if chunks.is_dir() and len(list(chunks.glob("chunk-*.npz"))) >= 3:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = FeatureStore(tmp_path / "run").completed_ids()
    assert 0 < len(partial) < 24, f"the kill should land mid-run, {len(partial)} ids were done"
    subprocess.run(command + [str(tmp_path / "run")], check=True, env=env, timeout=300)
    resumed, reference = FeatureStore(tmp_path / "run"), FeatureStore(tmp_path / "ref")
    assert len(resumed.ids) == 24
    assert_same_store(resumed, reference)


def test_rejects_bad_batch_size(tmp_path):
    extractor = OpenCVSiftExtractor()
    with pytest.raises(ValueError, match="batch_size"):
        extract_to_store(extractor, [], FeatureStore(tmp_path, extractor.fingerprint()), batch_size=0)


def test_tiny_images_links_and_folders_are_failures_with_reasons(tmp_path):
    ids = write_views(tmp_path / "img", 2)
    folder = tmp_path / "img"
    cv2.imwrite(str(folder / "dot.png"), np.full((1, 1, 3), 200, np.uint8))
    cv2.imwrite(str(folder / "line.png"), np.full((1, 500, 3), 200, np.uint8))
    cv2.imwrite(str(folder / "small.png"), np.full((MIN_IMAGE_SIDE, MIN_IMAGE_SIDE, 3), 9, np.uint8))
    os.symlink(tmp_path / "deleted.jpg", folder / "gone.jpg")
    (folder / "album.jpg").mkdir()
    extractor = OpenCVSiftExtractor()
    store = FeatureStore(tmp_path / "store", extractor.fingerprint())
    summary = extract_to_store(extractor, list_images(folder), store, progress=False)
    assert (summary.total, summary.extracted, summary.failed) == (7, 3, 4)
    failures = store.failures()
    assert failures["dot"] == f"image too small: 1x1 px (at least {MIN_IMAGE_SIDE} px per side)"
    assert failures["line"] == f"image too small: 500x1 px (at least {MIN_IMAGE_SIDE} px per side)"
    assert failures["gone"].startswith("broken link:")
    assert failures["album"].startswith("not a file (a directory)")
    assert store.ids == sorted([*ids, "small"])  # 16 px is enough (and has no keypoints)


class PoisonedSift(OpenCVSiftExtractor):
    """RootSIFT that returns NaN descriptors for 300-px-wide images and an infinite
    keypoint for 280-px-wide ones (a model that overflowed, say)."""

    def extract(self, image: np.ndarray) -> ImageFeatures:
        features = super().extract(image)
        local = features.local
        descriptors, keypoints = local.descriptors.copy(), local.keypoints.copy()
        if image.shape[1] == 300:
            descriptors[len(descriptors) // 2, 0] = np.nan
        if image.shape[1] == 280:
            keypoints[-1, 1] = np.inf
        return ImageFeatures(LocalFeatures(keypoints, descriptors, local.scores, local.scales), None)


def test_non_finite_features_are_failures_not_stored(tmp_path):
    good = write_views(tmp_path / "img", 2, size=320)
    nan_id = write_views(tmp_path / "img", 1, size=300, seed=1)[0]
    inf_id = write_views(tmp_path / "img", 1, size=280, seed=2)[0]
    extractor = PoisonedSift()
    store = FeatureStore(tmp_path / "store", extractor.fingerprint())
    summary = extract_to_store(extractor, list_images(tmp_path / "img"), store, progress=False)
    assert (summary.extracted, summary.failed) == (2, 2)
    assert store.ids == sorted(good)
    assert store.failures() == {
        nan_id: "extraction failed: non-finite values (NaN or inf) in the local descriptors",
        inf_id: "extraction failed: non-finite values (NaN or inf) in the local keypoints",
    }
    for image_id in good:
        assert np.isfinite(store.local_features(image_id).descriptors).all()
