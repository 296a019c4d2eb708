"""One pass over a similarity block: per-row best, its position and the second best per
candidate segment, and the column maxima.

These are the only quantities the matching rules need (:func:`delf_retrieval.matching.nn.
select_matches`: nearest neighbour, ratio test, mutual test). NumPy needs four passes
over the ``[N1, N2]`` block for them (argmax, a gather, a max with the argmax masked,
a column max) and writes the block twice; the compiled kernel here (Numba, optional extra
``fast``) reads each row once for the column maxima and row maximum, then re-reads it
from the L1 cache for the position and the second best, so the step costs little next to
the product that made the block. Without Numba the NumPy passes give the same values.

Values are compared as 32-bit integer keys: an int32 block as it is; a float32 block
through an order-preserving map of its bit patterns (non-negative floats unchanged, a
negative one becomes minus its magnitude's bits, so ``-0.0`` and ``+0.0`` are both 0),
so that the vectorised AVX2 integer maximum applies (Numba does not vectorise float
maxima). Rows must be NaN-free (the callers drop non-finite rows).
Ties: the first (smallest) column wins, and a repeated maximum is its own second best,
as with ``argmax`` and a masked ``max``.
"""

from __future__ import annotations

import os
import threading

import numpy as np

__all__ = ["SegmentStats", "TiledProduct", "numba_available", "product_stats", "segment_stats"]

_LOW = np.int32(np.iinfo(np.int32).min)
# Rows of one product tile in product_stats. Each BLAS call packs the whole right-hand
# matrix again, so small tiles cost more than they save in cache misses; 256 rows (2 MiB
# at 2048 columns) measured best on 1 and 2 cores (benchmarks/verification.py pairs). It is
# fixed, not derived from the width: BLAS rounds an entry the same way whenever its tile
# has the same height, so a pair matched alone and inside a stacked group agree.
_TILE_ROWS = 256


class SegmentStats:
    """Per-row statistics of a block ``[N1, C]`` cut into S column segments.

    Attributes
    ----------
    best : array [N1, S], the block's dtype
        Row maximum within each segment.
    nearest : int64 [N1, S]
        Its first position, counted from the segment's first column.
    second : array [N1, S]
        Maximum over the segment without that position (``-inf`` / the dtype's minimum
        for a one-column segment).
    column_max : array [C]
        Column maxima over all rows.
    """

    __slots__ = ("best", "column_max", "nearest", "second")

    def __init__(self, best, nearest, second, column_max):
        self.best, self.nearest, self.second, self.column_max = best, nearest, second, column_max


def numba_available() -> bool:
    """True when the compiled kernel is used (Numba importable, ``DELF_RETRIEVAL_NO_NUMBA``
    not set)."""
    return _kernel() is not None


def segment_stats(block: np.ndarray, bounds: np.ndarray, nonnegative: bool = False) -> SegmentStats:
    """Statistics of ``block`` (float32 or int32 ``[N1, C]``, no NaN) per segment
    ``[bounds[s], bounds[s + 1])`` (``bounds``: int64 ``[S + 1]``, ``bounds[0] = 0``,
    ``bounds[-1] = C``, every segment non-empty).

    ``nonnegative=True`` promises a float32 block without negative values or ``-0.0`` (a
    product of non-negative descriptors): their bit patterns then order as the values do,
    and the key map is skipped (about a third of the kernel's work)."""
    if block.dtype not in (np.float32, np.int32):
        raise TypeError(f"similarity blocks are float32 or int32, got {block.dtype}")
    bounds = np.asarray(bounds, np.int64)
    if _kernel() is None or block.shape[0] == 0:
        return _numpy_stats(block, bounds)
    block = np.ascontiguousarray(block)
    rows, segments = block.shape[0], len(bounds) - 1
    best = np.empty((rows, segments), np.int32)
    second = np.empty((rows, segments), np.int32)
    nearest = np.empty((rows, segments), np.int64)
    column_max = np.full(block.shape[1], _LOW, np.int32)
    use_keys = block.dtype == np.float32 and not nonnegative
    _kernel()(block.view(np.int32), bounds, use_keys, best, nearest, second, column_max)
    if block.dtype == np.int32:
        return SegmentStats(best, nearest, second, column_max)
    return _float_stats(best, nearest, second, column_max, bounds, use_keys)


def product_stats(d1: np.ndarray, d2: np.ndarray, bounds: np.ndarray, nonnegative: bool = False) -> SegmentStats:
    """:func:`segment_stats` of the similarity block ``d1 @ d2.T`` without materialising it.

    ``d1`` float32 ``[N1, D]``, ``d2`` float32 ``[C, D]`` (rows stacked per segment).
    With Numba the product runs in tiles of rows that fit the L2 cache, each reduced right
    after BLAS writes it into one reused buffer: faster than the bare product alone, which
    writes (and page-faults) a fresh ``[N1, C]`` array in main memory. Without Numba: the
    whole product, then the NumPy passes.
    """
    if _kernel() is None or len(d1) == 0:
        return segment_stats(d1 @ d2.T, bounds, nonnegative)
    product = TiledProduct(d1, d2, bounds, nonnegative)
    buffer = product.thread_buffer()
    for tile in range(product.tiles):
        product.run_tile(tile, 0, buffer)
    return product.stats()


# One tile buffer per thread, kept across calls (a fresh one page-faults on every query).
_TILE_BUFFERS = threading.local()


class TiledProduct:
    """:func:`product_stats` cut into jobs: tile ``t`` is rows ``[256 t, 256 (t + 1))`` of
    ``d1 @ d2.T``, multiplied into a caller's buffer and reduced at once. Tiles write
    disjoint rows of the row statistics and their own slot's column maxima, so different
    threads (one ``slot`` each, ``0 <= slot < slots``) may run different tiles at the same
    time; :meth:`stats` merges the slots (a maximum) once every tile has run. Needs Numba.
    The tiles are those of :func:`product_stats`, so the values are the same.
    """

    def __init__(self, d1: np.ndarray, d2: np.ndarray, bounds: np.ndarray, nonnegative: bool = False, slots: int = 1):
        self.d1, self.right = d1, d2.T
        self.bounds = np.asarray(bounds, np.int64)
        self.use_keys = not nonnegative
        rows, segments = len(d1), len(self.bounds) - 1
        self.tiles = self.count(rows)
        self.buffer_elements = min(rows, _TILE_ROWS) * len(d2)
        self.width = len(d2)
        self.best = np.empty((rows, segments), np.int32)
        self.second = np.empty((rows, segments), np.int32)
        self.nearest = np.empty((rows, segments), np.int64)
        self.column_max = np.full((slots, self.width), _LOW, np.int32)

    @staticmethod
    def count(rows: int) -> int:
        """Tiles of a product with ``rows`` rows."""
        return -(-rows // _TILE_ROWS)

    def thread_buffer(self) -> np.ndarray:
        """The calling thread's tile buffer, grown to fit this product (kept between calls:
        a fresh buffer page-faults on every query)."""
        buffer = getattr(_TILE_BUFFERS, "array", None)
        if buffer is None or buffer.size < self.buffer_elements:
            buffer = _TILE_BUFFERS.array = np.empty(max(self.buffer_elements, _TILE_ROWS * 1024), np.float32)
        return buffer

    def run_tile(self, tile: int, slot: int, buffer: np.ndarray) -> None:
        """Multiply and reduce tile ``tile``. ``buffer``: a C-contiguous float32 array of
        at least ``256 * len(d2)`` elements, owned by the calling thread (its leading part
        holds the tile)."""
        start = tile * _TILE_ROWS
        stop = min(len(self.d1), start + _TILE_ROWS)
        out = buffer.reshape(-1)[: (stop - start) * self.width].reshape(stop - start, self.width)
        block = np.matmul(self.d1[start:stop], self.right, out=out)
        _kernel()(block.view(np.int32), self.bounds, self.use_keys, self.best[start:stop],
                  self.nearest[start:stop], self.second[start:stop], self.column_max[slot])

    def stats(self) -> SegmentStats:
        """The statistics, after every tile has run."""
        column_max = self.column_max.max(axis=0)
        return _float_stats(self.best, self.nearest, self.second, column_max, self.bounds, self.use_keys)


def _float_stats(best, nearest, second, column_max, bounds, use_keys) -> SegmentStats:
    """float32 statistics from the kernel's int32 keys (bit patterns when not ``use_keys``)."""
    convert = _from_keys if use_keys else (lambda bits: bits.view(np.float32))
    second = convert(second)
    second[:, np.diff(bounds) == 1] = -np.inf
    return SegmentStats(convert(best), nearest, second, convert(column_max))


def _from_keys(keys: np.ndarray) -> np.ndarray:
    """float32 values of keys (inverse of ``_match_kernels_numba.float_key``)."""
    negative = keys < 0
    bits = np.where(negative, (-keys.astype(np.int64)) | 0x80000000, keys).astype(np.uint32)
    return bits.view(np.float32)


def _numpy_stats(block: np.ndarray, bounds: np.ndarray) -> SegmentStats:
    rows = np.arange(block.shape[0])
    lowest = -np.inf if block.dtype == np.float32 else _LOW
    parts = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        segment = block[:, start:stop]
        nearest = segment.argmax(axis=1)
        best = segment[rows, nearest]
        if stop - start > 1:
            masked = segment.copy()
            masked[rows, nearest] = lowest
            second = masked.max(axis=1)
        else:
            second = np.full(len(rows), lowest, block.dtype)
        parts.append((best, nearest, second))
    best, nearest, second = (np.stack(p, axis=1) if parts else None for p in zip(*parts, strict=True))
    return SegmentStats(best, nearest.astype(np.int64), second, block.max(axis=0))


# --------------------------------------------------------------------------- Numba
_KERNELS: list = []


def _kernel():
    """The compiled ``stats(block, bounds, is_float, best, nearest, second, column_max)``
    or None."""
    if not _KERNELS:
        kernel = None
        if not os.environ.get("DELF_RETRIEVAL_NO_NUMBA"):
            try:
                from delf_retrieval.matching._kernels_numba import stats as kernel
            except ImportError:
                kernel = None
        _KERNELS.append(kernel)
    return _KERNELS[0]


def unit_distance(similarity: np.ndarray) -> np.ndarray:
    """L2 distance between unit vectors with the given cosine similarity (float64)."""
    with np.errstate(invalid="ignore"):
        return np.sqrt(np.maximum(2.0 - 2.0 * similarity, 0.0))
