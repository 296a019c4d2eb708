"""``RANSAC_METHOD="skimage-affine"`` equals the reference re-ranking, checked against it.

The reference is tensorflow/models research/delf/delf/python/detect_to_retrieve/
image_reranking.py ``MatchFeatures``: putative matches from a KD-tree of the index
image's descriptors queried with the query's under ``distance_upper_bound`` 0.9, 0 for
3 matches or fewer, then ``skimage.measure.ransac((index_points, query_points),
AffineTransform, min_samples=3, residual_threshold=10, max_trials=1000)`` (default
``stop_probability``) and ``sum(inliers)``. ``_reference_match_features`` restates it in
plain scipy/scikit-image; the library's ``count_inliers`` with the
``delf-matchfeatures`` preset must give the same count for the same features and seed.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
from scipy import spatial
from skimage import data, measure, transform

from delf_retrieval.config import load_config
from delf_retrieval.matching.ransac import ransac_inliers
from delf_retrieval.matching.verify import MatchingSettings, count_inliers

PRESET = MatchingSettings.from_config(load_config("delf-matchfeatures"))


def _reference_ransac(index_points, query_points, seed, threshold=10.0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, inliers = measure.ransac(
            (index_points, query_points),
            transform.AffineTransform,
            min_samples=3,
            residual_threshold=threshold,
            max_trials=1000,
            rng=seed,  # scikit-image >= 0.23; the reference's random_state=seed before
        )
    return [] if inliers is None else inliers


def _reference_match_features(
    query_locations, query_descriptors, index_locations, index_descriptors, seed
):
    """MatchFeatures restated (use_ratio_test=False, its default thresholds)."""
    if not query_locations.shape[0] or not index_locations.shape[0]:
        return 0
    tree = spatial.cKDTree(index_descriptors)
    _, indices = tree.query(query_descriptors, distance_upper_bound=0.9)
    found = indices != index_locations.shape[0]
    query_used = query_locations[found]
    index_used = index_locations[indices[found]]
    if query_used.shape[0] <= 3:
        return 0
    return int(sum(_reference_ransac(index_used, query_used, seed)))


# --- hand-made point sets -----------------------------------------------------------------


def _apply(matrix, points):
    mapped = np.c_[points, np.ones(len(points))] @ matrix.T
    return mapped[:, :2] / mapped[:, 2:]


ZOOM = np.array([[3.0, 0.2, 40.0], [-0.1, 2.8, -25.0], [0.0, 0.0, 1.0]])
MIRROR = np.array([[-1.0, 0.0, 640.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def _noisy_pairs(matrix, seed, count=120, outliers=50, noise=2.5):
    rng = np.random.default_rng(seed)
    query = rng.uniform(0, 640, size=(count, 2))
    index = _apply(matrix, query) + rng.normal(0, noise, size=(count, 2))
    index[count - outliers :] = rng.uniform(0, 1900, size=(outliers, 2))
    return query, index


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.slow
def test_same_mask_as_a_direct_reference_call(seed):
    query, index = _noisy_pairs(ZOOM, seed)
    ours = ransac_inliers(
        query,
        index,
        method="skimage-affine",
        max_reprojection_error=10.0,
        max_iterations=1000,
        confidence=1.0,
        seed=seed,
    )
    reference = _reference_ransac(index, query, seed)
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.slow
def test_random_points_count_like_the_reference():
    rng = np.random.default_rng(5)
    query, index = rng.uniform(0, 1000, size=(2, 30, 2))
    ours = ransac_inliers(
        query, index, method="skimage-affine", max_reprojection_error=2.0, confidence=1.0, seed=1
    )
    np.testing.assert_array_equal(ours, _reference_ransac(index, query, 1, threshold=2.0))
    assert 3 <= ours.sum() <= 5  # the minimal sample fits itself; no filter removes it


@pytest.mark.slow
def test_fit_direction_is_index_to_query():
    # the index image is a 3x zoom of the query: a residual of 10 px in the query image
    # is 30 px in the index image, so the two directions disagree on noisy matches
    query, index = _noisy_pairs(ZOOM, 1, noise=6.0)
    reference = int(sum(_reference_ransac(index, query, 3)))
    other_way = int(sum(_reference_ransac(query, index, 3)))
    assert reference != other_way
    assert (
        ransac_inliers(
            query,
            index,
            method="skimage-affine",
            max_reprojection_error=10.0,
            confidence=1.0,
            seed=3,
        ).sum()
        == reference
    )


@pytest.mark.slow
def test_no_filter_after_ransac():
    # the reference counts every inlier of a mirrored map, and of a collapse onto a cluster
    rng = np.random.default_rng(4)
    query = rng.uniform(0, 640, size=(60, 2))
    mirrored = _apply(MIRROR, query)
    assert ransac_inliers(query, mirrored, method="skimage-affine", confidence=1.0).sum() == 60
    assert sum(_reference_ransac(mirrored, query, 0, threshold=4.0)) == 60
    cluster = np.r_[300 + rng.uniform(0, 1, size=(40, 2)), rng.uniform(0, 640, size=(20, 2))]
    ours = ransac_inliers(
        query, cluster, method="skimage-affine", confidence=1.0, seed=2, max_reprojection_error=10.0
    )
    np.testing.assert_array_equal(ours, _reference_ransac(cluster, query, 2))
    assert ours.sum() > 0


def test_minimum_match_rules():
    rng = np.random.default_rng(6)
    query = rng.uniform(0, 640, size=(4, 2))
    index = _apply(ZOOM, query)
    # 4 matches: RANSAC runs (the reference stops only at 3 or fewer); an exact map fits all
    assert ransac_inliers(query, index, method="skimage-affine", confidence=1.0).sum() == 4
    descriptors = np.eye(4, dtype=np.float32)
    assert count_inliers(query, descriptors, index, descriptors, PRESET) == 4
    assert _reference_match_features(query, descriptors, index, descriptors, 0) == 4
    # 3 matches: 0 in both
    assert (
        count_inliers(query[:3], descriptors[:3, :3], index[:3], descriptors[:3, :3], PRESET) == 0
    )
    assert (
        _reference_match_features(query[:3], descriptors[:3, :3], index[:3], descriptors[:3, :3], 0)
        == 0
    )


# --- real photo pairs: views of scikit-image's photos under known homographies ------------


def _view(image, matrix):
    """``image`` seen through the homography ``matrix`` (output -> input pixels), uint8."""
    warped = transform.warp(
        image,
        transform.ProjectiveTransform(matrix),
        preserve_range=True,
        output_shape=image.shape[:2],
        order=1,
        mode="edge",
    )
    return np.clip(np.round(warped), 0, 255).astype(np.uint8)


VIEWS = [
    np.array([[0.9, 0.08, 30.0], [-0.06, 0.92, 20.0], [1e-4, -5e-5, 1.0]]),
    np.array([[1.15, -0.1, -40.0], [0.12, 1.1, -30.0], [0.0, 2e-4, 1.0]]),
]


@pytest.fixture(scope="module")
def photo_features():
    from delf_retrieval.models.loader import load_extractor

    extractor = load_extractor("opencv-sift")
    features = {}
    for name in ("astronaut", "coffee", "chelsea"):
        image = getattr(data, name)()
        features[name, -1] = extractor.extract(image).local
        for k, matrix in enumerate(VIEWS):
            features[name, k] = extractor.extract(_view(image, matrix)).local
    return features


@pytest.mark.slow
def test_real_pairs_equal_the_reference(photo_features):
    pairs = [
        ((name, -1), (name, k))
        for name in ("astronaut", "coffee", "chelsea")
        for k in range(len(VIEWS))
    ]
    pairs += [(("astronaut", -1), ("coffee", 0)), (("chelsea", 0), ("astronaut", 1))]
    counts = []
    for seed, (query_key, index_key) in enumerate(pairs):
        query, index = photo_features[query_key], photo_features[index_key]
        keypoints_q = query.keypoints.astype(np.float64)
        keypoints_i = index.keypoints.astype(np.float64)
        descriptors_q = query.descriptors.astype(np.float64)
        descriptors_i = index.descriptors.astype(np.float64)
        config = replace(PRESET, ransac=replace(PRESET.ransac, seed=seed))
        ours = count_inliers(keypoints_q, descriptors_q, keypoints_i, descriptors_i, config)
        reference = _reference_match_features(
            keypoints_q, descriptors_q, keypoints_i, descriptors_i, seed
        )
        assert ours == reference, (query_key, index_key)
        counts.append(ours)
    # the views of one photo verify far better than unrelated photos
    assert min(counts[:6]) > 2 * max(counts[6:])
