"""Verification cascade side by side: which candidates the learned matcher sees.

Runs recognition (and with ``--retrieval`` retrieval) on feature stores that a
``delf-retrieval recognize`` / ``retrieve`` run with the same ``--work-dir`` already
extracted, once per ``CASCADE_CANDIDATES`` value (0: the learned matcher verifies the
first ``NUM_TO_RERANK`` by global similarity; W: mutual NN + RANSAC on the first W picks
them, :mod:`delf_retrieval.matching.cascade`), all in one process: the learned matcher caches its
matches by pair content, so a pair is matched once for the whole table. Prints GAP /
mAP@100 (All), the seconds spent in the cheap and the learned stage, the learned pairs
matched for the first time, and how often a candidate of the query's true landmark is
among the first 5 / W global candidates (landmark queries).

Usage::

    delf-retrieval recognize DATA --model aliked --work-dir W -o /dev/null   # extracts
    python benchmarks/cascade.py DATA --work-dir W --model aliked [--widths 0,30] [--retrieval]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
from cached_stores import add_store_arguments, open_stores, true_landmarks

import delf_retrieval
from delf_retrieval.config import default_preset, load_config
from delf_retrieval.features.images import read_labels_csv
from delf_retrieval.kaggle.metrics import evaluate_recognition, evaluate_retrieval
from delf_retrieval.kaggle.submission import recognition_dataframe, retrieval_dataframe
from delf_retrieval.matching import cascade
from delf_retrieval.matching import learned as learned_matching

_seconds: dict[str, float] = defaultdict(float)
_count = cascade.count_inliers_many


def timed_count_inliers_many(query, candidates, settings):
    """``count_inliers_many`` that adds its wall time to ``_seconds[MATCHER]``."""
    started = time.perf_counter()
    try:
        return _count(query, candidates, settings)
    finally:
        _seconds[settings.matcher] += time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_store_arguments(parser, model="aliked")
    parser.add_argument("--widths", default="0,30", help="CASCADE_CANDIDATES values, comma-separated")
    parser.add_argument("--retrieval", action="store_true", help="also retrieval mAP@100 (needs the index store)")
    args = parser.parse_args()
    cascade.count_inliers_many = timed_count_inliers_many

    extractor, stores = open_stores(args.work_dir, args.model)
    preset = args.preset or default_preset(extractor.family)
    base = load_config(preset)
    labels = read_labels_csv(args.data / "train.csv")
    ids = stores["test"].ids
    widths = [int(w) for w in args.widths.split(",")]
    recall = _candidate_recall(stores, labels, true_landmarks(args.data), [base.NUM_TO_RERANK, *widths])
    print(f"{args.data.name}, {args.model}, preset {preset} (NUM_TO_RERANK {base.NUM_TO_RERANK}, "
          f"CASCADE_MIN_INLIERS {base.CASCADE_MIN_INLIERS}); a true train photo among the first k global "
          f"candidates: " + ", ".join(f"k={k}: {r:.0%}" for k, r in recall.items()))
    print(f"{'CASCADE_CANDIDATES':>18s} {'GAP':>7s} {'mAP@100':>8s} {'cheap s':>8s} {'learned s':>9s} {'new pairs':>9s}")
    for width in widths:
        config = base.replace(CASCADE_CANDIDATES=width)
        _seconds.clear()
        cached = len(learned_matching._pair_cache)
        result = delf_retrieval.recognize_stores(stores["test"], stores["train"], labels, config, progress=False)
        gap = evaluate_recognition(recognition_dataframe(result.predictions, ids=ids), args.data / "solution.csv")["All"]
        score = float("nan")
        if args.retrieval and "index" in stores:
            ranked = delf_retrieval.retrieve_stores(
                stores["test"], stores["index"], config, train=stores["train"], labels=labels, progress=False
            )
            frame = retrieval_dataframe(ranked.rankings, ids=ids, top=config.RETRIEVAL_TOP)
            score = evaluate_retrieval(frame, args.data / "retrieval_solution.csv")["All"]
        learned = sum(v for k, v in _seconds.items() if k != "nn")
        new = len(learned_matching._pair_cache) - cached
        print(f"{width:18d} {gap:7.4f} {score:8.4f} {_seconds['nn']:8.1f} {learned:9.1f} {new:9d}", flush=True)


def _candidate_recall(stores, labels, truth: dict[str, frozenset[str]], widths: list[int]) -> dict[int, float]:
    """Fraction of landmark queries with a train photo of a true landmark among the first
    k global candidates, per k."""
    truth = {image_id: landmarks for image_id, landmarks in truth.items() if landmarks}
    queries, train = stores["test"], stores["train"]
    wanted = [i for i, q in enumerate(queries.ids) if q in truth]
    if not wanted:
        return {}
    vectors = np.asarray(queries.global_descriptors(), np.float32)[wanted]
    similarity = vectors @ np.asarray(train.global_descriptors(), np.float32).T
    order = np.argsort(-similarity, axis=1, kind="stable")
    train_labels = np.array([labels.get(t) for t in train.ids], dtype=object)
    result = {}
    for k in sorted({w for w in widths if w > 0}):
        hits = [bool(set(train_labels[order[r, :k]]) & truth[queries.ids[i]]) for r, i in enumerate(wanted)]
        result[k] = float(np.mean(hits))
    return result


if __name__ == "__main__":
    main()
