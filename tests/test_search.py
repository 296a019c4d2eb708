"""Exact cosine top-k search: blockwise results equal brute force, with the tie rule."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from delf_retrieval.search.index import CosineIndex, cosine_topk, merge_topk


def brute_force(queries: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: full similarity matrix, rows sorted by (-similarity, index)."""
    sims = queries.astype(np.float32) @ index.astype(np.float32).T
    ids = np.stack([np.lexsort((np.arange(row.size), -row))[:k] for row in sims])
    return np.take_along_axis(sims, ids, axis=1), ids


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    rows = rng.standard_normal((n, d)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture
def planted():
    """300 random unit rows; query q has planted neighbours at rows 7q+1, 7q+2 (best first)."""
    rng = np.random.default_rng(0)
    index = unit_rows(rng, 300, 16)
    queries = unit_rows(rng, 4, 16)
    for q in range(4):
        index[7 * q + 1] = queries[q]
        near = queries[q] + 0.3 * unit_rows(rng, 1, 16)[0]
        index[7 * q + 2] = near / np.linalg.norm(near)
    return queries, index


def test_planted_neighbours_match_brute_force(planted):
    queries, index = planted
    sims, ids = cosine_topk(queries, index, 10, block_size=64, query_block_size=3)
    ref_sims, ref_ids = brute_force(queries, index, 10)
    assert ids.dtype == np.int64 and sims.dtype == np.float32
    assert sims.shape == ids.shape == (4, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    # Other block shapes can round the last float32 bit differently.
    np.testing.assert_allclose(sims, ref_sims, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(ids[:, :2], [[1, 2], [8, 9], [15, 16], [22, 23]])
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-6)
    assert (np.diff(sims, axis=1) <= 0).all()


@pytest.mark.parametrize("block_size", [1, 2, 3, 6, 100])
def test_ties_prefer_smaller_index_across_blocks(block_size):
    index = np.array([[0.5], [1.0], [0.2], [1.0], [1.0], [0.5]], np.float32)
    sims, ids = cosine_topk(np.array([[1.0]], np.float32), index, 4, block_size=block_size)
    np.testing.assert_array_equal(ids, [[1, 3, 4, 0]])
    np.testing.assert_array_equal(sims, np.array([[1.0, 1.0, 1.0, 0.5]], np.float32))


def test_many_ties_in_a_dense_block_and_later_blocks():
    # Values 0/1 only: argpartition alone would pick arbitrary tied rows.
    values = np.random.default_rng(1).integers(0, 2, size=(500, 1)).astype(np.float32)
    queries = np.array([[1.0], [-1.0]], np.float32)
    sims, ids = cosine_topk(queries, values, 7, block_size=128)
    np.testing.assert_array_equal(ids[0], np.flatnonzero(values[:, 0] == 1)[:7])
    np.testing.assert_array_equal(ids[1], np.flatnonzero(values[:, 0] == 0)[:7])
    np.testing.assert_array_equal(sims, [[1.0] * 7, [-0.0] * 7])


def test_random_integer_data_with_ties_equals_brute_force():
    rng = np.random.default_rng(2)
    for _ in range(10):
        index = rng.integers(-2, 3, size=(int(rng.integers(1, 200)), 3)).astype(np.float32)
        queries = rng.integers(-2, 3, size=(5, 3)).astype(np.float32)
        k = int(rng.integers(1, 30))
        sims, ids = cosine_topk(
            queries, index, k, block_size=int(rng.integers(1, 50)), query_block_size=2
        )
        ref_sims, ref_ids = brute_force(queries, index, min(k, len(index)))
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(sims, ref_sims)


def test_float16_memmap_index(tmp_path, planted):
    queries, index = planted
    path = tmp_path / "index.f16"
    stored = np.memmap(path, dtype=np.float16, mode="w+", shape=index.shape)
    stored[:] = index
    stored.flush()
    del stored
    mapped = np.memmap(path, dtype=np.float16, mode="r", shape=index.shape)
    sims, ids = cosine_topk(queries, mapped, 5, block_size=50)
    ref_sims, ref_ids = brute_force(queries, index.astype(np.float16), 5)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(sims, ref_sims, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(ids[:, 0], [1, 8, 15, 22])
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.float16  # not replaced


def test_k_larger_than_index_returns_everything():
    index = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
    sims, ids = cosine_topk(np.array([[1.0, 0.0]], np.float32), index, 10)
    np.testing.assert_array_equal(ids, [[0, 2, 1]])
    np.testing.assert_allclose(sims, [[1.0, 0.6, 0.0]], atol=1e-7)


def test_empty_inputs_give_empty_outputs():
    index = np.ones((5, 4), np.float32)
    sims, ids = cosine_topk(np.zeros((0, 4), np.float32), index, 3)
    assert sims.shape == ids.shape == (0, 3) and ids.dtype == np.int64
    sims, ids = cosine_topk(np.ones((2, 4), np.float32), np.zeros((0, 4), np.float32), 3)
    assert sims.shape == ids.shape == (2, 0) and sims.dtype == np.float32


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="dimension"):
        cosine_topk(np.ones((1, 3)), np.ones((5, 4)), 2)
    with pytest.raises(ValueError, match="k must be"):
        cosine_topk(np.ones((1, 4)), np.ones((5, 4)), 0)
    with pytest.raises(ValueError, match="2-D"):
        cosine_topk(np.ones(4), np.ones((5, 4)), 1)
    with pytest.raises(ValueError, match="backend"):
        cosine_topk(np.ones((1, 4)), np.ones((5, 4)), 1, backend="annoy")


def test_normalize_makes_scale_irrelevant(planted):
    queries, index = planted
    scales = np.linspace(0.5, 4.0, len(index), dtype=np.float32)[:, None]
    sims, ids = cosine_topk(3 * queries, index * scales, 6, block_size=40, normalize=True)
    ref_sims, ref_ids = cosine_topk(queries, index, 6)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-6)


def test_inputs_are_not_modified(planted):
    queries, index = planted
    q_copy, x_copy = queries.copy(), index.copy()
    cosine_topk(queries, index, 3, block_size=7, normalize=True)
    np.testing.assert_array_equal(queries, q_copy)
    np.testing.assert_array_equal(index, x_copy)


def test_faiss_backend_equals_numpy(planted):
    pytest.importorskip("faiss", reason="faiss-cpu is an optional extra")
    queries, index = planted
    for block_size in (37, 1000):
        f_sims, f_ids = cosine_topk(queries, index, 12, block_size=block_size, backend="faiss")
        n_sims, n_ids = cosine_topk(queries, index, 12, block_size=block_size)
        np.testing.assert_array_equal(f_ids, n_ids)
        np.testing.assert_allclose(f_sims, n_sims, atol=1e-6)
    tied = np.array([[0.5], [1.0], [0.2], [1.0], [1.0], [0.5]], np.float32)
    _, ids = cosine_topk(np.array([[1.0]], np.float32), tied, 4, block_size=4, backend="faiss")
    np.testing.assert_array_equal(ids, [[1, 3, 4, 0]])


def test_merge_topk_applies_the_tie_rule_across_shards():
    shard_a = (np.array([[0.9, 0.5], [0.3, 0.1]]), np.array([[7, 2], [4, 5]]))
    shard_b = (np.array([[0.9, 0.5], [0.8, 0.3]]), np.array([[3, 1], [0, 9]]))
    sims, ids = merge_topk([shard_a, shard_b], k=3)
    np.testing.assert_array_equal(ids, [[3, 7, 1], [0, 4, 9]])
    np.testing.assert_array_equal(sims, np.array([[0.9, 0.9, 0.5], [0.8, 0.3, 0.3]], np.float32))
    sims, ids = merge_topk([shard_a, shard_b])  # k defaults to the widest partial
    assert ids.shape == (2, 2)
    sims, ids = merge_topk([shard_a], k=5)  # never more than there is
    assert ids.shape == (2, 2) and ids.dtype == np.int64 and sims.dtype == np.float32
    with pytest.raises(ValueError, match="number of queries"):
        merge_topk([shard_a, (np.zeros((1, 2)), np.zeros((1, 2), int))])


def test_merge_of_shards_equals_search_of_the_whole(planted):
    queries, index = planted
    shards = [(0, 90), (90, 200), (200, 300)]
    partials = []
    for start, stop in shards:
        sims, ids = cosine_topk(queries, index[start:stop], 8)
        partials.append((sims, ids + start))
    merged = merge_topk(partials, k=8)
    whole = cosine_topk(queries, index, 8)
    np.testing.assert_array_equal(merged[1], whole[1])
    np.testing.assert_allclose(merged[0], whole[0], rtol=0, atol=1e-6)


def test_cosine_index_object_api(tmp_path, planted):
    queries, index = planted
    path = tmp_path / "tail.f32"
    tail = np.memmap(path, dtype=np.float32, mode="w+", shape=(100, 16))
    tail[:] = index[200:]
    search_index = CosineIndex(16, block_size=32)
    search_index.add(index[:150])
    search_index.add(index[150:200])
    search_index.add(tail)
    assert search_index.ntotal == len(search_index) == 300
    sims, ids = search_index.search(queries, 5)
    ref_sims, ref_ids = brute_force(queries, index, 5)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(sims, ref_sims, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="dimension"):
        search_index.add(np.ones((2, 3), np.float32))
    empty = CosineIndex()
    assert empty.search(queries, 3)[1].shape == (4, 0)


def test_missing_faiss_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes "import faiss" fail
    with pytest.raises(ImportError, match=r"pip install delf_retrieval\[faiss\]"):
        cosine_topk(np.ones((1, 2), np.float32), np.ones((3, 2), np.float32), 1, backend="faiss")


# --- non-finite rows and queries -----------------------------------------------------------


def brute_force_finite(queries: np.ndarray, index: np.ndarray, k: int):
    """Reference written from the definition: float64 products, every non-finite value
    counts as -inf, rank by similarity descending then by row."""
    with np.errstate(invalid="ignore", over="ignore"):
        sims = queries.astype(np.float64) @ index.astype(np.float64).T
    sims[~np.isfinite(sims)] = -np.inf
    ids = np.array([sorted(range(len(index)), key=lambda j: (-row[j], j))[:k] for row in sims])
    return np.take_along_axis(sims, ids, axis=1), ids


@pytest.mark.parametrize("backend", ["numpy", "faiss"])
@pytest.mark.parametrize("block_size", [1, 3, 7, 100])
def test_nan_and_inf_rows_rank_last_with_real_ids(backend, block_size):
    """One NaN row used to make every query return id 9223372036854775807 at -inf."""
    if backend == "faiss":
        pytest.importorskip("faiss", reason="faiss-cpu is an optional extra")
    rng = np.random.default_rng(3)
    index = rng.integers(-3, 4, size=(12, 5)).astype(np.float32)  # integers: exact ties
    index[2, 1] = np.nan
    index[5] = np.inf
    index[9, 0] = -np.inf
    queries = rng.integers(-3, 4, size=(4, 5)).astype(np.float32)
    queries[3, 2] = np.nan  # a broken query: every similarity -inf, ids 0..k-1
    for k in (1, 4, 9, 12):
        sims, ids = cosine_topk(queries, index, k, block_size=block_size, backend=backend)
        expected_sims, expected_ids = brute_force_finite(queries, index, k)
        np.testing.assert_array_equal(ids, expected_ids, err_msg=f"k={k}")
        np.testing.assert_array_equal(sims, expected_sims.astype(np.float32), err_msg=f"k={k}")
        assert ((ids >= 0) & (ids < len(index))).all()
    assert ids[3].tolist() == list(range(12)) and np.isneginf(sims[3]).all()
    # The bad rows come last for every good query, after all finite similarities.
    assert ids[:3, -3:].tolist() == [[2, 5, 9]] * 3 and np.isfinite(sims[:3, :9]).all()


def test_finite_inputs_give_the_same_result_as_before_the_check(planted):
    """The non-finite handling must not change ordinary results (exact ids, same sims)."""
    queries, index = planted
    sims, ids = cosine_topk(queries, index, 10, block_size=37)
    expected_sims, expected_ids = brute_force_finite(queries[:5], index, 10)
    np.testing.assert_array_equal(ids[:5], expected_ids)
    np.testing.assert_allclose(sims[:5], expected_sims, atol=1e-5)
