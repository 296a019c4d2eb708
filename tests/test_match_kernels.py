"""The one-pass similarity-block statistics against NumPy derivations written here."""

from __future__ import annotations

import time

import numpy as np
import pytest

from delf_retrieval.matching import kernels as match_kernels
from delf_retrieval.matching.nn import match_segments, select_matches

pytest.importorskip("numba", reason="the compiled pass needs the 'fast' extra (CI requires it)")


def planted_block(seed: int, dtype) -> np.ndarray:
    """A [157, 300] block with repeated row maxima, a column of +0.0 / -0.0, negative
    values and rows tied for a column maximum."""
    rng = np.random.default_rng(seed)
    block = rng.standard_normal((157, 300)).astype(np.float32)
    block[5, [7, 90, 91]] = block[5].max() + 1  # a repeated maximum: it is its own second
    block[:, 3] = 0.0
    block[[9, 12], 3] = -0.0
    block[20] = -np.abs(block[20])  # an all-negative row
    block[30:34, 200] = 50.0  # four rows tied for one column
    block[40, 255:300] = 7.0  # a constant tail
    if dtype == np.int32:
        return np.rint(block * 1000).astype(np.int32)
    return block


def reference(block: np.ndarray, start: int, stop: int):
    """Row maximum, its first position, the maximum with that position removed."""
    segment = block[:, start:stop].astype(np.float64)
    nearest = np.array([int(np.flatnonzero(row == row.max())[0]) for row in segment])
    best = segment.max(axis=1)
    second = np.array([np.delete(row, k).max() if len(row) > 1 else -np.inf for row, k in zip(segment, nearest, strict=True)])
    return best, nearest, second


@pytest.mark.parametrize("dtype", [np.float32, np.int32])
@pytest.mark.parametrize("bounds", [[0, 300], [0, 1, 2, 150, 151, 300], [0, 3, 4, 250, 300]])
def test_segment_stats_equal_the_definition(dtype, bounds):
    block = planted_block(0, dtype)
    stats = match_kernels.segment_stats(block, np.array(bounds))
    assert match_kernels.numba_available()
    np.testing.assert_array_equal(stats.column_max.astype(np.float64), block.astype(np.float64).max(axis=0))
    for s, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        best, nearest, second = reference(block, start, stop)
        np.testing.assert_array_equal(stats.best[:, s].astype(np.float64), best)
        np.testing.assert_array_equal(stats.nearest[:, s], nearest)
        if stop - start > 1:
            np.testing.assert_array_equal(stats.second[:, s].astype(np.float64), second)
    assert stats.best.dtype == stats.column_max.dtype == dtype
    s = int(np.searchsorted(bounds, 90, side="right")) - 1  # columns 90 and 91 share it
    assert stats.second[5, s] == stats.best[5, s]  # the repeated maximum is its own second


def test_float_keys_keep_the_float_order_and_join_the_zeros():
    values = np.array([-np.inf, -3.5, -1e-45, -0.0, 0.0, 1e-45, 2.0, np.finfo(np.float32).max, np.inf], np.float32)
    block = np.tile(values, (2, 1))
    block[1] = block[1][::-1]
    stats = match_kernels.segment_stats(block, np.array([0, 3, 5, 9]))
    # segment [3, 5) holds -0.0 and +0.0: equal, so the first wins, as with argmax
    assert stats.nearest[0, 1] == 0 and stats.best[0, 1] == 0.0 and stats.second[0, 1] == 0.0
    assert stats.best[0, 2] == np.inf and stats.second[0, 2] == np.finfo(np.float32).max
    assert stats.best[0, 0] == -1e-45 and stats.nearest[0, 0] == 2 and stats.second[0, 0] == -3.5
    np.testing.assert_array_equal(stats.column_max, np.maximum(values, values[::-1]))


def test_numpy_fallback_gives_the_same_statistics():
    block = planted_block(1, np.float32)
    bounds = np.array([0, 1, 120, 300])
    compiled, fallback = match_kernels.segment_stats(block, bounds), match_kernels._numpy_stats(block, bounds)
    for name in ("best", "nearest", "second", "column_max"):
        np.testing.assert_array_equal(getattr(compiled, name), getattr(fallback, name))


@pytest.mark.parametrize("rule", [
    dict(max_distance=0.9, mutual=False, ratio=1.0),
    dict(max_distance=float("inf"), mutual=True, ratio=0.8),
    dict(max_distance=1.0, mutual=True, ratio=0.9),
])
def test_match_segments_equal_select_matches_with_ties(rule):
    rng = np.random.default_rng(3)
    d1 = rng.standard_normal((200, 16)).astype(np.float32)
    d1 /= np.linalg.norm(d1, axis=1, keepdims=True)
    d2 = np.concatenate([d1[::3] + 0.05 * rng.standard_normal((67, 16)).astype(np.float32), d1[:40:2]])
    d2 /= np.linalg.norm(d2, axis=1, keepdims=True)
    d1[50] = d1[51]  # two query rows tied for every column
    sims = d1 @ d2.T
    sims = np.round(sims, 2).astype(np.float32)  # many exact ties
    bounds = np.array([0, 30, 31, 87])
    found = match_segments(sims, bounds, **rule)
    for (start, stop), got in zip(zip(bounds[:-1], bounds[1:], strict=True), found, strict=True):
        want = select_matches(sims[:, start:stop].copy(), None, **rule)
        np.testing.assert_array_equal(got, want)
    assert sum(len(m) for m in found) > 20


def test_rejects_other_dtypes():
    with pytest.raises(TypeError, match="float32 or int32"):
        match_kernels.segment_stats(np.zeros((2, 2)), np.array([0, 2]))


def test_nonnegative_blocks_skip_the_key_map_with_the_same_result():
    rng = np.random.default_rng(4)
    d1, d2 = np.abs(rng.standard_normal((120, 32))), np.abs(rng.standard_normal((90, 32)))
    d1[:, :20] = 0  # exact zeros in the product: +0.0 only
    d2[:, 12:] = 0
    block = (d1.astype(np.float32) @ d2.astype(np.float32).T).astype(np.float32)
    block[7, 40:43] = block[7].max()  # a repeated maximum
    bounds = np.array([0, 1, 50, 90])
    fast = match_kernels.segment_stats(block, bounds, nonnegative=True)
    for s, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        best, nearest, second = reference(block, start, stop)
        np.testing.assert_array_equal(fast.best[:, s], best)
        np.testing.assert_array_equal(fast.nearest[:, s], nearest)
        np.testing.assert_array_equal(fast.second[:, s], second)
    np.testing.assert_array_equal(fast.column_max, block.max(axis=0))
    assert (block == 0).sum() > 100


@pytest.mark.parametrize("nonnegative", [False, True])
@pytest.mark.parametrize("tile_rows", [8, 64])  # several tiles (the last one short), or one
def test_product_stats_in_tiles_equal_the_whole_block(nonnegative, tile_rows, monkeypatch):
    monkeypatch.setattr(match_kernels, "_TILE_ROWS", tile_rows)
    rng = np.random.default_rng(5)
    # small integers: every product and sum is exact in float32, whatever BLAS's order
    low = 0 if nonnegative else -7
    d1, d2 = (rng.integers(low, 8, size=s).astype(np.float32) for s in ((61, 24), (130, 24)))
    d2[100:110] = d2[90:100]  # duplicate candidate rows: tied columns
    bounds = np.array([0, 1, 64, 130])
    tiled = match_kernels.product_stats(d1, d2, bounds, nonnegative)
    block = d1.astype(np.float64) @ d2.T.astype(np.float64)
    np.testing.assert_array_equal(tiled.column_max, block.max(axis=0))
    for s, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        best, nearest, second = reference(block, start, stop)
        np.testing.assert_array_equal(tiled.best[:, s], best)
        np.testing.assert_array_equal(tiled.nearest[:, s], nearest)
        if stop - start > 1:
            np.testing.assert_array_equal(tiled.second[:, s], second)
    assert (tiled.second == tiled.best).sum() > 5  # ties were exercised


def test_matching_without_numba_gives_the_same_matches(monkeypatch):
    from delf_retrieval.matching.nn import match_batch

    rng = np.random.default_rng(6)
    query = rng.standard_normal((150, 32)).astype(np.float32)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    candidates = []
    for size in (40, 1100, 90):  # stacked small ones, one matched in place
        rows = np.concatenate([query[rng.choice(150, 30)] + 0.1 * rng.standard_normal((30, 32)),
                               rng.standard_normal((size - 30, 32))]).astype(np.float32)
        candidates.append(rows / np.linalg.norm(rows, axis=1, keepdims=True))
    rule = dict(max_distance=float("inf"), mutual=True, ratio=0.9)
    compiled = match_batch(query, candidates, **rule)
    monkeypatch.setattr(match_kernels, "_KERNELS", [None])
    assert not match_kernels.numba_available()
    fallback = match_batch(query, candidates, **rule)
    for a, b in zip(compiled, fallback, strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(len(m) >= 15 for m in compiled)


def threaded_case(seed: int = 8):
    """A 600-row query (three tiles, the last short) and candidates of assorted sizes whose
    products are exact in float32 (multiples of 1/256 with small numerators)."""
    rng = np.random.default_rng(seed)
    d1 = (rng.integers(-3, 4, size=(600, 24)) / 16).astype(np.float32)
    sizes = [40, 0, 1100, 90, 5, 700, 1, 30]
    candidates = []
    for size in sizes:
        rows = (rng.integers(-3, 4, size=(size, 24)) / 16).astype(np.float32)
        rows[: size // 3] = d1[rng.choice(600, size // 3)]  # true matches and tied columns
        candidates.append(rows)
    kept = {3: slice(10, 80), 7: slice(0, 0)}  # prepare drops rows (non-finite ones, in verify)
    return d1, sizes, candidates, kept


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("rule", [dict(max_distance=float("inf"), mutual=True, ratio=0.9),
                                  dict(max_distance=1.2, mutual=False, ratio=1.0)])
def test_threaded_tiles_give_the_matches_of_the_whole_block(workers, rule):
    from concurrent.futures import ThreadPoolExecutor

    from delf_retrieval.matching.nn import match_products_threaded

    d1, sizes, candidates, kept = threaded_case()
    prepared = {p: c[kept.get(p, slice(None))] for p, c in enumerate(candidates)}
    calls, found = [], {}
    consumed_on = set()

    def prepare(position):
        calls.append(position)
        if position == 0:
            time.sleep(0.05)  # the other threads reach this group's tiles while it is being stacked
        return prepared[position]

    def consume(position, matches):
        assert position not in found
        found[position] = matches
        consumed_on.add(__import__("threading").get_ident())

    with ThreadPoolExecutor(workers) as pool:
        match_products_threaded(d1, sizes, prepare, workers=workers, consume=consume,
                                run=lambda f, n: list(pool.map(f, range(n))), **rule)
    assert sorted(calls) == [p for p, s in enumerate(sizes) if s > 0]  # each once, empty ones never
    assert sorted(found) == list(range(len(sizes)))
    for position, rows in prepared.items():
        expected = np.zeros((0, 2), np.int64)
        if len(rows):
            block = (d1.astype(np.float64) @ rows.T.astype(np.float64)).astype(np.float32)  # exact
            expected = select_matches(block, None, **rule)
        np.testing.assert_array_equal(found[position], expected)
    assert sum(len(m) for m in found.values()) > 100


def test_threaded_tiles_stop_and_raise_on_an_error():
    from concurrent.futures import ThreadPoolExecutor

    from delf_retrieval.matching.nn import match_products_threaded

    d1, sizes, candidates, _ = threaded_case()

    def prepare(position):
        if position == 5:
            raise ValueError("bad candidate 5")
        return candidates[position]

    found = []
    with ThreadPoolExecutor(2) as pool, pytest.raises(ValueError, match="bad candidate 5"):
        match_products_threaded(d1, sizes, prepare, max_distance=float("inf"), mutual=True, ratio=1.0, workers=2,
                                run=lambda f, n: list(pool.map(f, range(n))), consume=lambda p, m: found.append(p))
    assert 5 not in found
