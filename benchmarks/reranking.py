"""Global re-ranking side by side: alpha-QE, DBA, the non-landmark rules and the confidence
order (``VERIFIED_FIRST``), on any embedding.

Runs on feature stores that a ``delf-retrieval recognize`` / ``retrieve`` run with the same
``--work-dir`` already extracted (nothing is extracted here except a distractor set), and
prints recognition GAP and retrieval mAP@100 (All) for each setting, global similarity
alone and with verification. Inlier counts are cached by pair content, so every pair is
verified once for the whole table.

Non-landmark handling is measured with a distractor set given by ``--distractors`` (a
Kaggle-layout folder with ``nonlandmark.csv``; default: the dataset's own). Giving
``gldv2-mini-dev`` (objects, animals, indoor scenes) to ``paris-dev`` (which has none)
measures the case of a distractor set unlike the queries. Per query it also prints why
the rules differ: the query's similarity to the distractors next to its best candidate
cosine.

Usage::

    delf-retrieval recognize DATA --model opencv-sift --work-dir W -o /dev/null
    delf-retrieval retrieve DATA --model opencv-sift --work-dir W -o /dev/null
    python benchmarks/reranking.py DATA --work-dir W [--distractors OTHER_DATA] [--preset opencv-sift]
    python benchmarks/reranking.py DATA --work-dir W --model aliked --only verified --skip-map

The ``verified first`` rows change only the order of the confidences (recognition GAP;
retrieval is untouched, so they print no mAP).
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
from cached_stores import add_store_arguments, open_stores, true_landmarks

import delf_retrieval
from delf_retrieval.config import default_preset, load_config
from delf_retrieval.features.images import read_labels_csv
from delf_retrieval.kaggle.metrics import evaluate_recognition, evaluate_retrieval
from delf_retrieval.kaggle.submission import recognition_dataframe, retrieval_dataframe
from delf_retrieval.matching import cascade
from delf_retrieval.models.loader import load_extractor
from delf_retrieval.scoring.rerank import nonlandmark_similarity
from delf_retrieval.search.vlad import searchable
from delf_retrieval.tasks import retrieval

_inliers: dict[tuple[bytes, ...], np.ndarray] = {}
_count = cascade.count_inliers_many


def _digest(local) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(local.keypoints).tobytes(), digest_size=12).digest()


def cached_count_inliers_many(query, candidates, settings):
    """``count_inliers_many`` with results cached by pair content and matching settings."""
    key = (repr(settings), _digest(query), *[_digest(c) for c in candidates])
    if key not in _inliers:
        _inliers[key] = _count(query, candidates, settings)
    return _inliers[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_store_arguments(parser, model="opencv-sift")
    parser.add_argument("--distractors", type=Path, default=None, help="dataset whose nonlandmark.csv is the distractor set")
    parser.add_argument("--no-verify", action="store_true", help="global similarity only")
    parser.add_argument("--only", default="", help="run only the settings whose name contains this")
    parser.add_argument("--skip-map", action="store_true", help="recognition GAP only (no retrieval runs)")
    args = parser.parse_args()
    cascade.count_inliers_many = cached_count_inliers_many
    retrieval.count_inliers_many = cached_count_inliers_many

    extractor = load_extractor(args.model)
    base = load_config(args.preset or default_preset(extractor.family))
    distractor_data = args.distractors or args.data
    nl_store, _ = delf_retrieval.extract_split(
        extractor, distractor_data / "nonlandmark.csv", args.work_dir, f"nonlandmark-{distractor_data.name}", progress=False
    )
    _, stores = open_stores(args.work_dir, extractor, extra=[nl_store])
    nl_store = searchable(nl_store)  # VLAD of a local-only model (the search step's view)
    labels = read_labels_csv(args.data / "train.csv")
    ids = stores["test"].ids

    def gap(config) -> float:
        result = delf_retrieval.recognize_stores(
            stores["test"], stores["train"], labels, config, nonlandmark=nl_store, verify=not args.no_verify, progress=False
        )
        frame = recognition_dataframe(result.predictions, ids=ids)
        return evaluate_recognition(frame, args.data / "solution.csv")["All"]

    def map100(config) -> float:
        if "index" not in stores:
            return float("nan")
        result = delf_retrieval.retrieve_stores(
            stores["test"], stores["index"], config, train=stores["train"], labels=labels, verify=not args.no_verify, progress=False
        )
        frame = retrieval_dataframe(result.rankings, ids=ids, top=config.RETRIEVAL_TOP)
        return evaluate_retrieval(frame, args.data / "retrieval_solution.csv")["All"]

    settings = {
        "baseline": {},
        "QE k=2 a=3": {"QE_TOP_K": 2, "QE_ALPHA": 3.0},
        "DBA k=2 a=3": {"DBA_TOP_K": 2, "DBA_ALPHA": 3.0},
        "QE+DBA k=2 a=3": {"QE_TOP_K": 2, "DBA_TOP_K": 2},
        "nonlandmark subtract": {"NONLANDMARK_PENALTY": 1.0},
        "nonlandmark unverified": {"NONLANDMARK_PENALTY": 1.0, "NONLANDMARK_RULE": "unverified"},
        "nonlandmark excess": {"NONLANDMARK_PENALTY": 1.0, "NONLANDMARK_RULE": "excess"},
        "verified first off": {"VERIFIED_FIRST": False},
        "verified first on": {"VERIFIED_FIRST": True},
    }
    mode = "global only" if args.no_verify else f"verified ({base.MATCHER})"
    print(f"{args.data.name}, {args.model}, preset {args.preset or default_preset(extractor.family)}, {mode}; "
          f"distractors: {len(nl_store.ids)} photos of {distractor_data.name}")
    print(f"{'setting':24s} {'GAP':>7s} {'mAP@100':>8s}")
    for name, changes in settings.items():
        if args.only not in name and name != "baseline":
            continue
        config = base.replace(**changes)
        scores_retrieval = not (args.skip_map or name.startswith(("nonlandmark", "verified first")))
        retrieval_score = map100(config) if scores_retrieval else float("nan")
        print(f"{name:24s} {gap(config):7.4f} {retrieval_score:8.4f}", flush=True)

    # Why a rule helps or hurts: distractor similarity vs the landmark evidence per query.
    if len(nl_store.ids):
        queries = stores["test"].global_descriptors()
        nl = nonlandmark_similarity(queries, nl_store.global_descriptors(), base.NONLANDMARK_TOP_K)
        best = (np.asarray(queries, np.float32) @ np.asarray(stores["train"].global_descriptors(), np.float32).T).max(axis=1)
        truth = true_landmarks(args.data)
        landmark = np.array([bool(truth.get(i)) for i in ids])
        for name, mask in (("landmark queries", landmark), ("non-landmark queries", ~landmark)):
            if mask.any():
                print(f"{name:22s} n={mask.sum():3d}: distractor sim {nl[mask].mean():.3f} +- {nl[mask].std():.3f}, "
                      f"best train cosine {best[mask].mean():.3f}, distractor sim > best cosine for {np.mean(nl[mask] > best[mask]):.0%}")


if __name__ == "__main__":
    main()
