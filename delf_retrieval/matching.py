"""Putative matches of one query image against many candidates in one batched step.

:func:`match_batch` stacks the candidates' descriptors and multiplies them with the
query's in one product per group (``[N1, D] x [D, N2_1 + N2_2 + ...]``), then finds, per
candidate segment of the columns, each query descriptor's nearest and second nearest
neighbour (argmax / ratio test) and each candidate descriptor's nearest query descriptor
(mutual test). The rules are those of :func:`delf_retrieval.verify.putative_matches`.

Precision (``Config.MATCH_DTYPE``):

``"float32"``
    NumPy/BLAS ``sgemm``; equal to :func:`~delf_retrieval.verify.putative_matches`.
``"int8"``
    The product runs on 8-bit integers through ONNX Runtime's ``MatMulInteger`` (MLAS
    u8 x s8 kernels, ``onnxruntime/core/mlas/lib/qgemm_kernel_avx2.cpp``: ``vpmaddubsw`` +
    ``vpmaddwd`` on AVX2, ``vpdpbusd`` where the CPU has AVX-512/AVX VNNI). This project's
    machines (AMD EPYC, AVX2 only: no AVX-512, VNNI, BF16 or AMX) run the product alone at
    about 1.6-2x the float32 rate, but the reductions over the int32 result cost what they
    cost in float32 and the re-scoring below adds to them, so whole-pair matching is not
    faster there (``benchmarks/verification.py`` measures it); the mode is for CPUs with
    VNNI, where the product is 4x+ faster. Query descriptors are quantised to 7 bits (the
    u8 x s8 AVX2 kernel sums pairs of products in int16), candidates to 8. Approximate
    similarities only *choose*: each row's two best columns are re-scored in float32, and
    rows whose decision could change within the rounding margin are re-ranked exactly
    over every column inside that margin. The margin is statistical (``_SIGMAS`` standard
    deviations of the rounding error), so rare near-ties can still differ from float32.
``"float16"`` / ``"bfloat16"``
    TensorFlow ``tf.matmul`` in that dtype (for GPUs: Tensor Cores; on these CPUs it is
    slower than float32), followed by the same exact re-scoring as ``"int8"``.

Device (``Config.MATCH_DEVICE``): ``"cpu"``; ``"gpu"`` runs the product with TensorFlow
on ``/GPU:0`` (every dtype; int8 becomes float16 there); ``"auto"`` picks the GPU when
TensorFlow sees one. :func:`resolve_device` holds that logic.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence

import numpy as np

__all__ = ["match_batch", "quantize_int8", "resolve_device", "select_matches", "tensorflow_device"]

# Stacked product size per group (elements of the [N1, sum N2] similarity matrix).
_GROUP_ELEMENTS = 1 << 22
# Rows of the int8 product computed at once (the tile stays in cache while reduced).
_TILE_ELEMENTS = 1 << 19
# Margin of the reduced-precision re-scoring, in standard deviations of the rounding error.
_SIGMAS = 6.0
# Stacked candidate descriptors per int8 product (ONNX Runtime packs them per call).
_INT8_GROUP_COLUMNS = 2048
_INT32_MIN = np.iinfo(np.int32).min


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
        As :func:`delf_retrieval.verify.putative_matches`.
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
    order = [c for c in range(len(candidates)) if len(candidates[c])]
    for c in range(len(candidates)):
        if not len(candidates[c]):
            results[c] = np.zeros((0, 2), np.int64)
    exact = dtype == "float32" and where == "cpu"
    # The int8 kernel packs the right-hand matrix on every call: small groups there.
    rows = len(d1) if exact else _GROUP_ELEMENTS // _INT8_GROUP_COLUMNS
    state: dict = {}  # the query's quantisation, made once per call
    for group in _groups([len(candidates[c]) for c in order], rows):
        members = [order[g] for g in group]
        stacked = np.ascontiguousarray(np.concatenate([candidates[c] for c in members]), np.float32)
        bounds = np.cumsum([0] + [len(candidates[c]) for c in members])
        if exact:
            found = _exact_group(d1, stacked, bounds, max_distance, mutual, ratio)
        else:
            found = _approximate_group(
                d1, stacked, bounds, max_distance, mutual, ratio, dtype, where, state
            )
        for c, matches in zip(members, found, strict=True):
            results[c] = matches
    return [r if r is not None else np.zeros((0, 2), np.int64) for r in results]


def resolve_device(device: str) -> str:
    """``"cpu"`` or ``"gpu"`` for a MATCH_DEVICE setting.

    ``"auto"`` is ``"gpu"`` when TensorFlow is importable and lists a GPU, else ``"cpu"``;
    ``"gpu"`` without one raises ``RuntimeError``.
    """
    if device == "cpu":
        return "cpu"
    if device not in ("gpu", "auto"):
        raise ValueError(f"MATCH_DEVICE must be 'cpu', 'gpu' or 'auto', got {device!r}")
    has_gpu = _tensorflow_gpus() > 0
    if device == "gpu" and not has_gpu:
        raise RuntimeError("MATCH_DEVICE='gpu' but TensorFlow sees no GPU; use 'cpu' or 'auto'")
    return "gpu" if has_gpu else "cpu"


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
    sims = d1 @ stacked.T  # [N1, sum N2]: one product for the whole group
    column_max = sims.max(axis=0) if mutual else None
    return [
        select_matches(
            sims[:, start:stop],
            None if column_max is None else column_max[start:stop],
            max_distance,
            mutual,
            ratio,
        )
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def select_matches(
    sims: np.ndarray,
    column_max: np.ndarray | None,
    max_distance: float,
    mutual: bool,
    ratio: float,
) -> np.ndarray:
    """Matches from a similarity block ``[N1, N2]`` (modified in place when ``ratio < 1``).

    ``column_max`` is ``sims.max(axis=0)`` (needed when ``mutual``). Ties: the smaller
    index wins (first maximum), and of several rows tied for one column only the
    smallest is kept.
    """
    rows = np.arange(sims.shape[0])
    nearest = sims.argmax(axis=1)
    best = sims[rows, nearest]
    keep = np.ones(sims.shape[0], dtype=bool)
    if np.isfinite(max_distance):
        keep &= _distance(best.astype(np.float64)) < max_distance
    if mutual:
        candidates = np.flatnonzero(keep & (best == column_max[nearest]))
        _, first = np.unique(nearest[candidates], return_index=True)
        keep = np.zeros_like(keep)
        keep[candidates[first]] = True
    if ratio < 1.0 and sims.shape[1] > 1:
        sims[rows, nearest] = -np.inf
        second = _distance(sims.max(axis=1).astype(np.float64))
        keep &= _distance(best.astype(np.float64)) < ratio * second
    return np.stack([rows[keep], nearest[keep]], axis=1).astype(np.int64)


def _distance(similarity: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.sqrt(np.maximum(2.0 - 2.0 * similarity, 0.0))


# --------------------------------------------------------------------------- reduced precision
def _approximate_group(d1, stacked, bounds, max_distance, mutual, ratio, dtype, where, state):
    """Approximate products choose, float32 re-scoring decides (see the module notes).

    The product is computed a tile of query rows at a time (the tile stays in cache while
    it is reduced) with the passes of the float32 path: per row and candidate segment the
    two best columns (argmax, masked argmax), per column the maximum. A row whose two
    best are within ``2 * margin`` of each other, and that could still pass the distance
    and ratio tests, is re-ranked exactly over every column within ``2 * margin`` of its
    maximum. :func:`_decide` re-scores the chosen pairs in float32.
    """
    n1, total = d1.shape[0], stacked.shape[0]
    segments = list(zip(bounds[:-1], bounds[1:], strict=True))
    picks = np.full((len(segments), 2, n1), -1, np.int64)  # best, second best column
    values = np.full((len(segments), 2, n1), -np.inf)  # their approximate similarities
    column_max = np.full(total, -np.inf)
    product, unit, margin = _approximate_product(d1, stacked, dtype, where, state)
    band = 2 * margin
    tile = max(16, min(n1, _TILE_ELEMENTS // max(total, 1)))
    for start in range(0, n1, tile):
        block = product(start, min(start + tile, n1))  # [t, total] approximate, x unit
        rows = np.arange(block.shape[0])
        stop = start + len(rows)
        if mutual:
            np.maximum(column_max, block.max(axis=0) / unit, out=column_max)
        for s, (lo, hi) in enumerate(segments):
            view = block[:, lo:hi]
            j1 = view.argmax(axis=1)
            top = view[rows, j1]
            picks[s, 0, start:stop], values[s, 0, start:stop] = j1, top / unit
            if hi - lo < 2:
                continue
            view[rows, j1] = _lowest(block.dtype)
            j2 = view.argmax(axis=1)
            picks[s, 1, start:stop], values[s, 1, start:stop] = j2, view[rows, j2] / unit
            view[rows, j1] = top
            y1, y2 = values[s, 0, start:stop], values[s, 1, start:stop]
            unsure = (y1 - y2 <= band) | _ratio_undecided(y1, y2, margin, ratio)
            unsure = np.flatnonzero(unsure & _could_pass(y1, y2, margin, max_distance, ratio))
            if len(unsure):
                _rerank_exactly(d1, stacked, view, unsure, start, lo, y2, band, unit, picks[s], values[s])
    return [
        _decide(d1, stacked[lo:hi], picks[s], values[s], column_max[lo:hi], margin,
                max_distance, mutual, ratio)
        for s, (lo, hi) in enumerate(segments)
    ]


def _could_pass(y1, y2, margin, max_distance, ratio) -> np.ndarray:
    """Whether a row with approximate best / second best similarities ``y1 >= y2`` might
    pass the distance and ratio tests for some exact values within ``margin``."""
    possible = np.ones(len(y1), bool)
    if np.isfinite(max_distance):
        possible &= _distance(np.minimum(y1 + margin, 1.0)) < max_distance
    if ratio < 1.0:
        possible &= _distance(np.minimum(y1 + margin, 1.0)) < ratio * _distance(y2 - margin)
    return possible


def _ratio_undecided(y1, y2, margin, ratio) -> np.ndarray:
    """Rows whose ratio test could go either way for exact values within ``margin``."""
    if ratio >= 1.0:
        return np.zeros(len(y1), bool)
    can_pass = _distance(np.minimum(y1 + margin, 1.0)) < ratio * _distance(y2 - margin)
    can_fail = _distance(np.minimum(y1 - margin, 1.0)) >= ratio * _distance(np.minimum(y2 + margin, 1.0))
    return can_pass & can_fail


def _rerank_exactly(d1, stacked, view, unsure, start, lo, y2, band, unit, picks, values) -> None:
    """Exact best two of the ``unsure`` rows of a tile over their shortlists (every column
    within ``band`` of the approximate second best, so the exact second best is among
    them), written into ``picks``/``values``."""
    sub = view[unsure]
    rows, cols = np.nonzero(sub >= ((y2[unsure] - band) * unit)[:, None])
    exact = _dots(d1, stacked, unsure[rows] + start, cols + lo)
    order = np.lexsort((cols, -exact, rows))
    rows, cols = rows[order], cols[order]
    first = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    runner = first + 1
    has_runner = runner < len(rows)
    has_runner[has_runner] &= rows[runner[has_runner]] == rows[first[has_runner]]
    target = unsure[rows[first]] + start
    picks[0, target] = cols[first]
    values[0, target] = sub[rows[first], cols[first]] / unit
    picks[1, target[has_runner]] = cols[runner[has_runner]]
    values[1, target[has_runner]] = sub[rows[runner[has_runner]], cols[runner[has_runner]]] / unit


def _lowest(dtype: np.dtype):
    return np.iinfo(dtype).min if np.issubdtype(dtype, np.integer) else -np.inf


def _decide(d1, d2, picks, values, column_max, margin, max_distance, mutual, ratio):
    """Matches from each row's approximate two best columns, re-scored in float32 (the
    exactly better one is the nearest), and the approximate column maxima.

    Mutual test: a row claims each of its two columns where its approximate similarity
    is within ``2 * margin`` of the column's approximate maximum; a column goes to its
    exactly most similar claimant (ties: the smaller row), and a row is mutual when it
    wins its nearest column.
    """
    n1, n2 = d1.shape[0], d2.shape[0]
    rows = np.arange(n1)
    exact = np.full((2, n1), -np.inf, np.float32)
    exact[0] = _dots(d1, d2, rows, picks[0])
    has_second = picks[1] >= 0
    exact[1, has_second] = _dots(d1, d2, rows[has_second], picks[1][has_second])
    swap = exact[1] > exact[0]
    nearest = np.where(swap, picks[1], picks[0])
    best = np.where(swap, exact[1], exact[0])
    second = np.where(swap, exact[0], exact[1])
    keep = np.ones(n1, bool)
    if np.isfinite(max_distance):
        keep &= _distance(best.astype(np.float64)) < max_distance
    if mutual:
        claim_rows = np.r_[rows, rows[has_second]]
        claim_cols = np.r_[picks[0], picks[1][has_second]]
        claim_value = np.r_[exact[0], exact[1][has_second]]
        approx = np.r_[values[0], values[1][has_second]]
        close = approx >= column_max[claim_cols] - 2 * margin
        claim_rows, claim_cols, claim_value = claim_rows[close], claim_cols[close], claim_value[close]
        order = np.lexsort((claim_rows, -claim_value, claim_cols))
        first = order[np.unique(claim_cols[order], return_index=True)[1]]
        winner = np.full(n2, -1, np.int64)
        winner[claim_cols[first]] = claim_rows[first]
        keep &= winner[nearest] == rows
    if ratio < 1.0 and n2 > 1:
        keep &= _distance(best.astype(np.float64)) < ratio * _distance(second.astype(np.float64))
    return np.stack([rows[keep], nearest[keep]], axis=1).astype(np.int64)


def _dots(d1: np.ndarray, d2: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """float32 ``d1[rows[k]] . d2[cols[k]]`` for each k."""
    return np.einsum("ij,ij->i", d1[rows], d2[cols]).astype(np.float32)


def _approximate_product(d1, stacked, dtype, where, state):
    """``(product(start, stop) -> [t, N2] block, unit, margin)``: block / unit ~ cosine."""
    if dtype == "int8" and where == "cpu":
        return _int8_product(d1, stacked, state)
    if dtype not in ("float16", "bfloat16", "int8", "float32"):
        raise ValueError(f"unknown MATCH_DTYPE {dtype!r}")
    return _tensorflow_product(d1, stacked, "float16" if dtype == "int8" else dtype, where)


def _int8_product(d1, stacked, state):
    if "query" not in state:
        nonnegative = bool(d1.min() >= 0)
        # 7 bits on the u8 side (the AVX2 u8 x s8 kernel sums pairs of products in int16).
        query, scale = quantize_int8(d1, 127 if nonnegative else 63)
        zero_point = 0 if nonnegative else 64
        state["query"] = (query.astype(np.int16) + zero_point).astype(np.uint8)
        state["zero_point"] = np.array(zero_point, np.uint8)
        state["scale"] = scale
        state["residual"] = _residual_norm(d1, query, scale)
    candidates, candidate_scale = quantize_int8(stacked, 127)
    candidates_t = np.ascontiguousarray(candidates.T)
    unit = state["scale"] * candidate_scale
    # The rounding residual r = x - q / s of a row is about uniform and independent of the
    # other descriptor's direction, so a . r_b has a standard deviation near
    # |r_b| / sqrt(D) for unit rows: the margin is _SIGMAS of those, both sides.
    spread = np.hypot(state["residual"], _residual_norm(stacked, candidates, candidate_scale))
    margin = _SIGMAS * spread / np.sqrt(d1.shape[1]) + 1e-6
    session = _int8_session()
    query_u8, zero_point = state["query"], state["zero_point"]

    def product(start: int, stop: int) -> np.ndarray:
        return session.run(None, {"A": query_u8[start:stop], "B": candidates_t, "Z": zero_point})[0]

    return product, unit, margin


def _residual_norm(x: np.ndarray, q: np.ndarray, scale: float) -> float:
    """Largest row norm of ``x - q / scale`` (float32)."""
    residual = x - q.astype(np.float32) * np.float32(1.0 / scale)
    return float(np.sqrt(np.einsum("ij,ij->i", residual, residual).max(initial=0.0)))


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


# --------------------------------------------------------------------------- TensorFlow
_TF_LOCK = threading.Lock()


def _tensorflow_gpus() -> int:
    try:
        import tensorflow as tf
    except ImportError:
        return 0
    return len(tf.config.list_physical_devices("GPU"))


def tensorflow_device(where: str) -> str:
    """TensorFlow device string for ``"cpu"``/``"gpu"``."""
    return "/GPU:0" if where == "gpu" else "/CPU:0"


def _tensorflow_product(d1, stacked, dtype, where):
    import tensorflow as tf

    name = tensorflow_device(where)
    with _TF_LOCK, tf.device(name):
        a = tf.cast(tf.constant(d1), dtype)
        b = tf.cast(tf.constant(stacked), dtype)
    # Rounding each element to a p-bit significand changes it by at most 2^-p relatively,
    # so |a.b - a~.b~| <= sum |a_k b_k| (2 2^-p + 2^-2p) <= 2^(1-p) + 2^-2p for unit rows
    # (Cauchy-Schwarz); products are accumulated in float32 (D 2^-24 more).
    bits = {"float16": 11, "bfloat16": 8, "float32": 24}[dtype]
    margin = 2.0 ** (1 - bits) + 2.0 ** (-2 * bits) + d1.shape[1] * 2.0**-24

    def product(start: int, stop: int) -> np.ndarray:
        with tf.device(name):
            block = tf.matmul(a[start:stop], b, transpose_b=True)
            return tf.cast(block, tf.float32).numpy()

    return product, 1.0, margin
