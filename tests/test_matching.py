"""Batched matching (one query, many candidates), reduced precision, device choice and
thread limits."""

from __future__ import annotations

import numpy as np
import pytest

from delf_retrieval import matching, verify
from delf_retrieval.config import Config
from delf_retrieval.features import LocalFeatures
from delf_retrieval.matching import match_batch, quantize_int8, resolve_device
from delf_retrieval.verify import (
    bounded_blas_threads,
    count_inliers,
    count_inliers_many,
    putative_matches,
)

RULES = {
    "baseline bound": dict(max_distance=0.9, mutual=False, ratio=1.0),
    "mutual + ratio": dict(max_distance=float("inf"), mutual=True, ratio=0.8),
    "all three": dict(max_distance=1.0, mutual=True, ratio=0.9),
}


def unit(array: np.ndarray) -> np.ndarray:
    return (array / np.linalg.norm(array, axis=1, keepdims=True)).astype(np.float32)


def views(seed: int, nonnegative: bool, count: int = 5, size: int = 300, dim: int = 128):
    """A query and ``count`` candidates; candidate c holds noisy copies of 40 + 20 c of
    the query's descriptors (shuffled) among random ones. ``nonnegative`` makes
    RootSIFT-like descriptors (a different quantisation path)."""
    rng = np.random.default_rng(seed)
    draw = (lambda *s: np.abs(rng.standard_normal(s))) if nonnegative else (lambda *s: rng.standard_normal(s))
    query = unit(draw(size, dim))
    candidates = []
    for c in range(count):
        shared = 40 + 20 * c
        rows = unit(draw(size - 37 * c, dim))
        picked = rng.choice(size, shared, replace=False)
        rows[:shared] = unit(query[picked] + 0.15 * draw(shared, dim) / np.sqrt(dim))
        candidates.append(rows[rng.permutation(len(rows))])
    return query, candidates


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("nonnegative", [False, True])
def test_float32_batch_equals_pair_by_pair(rule, nonnegative, monkeypatch):
    query, candidates = views(1, nonnegative)
    candidates.insert(2, np.zeros((0, 128), np.float32))
    expected = [putative_matches(query, c, **RULES[rule]) for c in candidates]
    for group_elements in (1 << 22, 300 * 500):  # one stacked product, or several groups
        monkeypatch.setattr(matching, "_GROUP_ELEMENTS", group_elements)
        found = match_batch(query, candidates, **RULES[rule])
        assert len(found) == len(candidates)
        for got, want in zip(found, expected, strict=True):
            np.testing.assert_array_equal(got, want)
    assert sum(len(m) for m in expected) > 100  # the planted matches are found


@pytest.mark.slow
@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("nonnegative", [False, True])
def test_int8_matches_equal_float32_matches(rule, nonnegative):
    pytest.importorskip("onnxruntime", reason="MATCH_DTYPE=int8 needs the 'fast' extra")
    for seed in range(3):
        query, candidates = views(seed, nonnegative)
        expected = match_batch(query, candidates, **RULES[rule])
        found = match_batch(query, candidates, dtype="int8", **RULES[rule])
        for got, want in zip(found, expected, strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tensorflow_reduced_precision_matches_equal_float32(dtype):
    import tensorflow  # noqa: F401  (required: missing it must fail, not skip)
    query, candidates = views(4, nonnegative=True, count=3, size=200)
    for rule in RULES.values():
        expected = match_batch(query, candidates, **rule)
        found = match_batch(query, candidates, dtype=dtype, **rule)
        for got, want in zip(found, expected, strict=True):
            np.testing.assert_array_equal(got, want)


def test_quantize_int8():
    values = np.array([[0.5, -0.25, 0.0], [0.1, 0.2, -0.5]], np.float32)
    q, scale = quantize_int8(values, 100)
    assert scale == 200.0 and q.dtype == np.int8
    np.testing.assert_array_equal(q, [[100, -50, 0], [20, 40, -100]])


# --------------------------------------------------------------------------- devices


def test_device_choice_without_a_gpu(monkeypatch):
    monkeypatch.setattr(matching, "_tensorflow_gpus", lambda: 0)
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == "cpu"
    with pytest.raises(RuntimeError, match="no GPU"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="MATCH_DEVICE"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="MATCH_DEVICE"):
        Config(MATCH_DEVICE="tpu")
    with pytest.raises(ValueError, match="MATCH_DTYPE"):
        Config(MATCH_DTYPE="int4")


@pytest.mark.slow
def test_gpu_path_places_the_product_on_the_gpu(monkeypatch):
    """With a GPU visible, MATCH_DEVICE gpu/auto run the product through TensorFlow on
    /GPU:0 (on this CPU-only machine TensorFlow's soft placement runs it on the CPU, so
    the results can still be checked)."""
    import tensorflow as tf
    monkeypatch.setattr(matching, "_tensorflow_gpus", lambda: 1)
    requested = []
    real_device = tf.device
    monkeypatch.setattr(tf, "device", lambda name: requested.append(name) or real_device(name))
    assert resolve_device("auto") == "gpu"
    query, candidates = views(5, nonnegative=True, count=2, size=120)
    rule = RULES["mutual + ratio"]
    expected = match_batch(query, candidates, **rule)
    for dtype in ("float32", "int8", "float16"):
        requested.clear()
        found = match_batch(query, candidates, dtype=dtype, device="gpu", **rule)
        assert requested and set(requested) == {"/GPU:0"}
        for got, want in zip(found, expected, strict=True):
            np.testing.assert_array_equal(got, want)
    requested.clear()
    match_batch(query, candidates, device="cpu", **rule)
    assert requested == []  # the CPU float32 path never touches TensorFlow


# --------------------------------------------------------------------------- count_inliers_many


def shifted_views(seed: int = 0, count: int = 6):
    """A query whose keypoints, shifted, reappear in each candidate for a share of its
    descriptors: candidate c has 15 + 8 c inliers."""
    rng = np.random.default_rng(seed)
    points = rng.uniform(0, 640, size=(200, 2)).astype(np.float32)
    query_d = unit(np.abs(rng.standard_normal((200, 128))))
    ones = np.ones(200, np.float32)
    query = LocalFeatures(points, query_d, ones, ones)
    candidates = []
    for c in range(count):
        shared = 15 + 8 * c
        d = unit(np.abs(rng.standard_normal((200, 128))))
        d[:shared] = query_d[:shared]
        k = rng.uniform(0, 640, size=(200, 2)).astype(np.float32)
        k[:shared] = points[:shared] + [25.0, -10.0]
        candidates.append(LocalFeatures(k, d, ones, ones))
    return query, candidates


def blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_count_inliers_many_bounds_blas_threads_and_restores_them(monkeypatch):
    pytest.importorskip("threadpoolctl")
    query, candidates = shifted_views()
    config = Config(MUTUAL_NEAREST_NEIGHBOR=True, RATIO_TEST=0.8, MAX_DESCRIPTOR_DISTANCE=float("inf"))
    before = blas_threads()
    serial = count_inliers_many(query, candidates, config.replace(WORKERS=1))
    np.testing.assert_array_equal(serial, [15 + 8 * c for c in range(6)])
    seen = []
    real = verify.match_batch
    monkeypatch.setattr(verify, "match_batch", lambda *a, **k: seen.append(blas_threads()) or real(*a, **k))
    threaded = count_inliers_many(query, candidates, config.replace(WORKERS=2))
    np.testing.assert_array_equal(threaded, serial)
    assert seen and all(set(threads) == {1} for threads in seen)
    assert blas_threads() == before  # restored
    loop = [count_inliers(query.keypoints, query.descriptors, c.keypoints, c.descriptors, config) for c in candidates]
    np.testing.assert_array_equal(serial, loop)


def test_bounded_blas_threads_restores_after_an_error():
    pytest.importorskip("threadpoolctl")
    before = blas_threads()
    with pytest.raises(KeyError), bounded_blas_threads(1):
        assert set(blas_threads()) <= {1}
        raise KeyError("boom")
    assert blas_threads() == before


def test_count_inliers_many_int8_equals_float32():
    pytest.importorskip("onnxruntime", reason="MATCH_DTYPE=int8 needs the 'fast' extra")
    query, candidates = shifted_views(3)
    config = Config(MUTUAL_NEAREST_NEIGHBOR=True, RATIO_TEST=0.8, MAX_DESCRIPTOR_DISTANCE=float("inf"))
    np.testing.assert_array_equal(
        count_inliers_many(query, candidates, config.replace(MATCH_DTYPE="int8")),
        count_inliers_many(query, candidates, config),
    )
