"""VLAD codebook and encoding."""

import numpy as np
import pytest

from delf_retrieval.features.containers import l2_normalize
from delf_retrieval.search.vlad import fit_codebook, vlad, vlad_many


def clustered(seed=0, per_cluster=50):
    rng = np.random.default_rng(seed)
    centres = np.eye(4, 8, dtype=np.float32)
    points = np.concatenate([c + rng.normal(0, 0.05, (per_cluster, 8)) for c in centres])
    return l2_normalize(points), centres


def test_codebook_recovers_well_separated_clusters():
    points, centres = clustered()
    codebook = fit_codebook(points, 4, seed=1)
    assert codebook.shape == (4, 8)
    # Every true centre has a codeword within 0.1.
    distance = np.linalg.norm(centres[:, None] - codebook[None], axis=2)
    assert distance.min(axis=1).max() < 0.1
    np.testing.assert_array_equal(codebook, fit_codebook(points, 4, seed=1))  # seeded


def test_codebook_shrinks_to_available_points_and_rejects_empty():
    assert fit_codebook(np.eye(3, 8, dtype=np.float32), 64).shape == (3, 8)
    with pytest.raises(ValueError):
        fit_codebook(np.zeros((0, 8), np.float32))


def test_vlad_exact_small_case():
    codebook = np.array([[1, 0], [0, 1]], np.float32)
    descriptors = np.array([[0.8, 0.6], [0.6, 0.8]], np.float32)
    # Residuals: cluster 0 gets (-0.2, 0.6), cluster 1 gets (0.6, -0.2); each block is
    # L2-normalised, signed square root, then L2-normalised again.
    block0 = np.array([-0.2, 0.6]) / np.hypot(0.2, 0.6)
    block1 = np.array([0.6, -0.2]) / np.hypot(0.2, 0.6)
    flat = np.concatenate([block0, block1])
    expected = np.sign(flat) * np.sqrt(np.abs(flat))
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(vlad(descriptors, codebook), expected, atol=1e-6)


def test_vlad_of_nothing_is_zero_and_similar_sets_are_close():
    points, _ = clustered()
    codebook = fit_codebook(points, 4, seed=0)
    assert not vlad(np.zeros((0, 8), np.float32), codebook).any()
    a, b = clustered(seed=2)[0], clustered(seed=3)[0]
    other = l2_normalize(np.random.default_rng(4).normal(size=(200, 8)))
    vectors = vlad_many([a, b, other], codebook)
    assert vectors.shape == (3, 32)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
    with pytest.raises(ValueError, match="width"):
        vlad(np.ones((2, 5), np.float32), codebook)
