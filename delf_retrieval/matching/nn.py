"""Putative matches of one query image against many candidates in one batched step.

:func:`match_batch` stacks the candidates' descriptors and multiplies them with the
query's in one product per group (``[N1, D] x [D, N2_1 + N2_2 + ...]``), then finds, per
candidate segment of the columns, each query descriptor's nearest and second nearest
neighbour (argmax / ratio test) and each candidate descriptor's nearest query descriptor
(mutual test). The rules are those of :func:`delf_retrieval.matching.verify.putative_matches`.

Precision (``Config.MATCH_DTYPE``):

``"float32"``
    NumPy/BLAS ``sgemm``; equal to :func:`~delf_retrieval.matching.verify.putative_matches`. With
    Numba (extra ``fast``) the product runs in L2-sized tiles of rows, each reduced to
    the row and column statistics the rules need while it is in cache
    (:mod:`delf_retrieval.matching.kernels`), instead of four NumPy passes over the block.
``"int8"``
    The product runs on 8-bit integers through ONNX Runtime's ``MatMulInteger`` (MLAS
    u8 x s8 kernels, ``onnxruntime/core/mlas/lib/qgemm_kernel_avx2.cpp``: ``vpmaddubsw`` +
    ``vpmaddwd`` on AVX2, ``vpdpbusd`` where the CPU has AVX-512/AVX VNNI). Query rows are
    quantised per row to 7 bits (8 when non-negative; the AVX2 u8 x s8 kernel sums pairs
    of products in int16), candidates to 8 bits. The approximate similarities only
    *choose*: a rigorous per-entry error bound from the actual rounding residuals says
    which decisions they cannot settle, and those are settled on exact (float64) dot
    products (:mod:`delf_retrieval.matching.reduced_precision`), so the matches are those of the
    exact similarities by construction. This project's machines (AMD EPYC Zen 3, AVX2
    only: no AVX-512, VNNI, BF16 or AMX) run the int8 product at about 2x the float32
    rate; ``benchmarks/verification.py`` measures the whole step.
``"float16"`` / ``"bfloat16"``
    TensorFlow ``tf.matmul`` in that dtype (for GPUs: Tensor Cores; on these CPUs it is
    slower than float32), with the same certified decisions (bound from the significand
    width).

Device (``Config.MATCH_DEVICE``): ``"cpu"``; ``"gpu"`` runs the product with TensorFlow
on ``/GPU:0`` (every dtype; int8 becomes float16 there); ``"auto"`` picks the GPU when
TensorFlow sees one. :func:`resolve_device` holds that logic.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np

from delf_retrieval.matching.device import resolve_device, tensorflow_device
from delf_retrieval.matching.kernels import (
    TiledProduct,
    numba_available,
    product_stats,
    segment_stats,
    unit_distance,
)
from delf_retrieval.matching.reduced_precision import approximate_group

__all__ = [
    "match_batch",
    "match_products",
    "match_products_threaded",
    "match_segments",
    "quantize_int8",
    "resolve_device",
    "select_matches",
    "tensorflow_device",
]

# Stacked product size per group (elements of the [N1, sum N2] similarity matrix).
_GROUP_ELEMENTS = 1 << 22
# Stacked candidate descriptors per int8 product (ONNX Runtime packs them per call).
_INT8_GROUP_COLUMNS = 2048
# Stacked candidate descriptors per float32 group (BLAS packs them once per row tile).
# Stacking only saves calls for small candidates; a larger one is its own group, read in
# place (a copy into a stacked array costs more than the calls it saves).
_EXACT_GROUP_COLUMNS = 1024


# --------------------------------------------------------------------------- public
def match_batch(
    d1: np.ndarray,
    candidates: Sequence[np.ndarray],
    *,
    max_distance: float = float("inf"),
    mutual: bool = False,
    ratio: float = 1.0,
    dtype: str = "float32",
    device: str = "cpu",
) -> list[np.ndarray]:
    """Putative matches of query descriptors against each candidate's descriptors.

    Parameters
    ----------
    d1 : float32 array [N1, D]
        Query descriptors, L2-normalised, N1 >= 1.
    candidates : sequence of float32 arrays [N2_c, D]
        Candidate descriptors, L2-normalised (empty arrays give no matches).
    max_distance, mutual, ratio
        As :func:`delf_retrieval.matching.verify.putative_matches`.
    dtype : {"float32", "int8", "float16", "bfloat16"}
        Precision of the product (see the module notes).
    device : {"cpu", "gpu", "auto"}

    Returns
    -------
    list of int64 arrays [M_c, 2]
        Per candidate, ``(row of d1, row of the candidate)`` sorted by the first column.
    """
    d1 = np.ascontiguousarray(d1, np.float32)
    where = resolve_device(device)
    results: list[np.ndarray | None] = [None] * len(candidates)
    order = [c for c in range(len(candidates)) if len(candidates[c]) and len(d1)]
    for c in range(len(candidates)):
        if not len(candidates[c]) or not len(d1):
            results[c] = np.zeros((0, 2), np.int64)
    exact = dtype == "float32" and where == "cpu"
    # BLAS (per tile of rows, match_kernels.product_stats) and the int8 kernel (per call)
    # pack the right-hand matrix again each time: groups of at most 1024 / 2048 columns.
    rows = max(len(d1), _GROUP_ELEMENTS // _EXACT_GROUP_COLUMNS) if exact else _GROUP_ELEMENTS // _INT8_GROUP_COLUMNS
    state: dict = {}  # the query's quantisation, made once per call
    for group in _groups([len(candidates[c]) for c in order], rows):
        members = [order[g] for g in group]
        parts = [candidates[c] for c in members]
        stacked = np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts), np.float32)
        bounds = np.cumsum([0] + [len(candidates[c]) for c in members])
        if exact:
            found = _exact_group(d1, stacked, bounds, max_distance, mutual, ratio)
        else:
            found = approximate_group(d1, stacked, bounds, max_distance, mutual, ratio, dtype, where, state)
        for c, matches in zip(members, found, strict=True):
            results[c] = matches
    return [r if r is not None else np.zeros((0, 2), np.int64) for r in results]


def quantize_int8(descriptors: np.ndarray, levels: int = 127) -> tuple[np.ndarray, float]:
    """Symmetric quantisation ``q = rint(x * scale)`` with ``max |q| = levels``.

    Returns ``(int8 [N, D], scale)``; ``x ~ q / scale``.
    """
    peak = float(np.abs(descriptors).max()) if descriptors.size else 0.0
    scale = levels / peak if peak > 0 else 1.0
    return np.rint(descriptors * np.float32(scale)).astype(np.int8), scale


# --------------------------------------------------------------------------- grouping
def _groups(sizes: list[int], rows: int) -> list[list[int]]:
    """Consecutive candidate positions whose stacked product fits ``_GROUP_ELEMENTS``."""
    groups: list[list[int]] = []
    current: list[int] = []
    width = 0
    for position, size in enumerate(sizes):
        if current and (width + size) * rows > _GROUP_ELEMENTS:
            groups.append(current)
            current, width = [], 0
        current.append(position)
        width += size
    if current:
        groups.append(current)
    return groups


# --------------------------------------------------------------------------- exact float32
def _exact_group(d1, stacked, bounds, max_distance, mutual, ratio) -> list[np.ndarray]:
    return match_products(d1, stacked, bounds, max_distance, mutual, ratio)


def match_products(
    d1: np.ndarray,
    stacked: np.ndarray,
    bounds: np.ndarray,
    max_distance: float,
    mutual: bool,
    ratio: float,
) -> list[np.ndarray]:
    """:func:`select_matches` of ``d1`` (float32 ``[N1, D]``, finite, unit rows) against
    each candidate segment ``stacked[bounds[s]:bounds[s + 1]]`` (float32 ``[C, D]``).

    With Numba (extra ``fast``) the product runs in cache-sized tiles of rows, each
    reduced to the statistics the rules need right after it is written
    (:func:`delf_retrieval.matching.kernels.product_stats`); the matches are those of
    ``select_matches`` on the whole block (tested). Without Numba that is what runs.
    """
    if not numba_available():
        sims = d1 @ stacked.T  # [N1, C]: one product for the whole group
        return [select_matches(sims[:, a:b], None, max_distance, mutual, ratio) for a, b in _pairs(bounds)]
    nonnegative = bool(d1.min() >= 0 and stacked.min() >= 0)
    stats = product_stats(d1, stacked, np.asarray(bounds, np.int64), nonnegative)
    return _segments_from_stats(stats, bounds, max_distance, mutual, ratio)


def match_segments(
    sims: np.ndarray,
    bounds: np.ndarray,
    max_distance: float,
    mutual: bool,
    ratio: float,
) -> list[np.ndarray]:
    """:func:`select_matches` of each column segment ``[bounds[s], bounds[s + 1])`` of a
    float32 similarity block ``[N1, C]`` (no NaN; every segment non-empty), from one
    pass over the block (:func:`delf_retrieval.matching.kernels.segment_stats`) when Numba
    is installed."""
    if not numba_available() or sims.dtype != np.float32:
        return [select_matches(sims[:, a:b], None, max_distance, mutual, ratio) for a, b in _pairs(bounds)]
    stats = segment_stats(sims, np.asarray(bounds, np.int64))
    return _segments_from_stats(stats, bounds, max_distance, mutual, ratio)


def _pairs(bounds) -> list[tuple[int, int]]:
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _segments_from_stats(stats, bounds, max_distance, mutual, ratio) -> list[np.ndarray]:
    return [
        _matches_from_stats(
            stats.best[:, s], stats.nearest[:, s], stats.second[:, s], stats.column_max[start:stop],
            max_distance, mutual, ratio,
        )
        for s, (start, stop) in enumerate(_pairs(bounds))
    ]


def _matches_from_stats(best, nearest, second, column_max, max_distance, mutual, ratio) -> np.ndarray:
    """The rules of :func:`select_matches` on per-row statistics of one segment: row
    maximum ``best`` [N1] at ``nearest`` [N1], the maximum ``second`` [N1] without that
    position, and the segment's ``column_max`` [N2]."""
    n1, n2 = len(best), len(column_max)
    rows = np.arange(n1)
    best64 = unit_distance(best.astype(np.float64))
    keep = np.ones(n1, dtype=bool)
    if np.isfinite(max_distance):
        keep &= best64 < max_distance
    passes_ratio = np.ones(n1, dtype=bool)
    if ratio < 1.0 and n2 > 1:
        passes_ratio = best64 < ratio * unit_distance(second.astype(np.float64))
    if mutual:
        keep = _winners_by_column_max(column_max, nearest, best, keep)
    keep &= passes_ratio
    return np.stack([rows[keep], nearest[keep]], axis=1).astype(np.int64)


def select_matches(
    sims: np.ndarray,
    column_max: np.ndarray | None,
    max_distance: float,
    mutual: bool,
    ratio: float,
) -> np.ndarray:
    """Matches from a similarity block ``[N1, N2]`` (used as scratch, restored on return).

    ``column_max`` is ``sims.max(axis=0)`` or None (with ``mutual``, the maxima are then
    taken only over the columns some row could still match: the nearest columns of rows
    passing the distance and ratio tests, a gather instead of a pass over the block when
    they are few). Ties: the smaller index wins (first maximum), and of several rows tied
    for one column only the smallest is kept (even when it then fails the ratio test).
    """
    n1, n2 = sims.shape
    rows = np.arange(n1)
    nearest = sims.argmax(axis=1)
    best = sims[rows, nearest]
    keep = np.ones(n1, dtype=bool)
    if np.isfinite(max_distance):
        keep &= unit_distance(best.astype(np.float64)) < max_distance
    passes_ratio = np.ones(n1, dtype=bool)
    if ratio < 1.0 and n2 > 1:
        sims[rows, nearest] = -np.inf
        second = unit_distance(sims.max(axis=1).astype(np.float64))
        sims[rows, nearest] = best
        passes_ratio = unit_distance(best.astype(np.float64)) < ratio * second
    if mutual:
        keep = _mutual_winners(sims, column_max, nearest, best, keep, keep & passes_ratio)
    keep &= passes_ratio
    return np.stack([rows[keep], nearest[keep]], axis=1).astype(np.int64)


def _mutual_winners(sims, column_max, nearest, best, eligible, claiming) -> np.ndarray:
    """Rows kept by the mutual test: per column, the smallest ``eligible`` row whose
    nearest column it is and whose similarity is the column's maximum. Only columns that
    ``claiming`` rows point at are resolved (the others can give no match)."""
    n1, n2 = sims.shape
    columns = np.unique(nearest[claiming])
    winners = np.zeros(n1, dtype=bool)
    if column_max is None and 3 * len(columns) <= n2:
        block = np.take(sims, columns, axis=1)  # [N1, C]
        candidates = (block == block.max(axis=0)) & (nearest[:, None] == columns) & eligible[:, None]
        found = candidates.any(axis=0)
        winners[candidates.argmax(axis=0)[found]] = True
        return winners
    if column_max is None:
        column_max = sims.max(axis=0)
    return _winners_by_column_max(column_max, nearest, best, eligible)


def _winners_by_column_max(column_max, nearest, best, eligible) -> np.ndarray:
    """Per column, the smallest ``eligible`` row whose nearest column it is and whose
    similarity equals the column maximum."""
    winners = np.zeros(len(best), dtype=bool)
    candidates = np.flatnonzero(eligible & (best == column_max[nearest]))
    _, first = np.unique(nearest[candidates], return_index=True)
    winners[candidates[first]] = True
    return winners


# --------------------------------------------------------------------------- threaded float32
def match_products_threaded(
    d1: np.ndarray,
    sizes: Sequence[int],
    prepare: Callable[[int], np.ndarray],
    *,
    max_distance: float,
    mutual: bool,
    ratio: float,
    workers: int,
    run: Callable[[Callable[[int], None], int], None],
    consume: Callable[[int, np.ndarray], None],
) -> None:
    """:func:`match_batch` (float32, CPU, Numba) of one query over ``workers`` threads in
    fine jobs, with no wait between a candidate's matches and what follows them.

    The candidates are grouped as :func:`match_batch` groups them and each group's product
    is cut into 256-row tiles (:class:`~delf_retrieval.matching.kernels.TiledProduct`). The
    threads first stack every group between them, then take the tiles of all groups in
    order, so both stay busy until the last tile (handing whole candidates to threads instead leaves one idle while the other finishes
    the last candidate: measured 10% of the time at 8-9 candidates per query). The thread
    that finishes a group's last tile derives its candidates' matches and calls
    ``consume`` for each (RANSAC, in :func:`delf_retrieval.matching.verify.count_inliers_many`)
    while the other keeps multiplying. The matches equal :func:`match_batch`'s (the tiles
    are the same; tested).

    Parameters
    ----------
    d1 : float32 [N1, D], finite, unit rows, N1 >= 1.
    sizes : descriptor count of each candidate (before ``prepare``), length C; groups
        are formed from them.
    prepare : position -> float32 ``[M, D]`` descriptors of that candidate, finite, unit
        rows, ``M <= sizes[position]``; called once per candidate with ``sizes > 0``, on
        a worker thread, before any tile is multiplied.
    max_distance, mutual, ratio : as :func:`match_batch`.
    workers : threads, >= 1.
    run : ``run(worker, workers)`` calls ``worker(slot)`` for each ``slot`` in
        ``range(workers)`` concurrently, returns when all have returned and re-raises the
        first error (e.g. ``lambda f, n: list(pool.map(f, range(n)))``).
    consume : ``consume(position, matches)`` with int64 ``[M_c, 2]`` matches, once per
        candidate, on the worker threads (two may run at once); empty candidates on the
        calling thread after ``run``.
    """
    if not numba_available():
        raise RuntimeError("match_products_threaded needs Numba (extra 'fast')")
    order = [c for c in range(len(sizes)) if sizes[c] > 0]
    rows = max(len(d1), _GROUP_ELEMENTS // _EXACT_GROUP_COLUMNS)
    groups = [_TileGroup([order[g] for g in group]) for group in _groups([sizes[c] for c in order], rows)]
    tiles = TiledProduct.count(len(d1))
    query_nonnegative = bool(d1.min() >= 0)
    jobs = [(group, tile) for group in groups for tile in range(tiles)]
    lock = threading.Lock()
    unprepared, taken = iter(groups), iter(jobs)
    failed = threading.Event()

    def worker(slot: int) -> None:
        try:
            # Stack every group first, shared between the threads: a thread that met a
            # group still being stacked by the other would wait for it (about a tenth of
            # a 1000 x 1000 product, once per group).
            while not failed.is_set():
                with lock:
                    group = next(unprepared, None)
                if group is None:
                    break
                group.stack(d1, query_nonnegative, prepare, workers, consume)
            while not failed.is_set():
                with lock:
                    job = next(taken, None)
                if job is None:
                    return
                group, tile = job
                group.stack(d1, query_nonnegative, prepare, workers, consume)  # waits if the other thread is at it
                product = group.product
                if product is not None:
                    product.run_tile(tile, slot, product.thread_buffer())
                if group.tile_done(tiles) and product is not None:
                    found = _segments_from_stats(product.stats(), product.bounds, max_distance, mutual, ratio)
                    for position, matches in zip(group.present, found, strict=True):
                        consume(position, matches)
                    group.release()
        except BaseException:
            failed.set()
            raise

    run(worker, workers)
    for position, size in enumerate(sizes):
        if size <= 0:
            consume(position, np.zeros((0, 2), np.int64))


class _TileGroup:
    """One group of :func:`match_products_threaded`: its candidates, stacked once, and how
    many of its tiles are done."""

    def __init__(self, members: list[int]):
        self.members = members
        self.present: list[int] = []  # members left with descriptors after prepare
        self.product: TiledProduct | None = None  # set by stack()
        self._prepared = False
        self._lock = threading.Lock()
        self._done = 0

    def stack(self, d1, query_nonnegative, prepare, slots, consume) -> None:
        """Prepare the members and set up the group's tiled product (None when no member
        has descriptors left); once, whichever thread calls first."""
        with self._lock:
            if not self._prepared:
                parts = []
                for position in self.members:
                    descriptors = prepare(position)
                    if len(descriptors):
                        self.present.append(position)
                        parts.append(descriptors)
                    else:
                        consume(position, np.zeros((0, 2), np.int64))
                if parts:
                    stacked = np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts), np.float32)
                    bounds = np.cumsum([0] + [len(p) for p in parts])
                    nonnegative = query_nonnegative and bool(stacked.min() >= 0)
                    self.product = TiledProduct(d1, stacked, bounds, nonnegative, slots)
                self._prepared = True

    def tile_done(self, tiles: int) -> bool:
        """Count one finished tile; True for the group's last."""
        with self._lock:
            self._done += 1
            return self._done == tiles

    def release(self) -> None:
        self.product = None
