"""Reduced-precision products that only *choose*: every decision is certified exactly.

:func:`approximate_group` is the ``MATCH_DTYPE != "float32"`` (or GPU) branch of
:func:`delf_retrieval.matching.nn.match_batch`. An approximate product ``Y`` (int8 through
ONNX Runtime, float16/bfloat16/TF32 through TensorFlow) comes with a **rigorous** per-row
bound ``slack[i]`` such that, for every column j,

    |S_ij - Y_ij * scale_i| <= slack_i,

where ``S = d1 . d2`` is the exact (real-arithmetic) similarity. For int8, with
``a~ = q / s_a`` and ``b~ = p / s_b`` the dequantised descriptors and ``r = a - a~``,
``e = b - b~`` the actual rounding residuals,

    S - a~.b~ = r.b + a~.e,  so  |S_ij - a~_i.b~_j| <= |r_i| max_j |b_j| + |a~_i| max_j |e_j|

(Cauchy-Schwarz; the integer product ``q.p`` is exact in int32). The decisions of the
float32 rules (:func:`delf_retrieval.matching.nn.select_matches`: row argmax with the first
maximum winning, second best for the ratio test, column maximum for the mutual test with
the smallest row winning ties, distance bound) are then taken on **float64 dot products**
of the float32 descriptors (error below 1e-13, i.e. the exact similarity for every
decision that is not an exact tie), computed only where the bounds cannot decide:

1. per row and candidate: the approximate best ``j1`` and second best ``j2`` (with Numba
   one pass over the int32 block gives both values and ``j1``,
   :func:`delf_retrieval.matching.kernels.segment_stats`, and ``j2`` is looked up only for
   the rows still live; without it two argmax passes); rows that fail the distance or
   ratio test for *every* value inside the bounds are dropped without any exact work;
2. the survivors' two columns are scored exactly; a third column can only matter when its
   upper bound ``y2 + slack`` reaches the smaller exact score, and then every column whose
   upper bound reaches it (the row's *shortlist*) is scored exactly, unless the bounds
   already decide the tests;
3. mutual test: for each surviving row i and its nearest column j, every row whose upper
   bound at j reaches ``S_ij`` is scored exactly at j; i is mutual when none is larger
   and no smaller row with the same value has j as its own nearest column (the float32
   tie rule).

So the matches are those of ``select_matches`` on the exact similarities, by
construction. They differ from the float32 path only where float32's own rounding of the
product (at most ``D * 2**-24 ~ 7.6e-6`` for unit rows, and different between a
pair-by-pair and a stacked ``sgemm`` in OpenBLAS) decides a comparison.
"""

from __future__ import annotations

import functools
import threading

import numpy as np

from delf_retrieval.matching.device import tensorflow_device
from delf_retrieval.matching.kernels import numba_available, segment_stats, unit_distance

__all__ = ["approximate_group", "exact_dots"]

# Absolute slack added to every bound. The residual and descriptor norms are evaluated in
# float32 (each within about 4e-6 relative of its real value, and the bound terms are
# products of a norm near 1 with one near 0.01, so they move by < 1e-7), the scaled
# integer product and the exact dot products in float64 (< 1e-13): 1e-5 covers all.
_SLACK = 1e-5


def approximate_group(d1, stacked, bounds, max_distance, mutual, ratio, dtype, where, state):
    """Matches per candidate segment ``stacked[bounds[c]:bounds[c + 1]]`` (see module notes)."""
    approx, scale, slack = _approximate_product(d1, stacked, dtype, where, state)
    stats = None
    if approx.dtype == np.int32 and numba_available() and len(d1):  # one compiled pass for step 1
        stats = segment_stats(approx, np.asarray(bounds, np.int64))
    return [
        _decide_segment(
            d1, stacked[lo:hi], approx[:, lo:hi], scale, slack, max_distance, mutual, ratio,
            None if stats is None else (stats.best[:, s], stats.nearest[:, s], stats.second[:, s]),
        )
        for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
    ]


def exact_dots(d1: np.ndarray, d2: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """float64 ``d1[rows[k]] . d2[cols[k]]`` for each k: the value every decision uses.

    Each value depends only on its two descriptors (one contiguous 1-D dot product per
    pair), so equal descriptors give equal values wherever they sit.
    """
    if len(rows) == 0:
        return np.zeros(0)
    return np.einsum("ij,ij->i", d1[rows].astype(np.float64), d2[cols].astype(np.float64))


# --------------------------------------------------------------------------- decisions
class _Tests:
    """The distance and ratio tests on intervals of the best and second-best similarity."""

    def __init__(self, max_distance: float, ratio: float, has_ratio: bool):
        self.max_distance, self.ratio, self.has_ratio = max_distance, ratio, has_ratio

    def passes(self, best, second):
        """Exact values -> bool (the float32 path's comparisons, in float64)."""
        distance = unit_distance(best)
        ok = distance < self.max_distance
        if self.has_ratio:
            ok &= distance < self.ratio * unit_distance(second)
        return ok

    def surely_fails(self, best_hi, second_lo):
        """Fails for every best <= best_hi and second >= second_lo."""
        return ~self.passes(best_hi, second_lo)

    def surely_passes(self, best_lo, second_hi):
        """Passes for every best >= best_lo and second <= second_hi."""
        return self.passes(best_lo, second_hi)


def _decide_segment(d1, d2, block, scale, slack, max_distance, mutual, ratio, row_stats=None) -> np.ndarray:
    """Matches ``[M, 2]`` of ``d1`` against one candidate ``d2`` ``[N2, D]`` from its
    approximate block ``[N1, N2]`` (similarity ~ ``block * scale[:, None]`` within
    ``slack[:, None]``). ``row_stats``: the block's row maximum, its first position and
    the maximum without it (:func:`delf_retrieval.matching.kernels.segment_stats`), or None
    to take them here with two argmax passes."""
    n1, n2 = block.shape
    rows = np.arange(n1)
    tests = _Tests(max_distance, ratio, ratio < 1.0 and n2 > 1)
    if row_stats is None:
        j1 = block.argmax(axis=1)
        top = block[rows, j1]
        if n2 > 1:
            block[rows, j1] = _lowest(block.dtype)
            j2 = block.argmax(axis=1)
            runner_up = block[rows, j2]
            block[rows, j1] = top
    else:
        top, j1, runner_up = row_stats
        j2 = None  # found below for the live rows only (the approximate second best's column)
    y1 = top * scale
    y2 = runner_up * scale if n2 > 1 else np.full(n1, -np.inf)
    # 1. rows that fail for every exact value within the bounds need no exact work
    live = np.flatnonzero(~tests.surely_fails(y1 + slack, y2 - slack))
    if n2 == 1:
        j2 = j1
    elif j2 is None:
        j2 = np.zeros(n1, np.int64)
        masked = block[live]  # a copy
        masked[np.arange(len(live)), j1[live]] = _lowest(block.dtype)
        j2[live] = masked.argmax(axis=1)
    nearest, best, ok = _rows_exactly(d1, d2, block, scale, slack, live, j1, j2, y2, tests)
    keep = live[ok]
    if mutual and len(keep):
        keep = keep[_mutual(d1, d2, block, scale, slack, keep, nearest[ok], best[ok])]
    found = np.searchsorted(live, keep)
    return np.stack([keep, nearest[found]], axis=1).astype(np.int64)


def _rows_exactly(d1, d2, block, scale, slack, live, j1, j2, y2, tests):
    """Exact nearest column, its exact similarity and the distance/ratio outcome of the
    ``live`` rows (arrays aligned with ``live``)."""
    n2 = block.shape[1]
    g1 = exact_dots(d1, d2, live, j1[live])
    if n2 == 1:
        return j1[live], g1, tests.passes(g1, np.full(len(live), -np.inf))
    g2 = exact_dots(d1, d2, live, j2[live])
    swap = (g2 > g1) | ((g2 == g1) & (j2[live] < j1[live]))
    nearest = np.where(swap, j2[live], j1[live])
    best = np.maximum(g1, g2)
    other = np.minimum(g1, g2)
    # Any third column is at most y2 + slack (y2 is the approximate second best).
    third = y2[live] + slack[live] if n2 > 2 else np.full(len(live), -np.inf)
    known_top2 = third < other  # strict: no third column reaches the two scored ones
    best_known = third < best
    ok = tests.passes(best, other)
    unsure = ~known_top2
    # Bounds: best in [best, max(best, third)], second in [other, max(other, third)].
    fails = tests.surely_fails(np.maximum(best, third), other)
    passes = best_known & tests.surely_passes(best, np.maximum(other, third))
    ok[unsure & fails] = False
    ok[unsure & passes] = True
    shortlist = np.flatnonzero(unsure & ~fails & ~passes)
    if len(shortlist):
        n, b, s = _shortlist_exactly(d1, d2, block, scale, slack, live[shortlist], other[shortlist])
        nearest[shortlist], best[shortlist] = n, b
        ok[shortlist] = tests.passes(b, s)
    return nearest, best, ok


def _shortlist_exactly(d1, d2, block, scale, slack, rows, floor):
    """Exact nearest column, best and second-best similarity of ``rows`` over every column
    whose upper bound reaches ``floor`` (a lower bound of the row's second best, so the
    columns left out can be neither)."""
    sub = block[rows] * scale[rows, None] + slack[rows, None]
    r, c = np.nonzero(sub >= floor[:, None])
    values = exact_dots(d1, d2, rows[r], c)
    order = np.lexsort((c, -values, r))  # per row: most similar first, ties smaller column
    r, c, values = r[order], c[order], values[order]
    first = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
    # the two scored columns are always in the shortlist, so each row has a runner-up
    return c[first], values[first], values[first + 1]


def _mutual(d1, d2, block, scale, slack, keep, nearest, best) -> np.ndarray:
    """Mask over ``keep``: row i is mutual with its nearest column j (exact similarity
    ``best``) when no row is more similar to j and no smaller row with the same
    similarity has j as its own nearest column (``select_matches``' tie rule)."""
    # Upper bounds of every row at the claimed columns, in float32 (2x cheaper; the
    # 1e-6 added covers its rounding, so no contender is missed, at worst a few more).
    columns = np.take(block, nearest, axis=1)  # [N1, M]
    upper = columns * scale.astype(np.float32)[:, None]
    upper += (slack + 1e-6).astype(np.float32)[:, None]
    upper[keep, np.arange(len(keep))] = -np.inf  # a row does not contend with itself
    k, m = np.nonzero(upper >= best.astype(np.float32)[None, :])
    values = exact_dots(d1, d2, k, nearest[m])
    mutual = np.ones(len(keep), bool)
    mutual[m[values > best[m]]] = False
    for row, position in zip(k[values == best[m]], m[values == best[m]], strict=True):
        if row < keep[position] and _exact_nearest(d1, d2, row) == nearest[position]:
            mutual[position] = False  # an exact tie won by a smaller row (rare)
    return mutual


def _exact_nearest(d1, d2, row: int) -> int:
    values = exact_dots(d1, d2, np.full(len(d2), row), np.arange(len(d2)))
    return int(values.argmax())


def _lowest(dtype: np.dtype):
    return np.iinfo(dtype).min if np.issubdtype(dtype, np.integer) else -np.inf


# --------------------------------------------------------------------------- products
def _approximate_product(d1, stacked, dtype, where, state):
    """``(approx [N1, N2], scale [N1], slack [N1])``: ``|S - approx * scale| <= slack``."""
    if dtype == "int8" and where == "cpu":
        return _int8_product(d1, stacked, state)
    if dtype not in ("float16", "bfloat16", "int8", "float32"):
        raise ValueError(f"unknown MATCH_DTYPE {dtype!r}")
    return _tensorflow_product(d1, stacked, "float16" if dtype == "int8" else dtype, where)


def quantize_rows(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric quantisation: ``(q int16 [N, D], scale float32 [N])`` with
    ``q = rint(x * scale)`` and ``max |q| <= levels`` per row (all-zero rows: scale 1).
    Any integer ``q`` is valid for the bounds: they use the actual residuals."""
    peak = np.abs(x).max(axis=1) if x.size else np.zeros(len(x), np.float32)
    scale = (levels / np.where(peak > 0, peak, 1.0)).astype(np.float32)
    return np.rint(x * scale[:, None]).astype(np.int16), scale


def _int8_product(d1, stacked, state):
    if "query" not in state:  # once per match_batch call
        nonnegative = bool(d1.min() >= 0)
        # 7 bits on the u8 side when signed (the AVX2 u8 x s8 kernel sums pairs of
        # products in int16: 2 * 127 * 127 fits, 2 * 255 * 127 does not).
        query, query_scale = quantize_rows(d1, 127 if nonnegative else 63)
        zero_point = 0 if nonnegative else 64
        dequantised = query * (1 / query_scale)[:, None]
        state["query"] = (query + zero_point).astype(np.uint8)
        state["zero_point"] = np.array(zero_point, np.uint8)
        state["query_scale"] = query_scale.astype(np.float64)
        state["residual"] = _norms(d1 - dequantised).astype(np.float64)
        state["dequantised_norm"] = _norms(dequantised).astype(np.float64)
    peak = float(np.abs(stacked).max())
    candidate_scale = np.float32(127.0 / peak if peak > 0 else 1.0)
    candidates = np.rint(stacked * candidate_scale).astype(np.int8)
    residual = float(_norms(stacked - candidates * (1 / candidate_scale)).max())
    norm = float(_norms(stacked).max())
    # |S_ij - a~_i . b~_j| <= |r_i| |b_j| + |a~_i| |e_j| (module notes), per row:
    slack = state["residual"] * norm + state["dequantised_norm"] * residual + _SLACK
    scale = 1.0 / (state["query_scale"] * float(candidate_scale))
    approx = _int8_session().run(
        None, {"A": state["query"], "B": np.ascontiguousarray(candidates.T), "Z": state["zero_point"]}
    )[0]
    return approx, scale, slack


def _norms(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", x, x))


@functools.lru_cache(maxsize=1)
def _int8_session():
    """An ONNX Runtime session computing ``(A - Z) @ B`` for u8 A, s8 B (int32 result)."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError as error:
        raise ImportError(
            "MATCH_DTYPE='int8' needs ONNX Runtime: pip install 'delf_retrieval[fast]' "
            "(or pip install onnxruntime onnx)"
        ) from error
    inputs = [
        helper.make_tensor_value_info("A", TensorProto.UINT8, [None, None]),
        helper.make_tensor_value_info("B", TensorProto.INT8, [None, None]),
        helper.make_tensor_value_info("Z", TensorProto.UINT8, []),
    ]
    output = helper.make_tensor_value_info("Y", TensorProto.INT32, [None, None])
    node = helper.make_node("MatMulInteger", ["A", "B", "Z"], ["Y"])
    graph = helper.make_graph([node], "int8_similarity", inputs, [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)])
    options = ort.SessionOptions()
    # One thread: callers parallelise over candidates (see verify.count_inliers_many).
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


_TF_LOCK = threading.Lock()


def _tensorflow_product(d1, stacked, dtype, where):
    import tensorflow as tf

    name = tensorflow_device(where)
    with _TF_LOCK, tf.device(name):
        a = tf.cast(tf.constant(d1), dtype)
        b = tf.cast(tf.constant(stacked), dtype)
        block = tf.cast(tf.matmul(a, b, transpose_b=True), tf.float32).numpy()
    # Rounding each input element to a p-bit significand changes it by at most 2^-p
    # relatively, so |a.b - a~.b~| <= sum |a_k b_k| (2 2^-p + 2^-2p) <= 2^(1-p) + 2^-2p for
    # unit rows (Cauchy-Schwarz); float32 accumulation adds D 2^-24, rounding the output
    # to p bits 2^-p |y|. float32 on a GPU may run as TF32 (p = 11), so it is bounded so.
    bits = {"float16": 11, "bfloat16": 8, "float32": 24 if where == "cpu" else 11}[dtype]
    norm = float(max(_norms(d1.astype(np.float64)).max(), _norms(stacked.astype(np.float64)).max()))
    margin = (2.0 ** (1 - bits) + 2.0 ** (-2 * bits)) * norm**2 + d1.shape[1] * 2.0**-24 * norm**2
    margin += 2.0**-bits * (norm**2 + margin) + _SLACK
    return block, np.ones(len(d1)), np.full(len(d1), margin)
