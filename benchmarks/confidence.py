"""Confidence order side by side: recognition GAP with ``VERIFIED_FIRST`` off and on.

GAP sorts every query's prediction by confidence, so a wrong prediction ranked above a
right one costs precision at every rank below it. With the host baseline's scores a
landmark that several unverified candidates vote for (summed cosines, up to ``TOP_K``)
can outrank one that a single candidate verifies geometrically (its inlier term plus one
cosine); ``VERIFIED_FIRST`` puts every verified prediction first
(:func:`delf_retrieval.rerank.recognize_one`).

Runs on feature stores that a ``delf-retrieval recognize`` run with the same
``--work-dir`` already extracted. Each ``MODEL:PRESET`` is verified once
(:func:`delf_retrieval.recognition.recognize_stores`); both orders are then scored from
the same candidates and inlier counts with :func:`~delf_retrieval.rerank.recognize_one`,
so the two columns differ only by the rule. Also prints how many predictions are
verified and how many of those / of the others are right (landmark queries).

Usage::

    delf-retrieval recognize DATA --model aliked --config aliked --work-dir W -o /dev/null   # extracts
    python benchmarks/confidence.py DATA --work-dir W opencv-sift:opencv-sift aliked:aliked aliked:aliked-lightglue
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

try:
    import delf_retrieval  # noqa: F401
except ImportError:  # run from a checkout without installing
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from delf_retrieval import pipeline
from delf_retrieval.config import load_config
from delf_retrieval.images import read_labels_csv
from delf_retrieval.metrics import evaluate_recognition
from delf_retrieval.models.loader import load_extractor
from delf_retrieval.rerank import recognize_one
from delf_retrieval.store import FeatureStore
from delf_retrieval.submission import recognition_dataframe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("runs", nargs="+", metavar="MODEL:PRESET")
    args = parser.parse_args()
    labels = read_labels_csv(args.data / "train.csv")
    solution = args.data / "solution.csv"
    truth = {}
    for row in solution.read_text().splitlines()[1:]:
        image_id, landmarks = row.split(",")[:2]
        truth[image_id] = set(landmarks.split())
    print(f"{args.data.name}: recognition GAP (All) with the host baseline's confidence order and with "
          "VERIFIED_FIRST; verified = the predicted landmark has a voting candidate with >= max(MIN_INLIERS, 1) inliers")
    print(f"{'model:preset':32s} {'GAP off':>8s} {'GAP on':>8s} {'verified':>9s} {'right/landmark q.':>18s} "
          f"{'unverified':>10s} {'right/landmark q.':>18s} {'verify s':>9s}")
    for spec in args.runs:
        model, preset = spec.split(":")
        extractor = load_extractor(model)
        root = args.work_dir / pipeline.model_key(extractor)
        queries, train = FeatureStore(root / "test"), FeatureStore(root / "train")
        pipeline.ensure_global_descriptors(train, [queries])
        base = load_config(preset)
        started = time.perf_counter()
        result = pipeline.recognize_stores(queries, train, labels, base, progress=False)
        seconds = time.perf_counter() - started
        row, counts = [], {True: [0, 0, 0], False: [0, 0, 0]}  # predictions, landmark queries, right
        for first in (False, True):
            config = base.replace(VERIFIED_FIRST=first)
            predictions = {}
            for query_id in queries.ids:
                names = [labels.get(i) for i in result.neighbours[query_id]]
                cosine = np.asarray(result.similarities[query_id], np.float64)
                inliers = result.inliers.get(query_id)
                predictions[query_id] = recognize_one(names, cosine, inliers, config)
                if first:
                    # the rule lowers exactly the unverified predictions
                    verified = predictions[query_id][1] == recognize_one(
                        names, cosine, inliers, config.replace(VERIFIED_FIRST=False))[1]
                    tally = counts[verified]
                    tally[0] += 1
                    tally[1] += bool(truth.get(query_id))
                    tally[2] += predictions[query_id][0] in truth.get(query_id, set())
            frame = recognition_dataframe(predictions, ids=queries.ids)
            row.append(evaluate_recognition(frame, solution)["All"])
        v, u = counts[True], counts[False]
        print(f"{spec:32s} {row[0]:8.4f} {row[1]:8.4f} {v[0]:9d} {f'{v[2]}/{v[1]}':>18s} {u[0]:10d} "
              f"{f'{u[2]}/{u[1]}':>18s} {seconds:9.1f}", flush=True)


if __name__ == "__main__":
    main()
