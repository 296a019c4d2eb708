"""Global descriptors for local-only extractors: VLAD over a codebook fitted on the database.

VLAD (Jegou et al. 2010) with intra-normalisation and signed square root (Arandjelovic &
Zisserman 2013): for each codeword, the sum of residuals of the descriptors assigned to
it, each block L2-normalised, power-normalised, then the whole vector L2-normalised.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from delf_retrieval.core.atomic import atomic_write, atomic_write_bytes
from delf_retrieval.core.log import Log
from delf_retrieval.features.containers import l2_normalize
from delf_retrieval.features.store import FeatureStore, ids_hash
from delf_retrieval.search.stores import SearchView

DEFAULT_NUM_CLUSTERS = 64
VLAD = "vlad"  # name of the derived array of VLAD global descriptors in a store
DEFAULT_MAX_SAMPLES = 200_000


def fit_codebook(
    descriptors: np.ndarray,
    num_clusters: int = DEFAULT_NUM_CLUSTERS,
    *,
    iterations: int = 20,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    seed: int = 0,
) -> np.ndarray:
    """k-means codebook of local descriptors (k-means++ seeding, Lloyd iterations).

    Parameters
    ----------
    descriptors : [M, D] local descriptors (a random subset of ``max_samples`` is used).
    num_clusters : K, reduced to M when fewer descriptors are given.

    Returns
    -------
    float32 [K, D] cluster centres, L2-normalised (descriptors live on the unit sphere).
    """
    descriptors = np.asarray(descriptors, dtype=np.float32)
    if descriptors.ndim != 2 or descriptors.shape[0] == 0:
        raise ValueError(f"need a non-empty [M, D] descriptor array, got shape {descriptors.shape}")
    rng = np.random.default_rng(seed)
    if descriptors.shape[0] > max_samples:
        descriptors = descriptors[np.sort(rng.choice(descriptors.shape[0], max_samples, replace=False))]
    num_clusters = min(num_clusters, descriptors.shape[0])
    centres = _kmeans_plus_plus(descriptors, num_clusters, rng)
    squared_norms = (descriptors**2).sum(axis=1)
    for _ in range(iterations):
        assignment = _nearest_centre(descriptors, squared_norms, centres)
        sums = np.zeros_like(centres)
        np.add.at(sums, assignment, descriptors)
        counts = np.bincount(assignment, minlength=num_clusters)
        empty = counts == 0
        if empty.any():
            # Re-seed empty clusters with the points farthest from their centre.
            distance = squared_norms - 2 * np.einsum("ij,ij->i", descriptors, centres[assignment])
            farthest = np.argsort(-distance, kind="stable")[: int(empty.sum())]
            sums[empty] = descriptors[farthest]
            counts[empty] = 1
        new_centres = sums / counts[:, None]
        if np.allclose(new_centres, centres, atol=1e-6):
            centres = new_centres
            break
        centres = new_centres
    return l2_normalize(centres)


def _kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centres = np.empty((k, points.shape[1]), np.float32)
    centres[0] = points[rng.integers(points.shape[0])]
    closest = ((points - centres[0]) ** 2).sum(axis=1)
    for index in range(1, k):
        total = float(closest.sum())
        if total <= 0:
            choice = int(rng.integers(points.shape[0]))
        else:
            choice = int(rng.choice(points.shape[0], p=closest / total))
        centres[index] = points[choice]
        closest = np.minimum(closest, ((points - centres[index]) ** 2).sum(axis=1))
    return centres


def _nearest_centre(points: np.ndarray, squared_norms: np.ndarray, centres: np.ndarray) -> np.ndarray:
    distances = squared_norms[:, None] - 2.0 * points @ centres.T + (centres**2).sum(axis=1)[None, :]
    return np.argmin(distances, axis=1)


def vlad(descriptors: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """VLAD descriptor of one image.

    Parameters
    ----------
    descriptors : [N, D] local descriptors of the image (N may be 0).
    codebook : [K, D] from :func:`fit_codebook`.

    Returns
    -------
    float32 [K * D], L2-normalised (all zeros when the image has no descriptors).
    """
    codebook = np.asarray(codebook, dtype=np.float32)
    descriptors = np.asarray(descriptors, dtype=np.float32)
    num_clusters, dim = codebook.shape
    if descriptors.shape[0] == 0:
        return np.zeros(num_clusters * dim, np.float32)
    if descriptors.shape[1] != dim:
        raise ValueError(f"descriptor width {descriptors.shape[1]} != codebook width {dim}")
    assignment = _nearest_centre(descriptors, (descriptors**2).sum(axis=1), codebook)
    residuals = descriptors - codebook[assignment]
    blocks = np.zeros((num_clusters, dim), np.float32)
    np.add.at(blocks, assignment, residuals)
    blocks = l2_normalize(blocks, axis=1)
    flat = blocks.reshape(-1)
    flat = np.sign(flat) * np.sqrt(np.abs(flat))
    return l2_normalize(flat)


def vlad_many(descriptor_sets: list[np.ndarray], codebook: np.ndarray) -> np.ndarray:
    """:func:`vlad` of several images: float32 [len(descriptor_sets), K * D]."""
    codebook = np.asarray(codebook, dtype=np.float32)
    out = np.zeros((len(descriptor_sets), codebook.size), np.float32)
    for row, descriptors in enumerate(descriptor_sets):
        out[row] = vlad(descriptors, codebook)
    return out


CODEBOOK_FILE = "vlad_codebook.npy"


def ensure_global_descriptors(
    database: FeatureStore,
    others: Sequence[FeatureStore] = (),
    *,
    num_clusters: int = DEFAULT_NUM_CLUSTERS,
    seed: int = 0,
    log: Log = print,
) -> None:
    """Give local-only stores VLAD global descriptors (codebook fitted on ``database``).

    The codebook is saved in the database store and reused; queries and other stores
    are (re-)encoded when their VLAD was made with another codebook. Stores of models
    with a native global descriptor are left alone.
    """
    if database.global_dim:
        return
    codebook = _vlad_codebook(database, num_clusters, seed, log)
    codebook_hash = hashlib.sha1(codebook.tobytes()).hexdigest()[:16]
    for store in (database, *others):
        existing = store.read_derived(VLAD)
        if existing is not None and existing[1].get("codebook") == codebook_hash:
            continue
        vectors = np.zeros((len(store.ids), codebook.size), np.float32)
        for row, image_id in enumerate(store.ids):
            vectors[row] = vlad(store.local_features(image_id).descriptors, codebook)
        store.write_derived(VLAD, vectors.astype(store.dtype), {"codebook": codebook_hash})


def searchable(store: Any) -> Any:
    """The store as the search step sees it: the store itself when its model gives global
    descriptors, else a view (:class:`~delf_retrieval.search.stores.SearchView`) whose
    global descriptors are its VLAD array, made by :func:`ensure_global_descriptors`
    (ValueError when there is none yet). Everything else is the store's."""
    if store.global_dim or isinstance(store, SearchView):
        return store
    derived = store.read_derived(VLAD)
    if derived is None:
        raise ValueError(
            f"feature store {store.path} has no VLAD global descriptors for its images yet: "
            "compute them with delf_retrieval.ensure_global_descriptors"
        )
    return SearchView(store, derived[0], store.path / "derived" / f"{VLAD}.npy")


def _vlad_codebook(database: FeatureStore, num_clusters: int, seed: int, log: Log) -> np.ndarray:
    """The VLAD codebook cached in ``database/derived``, fitted when missing or stale."""
    codebook_path = database.path / "derived" / CODEBOOK_FILE
    codebook_info = database.path / "derived" / "vlad_codebook.json"
    database_hash = ids_hash(database.ids)
    info = json.loads(codebook_info.read_text()) if codebook_info.is_file() else {}
    if codebook_path.is_file() and info.get("ids_hash") == database_hash and info.get("num_clusters") == num_clusters:
        return np.load(codebook_path)
    started = time.perf_counter()
    sample = database.local_descriptor_sample(DEFAULT_MAX_SAMPLES, seed=seed)
    if sample.shape[0] == 0:
        raise ValueError(f"cannot fit a VLAD codebook: store {database.path} has no local descriptors")
    codebook = fit_codebook(sample, num_clusters, seed=seed)
    codebook_path.parent.mkdir(exist_ok=True)
    atomic_write(codebook_path, lambda handle: np.save(handle, codebook))
    record = {"ids_hash": database_hash, "num_clusters": num_clusters, "seed": seed}
    atomic_write_bytes(codebook_info, json.dumps(record).encode())
    log(
        f"VLAD codebook: {codebook.shape[0]} clusters fitted on {sample.shape[0]} descriptors "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return codebook
