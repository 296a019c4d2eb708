"""Exact cosine (inner-product) top-k search over a database that may not fit in memory.

The database is read block by block (an ``np.memmap`` works, float32 or float16), each
block is multiplied with a block of queries, and the best ``k`` of every block are merged
into a running top-k. Results are exact and deterministic: rows are sorted by similarity,
descending, and equal similarities are ordered by the smaller database index first, also
when the tie straddles a block boundary or a shard boundary (see :func:`merge_topk`).

Non-finite values: a similarity that is NaN or infinite (a database row or a query
holding NaN or inf) counts as ``-inf``. Such rows rank after every finite one, ties by
the smaller index as always, so every returned id is a real row; their similarity is
reported as ``-inf``. Finite inputs pay nothing for this: the check looks at each block's
k best values only, and a block is cleaned only when one of those is not finite.

Every index backend has the interface of a faiss index, :class:`SearchIndex`:
``index.search(queries, k) -> (similarities, ids)``. :class:`CosineIndex` is the exact
local one (numpy or faiss per block); ``delf_retrieval.distributed.ShardedIndex`` splits
the same search over Ray actors.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np

from delf_retrieval.features.containers import l2_normalize

__all__ = ["BACKENDS", "CosineIndex", "SearchIndex", "check_queries", "cosine_topk", "merge_topk"]

BACKENDS = ("numpy", "faiss")

# Id written into padding slots of a running top-k; sorts after every real id on ties.
_PAD_ID = np.iinfo(np.int64).max
# float64 elements of one chunk of the exact re-scoring (32 MB).
_RESCORE_ELEMENTS = 1 << 22
# Rows per argpartition call in the dense selection (bounds its int64 temporary).
_SELECT_ROWS = 64
# The cheap "beats the running k-th best" filter is used while it keeps at most this
# many candidates per query and block (times k); otherwise the block is reduced densely.
_SPARSE_FACTOR = 4


class SearchIndex(Protocol):
    """What every search backend provides (the faiss convention).

    ``search(queries [Q, D], k)`` returns ``similarities`` float32 ``[Q, min(k, N)]``,
    descending along each row, and ``ids`` int64 of the same shape: database rows,
    equal similarities listing the smaller row first. ``len(index)`` is ``N``.
    """

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def __len__(self) -> int: ...


def cosine_topk(
    queries: np.ndarray,
    index: np.ndarray,
    k: int,
    *,
    block_size: int = 65536,
    query_block_size: int = 1024,
    normalize: bool = False,
    backend: str = "numpy",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k database rows by inner product (cosine for L2-normalised rows).

    Parameters
    ----------
    queries : float array [Q, D]
        Query descriptors (converted to float32).
    index : float32 or float16 array [N, D]
        Database descriptors. May be an ``np.memmap``: it is read ``block_size`` rows at a
        time and each block is converted to float32, so memory stays about one block.
    k : int
        Neighbours per query (at least 1); ``min(k, N)`` are returned.
    block_size : int
        Database rows per block.
    query_block_size : int
        Queries multiplied at once; the similarity buffer is
        ``query_block_size * block_size`` float32.
    normalize : bool
        L2-normalise the queries and every database block first (for rows that are not
        normalised already; costs a copy of each block).
    backend : {"numpy", "faiss"}
        ``"faiss"`` computes each block's top-k with ``faiss.knn`` (exact inner product,
        optional extra ``faiss-cpu``). Both backends report the same similarities (see
        Returns); their ids agree except between near-ties at the k-th place.
    progress : bool
        Show a progress bar over database blocks (on stderr).

    Returns
    -------
    similarities : float32 [Q, min(k, N)]
        Descending along each row; each is the float32 rounding of the float64 inner
        product of the query and the row, so it does not depend on the other queries, the
        block sizes or the backend.
    indices : int64 [Q, min(k, N)]
        Database rows; equal similarities list the smaller index first.

    Raises
    ------
    ValueError
        For arrays that are not 2-D, differing widths ``D``, ``k < 1``, non-positive block
        sizes or an unknown backend.
    ImportError
        For ``backend="faiss"`` without faiss installed.
    """
    queries = _as_2d_float(queries, "queries")
    index = _check_index(index)
    _check_k(k)
    if block_size < 1 or query_block_size < 1:
        raise ValueError(
            f"block_size and query_block_size must be >= 1, got {block_size}, {query_block_size}"
        )
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "faiss":
        _import_faiss()
    if queries.shape[1] != index.shape[1]:
        raise ValueError(
            f"queries have dimension {queries.shape[1]} but the index has {index.shape[1]}"
        )
    num_queries, num_rows = queries.shape[0], index.shape[0]
    kk = min(k, num_rows)
    if num_queries == 0 or num_rows == 0:
        return np.zeros((num_queries, kk), np.float32), np.zeros((num_queries, kk), np.int64)

    queries = np.asarray(queries, dtype=np.float32)
    if normalize:
        queries = l2_normalize(queries)
    block_topk = (
        _faiss_block_topk()
        if backend == "faiss"
        else _numpy_block_topk(min(query_block_size, num_queries), min(block_size, num_rows))
    )
    best_sims = np.full((num_queries, kk), -np.inf, np.float32)
    best_ids = np.full((num_queries, kk), _PAD_ID, np.int64)
    for start, block in _progress(_blocks(index, block_size, normalize), num_rows, progress):
        for q0 in range(0, num_queries, query_block_size):
            q1 = min(q0 + query_block_size, num_queries)
            best_sims[q0:q1], best_ids[q0:q1] = block_topk(
                queries[q0:q1], block, start, best_sims[q0:q1], best_ids[q0:q1]
            )
    return _exact_topk(queries, index, best_sims, best_ids, normalize)


def _exact_topk(
    queries: np.ndarray, index: np.ndarray, sims: np.ndarray, ids: np.ndarray, normalize: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The selected rows re-scored exactly, and sorted again with the tie rule.

    The block products (BLAS ``sgemm``, or faiss) sum in an order that depends on how many
    queries are multiplied together, on the block sizes and on the library (measured here
    with OpenBLAS: one query alone and the same query among ten differ in the last float32
    bits). Each returned similarity is instead the float32 rounding of the float64 inner
    product of the float32 query and database row (products of float32 values are exact
    in float64; each row's sum runs over ``D`` in one fixed order). A query therefore gets
    the same numbers alone (``predict``) as in a batch run, with any backend or shard count.
    Rows whose block similarity was not finite keep ``-inf``.
    """
    num_queries, kk = ids.shape
    if num_queries == 0 or kk == 0:
        return sims, ids
    width = queries.shape[1]
    exact = sims.copy()
    chunk = max(1, _RESCORE_ELEMENTS // (kk * width))
    for q0 in range(0, num_queries, chunk):
        q1 = min(q0 + chunk, num_queries)
        live = np.isfinite(sims[q0:q1])
        rows = np.where(live, ids[q0:q1], 0)
        gathered = np.asarray(index[rows.ravel()], np.float32)
        if normalize:
            gathered = l2_normalize(gathered)
        products = gathered.reshape(q1 - q0, kk, width).astype(np.float64)
        products *= queries[q0:q1, None, :].astype(np.float64)
        rescored = products.sum(axis=2).astype(np.float32)
        exact[q0:q1] = np.where(live, rescored, sims[q0:q1])
    order = np.lexsort((ids, -exact), axis=1)
    return np.take_along_axis(exact, order, axis=1), np.take_along_axis(ids, order, axis=1)


def merge_topk(
    partials: Sequence[tuple[np.ndarray, np.ndarray]], k: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Merge top-k lists of the same queries into one, with the same tie rule.

    Used to combine blocks, shards or workers: every partial holds global database ids.

    Parameters
    ----------
    partials : sequence of (similarities float [Q, k_i], ids int [Q, k_i])
        Partial results for the same ``Q`` queries, in any order.
    k : int, optional
        Neighbours to keep; default ``max(k_i)``. At most ``sum(k_i)`` are returned.

    Returns
    -------
    similarities : float32 [Q, min(k, sum k_i)]
        Descending along each row.
    indices : int64 [Q, min(k, sum k_i)]
        Equal similarities list the smaller id first.
    """
    if len(partials) == 0:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64)
    sims_list, ids_list = [], []
    for i, (sims, ids) in enumerate(partials):
        sims, ids = np.asarray(sims), np.asarray(ids)
        if sims.ndim != 2 or sims.shape != ids.shape:
            raise ValueError(
                f"partial {i}: similarities {sims.shape} and ids {ids.shape} must be equal 2-D shapes"
            )
        sims_list.append(sims.astype(np.float32, copy=False))
        ids_list.append(ids.astype(np.int64, copy=False))
    num_queries = sims_list[0].shape[0]
    if any(s.shape[0] != num_queries for s in sims_list):
        raise ValueError(
            f"partials disagree on the number of queries: {[s.shape[0] for s in sims_list]}"
        )
    if k is None:
        k = max(s.shape[1] for s in sims_list)
    _check_k(k)
    total = sum(s.shape[1] for s in sims_list)
    kk = min(k, total)
    sims = np.concatenate(sims_list, axis=1)
    ids = np.concatenate(ids_list, axis=1)
    rows = np.repeat(np.arange(num_queries), total)
    return _select_sorted(rows, sims.ravel(), ids.ravel(), num_queries, kk)


class CosineIndex:
    """A minimal faiss-like exact index built on :func:`cosine_topk`.

    In-memory arrays are copied on :meth:`add`; ``np.memmap`` arrays are kept as they
    are (not copied, read block by block at search time), so a database larger than
    memory can be searched.

    Parameters
    ----------
    dim : int, optional
        Descriptor width; taken from the first :meth:`add` when omitted.
    normalize : bool
        L2-normalise added vectors and queries at search time.
    block_size, backend
        Passed to :func:`cosine_topk`.

    Examples
    --------
    >>> index = CosineIndex(4)
    >>> index.add(np.eye(4, dtype=np.float32))
    >>> sims, ids = index.search(np.array([[0.0, 1.0, 0.0, 0.0]], np.float32), 2)
    >>> ids.tolist()
    [[1, 0]]
    """

    def __init__(
        self,
        dim: int | None = None,
        *,
        normalize: bool = False,
        block_size: int = 65536,
        backend: str = "numpy",
    ) -> None:
        if dim is not None and dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        self.d = dim
        self.normalize = normalize
        self.block_size = block_size
        self.backend = backend
        self._chunks: list[np.ndarray] = []

    @property
    def ntotal(self) -> int:
        """Number of vectors added."""
        return sum(chunk.shape[0] for chunk in self._chunks)

    def add(self, vectors: np.ndarray) -> None:
        """Append ``vectors`` (float [n, d]; an ``np.memmap`` is referenced, not copied)."""
        if isinstance(vectors, np.memmap):
            vectors = _check_index(vectors)
        else:
            vectors = np.array(_as_2d_float(vectors, "vectors"), dtype=np.float32, copy=True)
        if self.d is None:
            self.d = vectors.shape[1]
        if vectors.shape[1] != self.d:
            raise ValueError(f"vectors have dimension {vectors.shape[1]}, the index has {self.d}")
        if vectors.shape[0]:
            self._chunks.append(vectors)

    def reset(self) -> None:
        """Remove every vector."""
        self._chunks = []

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ids by cosine similarity, as :func:`cosine_topk` returns them.

        Returns
        -------
        similarities : float32 [Q, min(k, ntotal)]
        ids : int64 [Q, min(k, ntotal)]
            Positions in the order vectors were added.
        """
        queries = check_queries(queries, k, self.d)
        self._consolidate()
        partials = []
        offset = 0
        for chunk in self._chunks:
            sims, ids = cosine_topk(
                queries,
                chunk,
                k,
                block_size=self.block_size,
                normalize=self.normalize,
                backend=self.backend,
            )
            partials.append((sims, ids + offset))
            offset += chunk.shape[0]
        if not partials:
            return np.zeros((queries.shape[0], 0), np.float32), np.zeros(
                (queries.shape[0], 0), np.int64
            )
        return merge_topk(partials, k)

    def _consolidate(self) -> None:
        """Join runs of consecutive in-memory chunks into one array (fewer, larger searches)."""
        merged: list[np.ndarray] = []
        run: list[np.ndarray] = []
        for chunk in [*self._chunks, None]:
            if chunk is not None and not isinstance(chunk, np.memmap):
                run.append(chunk)
                continue
            if run:
                merged.append(run[0] if len(run) == 1 else np.concatenate(run))
                run = []
            if chunk is not None:
                merged.append(chunk)
        self._chunks = merged

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        return f"CosineIndex(d={self.d}, ntotal={self.ntotal}, backend={self.backend!r})"


# --- helpers -------------------------------------------------------------------------------

_BlockTopk = Callable[
    [np.ndarray, np.ndarray, int, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]
]


def check_queries(queries: np.ndarray, k: int, dim: int | None) -> np.ndarray:
    """``queries`` as a real 2-D array [Q, D] after checking it and ``k`` for an index of
    width ``dim`` (None: any); ValueError saying what is wrong otherwise."""
    queries = _as_2d_float(queries, "queries")
    _check_k(k)
    if dim is not None and queries.shape[1] != dim:
        raise ValueError(f"queries have dimension {queries.shape[1]}, the index has {dim}")
    return queries


def _as_2d_float(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, D], got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    return array


def _check_index(index: np.ndarray) -> np.ndarray:
    # np.asarray would turn an np.memmap into a view that still reads lazily, but keep
    # the object itself so that nothing is loaded here.
    if not isinstance(index, np.ndarray):
        index = np.asarray(index)
    return _as_2d_float(index, "index")


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")


def _blocks(
    index: np.ndarray, block_size: int, normalize: bool
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_row, float32 block)``; a non-float32 index is converted into one
    reused buffer, so only one block is held at a time."""
    num_rows = index.shape[0]
    buffer = None
    for start in range(0, num_rows, block_size):
        stop = min(start + block_size, num_rows)
        raw = index[start:stop]
        if raw.dtype == np.float32:
            block = np.asarray(raw)
        else:
            if buffer is None:
                buffer = np.empty((min(block_size, num_rows), index.shape[1]), np.float32)
            block = buffer[: stop - start]
            np.copyto(block, raw, casting="unsafe")
        if normalize:
            block = l2_normalize(block)
        yield start, block


def _progress(
    blocks: Iterator[tuple[int, np.ndarray]], num_rows: int, enabled: bool
) -> Iterator[tuple[int, np.ndarray]]:
    if not enabled:
        yield from blocks
        return
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        with tqdm(total=num_rows, unit="rows", desc="cosine_topk") as bar:
            for start, block in blocks:
                yield start, block
                bar.update(block.shape[0])
        return
    for start, block in blocks:
        yield start, block
        print(f"\rcosine_topk: {start + block.shape[0]}/{num_rows} rows", end="", file=sys.stderr)
    print(file=sys.stderr)


def _numpy_block_topk(max_queries: int, max_rows: int) -> _BlockTopk:
    """Block step of the numpy backend, with a similarity buffer reused across blocks."""
    buffer = np.empty(max_queries * max_rows, np.float32)

    def step(
        queries: np.ndarray,
        block: np.ndarray,
        start: int,
        best_sims: np.ndarray,
        best_ids: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        sims = buffer[: queries.shape[0] * block.shape[0]].reshape(queries.shape[0], block.shape[0])
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite rows: see the module doc
            np.matmul(queries, block.T, out=sims)
        return _update(sims, start, best_sims, best_ids)

    return step


def _faiss_block_topk() -> _BlockTopk:
    faiss = _import_faiss()

    def step(
        queries: np.ndarray,
        block: np.ndarray,
        start: int,
        best_sims: np.ndarray,
        best_ids: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        kk = min(best_sims.shape[1], block.shape[0])
        # One extra neighbour shows whether the k-th value is tied with a row faiss left
        # out; only such rows are redone with numpy to apply the tie rule exactly.
        sims, ids = faiss.knn(
            np.ascontiguousarray(queries),
            np.ascontiguousarray(block),
            min(kk + 1, block.shape[0]),
            metric=faiss.METRIC_INNER_PRODUCT,
        )
        # faiss leaves NaN rows out (id -1 where fewer than k remain) and ranks +inf
        # first: such queries are redone with numpy, where non-finite counts as -inf.
        odd = ~(np.isfinite(sims).all(axis=1) & (ids >= 0).all(axis=1))
        if sims.shape[1] > kk:
            tied = np.flatnonzero((sims[:, kk] == sims[:, kk - 1]) | odd)
            sims, ids = sims[:, :kk].copy(), ids[:, :kk].copy()
        else:
            tied = np.flatnonzero(odd)
        if tied.size:
            with np.errstate(invalid="ignore", over="ignore"):
                products = queries[tied] @ block.T
            sims[tied], ids[tied] = _dense_topk(_finite_or_minus_inf(products), kk)
        return merge_topk([(best_sims, best_ids), (sims, ids + start)], best_sims.shape[1])

    return step


def _import_faiss():
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "backend='faiss' needs faiss: pip install delf_retrieval[faiss] (or faiss-cpu)"
        ) from error
    return faiss


def _update(
    sims: np.ndarray, start: int, best_sims: np.ndarray, best_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Merge block similarities ``sims`` [q, n] (rows ``start..start+n``) into the running
    top-k ``best_sims``/``best_ids`` [q, k]."""
    num_queries, num_rows = sims.shape
    kk = best_sims.shape[1]
    threshold = best_sims[:, -1]
    if np.isfinite(threshold).all():
        # Every earlier id is smaller than this block's ids, so a block row must beat the
        # running k-th best strictly to enter (NaN never does: it counts as -inf).
        passed = sims > threshold[:, None]
        if np.count_nonzero(passed) <= _SPARSE_FACTOR * num_queries * kk:
            flat = np.flatnonzero(passed)
            entering = sims.ravel()[flat]
            if not np.isposinf(entering).any():
                rows = np.concatenate([np.repeat(np.arange(num_queries), kk), flat // num_rows])
                values = np.concatenate([best_sims.ravel(), entering])
                ids = np.concatenate([best_ids.ravel(), flat % num_rows + start])
                return _select_sorted(rows, values, ids, num_queries, kk)
    block_sims, block_ids = _dense_topk(sims, kk)
    # Partitioning ranks NaN and +inf above everything: if a row holds any, they are
    # among its k best. Only then is the block cleaned and ranked again.
    if np.isnan(block_sims).any() or np.isposinf(block_sims).any():
        block_sims, block_ids = _dense_topk(_finite_or_minus_inf(sims), kk)
    return merge_topk([(best_sims, best_ids), (block_sims, block_ids + start)], kk)


def _finite_or_minus_inf(sims: np.ndarray) -> np.ndarray:
    """``sims`` with NaN and +-inf replaced by -inf, in place (our own buffer)."""
    sims[~np.isfinite(sims)] = -np.inf
    return sims


def _dense_topk(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of every row of ``sims`` [q, n] with the tie rule (ids are columns)."""
    num_queries, num_rows = sims.shape
    if num_rows <= k:
        ids = np.argsort(-sims, axis=1, kind="stable")
        return np.take_along_axis(sims, ids, axis=1), ids.astype(np.int64)
    out_sims = np.empty((num_queries, k), np.float32)
    out_ids = np.empty((num_queries, k), np.int64)
    for r0 in range(0, num_queries, _SELECT_ROWS):
        chunk = sims[r0 : r0 + _SELECT_ROWS]
        ids = np.argpartition(chunk, num_rows - k, axis=1)[:, num_rows - k :]
        values = np.take_along_axis(chunk, ids, axis=1)
        kth = values.min(axis=1)
        # argpartition keeps every value above the k-th but picks arbitrary ones among
        # values equal to it; replace those picks by the smallest tied indices.
        equal_taken = (values == kth[:, None]).sum(axis=1)
        equal_all = (chunk == kth[:, None]).sum(axis=1)
        for r in np.flatnonzero(equal_all > equal_taken):
            above = ids[r][values[r] > kth[r]]
            tied = np.flatnonzero(chunk[r] == kth[r])[: equal_taken[r]]
            ids[r] = np.concatenate([above, tied])
            values[r] = chunk[r, ids[r]]
        order = np.lexsort((ids, -values), axis=1)
        out_ids[r0 : r0 + len(chunk)] = np.take_along_axis(ids, order, axis=1)
        out_sims[r0 : r0 + len(chunk)] = np.take_along_axis(values, order, axis=1)
    return out_sims, out_ids


def _select_sorted(
    rows: np.ndarray, values: np.ndarray, ids: np.ndarray, num_queries: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` of flat candidates ``(row, value, id)``; each row must have >= k."""
    order = np.lexsort((ids, -values, rows))
    rows, values, ids = rows[order], values[order], ids[order]
    first = np.searchsorted(rows, np.arange(num_queries))
    keep = np.arange(rows.shape[0]) - first[rows] < k
    return (
        values[keep].reshape(num_queries, k).astype(np.float32, copy=False),
        ids[keep].reshape(num_queries, k),
    )
