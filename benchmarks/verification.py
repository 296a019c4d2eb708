"""Geometric verification on real image pairs: host baseline vs delf_retrieval.matching.verify.

Pairs come from a Kaggle-layout dataset's ``train.csv``: every pair of photos of the same
landmark is a true pair, pairs of different landmarks are false pairs (a seeded sample).
Local features are RootSIFT from the weights-free
``delf_retrieval.models.opencv_sift.OpenCVSiftExtractor`` (extraction is not timed).

Methods, side by side (pairs/s, inlier counts on true and false pairs, ROC-AUC of the
inlier count as a true-pair score). "loop" calls ``count_inliers`` pair by pair (its
matrix product still uses every core through BLAS); ``count_inliers_many`` is grouped by
query image and runs RANSAC on all cores:

* host baseline (Kaggle 2020, as in DESIGN.md): ``scipy.spatial.cKDTree`` of the train
  image's descriptors queried with the query image's, ``distance_upper_bound`` 0.9,
  matches built in Python lists, ``pydegensac.findHomography`` (4 px, 0.99, 1000
  iterations), 4 matches or fewer -> 0;
* the ``opencv-sift`` preset (mutual NN + ratio 0.8, MAGSAC++ 16 px);
* the ``kaggle2020`` preset (the baseline's matching rule, seeded MAGSAC++), and the
  same with ``RANSAC_METHOD="degensac"`` (baseline parity, seeded).

A second table, "matching at the hardware limit", times the same pairs in one run:

* one core: the bare float32 products ``d1 @ d2.T`` (the bound), the same products in
  row tiles written into one reused buffer (the product part of ``match_batch`` with
  Numba), ``putative_matches``
  pair by pair, ``match_batch`` (one query against all its candidates, stacked) in
  float32 and in int8 (``MATCH_DTYPE``), and how often int8 gives exactly the float32
  matches and inlier counts;
* two cores: the float32 products split over 2 cores (the bound), ``count_inliers_many``
  with ``WORKERS=2`` (threads, BLAS held to one thread each) in float32 and int8, and the
  host baseline on 2 processes (the multiprocessing of the cited 10-day cleaning).

``--max-keypoints 1000`` keeps the strongest 1000 keypoints per image (DELG's cap).

Usage::

    python benchmarks/verification.py /work/shared/data/gldv2-mini-dev [--max-keypoints 1000]
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

try:
    import delf_retrieval  # noqa: F401
except ImportError:  # run from a checkout without installing
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from delf_retrieval.config import PRESETS
from delf_retrieval.core.threads import bounded_blas_threads
from delf_retrieval.features.containers import LocalFeatures, l2_normalize
from delf_retrieval.features.images import kaggle_image_path, load_image, read_labels_csv
from delf_retrieval.matching.kernels import _TILE_ROWS
from delf_retrieval.matching.nn import match_batch, select_matches
from delf_retrieval.matching.ransac import RansacSettings
from delf_retrieval.matching.verify import (
    MatchingSettings,
    count_inliers,
    count_inliers_many,
    putative_matches,
)
from delf_retrieval.models.opencv_sift import OpenCVSiftExtractor

# --- the host baseline (Kaggle 2020), written from its description ------------------------

BASELINE_MAX_DISTANCE = 0.9
BASELINE_MAX_REPROJECTION_ERROR = 4.0
BASELINE_HOMOGRAPHY_CONFIDENCE = 0.99
BASELINE_MAX_RANSAC_ITERATIONS = 1000


def baseline_num_inliers(query: LocalFeatures, train: LocalFeatures) -> int:
    """KD-tree nearest neighbours with a distance bound, then pydegensac, as the baseline."""
    import pydegensac
    from scipy.spatial import cKDTree

    tree = cKDTree(train.descriptors)
    _, nearest = tree.query(query.descriptors, distance_upper_bound=BASELINE_MAX_DISTANCE)
    missing = len(train)  # what cKDTree returns when nothing is within the bound
    query_points = np.array(
        [query.keypoints[i] for i in range(len(query)) if nearest[i] != missing]
    )
    train_points = np.array(
        [train.keypoints[nearest[i]] for i in range(len(query)) if nearest[i] != missing]
    )
    if query_points.shape[0] <= 4:
        return 0
    try:
        _, mask = pydegensac.findHomography(
            query_points,
            train_points,
            BASELINE_MAX_REPROJECTION_ERROR,
            BASELINE_HOMOGRAPHY_CONFIDENCE,
            BASELINE_MAX_RANSAC_ITERATIONS,
        )
    except np.linalg.LinAlgError:
        return 0
    return int(np.asarray(mask).astype(np.float32).sum())


# --- data -----------------------------------------------------------------------------------


def extract_features(
    data_dir: Path, ids: list[str], max_keypoints: int | None = None
) -> dict[str, LocalFeatures]:
    """RootSIFT of each train photo; ``max_keypoints`` keeps the strongest (by score)."""
    extractor = OpenCVSiftExtractor()
    features = {}
    for image_id in ids:
        image = load_image(kaggle_image_path(data_dir / "train", image_id))
        local = extractor.extract(image).local
        if max_keypoints is not None and len(local) > max_keypoints:
            keep = np.sort(np.argsort(-local.scores, kind="stable")[:max_keypoints])
            local = LocalFeatures(local.keypoints[keep], local.descriptors[keep], local.scores[keep], local.scales[keep])
        features[image_id] = local
    return features


def make_pairs(
    labels: dict[str, str], max_false: int, seed: int
) -> tuple[list[tuple[str, str]], np.ndarray]:
    """All same-landmark pairs and up to ``max_false`` different-landmark pairs (seeded)."""
    ids = sorted(labels)
    true_pairs, false_pairs = [], []
    for a, b in itertools.combinations(ids, 2):
        (true_pairs if labels[a] == labels[b] else false_pairs).append((a, b))
    if len(false_pairs) > max_false:
        keep = np.random.default_rng(seed).choice(len(false_pairs), max_false, replace=False)
        false_pairs = [false_pairs[i] for i in sorted(keep)]
    pairs = true_pairs + false_pairs
    is_true = np.array([True] * len(true_pairs) + [False] * len(false_pairs))
    return pairs, is_true


# --- scoring --------------------------------------------------------------------------------


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a true pair > score of a false pair), ties counting one half."""
    pos, neg = scores[positive].astype(float), scores[~positive].astype(float)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).mean()
    equal = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * equal)


def time_pairs(
    fn: Callable[[LocalFeatures, LocalFeatures], int],
    pairs: list[tuple[str, str]],
    features: dict[str, LocalFeatures],
) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    counts = np.array([fn(features[a], features[b]) for a, b in pairs], np.int64)
    return counts, time.perf_counter() - start


def time_many(
    config, pairs: list[tuple[str, str]], features: dict[str, LocalFeatures]
) -> tuple[np.ndarray, float]:
    """count_inliers_many grouped by query image (how the pipeline calls it)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for position, (a, _) in enumerate(pairs):
        groups[a].append(position)
    counts = np.zeros(len(pairs), np.int64)
    settings = MatchingSettings.from_config(config)
    start = time.perf_counter()
    for query_id, positions in groups.items():
        candidates = [features[pairs[p][1]] for p in positions]
        counts[positions] = count_inliers_many(features[query_id], candidates, settings)
    return counts, time.perf_counter() - start


def library(config) -> Callable[[LocalFeatures, LocalFeatures], int]:
    settings = MatchingSettings.from_config(config)

    def fn(query: LocalFeatures, train: LocalFeatures) -> int:
        return count_inliers(
            query.keypoints, query.descriptors, train.keypoints, train.descriptors, settings
        )

    return fn


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data_dir", type=Path, help="Kaggle-layout dataset with train.csv")
    parser.add_argument("--max-false-pairs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-keypoints", type=int, default=None, help="keep the strongest N keypoints per image")
    parser.add_argument("--skip-presets", action="store_true", help="only the hardware-limit table")
    parser.add_argument("--skip-baseline", action="store_true", help="no host-baseline row in that table")
    args = parser.parse_args()

    labels = read_labels_csv(args.data_dir / "train.csv")
    pairs, is_true = make_pairs(labels, args.max_false_pairs, args.seed)
    start = time.perf_counter()
    features = extract_features(args.data_dir, sorted(labels), args.max_keypoints)
    sizes = [len(f) for f in features.values()]
    print(
        f"{len(labels)} train images, {is_true.sum()} true pairs, {(~is_true).sum()} false pairs; "
        f"RootSIFT {np.mean(sizes):.0f} keypoints/image on average "
        f"(extracted in {time.perf_counter() - start:.1f} s, not timed below); "
        f"{os.cpu_count()} cores"
    )

    if not args.skip_presets:
        preset_table(pairs, is_true, features)
    print()
    hardware_limit_table(pairs, features, baseline=not args.skip_baseline)


def preset_table(pairs, is_true, features) -> None:
    """Methods side by side on one core's worth of calls (the original table)."""
    sift, kaggle = PRESETS["opencv-sift"], PRESETS["kaggle2020"]
    degensac = kaggle.replace(RANSAC_METHOD="degensac")
    runs = [
        ("host baseline: cKDTree 0.9 + pydegensac", time_pairs, baseline_num_inliers),
        ("ours: opencv-sift, count_inliers loop", time_pairs, library(sift)),
        ("ours: opencv-sift, count_inliers_many", time_many, sift),
        ("ours: kaggle2020 (MAGSAC), count_inliers loop", time_pairs, library(kaggle)),
        ("ours: kaggle2020+degensac, count_inliers loop", time_pairs, library(degensac)),
        ("ours: kaggle2020+degensac, count_inliers_many", time_many, degensac),
    ]
    rows = []
    for name, timer, method in runs:
        counts, seconds = timer(method, pairs, features)
        rows.append((name, counts, seconds))

    base_rate = len(pairs) / rows[0][2]
    header = (
        f"{'method':46s} {'pairs/s':>8s} {'speedup':>8s} {'true mean':>9s} {'true med':>8s} "
        f"{'false mean':>10s} {'false med':>9s} {'false max':>9s} {'ROC-AUC':>7s}"
    )
    print()
    print(header)
    print("-" * len(header))
    for name, counts, seconds in rows:
        rate = len(pairs) / seconds
        t, f = counts[is_true], counts[~is_true]
        print(
            f"{name:46s} {rate:8.1f} {rate / base_rate:7.1f}x {t.mean():9.1f} {np.median(t):8.1f} "
            f"{f.mean():10.1f} {np.median(f):9.1f} {f.max():9d} {roc_auc(counts, is_true):7.3f}"
        )
    parity = rows[4][1] - rows[0][1]
    assert (rows[1][1] == rows[2][1]).all() and (rows[4][1] == rows[5][1]).all(), "many != loop"
    print()
    print(
        "baseline vs ours kaggle2020+degensac (same matches, seeded vs unseeded RANSAC): "
        f"{np.mean(parity == 0):.0%} of pairs equal, mean |difference| {np.abs(parity).mean():.2f} inliers"
    )
    print(
        "goal: >= 10x the baseline per pair with equal or better separation: "
        f"opencv-sift preset {len(pairs) / rows[1][2] / base_rate:.1f}x (loop), "
        f"{len(pairs) / rows[2][2] / base_rate:.1f}x (count_inliers_many), ROC-AUC "
        f"{roc_auc(rows[1][1], is_true):.3f} vs {roc_auc(rows[0][1], is_true):.3f}"
    )


# --- matching at the hardware limit -------------------------------------------------------


def by_query(pairs: list[tuple[str, str]]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for position, (a, _) in enumerate(pairs):
        groups[a].append(position)
    return groups


def timed(fn: Callable[[], object], repeats: int = 1) -> tuple[object, float]:
    """Result of ``fn`` and its best wall time over ``repeats`` runs (seconds)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def interleaved(
    methods: dict[str, Callable[[], object]], repeats: int = 3, cores: int = 1
) -> tuple[dict[str, object], dict[str, tuple[float, float]]]:
    """Run the methods round-robin ``repeats`` times; per method its result and
    ``(wall, cpu)``: the smallest wall time and the smallest CPU time (this process's,
    divided by ``cores``), seconds. Round-robin spreads the drift of a shared machine's
    load over all methods; on such a machine wall time mostly measures time slicing, CPU
    time much less so (cache sharing still slows it)."""
    results: dict[str, object] = {}
    times = {name: (float("inf"), float("inf")) for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            results[name] = fn()
            wall, cpu = time.perf_counter() - start, (time.process_time() - start_cpu) / cores
            times[name] = (min(times[name][0], wall), min(times[name][1], cpu))
    return results, times


def tiled_product(d1: np.ndarray, d2: np.ndarray, rows: int = _TILE_ROWS) -> tuple[int, int]:
    """The float32 product ``d1 @ d2.T`` computed ``rows`` rows at a time into one reused
    buffer (nothing else): the product part of ``match_kernels.product_stats``."""
    buffer = np.empty((min(rows, len(d1)), len(d2)), np.float32)
    for start in range(0, len(d1), rows):
        np.matmul(d1[start:start + rows], d2.T, out=buffer[: min(rows, len(d1) - start)])
    return len(d1), len(d2)


def product_bound(pairs, descriptors, workers: int, product=None) -> float:
    """Seconds of the bare float32 products of all pairs on ``workers`` cores: the faster
    of BLAS threads over each product and one-thread products on ``workers`` threads.
    ``product(d1, d2)``: how one product is computed (default ``d1 @ d2.T``)."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    def products(chunk):
        for a, b in chunk:
            if product is None:
                descriptors[a] @ descriptors[b].T
            else:
                product(descriptors[a], descriptors[b])

    with threadpool_limits(workers):
        _, blas = timed(lambda: products(pairs), 2)
    chunks = [pairs[i::workers] for i in range(workers)]
    with bounded_blas_threads(1), ThreadPoolExecutor(workers) as pool:
        _, threads = timed(lambda: list(pool.map(products, chunks)), 2)
    return min(blas, threads)


def _baseline_worker(chunk):
    return [baseline_num_inliers(_SHARED[a], _SHARED[b]) for a, b in chunk]


_SHARED: dict[str, LocalFeatures] = {}


def baseline_on_processes(pairs, features, processes: int) -> tuple[np.ndarray, float]:
    """The host baseline over ``processes`` forked processes (as the cited cleaning)."""
    import multiprocessing

    _SHARED.update(features)
    chunks = [pairs[i::processes] for i in range(processes)]
    context = multiprocessing.get_context("fork")
    with context.Pool(processes) as pool:
        start = time.perf_counter()
        parts = pool.map(_baseline_worker, chunks)
        seconds = time.perf_counter() - start
    counts = np.zeros(len(pairs), np.int64)
    for i, part in enumerate(parts):
        counts[i::processes] = part
    return counts, seconds


def many(pairs, features, config) -> np.ndarray:
    counts = np.zeros(len(pairs), np.int64)
    settings = MatchingSettings.from_config(config)
    for query_id, positions in by_query(pairs).items():
        candidates = [features[pairs[p][1]] for p in positions]
        counts[positions] = count_inliers_many(features[query_id], candidates, settings)
    return counts


def hardware_limit_table(pairs, features, config=None, baseline: bool = True) -> dict[str, float]:
    """Print (and return, as pairs/s) the hardware-limit comparison; see the module notes."""
    from threadpoolctl import threadpool_limits

    config = config or PRESETS["opencv-sift"]
    rule = dict(
        max_distance=config.MAX_DESCRIPTOR_DISTANCE,
        mutual=config.MUTUAL_NEAREST_NEIGHBOR,
        ratio=config.RATIO_TEST,
    )
    unit = {image_id: l2_normalize(f.descriptors) for image_id, f in features.items()}
    groups = by_query(pairs)
    n = len(pairs)
    rates: dict[str, float] = {}

    def batched(dtype):
        found = [None] * n
        for query_id, positions in groups.items():
            for p, m in zip(positions, match_batch(unit[query_id], [unit[pairs[p][1]] for p in positions], dtype=dtype, **rule), strict=True):
                found[p] = m
        return found

    print(f"matching at the hardware limit: {n} pairs, {np.mean([len(f) for f in features.values()]):.0f} keypoints/image, "
          f"{config.RATIO_TEST} ratio, mutual {config.MUTUAL_NEAREST_NEIGHBOR}; machine shared with other jobs: "
          "compare rows of this run only")
    load_before = os.getloadavg()[0]
    f32 = batched("float32")
    u8s8, ransac = int8_products(pairs, unit), ransac_jobs(pairs, features, f32, config)
    with threadpool_limits(1):
        found, times = interleaved({
            "bound": lambda: [(unit[a] @ unit[b].T).shape for a, b in pairs],
            "tiled bound": lambda: [tiled_product(unit[a], unit[b]) for a, b in pairs],
            "loop": lambda: [putative_matches(unit[a], unit[b], **rule) for a, b in pairs],
            "float32": lambda: batched("float32"),
            "int8": lambda: batched("int8"),
            "u8s8": u8s8,
            "ransac": ransac,
        })
        exact = [exact_matches(unit[a], unit[b], rule) for a, b in pairs]
    bound1, tiled1, t_loop, t_f32, t_int8, t_u8s8, t_ransac = (
        times[k] for k in ("bound", "tiled bound", "loop", "float32", "int8", "u8s8", "ransac")
    )
    loop, f32, int8 = found["loop"], found["float32"], found["int8"]
    same = np.mean([np.array_equal(x, y) for x, y in zip(int8, f32, strict=True)])
    same_exact = np.mean([np.array_equal(x, y) for x, y in zip(int8, exact, strict=True)])
    f32_exact = np.mean([np.array_equal(x, y) for x, y in zip(f32, exact, strict=True)])
    overlap = np.mean([
        len({tuple(r) for r in x} & {tuple(r) for r in y}) / max(len(y), 1) for x, y in zip(int8, f32, strict=True)
    ])
    assert all(np.array_equal(x, y) for x, y in zip(loop, f32, strict=True)), "batched float32 != pair by pair"
    # 2-core bound: wall time measured; CPU time per core = the 1-core products' CPU / 2
    bound2 = (product_bound(pairs, unit, 2), bound1[1] / 2)
    tiled2 = (product_bound(pairs, unit, 2, tiled_product), tiled1[1] / 2)
    cfg32 = config.replace(WORKERS=2)
    found, times = interleaved({
        "float32": lambda: many(pairs, features, cfg32),
        "int8": lambda: many(pairs, features, cfg32.replace(MATCH_DTYPE="int8")),
    }, cores=2)
    (counts32, t_many32), (counts8, t_many8) = (found["float32"], times["float32"]), (found["int8"], times["int8"])
    rows = [
        ("1 core: float32 products alone (bound)", bound1, bound1, ""),
        (f"1 core: float32 products, {_TILE_ROWS}-row tiles", tiled1, bound1, "into one reused buffer"),
        ("1 core: putative_matches, pair by pair", t_loop, bound1, ""),
        ("1 core: match_batch float32 (stacked)", t_f32, bound1, ""),
        ("1 core: int8 products alone (ORT u8s8)", t_u8s8, bound1, ""),
        ("1 core: match_batch int8", t_int8, bound1, f"{t_f32[1] / t_int8[1]:.2f}x faster than float32 (CPU)"),
        ("1 core: RANSAC alone (float32 matches)", t_ransac, bound1, ""),
        ("2 cores: float32 products alone (bound)", bound2, bound2, ""),
        (f"2 cores: float32 products, {_TILE_ROWS}-row tiles", tiled2, bound2, ""),
        ("2 cores: count_inliers_many float32", t_many32, bound2, ""),
        ("2 cores: count_inliers_many int8", t_many8, bound2, f"{t_many32[1] / t_many8[1]:.2f}x faster than float32 (CPU)"),
    ]
    if baseline:
        _, t_base2 = baseline_on_processes(pairs, features, 2)
        rows.append(("2 cores: host baseline, 2 processes", (t_base2, float("nan")), bound2,
                     f"{t_base2 / t_many32[0]:.1f}x slower than ours (wall)"))
    print("wall: elapsed time (best of 3, methods run round-robin); CPU (best of 3): this process's CPU time (per core for 2-core rows, "
          "which hides idle cores); x bound: against the float32 products on as many cores")
    print(f"{'step':44s} {'pairs/s':>8s} {'ms/pair':>8s} {'CPU ms':>7s} {'x bound':>8s} {'x bound':>8s}  note")
    print(f"{'':44s} {'(wall)':>8s} {'(wall)':>8s} {'/pair':>7s} {'(wall)':>8s} {'(CPU)':>8s}")
    for name, (wall, cpu), (bound_wall, bound_cpu), note in rows:
        rates[name] = n / wall
        print(f"{name:44s} {n / wall:8.1f} {wall / n * 1e3:8.2f} {cpu / n * 1e3:7.2f} "
              f"{wall / bound_wall:7.2f}x {cpu / bound_cpu:7.2f}x  {note}")
    print(f"int8 vs float32: identical putative matches on {same:.1%} of pairs (mean overlap {overlap:.2%}), "
          f"identical inlier counts on {np.mean(counts8 == counts32):.1%} of pairs")
    print(f"against the float64 product: int8 identical on {same_exact:.1%} of pairs, float32 on {f32_exact:.1%}")
    print(f"load average (1 min) before / after the timings: {load_before:.1f} / {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    rates["int8_same_matches"] = float(same)
    rates["int8_same_inliers"] = float(np.mean(counts8 == counts32))
    rates["int8_same_as_float64"] = float(same_exact)
    return rates


def int8_products(pairs, unit) -> Callable[[], list]:
    """The bare ONNX Runtime u8 x s8 products of all pairs, inputs quantised beforehand
    (match_batch int8 quantises once per query and group)."""
    from delf_retrieval.matching.reduced_precision import _int8_session, quantize_rows

    session, zero = _int8_session(), np.array(0, np.uint8)
    quantised = {k: quantize_rows(v, 127)[0] for k, v in unit.items()}
    inputs = [
        {"A": np.abs(quantised[a]).astype(np.uint8), "B": np.ascontiguousarray(quantised[b].T.astype(np.int8)), "Z": zero}
        for a, b in pairs
    ]
    return lambda: [session.run(None, x)[0].shape for x in inputs]


def ransac_jobs(pairs, features, matches, config) -> Callable[[], list]:
    """RANSAC alone on given putative matches (as count_inliers_many runs it)."""
    ransac = RansacSettings.from_config(config)
    jobs = [
        (features[a].keypoints[m[:, 0]], features[b].keypoints[m[:, 1]])
        for (a, b), m in zip(pairs, matches, strict=True)
        if len(m) > config.MIN_MATCHES
    ]
    return lambda: [ransac.inliers(p1, p2).sum() for p1, p2 in jobs]


def exact_matches(d1, d2, rule) -> np.ndarray:
    """The matching rules on the float64 product (the reference int8 is exact against)."""
    sims = d1.astype(np.float64) @ d2.astype(np.float64).T
    return select_matches(sims, sims.max(axis=0), **rule)


if __name__ == "__main__":
    main()
