"""Verification cascade side by side: which candidates the learned matcher sees.

Runs recognition (and with ``--retrieval`` retrieval) on feature stores that a
``delf-retrieval recognize`` / ``retrieve`` run with the same ``--work-dir`` already
extracted, once per ``CASCADE_CANDIDATES`` value (0: the learned matcher verifies the
first ``NUM_TO_RERANK`` by global similarity; W: mutual NN + RANSAC on the first W picks
them, :mod:`delf_retrieval.cascade`), all in one process: the learned matcher caches its
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
from pathlib import Path

import numpy as np

try:
    import delf_retrieval  # noqa: F401
except ImportError:  # run from a checkout without installing
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from delf_retrieval import cascade, learned_matching, pipeline
from delf_retrieval.config import default_preset, load_config
from delf_retrieval.images import read_labels_csv
from delf_retrieval.metrics import evaluate_recognition, evaluate_retrieval
from delf_retrieval.models.loader import load_extractor
from delf_retrieval.store import FeatureStore
from delf_retrieval.submission import recognition_dataframe, retrieval_dataframe

_seconds: dict[str, float] = defaultdict(float)
_count = cascade.count_inliers_many


def timed_count_inliers_many(query, candidates, config):
    """``count_inliers_many`` that adds its wall time to ``_seconds[MATCHER]``."""
    started = time.perf_counter()
    try:
        return _count(query, candidates, config)
    finally:
        _seconds[config.MATCHER] += time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--model", default="aliked")
    parser.add_argument("--preset", default=None, help="default: the model's (its learned matcher)")
    parser.add_argument("--widths", default="0,30", help="CASCADE_CANDIDATES values, comma-separated")
    parser.add_argument("--retrieval", action="store_true", help="also retrieval mAP@100 (needs the index store)")
    args = parser.parse_args()
    cascade.count_inliers_many = timed_count_inliers_many

    extractor = load_extractor(args.model)
    preset = args.preset or default_preset(extractor.family)
    base = load_config(preset)
    root = args.work_dir / pipeline.model_key(extractor)
    stores = {s: FeatureStore(root / s) for s in ("train", "test", "index") if (root / s / "meta.json").is_file()}
    pipeline.ensure_global_descriptors(stores["train"], [s for k, s in stores.items() if k != "train"])
    labels = read_labels_csv(args.data / "train.csv")
    ids = stores["test"].ids
    widths = [int(w) for w in args.widths.split(",")]
    recall = _candidate_recall(stores, labels, args.data / "solution.csv", [base.NUM_TO_RERANK, *widths])
    print(f"{args.data.name}, {args.model}, preset {preset} (NUM_TO_RERANK {base.NUM_TO_RERANK}, "
          f"CASCADE_MIN_INLIERS {base.CASCADE_MIN_INLIERS}); a true train photo among the first k global "
          f"candidates: " + ", ".join(f"k={k}: {r:.0%}" for k, r in recall.items()))
    print(f"{'CASCADE_CANDIDATES':>18s} {'GAP':>7s} {'mAP@100':>8s} {'cheap s':>8s} {'learned s':>9s} {'new pairs':>9s}")
    for width in widths:
        config = base.replace(CASCADE_CANDIDATES=width)
        _seconds.clear()
        cached = len(learned_matching._pair_cache)
        result = pipeline.recognize_stores(stores["test"], stores["train"], labels, config, progress=False)
        gap = evaluate_recognition(recognition_dataframe(result.predictions, ids=ids), args.data / "solution.csv")["All"]
        score = float("nan")
        if args.retrieval and "index" in stores:
            ranked = pipeline.retrieve_stores(
                stores["test"], stores["index"], config, train=stores["train"], labels=labels, progress=False
            )
            frame = retrieval_dataframe(ranked.rankings, ids=ids, top=config.RETRIEVAL_TOP)
            score = evaluate_retrieval(frame, args.data / "retrieval_solution.csv")["All"]
        learned = sum(v for k, v in _seconds.items() if k != "nn")
        new = len(learned_matching._pair_cache) - cached
        print(f"{width:18d} {gap:7.4f} {score:8.4f} {_seconds['nn']:8.1f} {learned:9.1f} {new:9d}", flush=True)


def _candidate_recall(stores, labels, solution: Path, widths: list[int]) -> dict[int, float]:
    """Fraction of landmark queries with a train photo of a true landmark among the first
    k global candidates, per k."""
    truth = {}
    for row in solution.read_text().splitlines()[1:]:
        image_id, landmarks = row.split(",")[:2]
        if landmarks.strip():
            truth[image_id] = set(landmarks.split())
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
