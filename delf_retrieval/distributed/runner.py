"""A whole recognition or retrieval run on Ray: the :class:`~delf_retrieval.tasks.run.Runner`
that extracts with a :class:`~.extraction.RayExtractorPool` and searches with
:class:`~.sharded.ShardedIndex`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

from delf_retrieval.distributed.cluster import local_cpus, ray_session
from delf_retrieval.distributed.extraction import RayExtractorPool
from delf_retrieval.distributed.sharded import ShardedIndex, index_file
from delf_retrieval.features.images import ImageSource
from delf_retrieval.features.store import FeatureStore
from delf_retrieval.models.base import Extractor, ExtractorParams
from delf_retrieval.models.extract import ExtractionSummary
from delf_retrieval.search.index import SearchIndex
from delf_retrieval.search.stores import exact_index

__all__ = ["RayRunner"]


class RayRunner:
    """Extraction and search of :func:`delf_retrieval.recognize` /
    :func:`~delf_retrieval.retrieve` on Ray (``--ray`` on the command line).

    :meth:`extract_to_store` runs on the pool's actors (one pool for every image set).
    :meth:`index` builds the search index of a store: with ``num_shards > 1`` a
    :class:`ShardedIndex` over its global descriptor file, else the exact local index.
    Building a sharded index stops the extraction actors (their CPUs/GPUs go to the
    shard actors; a later extraction starts them again); one sharded index lives at a
    time and is reused while its store file is unchanged.

    Examples
    --------
    >>> with RayRunner("opencv-sift", None, address="local", num_shards=2) as runner:  # doctest: +SKIP
    ...     pipeline.recognize(data, "opencv-sift", runner=runner)
    """

    def __init__(
        self,
        model_spec: str | os.PathLike,
        params: ExtractorParams | None = None,
        *,
        address: str | None = None,
        num_workers: int | None = None,
        num_shards: int = 1,
        num_gpus_per_worker: float | str = "auto",
        num_cpus_per_worker: float = 1.0,
    ) -> None:
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        self.pool = RayExtractorPool(
            model_spec,
            params,
            num_workers=num_workers,
            num_gpus_per_worker=num_gpus_per_worker,
            num_cpus_per_worker=num_cpus_per_worker,
        )
        self.num_shards = num_shards
        self._indexes: dict[tuple[Any, ...], ShardedIndex] = {}
        self._closed_searches = 0
        self._exit = contextlib.ExitStack()
        self._exit.enter_context(ray_session(address, num_cpus=local_cpus(num_workers, num_cpus_per_worker)))

    @property
    def sharded_searches(self) -> int:
        """Searches that ran on shard actors (the others ran locally)."""
        return self._closed_searches + sum(index.searches for index in self._indexes.values())

    def extract_to_store(
        self,
        extractor: Extractor | None,
        sources: Sequence[ImageSource],
        store: FeatureStore,
        **options: Any,
    ) -> ExtractionSummary:
        """:meth:`RayExtractorPool.extract_to_store` (keyword arguments as there)."""
        return self.pool.extract_to_store(extractor, sources, store, **options)

    def index(self, store: FeatureStore, block_size: int) -> SearchIndex:
        """Exact cosine index over ``store``'s global descriptors, sharded over Ray."""
        if self.num_shards <= 1:
            return exact_index(store, block_size)
        self.pool.close()
        path, shape, dtype = index_file(store)
        key = (path, os.stat(path).st_mtime_ns, shape, dtype, block_size)
        if key not in self._indexes:
            # One sharded index at a time: its actors hold the CPUs the next one needs.
            self._close_indexes()
            self._indexes[key] = ShardedIndex(path, self.num_shards, block_size=block_size)
        return self._indexes[key]

    def _close_indexes(self) -> None:
        for sharded in self._indexes.values():
            self._closed_searches += sharded.searches
            sharded.close()
        self._indexes = {}

    def close(self) -> None:
        """Stop every actor and the Ray connection this runner made."""
        self._close_indexes()
        self.pool.close()
        self._exit.close()

    def __enter__(self) -> RayRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
