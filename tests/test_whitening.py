"""Learned PCA-whitening against a direct numpy computation, and its store cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from delf_retrieval.features.containers import ImageFeatures
from delf_retrieval.features.store import FeatureStore
from delf_retrieval.search.whitening import (
    ensure_whitening,
    fit_whitening,
    whiten_for_run,
    whiten_stores,
)


def _direct(train: np.ndarray, queries: np.ndarray, dim: int) -> np.ndarray:
    """Whitening written out: covariance (np.cov, population), eigh, project, scale, normalise."""
    mean = train.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov(train, rowvar=False, bias=True))
    order = np.argsort(values)[::-1][:dim]
    projected = (queries - mean) @ vectors[:, order] / np.sqrt(values[order])
    return projected / np.linalg.norm(projected, axis=1, keepdims=True)


def _gram(x: np.ndarray) -> np.ndarray:
    # Eigenvectors are defined up to sign; cosines between whitened vectors are not.
    return x @ x.T


def test_whitening_matches_numpy_with_more_rows_than_dims() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(200, 6)) * np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.1]) + 2.0
    queries = rng.normal(size=(7, 6))
    whitening = fit_whitening(train, dim=4, block_rows=64)  # blockwise covariance
    got = whitening.apply(queries, block_rows=3)
    expected = _direct(train, queries, 4)
    assert got.shape == (7, 4) and got.dtype == np.float32
    np.testing.assert_allclose(np.abs(got), np.abs(expected), atol=1e-5)
    np.testing.assert_allclose(_gram(got), _gram(expected), atol=1e-5)
    # The training set comes out with identity covariance (before normalisation).
    centred = (train - whitening.mean) @ whitening.projection
    np.testing.assert_allclose(np.cov(centred, rowvar=False, bias=True), np.eye(4), atol=1e-9)


def test_whitening_with_fewer_rows_than_dims_is_capped_at_the_rank() -> None:
    rng = np.random.default_rng(1)
    train = rng.normal(size=(5, 12))
    queries = rng.normal(size=(3, 12))
    whitening = fit_whitening(train)  # all dimensions: rank of 5 centred rows is 4
    assert whitening.dim == 4
    np.testing.assert_allclose(_gram(whitening.apply(queries)), _gram(_direct(train, queries, 4)), atol=1e-5)
    assert fit_whitening(train, dim=2).dim == 2
    with pytest.raises(ValueError, match="at least 2"):
        fit_whitening(train[:1])
    with pytest.raises(ValueError, match="all database descriptors are equal"):
        fit_whitening(np.ones((4, 3)))


def _store(path: Path, vectors: np.ndarray) -> FeatureStore:
    fingerprint = {"family": "test", "global_dim": vectors.shape[1], "local_dim": 0}
    store = FeatureStore(path, fingerprint)
    ids = [f"{i:03d}" for i in range(len(vectors))]
    store.write_chunk(ids, [ImageFeatures(local=None, global_descriptor=v.astype(np.float32)) for v in vectors])
    store.finalize()
    return store


def test_whitened_stores_are_fitted_on_the_database_and_cached(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    train, queries = rng.normal(size=(40, 8)), rng.normal(size=(6, 8))
    stores = {"train": _store(tmp_path / "train", train), "test": _store(tmp_path / "test", queries)}
    logged: list[str] = []
    views = whiten_for_run(stores, "train", 3, log=logged.append)
    np.testing.assert_allclose(
        _gram(np.asarray(views["test"].global_descriptors())), _gram(_direct(train, queries, 3)), atol=1e-5
    )
    assert views["test"].ids == stores["test"].ids  # everything else is the store's
    assert (tmp_path / "train" / "derived" / "whitening.npz").is_file()
    assert len(logged) == 1 and "8 -> 3 dims" in logged[0]
    fit = ensure_whitening(stores["train"], 3, log=logged.append)  # cached: no new fit
    again = whiten_stores(stores, fit)  # the fit given, not loaded again
    assert len(logged) == 1
    np.testing.assert_array_equal(again["test"].global_descriptors(), views["test"].global_descriptors())
    whiten_for_run(stores, "train", 5, log=logged.append)  # another dimension: refitted
    assert len(logged) == 2 and whiten_for_run(stores, "train", 0) is stores
