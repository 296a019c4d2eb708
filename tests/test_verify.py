"""Putative matching and RANSAC verification on tiny hand-made arrays."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from delf_retrieval.config import Config
from delf_retrieval.features.containers import LocalFeatures
from delf_retrieval.matching.ransac import ransac_inliers
from delf_retrieval.matching.verify import (
    MatchingSettings,
    count_inliers,
    count_inliers_many,
    match_and_verify,
    putative_matches,
)


def matching(**fields) -> MatchingSettings:
    """The matching settings of ``Config(**fields)``."""
    return MatchingSettings.from_config(Config(**fields))

# Image 1 holds [1,0], [0,1], [-1,0]; image 2 holds [0.6,0.8], [1,0].
# Nearest neighbours 1->2: 0->1 (distance 0), 1->0 (sqrt(0.4)=0.632), 2->0 (sqrt(3.2)=1.789).
# Second nearest distances: 0.894, 1.414, 2.0. Nearest neighbours 2->1: 0->1, 1->0.
D1 = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
D2 = np.array([[0.6, 0.8], [1.0, 0.0]], np.float32)

H = np.array([[1.1, 0.05, 20.0], [-0.03, 0.95, -10.0], [1e-4, 2e-4, 1.0]])
AFFINE = np.array([[0.9, 0.2, 15.0], [-0.1, 1.1, 5.0], [0.0, 0.0, 1.0]])
HOMOGRAPHY_METHODS = ["magsac", "opencv-ransac", "degensac"]


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    mapped = np.c_[points, np.ones(len(points))] @ matrix.T
    return mapped[:, :2] / mapped[:, 2:]


def forty_inliers_twenty_outliers(matrix: np.ndarray, seed: int = 0):
    """60 correspondences in a 640 px square: the first 40 mapped exactly by ``matrix``."""
    rng = np.random.default_rng(seed)
    points1 = rng.uniform(0, 640, size=(60, 2))
    points2 = apply(matrix, points1)
    points2[40:] = rng.uniform(0, 640, size=(20, 2))
    return points1, points2


def skip_without_degensac(method: str) -> None:
    if method == "degensac":
        pytest.importorskip("pydegensac", reason="pydegensac is an optional extra")


# --- putative_matches ----------------------------------------------------------------------


def test_nearest_neighbour_for_every_descriptor_of_image_1():
    np.testing.assert_array_equal(putative_matches(D1, D2), [[0, 1], [1, 0], [2, 0]])


def test_distance_bound():
    np.testing.assert_array_equal(putative_matches(D1, D2, max_distance=1.0), [[0, 1], [1, 0]])
    np.testing.assert_array_equal(putative_matches(D1, D2, max_distance=0.5), [[0, 1]])
    np.testing.assert_array_equal(
        putative_matches(D1, D2, max_distance=1.8), [[0, 1], [1, 0], [2, 0]]
    )


def test_distance_bound_is_strict_like_the_kdtree():
    one, other = np.array([[1.0, 0.0]], np.float32), np.array([[0.0, 1.0]], np.float32)
    assert putative_matches(one, other, max_distance=np.sqrt(2.0)).shape == (0, 2)
    np.testing.assert_array_equal(
        putative_matches(one, other, max_distance=np.nextafter(np.sqrt(2.0), 3.0)), [[0, 0]]
    )


def test_mutual_nearest_neighbours():
    np.testing.assert_array_equal(putative_matches(D1, D2, mutual=True), [[0, 1], [1, 0]])


def test_ratio_test():
    np.testing.assert_array_equal(putative_matches(D1, D2, ratio=0.9), [[0, 1], [1, 0], [2, 0]])
    np.testing.assert_array_equal(putative_matches(D1, D2, ratio=0.8), [[0, 1], [1, 0]])
    np.testing.assert_array_equal(putative_matches(D1, D2, ratio=0.4), [[0, 1]])
    # A single descriptor in image 2 has no second neighbour: the test passes.
    np.testing.assert_array_equal(putative_matches(D1, D2[1:], ratio=0.5), [[0, 0], [1, 0], [2, 0]])


def test_ties_pick_the_smaller_index_and_fail_the_ratio_test():
    one = np.array([[1.0, 0.0]], np.float32)
    tied = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], np.float32)
    np.testing.assert_array_equal(putative_matches(one, tied), [[0, 1]])
    assert putative_matches(one, tied, ratio=0.99).shape == (0, 2)
    twins = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
    np.testing.assert_array_equal(putative_matches(twins, one), [[0, 0], [1, 0]])
    np.testing.assert_array_equal(putative_matches(twins, one, mutual=True), [[0, 0]])


def test_descriptors_are_normalised_and_float16_works():
    np.testing.assert_array_equal(
        putative_matches(5 * D1, 0.1 * D2, max_distance=1.0), [[0, 1], [1, 0]]
    )
    np.testing.assert_array_equal(
        putative_matches(D1.astype(np.float16), D2.astype(np.float16), mutual=True),
        [[0, 1], [1, 0]],
    )


def test_same_matches_as_the_baseline_kdtree():
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(3)
    d1 = rng.standard_normal((200, 16)).astype(np.float32)
    d2 = rng.standard_normal((300, 16)).astype(np.float32)
    d2[:80] = d1[:80] + 0.4 * rng.standard_normal((80, 16)).astype(np.float32)
    d1 /= np.linalg.norm(d1, axis=1, keepdims=True)
    d2 /= np.linalg.norm(d2, axis=1, keepdims=True)
    for bound in (0.6, 0.9, 1.1):
        _, nearest = cKDTree(d2).query(d1, distance_upper_bound=bound)
        found = np.flatnonzero(nearest != len(d2))
        expected = np.stack([found, nearest[found]], axis=1)
        assert len(expected) > 0
        np.testing.assert_array_equal(putative_matches(d1, d2, max_distance=bound), expected)


def test_empty_and_bad_inputs():
    empty = np.zeros((0, 2), np.float32)
    for result in (putative_matches(empty, D2), putative_matches(D1, empty)):
        assert result.shape == (0, 2) and result.dtype == np.int64
    with pytest.raises(ValueError, match="widths differ"):
        putative_matches(D1, np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="ratio"):
        putative_matches(D1, D2, ratio=1.5)


def test_inputs_are_not_modified():
    d1, d2 = 3 * D1, D2.copy()
    putative_matches(d1, d2, ratio=0.8, mutual=True)
    np.testing.assert_array_equal(d1, 3 * D1)
    np.testing.assert_array_equal(d2, D2)


# --- ransac_inliers ------------------------------------------------------------------------


@pytest.mark.parametrize("method", HOMOGRAPHY_METHODS)
def test_known_homography_finds_exactly_the_40_inliers(method):
    skip_without_degensac(method)
    points1, points2 = forty_inliers_twenty_outliers(H)
    inliers = ransac_inliers(points1, points2, method=method)
    assert inliers.dtype == bool and inliers.shape == (60,)
    assert inliers.sum() == 40
    assert inliers[:40].all()


def test_known_affine_map_with_skimage():
    points1, points2 = forty_inliers_twenty_outliers(AFFINE)
    inliers = ransac_inliers(points1, points2, method="skimage-affine")
    assert inliers.sum() == 40
    assert inliers[:40].all()


@pytest.mark.parametrize("method", HOMOGRAPHY_METHODS)
def test_random_points_have_no_inliers(method):
    # (skimage-affine counts its minimal sample, as the reference does: see
    # test_reference_rerank.py)
    skip_without_degensac(method)
    rng = np.random.default_rng(5)
    points1, points2 = rng.uniform(0, 1000, size=(2, 30, 2))
    inliers = ransac_inliers(points1, points2, method=method, max_reprojection_error=2.0)
    assert inliers.sum() == 0


@pytest.mark.parametrize("method", HOMOGRAPHY_METHODS)
def test_degenerate_inputs_give_no_inliers(method):
    skip_without_degensac(method)
    points1, points2 = forty_inliers_twenty_outliers(H)
    four = ransac_inliers(points1[:4], points2[:4], method=method)
    assert four.shape == (4,) and not four.any()
    assert ransac_inliers(np.zeros((0, 2)), np.zeros((0, 2)), method=method).shape == (0,)
    with_nan = points2.copy()
    with_nan[3, 1] = np.nan
    assert not ransac_inliers(points1, with_nan, method=method).any()
    line = np.stack([np.arange(20.0), 2 * np.arange(20.0) + 1], axis=1)
    assert not ransac_inliers(line, line + 5, method=method).any()
    same_point = np.ones((20, 2))
    assert not ransac_inliers(points1[:20], same_point, method=method).any()


@pytest.mark.parametrize("method", [*HOMOGRAPHY_METHODS, "skimage-affine"])
def test_same_seed_same_inliers(method):
    skip_without_degensac(method)
    rng = np.random.default_rng(7)
    matrix = AFFINE if method == "skimage-affine" else H
    points1 = rng.uniform(0, 640, size=(200, 2))
    points2 = apply(matrix, points1) + rng.normal(0, 2.0, size=(200, 2))
    points2[120:] = rng.uniform(0, 640, size=(80, 2))
    runs = [ransac_inliers(points1, points2, method=method, seed=11) for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert 90 <= runs[0].sum() <= 130  # 120 true matches with noise sigma 2 px


def test_magsac_seed_changes_the_random_state():
    rng = np.random.default_rng(8)
    points1 = rng.uniform(0, 640, size=(300, 2))
    points2 = apply(H, points1) + rng.normal(0, 3.0, size=(300, 2))
    points2[100:] = rng.uniform(0, 640, size=(200, 2))
    masks = {ransac_inliers(points1, points2, seed=s).tobytes() for s in range(6)}
    assert len(masks) > 1


def test_bad_ransac_arguments_raise():
    points = np.zeros((6, 2))
    with pytest.raises(ValueError, match="unknown RANSAC method"):
        ransac_inliers(points, points, method="lmeds")
    with pytest.raises(ValueError, match=r"\[M, 2\]"):
        ransac_inliers(np.zeros((6, 3)), points)
    with pytest.raises(ValueError, match="points2 has"):
        ransac_inliers(points, np.zeros((5, 2)))
    with pytest.raises(ValueError, match="confidence"):
        ransac_inliers(points, points, confidence=1.0)
    assert ransac_inliers(points, points, method="skimage-affine", confidence=1.0).shape == (
        points.shape[0],
    )


# --- count_inliers / match_and_verify / count_inliers_many ---------------------------------


def pair_features(seed: int = 0, matching: bool = True):
    """Two images whose 60 descriptors correspond one to one (shuffled in image 2); the
    keypoints of 40 of them are related by H, the other 20 are random."""
    rng = np.random.default_rng(seed)
    points1, points2 = forty_inliers_twenty_outliers(H, seed)
    descriptors1 = rng.standard_normal((60, 128)).astype(np.float32)
    descriptors1 /= np.linalg.norm(descriptors1, axis=1, keepdims=True)
    order = rng.permutation(60)
    if not matching:
        points2 = rng.uniform(0, 640, size=(60, 2))
    image1 = LocalFeatures(
        points1.astype(np.float32), descriptors1, np.ones(60, np.float32), np.ones(60, np.float32)
    )
    image2 = LocalFeatures(
        points2[order].astype(np.float32),
        descriptors1[order],
        np.ones(60, np.float32),
        np.ones(60, np.float32),
    )
    return image1, image2, order


def test_count_inliers_on_a_known_pair():
    image1, image2, order = pair_features()
    config = matching()  # the kaggle2020 preset: distance bound 0.9, MAGSAC
    args = (image1.keypoints, image1.descriptors, image2.keypoints, image2.descriptors)
    assert count_inliers(*args, config) == 40
    matches, inliers = match_and_verify(*args, config)
    np.testing.assert_array_equal(matches[:, 0], np.arange(60))
    np.testing.assert_array_equal(order[matches[:, 1]], np.arange(60))
    np.testing.assert_array_equal(inliers, np.arange(60) < 40)
    assert count_inliers(*args, matching(RANSAC_METHOD="opencv-ransac")) == 40


def test_count_inliers_follows_the_match_settings():
    image1, image2, _ = pair_features()
    args = (image1.keypoints, image1.descriptors, image2.keypoints, image2.descriptors)
    # Fewer than MIN_MATCHES + 1 putative matches: 0 without running RANSAC.
    assert count_inliers(*args, matching(MIN_MATCHES=60)) == 0
    assert count_inliers(*args, matching(MIN_MATCHES=59)) == 40
    few = (image1.keypoints[:4], image1.descriptors[:4], image2.keypoints, image2.descriptors)
    assert count_inliers(*few, matching(MIN_MATCHES=0)) == 0
    # Descriptors from unrelated images: nothing within the baseline's distance bound.
    rng = np.random.default_rng(9)
    noise = rng.standard_normal((60, 128)).astype(np.float32)
    assert putative_matches(image1.descriptors, noise, max_distance=0.9).shape == (0, 2)
    assert count_inliers(image1.keypoints, image1.descriptors, image2.keypoints, noise) == 0


def test_count_inliers_empty_and_mismatched_inputs():
    image1, _, _ = pair_features()
    empty = LocalFeatures.empty(128)
    assert (
        count_inliers(image1.keypoints, image1.descriptors, empty.keypoints, empty.descriptors) == 0
    )
    matches, inliers = match_and_verify(
        empty.keypoints, empty.descriptors, image1.keypoints, image1.descriptors
    )
    assert matches.shape == (0, 2) and inliers.shape == (0,)
    with pytest.raises(ValueError, match="keypoints but"):
        count_inliers(
            image1.keypoints[:5], image1.descriptors, image1.keypoints, image1.descriptors
        )


def shuffled_view(query: LocalFeatures, matrix: np.ndarray, num_inliers: int, seed: int):
    """The query's descriptors, shuffled, at keypoints mapped by ``matrix`` for the first
    ``num_inliers`` of them and random elsewhere."""
    rng = np.random.default_rng(seed)
    points = apply(matrix, query.keypoints.astype(np.float64))
    points[num_inliers:] = rng.uniform(0, 640, size=(len(query) - num_inliers, 2))
    order = rng.permutation(len(query))
    ones = np.ones(len(query), np.float32)
    return LocalFeatures(points[order].astype(np.float32), query.descriptors[order], ones, ones)


def test_count_inliers_many_equals_the_serial_loop():
    query, _, _ = pair_features(0)
    shift = np.array([[1.0, 0.0, 30.0], [0.0, 1.0, -12.0], [0.0, 0.0, 1.0]])
    unrelated = pair_features(4)[1]  # other descriptors: no match within the bound
    candidates = [
        shuffled_view(query, H, 40, seed=1),
        shuffled_view(query, shift, 25, seed=2),
        shuffled_view(query, AFFINE, 20, seed=3),
        unrelated,
        LocalFeatures.empty(128),
        shuffled_view(query, shift, 60, seed=5),
    ]
    config = matching(WORKERS=2)
    counts = count_inliers_many(query, candidates, config)
    serial = [
        count_inliers(query.keypoints, query.descriptors, c.keypoints, c.descriptors, config)
        for c in candidates
    ]
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, serial)
    np.testing.assert_array_equal(counts, [40, 25, 20, 0, 0, 60])
    np.testing.assert_array_equal(count_inliers_many(query, candidates, matching(WORKERS=1)), counts)
    assert count_inliers_many(query, [], config).shape == (0,)


@pytest.mark.parametrize("method", HOMOGRAPHY_METHODS)
def test_collapsing_or_mirroring_maps_are_rejected(method):
    skip_without_degensac(method)
    rng = np.random.default_rng(12)
    points1 = rng.uniform(0, 640, size=(60, 2))
    # 40 keypoints of image 1 all matched to a 1-pixel cluster of image 2 (what plain
    # nearest-neighbour matching does to repeated texture), 20 random matches.
    points2 = np.r_[300 + rng.uniform(0, 1, size=(40, 2)), rng.uniform(0, 640, size=(20, 2))]
    assert not ransac_inliers(points1, points2, method=method).any()
    mirror = np.array([[-1.0, 0.0, 640.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    mirrored = apply(mirror, points1)
    assert not ransac_inliers(points1, mirrored, method=method).any()
    zoom = np.array([[10.0, 0.0, 5.0], [0.0, 10.0, -3.0], [0.0, 0.0, 1.0]])  # area x100: kept
    assert ransac_inliers(points1, apply(zoom, points1), method=method).sum() == 60


def test_missing_pydegensac_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydegensac", None)  # makes "import pydegensac" fail
    points1, points2 = forty_inliers_twenty_outliers(H)
    with pytest.raises(ImportError, match="pip install pydegensac"):
        ransac_inliers(points1, points2, method="degensac")


# --- non-finite rows -----------------------------------------------------------------------

NAN_CONFIGS = [
    matching(),  # kaggle2020: distance bound
    matching(MUTUAL_NEAREST_NEIGHBOR=True, RATIO_TEST=0.8, MAX_DESCRIPTOR_DISTANCE=float("inf")),
]


@pytest.mark.parametrize("config", NAN_CONFIGS, ids=["bound", "mutual-ratio"])
@pytest.mark.parametrize("where", ["descriptor", "keypoint"])
def test_a_nan_row_counts_as_if_it_were_not_there(config, where):
    """One NaN used to zero a true pair (every column maximum became NaN). A row holding
    NaN or inf must behave exactly like a row that was never extracted."""
    image1, image2, _ = pair_features()
    bad = 7  # a row of image 2 (an inlier's match or not: the comparison covers both)
    k2, d2 = image2.keypoints.copy(), image2.descriptors.copy()
    if where == "descriptor":
        d2[bad, 3] = np.nan
    else:
        k2[bad, 0] = np.inf
    k1, d1 = image1.keypoints.copy(), image1.descriptors.copy()
    d1[11] = np.inf  # and a bad query row
    k_without = np.delete(k2, bad, axis=0)
    d_without = np.delete(d2 if where == "keypoint" else image2.descriptors, bad, axis=0)
    k1_without, d1_without = np.delete(k1, 11, axis=0), np.delete(image1.descriptors, 11, axis=0)

    matches, inliers = match_and_verify(k1, d1, k2, d2, config)
    ref_matches, ref_inliers = match_and_verify(k1_without, d1_without, k_without, d_without, config)
    # Same matches once indices are mapped past the removed rows.
    expected = ref_matches.copy()
    expected[:, 0] += expected[:, 0] >= 11
    expected[:, 1] += expected[:, 1] >= bad
    np.testing.assert_array_equal(matches, expected)
    np.testing.assert_array_equal(inliers, ref_inliers)
    count = count_inliers(k1, d1, k2, d2, config)
    assert count == int(ref_inliers.sum()) >= 38  # not 0: the pair still verifies
    many = count_inliers_many(LocalFeatures(k1, d1, np.ones(60), np.ones(60)), [LocalFeatures(k2, d2, np.ones(60), np.ones(60))], config)
    assert many.tolist() == [count]


def test_all_rows_non_finite_give_no_matches():
    nan = np.full((3, 2), np.nan, np.float32)
    assert putative_matches(nan, D2).shape == (0, 2)
    assert putative_matches(D1, nan, mutual=True, ratio=0.8).shape == (0, 2)
    # The finite rows of image 1 still find their neighbours in image 2.
    mixed = D1.copy()
    mixed[1] = np.nan
    np.testing.assert_array_equal(putative_matches(mixed, D2), [[0, 1], [2, 0]])
