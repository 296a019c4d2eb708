"""Learned PCA-whitening of global descriptors, fitted on the database store.

PCA-whitening as in cirtorch (filipradenovic/cnnimageretrieval-pytorch,
``cirtorch/utils/whiten.py``, ``pcawhitenlearn`` / ``whitenapply``): centre on the
database mean, project on the covariance eigenvectors with the largest eigenvalues, divide
each coordinate by the square root of its eigenvalue, L2-normalise. It works on any global
descriptor, native (DELG, Keras) or VLAD. The fit is saved with the database store's
derived data next to the VLAD codebook (``derived/whitening.npz``); whitened copies of
every store's descriptors are derived arrays (``derived/whitened.npy``), reused while the
database, the descriptors and the dimension stay the same.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from delf_retrieval.core.atomic import atomic_write, atomic_write_bytes
from delf_retrieval.features.containers import l2_normalize
from delf_retrieval.features.store import FeatureStore, ids_hash
from delf_retrieval.search.stores import SearchView

WHITENING_FILE = "whitening.npz"
WHITENED = "whitened"  # derived array name of the whitened descriptors
RANK_TOLERANCE = 1e-6  # eigenvalues below this fraction of the largest are treated as zero
BLOCK_ROWS = 65536


@dataclass(frozen=True)
class Whitening:
    """A fitted PCA-whitening.

    Attributes
    ----------
    mean : float64 [D], the database mean.
    projection : float64 [D, d], eigenvectors (largest eigenvalue first) divided by the
        square roots of their eigenvalues.
    eigenvalues : float64 [d], of the covariance ``Xc^T Xc / N``.
    """

    mean: np.ndarray
    projection: np.ndarray
    eigenvalues: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.projection.shape[1])

    def apply(self, vectors: np.ndarray, block_rows: int = BLOCK_ROWS) -> np.ndarray:
        """Whiten and L2-normalise ``vectors`` [N, D] (read in blocks): float32 [N, d]."""
        vectors = np.asarray(vectors) if not isinstance(vectors, np.memmap) else vectors
        if vectors.ndim != 2 or vectors.shape[1] != self.mean.shape[0]:
            raise ValueError(f"expected [N, {self.mean.shape[0]}] descriptors, got shape {vectors.shape}")
        out = np.zeros((vectors.shape[0], self.dim), np.float32)
        for start in range(0, vectors.shape[0], block_rows):
            block = np.asarray(vectors[start : start + block_rows], np.float64)
            out[start : start + block.shape[0]] = l2_normalize((block - self.mean) @ self.projection, axis=1)
        return out

    def digest(self) -> str:
        """Short hash of the fit (ties whitened arrays to it)."""
        digest = hashlib.sha1(np.ascontiguousarray(self.mean).tobytes())
        digest.update(np.ascontiguousarray(self.projection).tobytes())
        return digest.hexdigest()[:16]


def fit_whitening(vectors: np.ndarray, dim: int | None = None, block_rows: int = BLOCK_ROWS) -> Whitening:
    """Fit PCA-whitening on database descriptors.

    Parameters
    ----------
    vectors : float [N, D] (may be a memory map; read in blocks when N >= D).
    dim : output dimension d (None or -1: all); capped at the numerical rank of the
        centred data (at most N - 1), since whitening divides by the eigenvalues.

    Returns
    -------
    :class:`Whitening`.
    """
    count, width = vectors.shape
    if count < 2:
        raise ValueError(f"whitening needs at least 2 database descriptors, got {count}")
    if dim is not None and dim != -1 and dim < 1:
        raise ValueError(f"whitening dimension must be >= 1 (or -1 for all), got {dim}")
    mean = np.zeros(width, np.float64)
    for start in range(0, count, block_rows):
        mean += np.asarray(vectors[start : start + block_rows], np.float64).sum(axis=0)
    mean /= count
    if count < width:
        # Few rows: the eigenvectors of Xc^T Xc are the right singular vectors of Xc.
        centred = np.asarray(vectors, np.float64) - mean
        _, singular, right = np.linalg.svd(centred, full_matrices=False)
        eigenvalues, eigenvectors = singular**2 / count, right.T
    else:
        covariance = np.zeros((width, width), np.float64)
        for start in range(0, count, block_rows):
            block = np.asarray(vectors[start : start + block_rows], np.float64) - mean
            covariance += block.T @ block
        covariance /= count
        eigenvalues, eigenvectors = np.linalg.eigh((covariance + covariance.T) / 2)
        order = np.argsort(-eigenvalues, kind="stable")
        eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    rank = int(np.sum(eigenvalues > RANK_TOLERANCE * max(float(eigenvalues[0]), 1e-300)))
    if rank == 0:
        raise ValueError("cannot fit whitening: all database descriptors are equal")
    keep = rank if dim is None or dim == -1 else min(dim, rank)
    eigenvalues = eigenvalues[:keep]
    projection = eigenvectors[:, :keep] / np.sqrt(eigenvalues)[None, :]
    return Whitening(mean=mean, projection=projection, eigenvalues=eigenvalues)


class WhitenedStore(SearchView):
    """A :class:`FeatureStore` whose :meth:`global_descriptors` are whitened; all else delegated."""

    def __init__(self, store: FeatureStore, vectors: np.ndarray) -> None:
        super().__init__(store, vectors, store.path / "derived" / f"{WHITENED}.npy")


def _source_key(store: FeatureStore) -> str:
    """What the store's global descriptors are: native, or VLAD of which codebook."""
    if store.global_dim:
        return "global"
    vlad = store.read_derived("vlad")
    return f"vlad:{vlad[1].get('codebook') if vlad else None}"


def ensure_whitening(database: FeatureStore, dim: int, *, log: Callable[[str], None] = print) -> Whitening:
    """The whitening fitted on ``database``'s global descriptors (loaded when cached)."""
    folder = database.path / "derived"
    path, info_path = folder / WHITENING_FILE, folder / "whitening.json"
    record = {"ids_hash": ids_hash(database.ids), "dim": dim, "source": _source_key(database)}
    if path.is_file() and info_path.is_file() and json.loads(info_path.read_text()) == record:
        with np.load(path) as saved:
            return Whitening(saved["mean"], saved["projection"], saved["eigenvalues"])
    started = time.perf_counter()
    whitening = fit_whitening(database.global_descriptors(), dim)
    folder.mkdir(exist_ok=True)
    arrays = {"mean": whitening.mean, "projection": whitening.projection, "eigenvalues": whitening.eigenvalues}
    atomic_write(path, lambda handle: np.savez(handle, **arrays))
    atomic_write_bytes(info_path, json.dumps(record).encode())
    width = database.global_descriptors().shape[1]
    capped = "" if dim in (-1, whitening.dim) else f" (asked {dim}, capped at the data's rank)"
    log(
        f"whitening: {width} -> {whitening.dim} dims{capped}, fitted on {len(database.ids)} "
        f"database descriptors in {time.perf_counter() - started:.1f} s"
    )
    return whitening


def whiten_stores(stores: Mapping[str, FeatureStore], whitening: Whitening) -> dict[str, WhitenedStore]:
    """Whitened views of every store with ``whitening``, the fit of the database store
    (:func:`ensure_whitening`; the caller keeps it, e.g. to whiten query photos alike).

    The run hook of ``Config.WHITENING_DIM``: call it after
    :func:`delf_retrieval.ensure_global_descriptors` and pass the returned views
    to the search (queries, database and distractors all whitened alike). Whitened arrays
    are cached in each store (``derived/whitened.npy``).
    """
    key = whitening.digest()
    views = {}
    for split, store in stores.items():
        cached = store.read_derived(WHITENED)
        if cached is not None and cached[1].get("whitening") == key and cached[1].get("source") == _source_key(store):
            vectors = cached[0]
        else:
            vectors = whitening.apply(store.global_descriptors()).astype(store.dtype)
            store.write_derived(WHITENED, vectors, {"whitening": key, "source": _source_key(store)})
        views[split] = WhitenedStore(store, vectors)
    return views


def whiten_for_run(
    stores: Mapping[str, FeatureStore], database_split: str, dim: int, *, log: Callable[[str], None] = print
) -> Mapping[str, FeatureStore | WhitenedStore]:
    """The run hook: :func:`whiten_stores` with the fit of ``stores[database_split]`` when
    ``dim`` (``Config.WHITENING_DIM``) is not 0, else ``stores``."""
    return whiten_stores(stores, ensure_whitening(stores[database_split], dim, log=log)) if dim else stores
