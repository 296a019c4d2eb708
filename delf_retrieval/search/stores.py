"""Searching a feature store: its exact index and the search with alpha-QE/DBA."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from delf_retrieval.config import Config
from delf_retrieval.features.store import FeatureStore
from delf_retrieval.search.expansion import expand_globals
from delf_retrieval.search.index import CosineIndex, SearchIndex

# Builds the search index over a store's global descriptors: (store, block_size) -> index.
IndexFactory = Callable[[FeatureStore, int], SearchIndex]


# --------------------------------------------------------------------------- backends
def exact_index(store: FeatureStore, block_size: int = 65536, *, backend: str = "numpy") -> CosineIndex:
    """Exact cosine index over ``store``'s global descriptors (memory-mapped, not copied).

    ``block_size`` database rows are multiplied at once; ``backend`` is ``"numpy"`` or
    ``"faiss"`` (see :func:`~delf_retrieval.search.index.cosine_topk`).
    """
    index = CosineIndex(block_size=block_size, backend=backend)
    index.add(store.global_descriptors())
    return index


def search_store(
    queries: np.ndarray,
    database: FeatureStore,
    k: int,
    config: Config,
    index_factory: IndexFactory | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows of ``database`` (global cosine) for each query vector.

    Parameters
    ----------
    queries : float [Q, D] global descriptors.
    database : the store searched; its index is built by ``index_factory``
        (default :func:`exact_index`) with ``config.SEARCH_BLOCK_SIZE``.

    Returns
    -------
    similarities : float32 [Q, min(k, N)], descending; rows : int64 [Q, min(k, N)].

    With ``QE_TOP_K`` or ``DBA_TOP_K`` > 0 the queries and the database are first
    augmented (:func:`~delf_retrieval.search.expansion.expand_globals`) and searched
    exactly here, whatever ``index_factory`` says.
    """
    if config.QE_TOP_K or config.DBA_TOP_K:
        # alpha-QE / DBA change the vectors, so the search runs over the augmented ones
        # (exact and local: DBA needs every database vector's neighbours anyway).
        queries, vectors = expand_globals(queries, database.global_descriptors(), config)
        index = CosineIndex(block_size=config.SEARCH_BLOCK_SIZE)
        index.add(vectors)
        return index.search(queries, k)
    index = (index_factory or exact_index)(database, config.SEARCH_BLOCK_SIZE)
    return index.search(queries, k)
