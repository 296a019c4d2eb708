"""Exact search sharded over Ray actors, with the index interface of :mod:`..search`.

Each shard actor memory-maps its own row range of an ``.npy`` index file (nothing is
shipped through the object store but the queries and the partial results), runs
:func:`~delf_retrieval.search.index.cosine_topk` on it and returns the top-k with global row
ids; the driver merges them with :func:`~delf_retrieval.search.index.merge_topk`.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np

from delf_retrieval.distributed.cluster import (
    capacity,
    import_ray,
    kill_all,
    node_resources,
    ray_session,
    wait_started,
    where,
)
from delf_retrieval.features.store import FeatureStore
from delf_retrieval.search.index import check_queries, cosine_topk, merge_topk

__all__ = ["ShardedIndex", "shard_bounds", "sharded_cosine_topk"]

DEFAULT_SEARCH_BLOCK_SIZE = 65536
DEFAULT_QUERY_BLOCK_SIZE = 1024
_BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def shard_bounds(num_rows: int, num_shards: int, block_size: int) -> list[tuple[int, int]]:
    """Row ranges ``[(start, stop), ...]`` of the shards of an index.

    Shards start on multiples of ``block_size`` so that each one multiplies exactly the
    blocks :func:`~delf_retrieval.search.index.cosine_topk` multiplies on the whole index (the
    float32 sums of a matrix product depend on its shape). The ``ceil(num_rows /
    block_size)`` blocks are dealt out as evenly as possible; there are fewer shards than
    ``num_shards`` when there are fewer blocks, none for an empty index.

    Examples
    --------
    >>> shard_bounds(10, 3, 2)
    [(0, 2), (2, 6), (6, 10)]
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    num_blocks = -(-num_rows // block_size)
    shards = min(num_shards, num_blocks)
    edges = [(s * num_blocks) // shards * block_size for s in range(shards)] + [num_rows]
    return [(edges[s], min(edges[s + 1], num_rows)) for s in range(shards)]


def index_file(
    source: FeatureStore | str | os.PathLike | np.memmap,
) -> tuple[str, tuple[int, int], str]:
    """``(path, shape, dtype)`` of the ``.npy`` file behind ``source``."""
    if hasattr(source, "global_descriptors_file"):  # a store or a view of one
        source = source.global_descriptors_file()
    if isinstance(source, np.ndarray):
        filename = getattr(source, "filename", None)
        if not isinstance(source, np.memmap) or filename is None:
            raise ValueError(
                "sharded search reads the index from its .npy file: pass a FeatureStore, a "
                "path, or an array from np.load(path, mmap_mode='r'), not an in-memory array"
            )
        path, expected = str(filename), (source.shape, str(source.dtype))
    else:
        path, expected = os.fspath(source), None
    if not Path(path).is_file():
        raise FileNotFoundError(f"index file {path} does not exist")
    try:
        array = np.load(path, mmap_mode="r")
    except ValueError as error:
        raise ValueError(f"{path} is not a .npy array file: {error}") from error
    if array.ndim != 2:
        raise ValueError(f"index {path} must be 2-D [N, D], got shape {array.shape}")
    if expected is not None and expected != (array.shape, str(array.dtype)):
        raise ValueError(f"the memmap is a part of {path}, not the whole file; pass the path")
    return str(Path(path).resolve()), tuple(array.shape), str(array.dtype)


def _default_blas_threads() -> int:
    """BLAS threads of this process's numpy (OpenBLAS reads these variables at import)."""
    for name in _BLAS_THREAD_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _default_cpus_per_shard(nodes: list[dict[str, float]], num_shards: int) -> float:
    """1 CPU per shard, or 1/2, 1/3, ... when that many shards do not fit the nodes."""
    for divisor in range(1, num_shards + 1):
        # Rounded down to Ray's 1e-4 CPU unit (3 x 0.6667 > 2).
        cpus = np.floor(1e4 / divisor) / 1e4
        if capacity(nodes, cpus, 0.0) >= num_shards:
            return float(cpus)
    return 0.0


class _SearchShard:
    """Body of one search actor: rows ``start:stop`` of a memory-mapped ``.npy`` index."""

    def __init__(
        self, path: str, start: int, stop: int, shape: tuple[int, int], dtype: str
    ) -> None:
        array = np.load(path, mmap_mode="r")
        if tuple(array.shape) != tuple(shape) or str(array.dtype) != dtype:
            raise ValueError(
                f"{path} on host {socket.gethostname()} is {array.dtype} {array.shape}, the driver "
                f"saw {dtype} {tuple(shape)}: every node must see the same index file"
            )
        self._rows = array[start:stop]
        self._start = start

    def describe(self) -> dict[str, Any]:
        return where()

    def search(
        self, queries: np.ndarray, k: int, block_size: int, query_block_size: int, normalize: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        sims, ids = cosine_topk(
            queries,
            self._rows,
            k,
            block_size=block_size,
            query_block_size=query_block_size,
            normalize=normalize,
        )
        return sims, ids + self._start


class ShardedIndex:
    """Exact cosine top-k over an ``.npy`` index split between Ray actors, reused per search.

    Results equal :func:`~delf_retrieval.search.index.cosine_topk` on the whole index with the
    same ``block_size``, ``query_block_size`` and ``normalize``, bit for bit and with the
    same tie order, when the shards run on the same kind of CPU with the same BLAS and
    ``blas_threads`` as the local run: shards start on block boundaries
    (:func:`shard_bounds`) and OpenBLAS's float32 sums depend on how a product is split
    between threads, so the shards use as many BLAS threads as this process by default.

    Parameters
    ----------
    source : a :class:`FeatureStore` (its global descriptors, or VLAD for local-only
        models), an ``.npy`` path, or an ``np.load(..., mmap_mode="r")`` array. The file
        must be readable at the same path on every node that hosts a shard.
    num_shards : actors (fewer when the index has fewer than ``num_shards`` blocks).
    address : Ray address to connect to when this process is not connected yet (see
        :func:`ray_session`); that connection is closed with the index.
    num_cpus_per_shard : CPUs reserved per actor; default 1, or less when the cluster has
        fewer CPUs than shards (all shards must fit at once). Actors are spread over nodes.
    blas_threads : BLAS threads per actor; default: this process's count (exact results),
        e.g. ``cores // shards per node`` for speed without over-subscription.
    startup_timeout : seconds to wait for the actors to be placed.
    """

    def __init__(
        self,
        source: FeatureStore | str | os.PathLike | np.memmap,
        num_shards: int,
        *,
        address: str | None = None,
        block_size: int = DEFAULT_SEARCH_BLOCK_SIZE,
        query_block_size: int = DEFAULT_QUERY_BLOCK_SIZE,
        normalize: bool = False,
        num_cpus_per_shard: float | None = None,
        blas_threads: int | None = None,
        startup_timeout: float = 300.0,
    ) -> None:
        if query_block_size < 1:
            raise ValueError(f"query_block_size must be >= 1, got {query_block_size}")
        if blas_threads is not None and blas_threads < 1:
            raise ValueError(f"blas_threads must be >= 1, got {blas_threads}")
        self.path, self.shape, self.dtype = index_file(source)
        self.bounds = shard_bounds(self.shape[0], num_shards, block_size)
        self.block_size = block_size
        self.query_block_size = query_block_size
        self.normalize = normalize
        self.blas_threads = blas_threads or _default_blas_threads()
        self.searches = 0  # calls of search()
        self._exit = contextlib.ExitStack()
        self._actors: list[Any] = []
        if not self.bounds:
            return
        ray = self._exit.enter_context(ray_session(address))
        nodes = node_resources()
        if num_cpus_per_shard is None:
            num_cpus_per_shard = _default_cpus_per_shard(nodes, self.num_shards)
        cpus = sum(node.get("CPU", 0.0) for node in nodes)
        # A request the cluster can never hold would wait forever: refuse it now.
        if (
            num_cpus_per_shard < 0
            or 0 <= capacity(nodes, num_cpus_per_shard, 0.0) < self.num_shards
        ):
            self.close()
            raise ValueError(
                f"{self.num_shards} shards x {num_cpus_per_shard:g} CPU do not fit the Ray cluster "
                f"({cpus:g} CPUs); lower num_cpus_per_shard or num_shards"
            )
        threads = str(self.blas_threads)
        actor_class = ray.remote(_SearchShard).options(
            num_cpus=num_cpus_per_shard,
            scheduling_strategy="SPREAD",
            runtime_env={"env_vars": {name: threads for name in _BLAS_THREAD_VARIABLES}},
        )
        self._actors = [
            actor_class.remote(self.path, start, stop, self.shape, self.dtype)
            for start, stop in self.bounds
        ]
        try:
            wait_started(ray, self._actors, startup_timeout, "search shards")
        except Exception:
            self.close()
            raise

    @property
    def num_shards(self) -> int:
        return len(self.bounds)

    def __len__(self) -> int:
        return self.shape[0]

    def workers(self) -> list[dict[str, Any]]:
        """``{"pid", "node", "host"}`` of each shard actor."""
        if not self._actors:
            return []
        ray = import_ray()
        return ray.get([actor.describe.remote() for actor in self._actors])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows by inner product for each query.

        Parameters
        ----------
        queries : float array [Q, D]
        k : neighbours per query (>= 1).

        Returns
        -------
        similarities : float32 [Q, min(k, N)], descending along each row.
        indices : int64 [Q, min(k, N)], rows of the whole index; ties: smaller row first.
        """
        queries = check_queries(queries, k, self.shape[1])
        self.searches += 1
        kk = min(int(k), self.shape[0])
        if queries.shape[0] == 0 or not self._actors:
            return np.zeros((queries.shape[0], kk), np.float32), np.zeros(
                (queries.shape[0], kk), np.int64
            )
        ray = import_ray()
        shared = ray.put(np.ascontiguousarray(queries, dtype=np.float32))
        refs = [
            actor.search.remote(
                shared, int(k), self.block_size, self.query_block_size, self.normalize
            )
            for actor in self._actors
        ]
        return merge_topk(ray.get(refs), int(k))

    def close(self) -> None:
        """Stop the shard actors (and the Ray connection this index made)."""
        kill_all(self._actors)
        self._actors = []
        self._exit.close()

    def __enter__(self) -> ShardedIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ShardedIndex({self.path!r}, shape={self.shape}, shards={self.bounds})"


def sharded_cosine_topk(
    queries: np.ndarray,
    store_or_array_path: FeatureStore | str | os.PathLike | np.memmap,
    k: int,
    *,
    num_shards: int,
    address: str | None = None,
    block_size: int = DEFAULT_SEARCH_BLOCK_SIZE,
    query_block_size: int = DEFAULT_QUERY_BLOCK_SIZE,
    normalize: bool = False,
    num_cpus_per_shard: float | None = None,
    blas_threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One search with a temporary :class:`ShardedIndex` (same arguments and results).

    Returns
    -------
    similarities : float32 [Q, min(k, N)]
    indices : int64 [Q, min(k, N)]
        Global rows; equal to ``cosine_topk(queries, index, k, block_size=block_size)``.
    """
    with ShardedIndex(
        store_or_array_path,
        num_shards,
        address=address,
        block_size=block_size,
        query_block_size=query_block_size,
        normalize=normalize,
        num_cpus_per_shard=num_cpus_per_shard,
        blas_threads=blas_threads,
    ) as index:
        return index.search(queries, k)
