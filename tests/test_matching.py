"""Batched matching (one query, many candidates), reduced precision, device choice and
thread limits."""

from __future__ import annotations

import numpy as np
import pytest

from delf_retrieval.config import Config
from delf_retrieval.core.threads import bounded_blas_threads
from delf_retrieval.features.containers import LocalFeatures
from delf_retrieval.matching import (
    device,
    reduced_precision,
    verify,
)
from delf_retrieval.matching import (
    kernels as match_kernels,
)
from delf_retrieval.matching import (
    nn as matching,
)
from delf_retrieval.matching.device import resolve_device
from delf_retrieval.matching.nn import match_batch, quantize_int8
from delf_retrieval.matching.reduced_precision import exact_dots
from delf_retrieval.matching.verify import (
    MatchingSettings,
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


def exact_reference(query, candidate, rule):
    """select_matches on every similarity evaluated as reduced_precision evaluates the
    decisive ones (float64, one dot product per pair), so ties are ties in both."""
    rows, cols = np.divmod(np.arange(len(query) * len(candidate)), len(candidate))
    sims = exact_dots(query, candidate, rows, cols).reshape(len(query), len(candidate))
    return matching.select_matches(sims, sims.max(axis=0), **rule)


def near_ties(seed: int, nonnegative: bool):
    """A query and candidates full of decisions far below int8 resolution: columns that
    are copies of others moved by 1e-6..1e-3 (near ties for argmax and second best),
    exact duplicate columns and query rows (exact ties for argmax and mutual), and pairs
    planted at ratios within 1e-4 of the ratio test's 0.8 and 0.9."""
    rng = np.random.default_rng(seed)
    draw = (lambda *s: np.abs(rng.standard_normal(s))) if nonnegative else (lambda *s: rng.standard_normal(s))
    query = unit(draw(160, 64))
    query[100:110] = query[90:100]  # exact duplicate query rows
    candidates = []
    for _ in range(3):
        rows = unit(draw(150, 64))
        picked = rng.choice(90, 60, replace=False)
        rows[:60] = unit(query[picked] + 0.2 * draw(60, 64) / 8)
        rows[60:80] = unit(rows[:20] + 10.0 ** rng.uniform(-6, -3, (20, 1)) * draw(20, 64))
        rows[80:90] = rows[20:30]  # exact duplicate columns
        # ratio near 0.8 / 0.9: second best at the distance best / ratio (+-1e-4)
        for i, target in zip(picked[30:50], np.tile([0.8, 0.9], 10), strict=True):
            best = float(np.linalg.norm(query[i] - rows[picked.tolist().index(i)]))
            second = best / (target + rng.uniform(-1e-4, 1e-4))
            if second < 1.9:
                # a unit vector at distance `second` from the query row
                noise = unit(draw(1, 64))[0]
                noise -= noise.dot(query[i]) * query[i]
                noise /= np.linalg.norm(noise)
                cos = 1 - second**2 / 2
                rows[90 + i % 60] = cos * query[i] + np.sqrt(max(1 - cos**2, 0)) * noise
        candidates.append(unit(rows)[rng.permutation(len(rows))])
    return query, candidates


@pytest.mark.slow
@pytest.mark.parametrize("nonnegative", [False, True])
@pytest.mark.parametrize("compiled", [True, False])  # step 1 from the Numba pass or from argmax
def test_int8_matches_equal_exact_matches_on_near_ties(nonnegative, compiled, monkeypatch):
    pytest.importorskip("onnxruntime", reason="MATCH_DTYPE=int8 needs the 'fast' extra")
    if compiled:
        pytest.importorskip("numba", reason="the compiled pass needs the 'fast' extra (CI requires it)")
    else:
        monkeypatch.setattr(match_kernels, "_KERNELS", [None])
    close_calls = 0
    for seed in range(3):
        query, candidates = near_ties(seed, nonnegative)
        for candidate in candidates:
            sims = np.sort(query.astype(np.float64) @ candidate.astype(np.float64).T, axis=1)
            ratios = np.sqrt(2 - 2 * sims[:, -1]) / np.sqrt(2 - 2 * sims[:, -2])
            close_calls += np.sum(np.minimum(abs(ratios - 0.8), abs(ratios - 0.9)) < 2e-4)
        for rule in RULES.values():
            found = match_batch(query, candidates, dtype="int8", **rule)
            for got, candidate in zip(found, candidates, strict=True):
                np.testing.assert_array_equal(got, exact_reference(query, candidate, rule))
    assert close_calls >= 20  # ratio tests decided within 2e-4 of the threshold


@pytest.mark.parametrize("nonnegative", [False, True])
def test_int8_error_bound_holds_for_every_entry(nonnegative):
    """|exact similarity - approximate * scale| <= slack, also for adversarial rows
    (one-hot, constant, tiny+huge components) where rounding errors line up."""
    pytest.importorskip("onnxruntime", reason="MATCH_DTYPE=int8 needs the 'fast' extra")
    query, candidates = views(7, nonnegative, count=1)
    stacked = candidates[0].copy()
    special = np.zeros((4, 128), np.float32)
    special[0, 3] = 1.0
    special[1] = 1.0
    special[2, :2] = [1.0, 1e-3]
    special[3, ::2] = 1.0
    special = unit(special)
    stacked[:4] = special
    query = query.copy()
    query[:4] = special
    approx, scale, slack = reduced_precision._approximate_product(query, stacked, "int8", "cpu", {})
    exact = query.astype(np.float64) @ stacked.astype(np.float64).T
    error = np.abs(exact - approx * scale[:, None])
    assert (error <= slack[:, None]).all()
    assert error.max() > 0.1 * slack.min()  # the bound is not vacuous either


def test_int8_kernel_is_exact_at_the_extremes():
    """ONNX Runtime's u8 x s8 product equals the integer product for the value ranges used
    (u8 <= 127, |s8| <= 127), also where every pair of products is at the int16 limit."""
    pytest.importorskip("onnxruntime", reason="MATCH_DTYPE=int8 needs the 'fast' extra")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 128, (37, 128)).astype(np.uint8)
    b = rng.integers(-127, 128, (128, 45)).astype(np.int8)
    a[0], b[:, 0], b[:, 1] = 127, 127, -127
    zero = np.array(0, np.uint8)
    found = reduced_precision._int8_session().run(None, {"A": a, "B": b, "Z": zero})[0]
    np.testing.assert_array_equal(found, a.astype(np.int64) @ b.astype(np.int64))
    assert found[0, 0] == 128 * 127 * 127 and found[0, 1] == -128 * 127 * 127
    shifted = reduced_precision._int8_session().run(None, {"A": a, "B": b, "Z": np.array(64, np.uint8)})[0]
    np.testing.assert_array_equal(shifted, (a.astype(np.int64) - 64) @ b.astype(np.int64))


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


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_empty_query_or_candidates_give_no_matches(dtype):
    if dtype == "int8":
        pytest.importorskip("onnxruntime", reason="MATCH_DTYPE=int8 needs the 'fast' extra")
    query, candidates = views(2, nonnegative=True, count=2, size=120)
    empty = np.zeros((0, 128), np.float32)
    found = match_batch(empty, candidates, dtype=dtype, mutual=True, ratio=0.8)
    assert [m.shape for m in found] == [(0, 2), (0, 2)]
    found = match_batch(query, [empty, candidates[0]], dtype=dtype, mutual=True, ratio=0.8)
    assert found[0].shape == (0, 2)
    np.testing.assert_array_equal(found[1], match_batch(query, [candidates[0]], mutual=True, ratio=0.8)[0])
    assert len(found[1]) > 0


def test_column_maxima_over_claimed_columns_only_equal_the_full_pass():
    """select_matches without column maxima (it then takes them over the few columns rows
    can still match) == with the full column-max pass, also with many exact ties."""
    rng = np.random.default_rng(3)
    for trial in range(200):
        n1, n2 = rng.integers(1, 50), rng.integers(1, 70)
        sims = (rng.integers(0, 6, (n1, n2)) / 6 if trial % 2 else rng.uniform(-1, 1, (n1, n2))).astype(np.float32)
        for rule in RULES.values():
            full = matching.select_matches(sims.copy(), sims.max(axis=0), **rule)
            lazy = matching.select_matches(sims.copy(), None, **rule)
            np.testing.assert_array_equal(lazy, full)
    block = sims.copy()
    matching.select_matches(block, None, **RULES["all three"])
    np.testing.assert_array_equal(block, sims)  # scratch use restored


def test_quantize_int8():
    values = np.array([[0.5, -0.25, 0.0], [0.1, 0.2, -0.5]], np.float32)
    q, scale = quantize_int8(values, 100)
    assert scale == 200.0 and q.dtype == np.int8
    np.testing.assert_array_equal(q, [[100, -50, 0], [20, 40, -100]])


# --------------------------------------------------------------------------- devices


def test_device_choice_without_a_gpu(monkeypatch):
    monkeypatch.setattr(device, "_tensorflow_gpus", lambda: 0)
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
    monkeypatch.setattr(device, "_tensorflow_gpus", lambda: 1)
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
    pytest.importorskip("threadpoolctl", reason="bounding BLAS threads needs threadpoolctl (scipy/scikit-image stacks bring it)")
    query, candidates = shifted_views()
    config = Config(MUTUAL_NEAREST_NEIGHBOR=True, RATIO_TEST=0.8, MAX_DESCRIPTOR_DISTANCE=float("inf"))
    settings = MatchingSettings.from_config(config)
    before = blas_threads()
    serial = count_inliers_many(query, candidates, MatchingSettings.from_config(config.replace(WORKERS=1)))
    np.testing.assert_array_equal(serial, [15 + 8 * c for c in range(6)])
    seen = []
    real = verify._inliers  # runs inside the jobs on either path (tiles with Numba, shares without)
    monkeypatch.setattr(verify, "_inliers", lambda *a, **k: seen.append(blas_threads()) or real(*a, **k))
    threaded = count_inliers_many(query, candidates, MatchingSettings.from_config(config.replace(WORKERS=2)))
    np.testing.assert_array_equal(threaded, serial)
    assert len(seen) == len(candidates) and all(set(threads) == {1} for threads in seen)
    assert blas_threads() == before  # restored
    loop = [count_inliers(query.keypoints, query.descriptors, c.keypoints, c.descriptors, settings) for c in candidates]
    np.testing.assert_array_equal(serial, loop)


def test_bounded_blas_threads_restores_after_an_error():
    pytest.importorskip("threadpoolctl", reason="bounding BLAS threads needs threadpoolctl (scipy/scikit-image stacks bring it)")
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
        count_inliers_many(query, candidates, MatchingSettings.from_config(config.replace(MATCH_DTYPE="int8"))),
        count_inliers_many(query, candidates, MatchingSettings.from_config(config)),
    )
