"""Searching a feature store: its exact index, and alpha-QE/DBA composed into the search.

:class:`StoreSearch` is the one way a store is searched (batch runs, ``predict``, the
service): the index over the store's global descriptors is built once, and the settings
that change the vectors (DBA on the database, alpha-QE on each query) are part of the
search rather than of its callers (faiss composes transforms the same way,
``IndexPreTransform``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from delf_retrieval.features.store import FeatureStore
from delf_retrieval.search.expansion import alpha_query_expansion, database_augmentation
from delf_retrieval.search.index import CosineIndex, SearchIndex

# Builds the search index over a store's global descriptors: (store, block_size) -> index.
IndexFactory = Callable[[FeatureStore, int], SearchIndex]


@dataclass(frozen=True)
class SearchSettings:
    """What the global search reads of :class:`~delf_retrieval.config.Config`.

    ``block_size`` is ``SEARCH_BLOCK_SIZE`` (database rows multiplied at once);
    ``qe_top_k``/``qe_alpha`` and ``dba_top_k``/``dba_alpha`` are ``QE_TOP_K``,
    ``QE_ALPHA``, ``DBA_TOP_K``, ``DBA_ALPHA`` (see :mod:`delf_retrieval.search.expansion`).
    """

    block_size: int = 65536
    qe_top_k: int = 0
    qe_alpha: float = 3.0
    dba_top_k: int = 0
    dba_alpha: float = 3.0

    @classmethod
    def from_config(cls, config: Any) -> SearchSettings:
        return cls(
            block_size=config.SEARCH_BLOCK_SIZE,
            qe_top_k=config.QE_TOP_K,
            qe_alpha=config.QE_ALPHA,
            dba_top_k=config.DBA_TOP_K,
            dba_alpha=config.DBA_ALPHA,
        )

    @property
    def expands(self) -> bool:
        """Whether alpha-QE or DBA changes the vectors searched."""
        return bool(self.qe_top_k or self.dba_top_k)


def exact_index(store: FeatureStore, block_size: int = 65536, *, backend: str = "numpy") -> CosineIndex:
    """Exact cosine index over ``store``'s global descriptors (memory-mapped, not copied).

    ``block_size`` database rows are multiplied at once; ``backend`` is ``"numpy"`` or
    ``"faiss"`` (see :func:`~delf_retrieval.search.index.cosine_topk`).
    """
    index = CosineIndex(block_size=block_size, backend=backend)
    index.add(store.global_descriptors())
    return index


class SearchView:
    """A feature store searched with other global descriptors than its own (whitened ones,
    a float32 copy): ``global_descriptors()`` returns ``vectors`` [N, d], everything else
    (ids, local features, ``path``, ...) is the store's.

    ``vectors_file`` is the ``.npy`` file holding ``vectors``, for searches in other
    processes (Ray shards open it instead of the store's own arrays).
    """

    def __init__(self, store: Any, vectors: np.ndarray, vectors_file: Path | None = None) -> None:
        if len(vectors) != len(store.ids):
            raise ValueError(f"{len(vectors)} search vectors for the {len(store.ids)} images of {store.path}")
        self.store = store
        self._vectors = vectors
        self._vectors_file = vectors_file

    def global_descriptors(self) -> np.ndarray:
        """The searched vectors ``[N, d]``, rows in :attr:`ids` order."""
        return self._vectors

    def global_descriptors_file(self) -> Path | None:
        """The ``.npy`` file of the searched vectors (None: only in memory)."""
        return self._vectors_file

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.store!r}, dim={self._vectors.shape[1]})"


class StoreSearch:
    """Top-k search of one database store, built once and used for any number of queries.

    Parameters
    ----------
    database : the store searched (anything with ``global_descriptors()`` [N, D]).
    settings : block size and alpha-QE/DBA (:class:`SearchSettings`).
    index_factory : builds the index over ``database`` (default :func:`exact_index`;
        ``RayRunner.index`` shards it over Ray). With alpha-QE or DBA the search runs
        exactly over the augmented vectors here instead (DBA needs every database vector's
        neighbours anyway).

    The index (or the DBA-augmented vectors) is made on the first search and kept.
    """

    def __init__(
        self, database: Any, settings: SearchSettings, index_factory: IndexFactory | None = None
    ) -> None:
        self.database = database
        self.settings = settings
        self.index_factory = index_factory
        self._index: SearchIndex | None = None
        self._augmented: np.ndarray | None = None

    def index(self) -> SearchIndex:
        """The index searched (over the DBA-augmented vectors when expanding)."""
        if self._index is None:
            if self.settings.expands:
                index = CosineIndex(block_size=self.settings.block_size)
                index.add(self.augmented())
                self._index = index
            else:
                self._index = (self.index_factory or exact_index)(self.database, self.settings.block_size)
        return self._index

    def augmented(self) -> np.ndarray:
        """The database vectors after DBA (``dba_top_k = 0``: L2-normalised float32)."""
        if self._augmented is None:
            s = self.settings
            vectors = self.database.global_descriptors()
            self._augmented = database_augmentation(vectors, s.dba_top_k, s.dba_alpha, block_size=s.block_size)
        return self._augmented

    def query_vectors(self, queries: np.ndarray) -> np.ndarray:
        """The vectors searched for ``queries`` [Q, D]: alpha-QE against the augmented
        database when expanding, else the queries as they are."""
        if not self.settings.expands:
            return queries
        s = self.settings
        return alpha_query_expansion(queries, self.augmented(), s.qe_top_k, s.qe_alpha, block_size=s.block_size)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` database rows per query: similarities float32 [Q, min(k, N)],
        descending, and rows int64 [Q, min(k, N)]."""
        return self.index().search(self.query_vectors(queries), k)


def search_store(
    queries: np.ndarray,
    database: FeatureStore,
    k: int,
    settings: SearchSettings,
    index_factory: IndexFactory | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows of ``database`` (global cosine) for each query vector [Q, D], with
    ``settings`` (block size, alpha-QE/DBA): one :class:`StoreSearch`, used once.

    Returns similarities float32 [Q, min(k, N)], descending, and rows int64 [Q, min(k, N)].
    """
    return StoreSearch(database, settings, index_factory).search(queries, k)
