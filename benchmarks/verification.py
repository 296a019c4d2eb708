"""Geometric verification on real image pairs: host baseline vs delf_retrieval.verify.

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

Usage::

    python benchmarks/verification.py /work/shared/data/gldv2-mini-dev
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
from delf_retrieval.features import LocalFeatures
from delf_retrieval.images import kaggle_image_path, load_image, read_labels_csv
from delf_retrieval.models.opencv_sift import OpenCVSiftExtractor
from delf_retrieval.verify import count_inliers, count_inliers_many

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


def extract_features(data_dir: Path, ids: list[str]) -> dict[str, LocalFeatures]:
    extractor = OpenCVSiftExtractor()
    features = {}
    for image_id in ids:
        image = load_image(kaggle_image_path(data_dir / "train", image_id))
        features[image_id] = extractor.extract(image).local
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
    start = time.perf_counter()
    for query_id, positions in groups.items():
        candidates = [features[pairs[p][1]] for p in positions]
        counts[positions] = count_inliers_many(features[query_id], candidates, config)
    return counts, time.perf_counter() - start


def library(config) -> Callable[[LocalFeatures, LocalFeatures], int]:
    def fn(query: LocalFeatures, train: LocalFeatures) -> int:
        return count_inliers(
            query.keypoints, query.descriptors, train.keypoints, train.descriptors, config
        )

    return fn


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data_dir", type=Path, help="Kaggle-layout dataset with train.csv")
    parser.add_argument("--max-false-pairs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    labels = read_labels_csv(args.data_dir / "train.csv")
    pairs, is_true = make_pairs(labels, args.max_false_pairs, args.seed)
    start = time.perf_counter()
    features = extract_features(args.data_dir, sorted(labels))
    sizes = [len(f) for f in features.values()]
    print(
        f"{len(labels)} train images, {is_true.sum()} true pairs, {(~is_true).sum()} false pairs; "
        f"RootSIFT {np.mean(sizes):.0f} keypoints/image on average "
        f"(extracted in {time.perf_counter() - start:.1f} s, not timed below); "
        f"{os.cpu_count()} cores"
    )

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


if __name__ == "__main__":
    main()
