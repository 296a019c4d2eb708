"""Numba kernels of :mod:`delf_retrieval.matching.kernels` (imported only when Numba is).

Loops run over slices with ``range(len)``: Numba then knows every index is in range and
non-negative, emits no wraparound code, and LLVM vectorises them.
"""

from __future__ import annotations

import numba
import numpy as np

_LOW = np.int32(np.iinfo(np.int32).min)
_MAGNITUDE = np.int32(0x7FFFFFFF)


@numba.njit(inline="always")
def float_key(x):
    """int32 key of float32 bits ``x``: ``x`` when the sign bit is clear, else minus the
    magnitude bits (so ``-0.0`` and ``+0.0`` share the key 0)."""
    sign = x >> np.int32(31)  # 0 or -1
    return np.int32(((x & _MAGNITUDE) ^ sign) - sign)  # Numba widens int32 arithmetic


@numba.njit(inline="always")
def int_key(x):
    return x


@numba.njit(inline="always")
def _row_max_and_columns(row, column_max, key):
    m = _LOW
    for j in range(row.shape[0]):
        v = key(row[j])
        c = column_max[j]
        column_max[j] = v if v > c else c
        m = v if v > m else m
    return m


@numba.njit(inline="always")
def _slice_max(row, key):
    m = _LOW
    for j in range(row.shape[0]):
        v = key(row[j])
        m = v if v > m else m
    return m


@numba.njit(inline="always")
def _first_position(row, m, key):
    k = 0
    n = row.shape[0]
    while k + 32 <= n and _slice_max(row[k : k + 32], key) != m:
        k += 32
    while key(row[k]) != m:
        k += 1
    return k


@numba.njit(inline="always")
def _stats(block, bounds, best, nearest, second, column_max, key):
    for i in range(block.shape[0]):
        for s in range(bounds.shape[0] - 1):
            row = block[i, bounds[s] : bounds[s + 1]]
            m = _row_max_and_columns(row, column_max[bounds[s] : bounds[s + 1]], key)
            k = _first_position(row, m, key)
            before = _slice_max(row[:k], key)
            after = _slice_max(row[k + 1 :], key)
            best[i, s] = m
            nearest[i, s] = k
            second[i, s] = before if before > after else after


@numba.njit(nogil=True, cache=True)
def stats(block, bounds, float_keys, best, nearest, second, column_max):
    """Fill ``best``, ``nearest``, ``second`` ``[N1, S]`` and ``column_max`` ``[C]`` (keys)
    from an int32 view ``block`` ``[N1, C]``: of float32 values with ``float_keys``, else
    of values that order as int32."""
    if float_keys:
        _stats(block, bounds, best, nearest, second, column_max, float_key)
    else:
        _stats(block, bounds, best, nearest, second, column_max, int_key)
