"""Confidence order side by side: recognition GAP with ``VERIFIED_FIRST`` off and on.

GAP sorts every query's prediction by confidence, so a wrong prediction ranked above a
right one costs precision at every rank below it. With the host baseline's scores a
landmark that several unverified candidates vote for (summed cosines, up to ``TOP_K``)
can outrank one that a single candidate verifies geometrically (its inlier term plus one
cosine); ``VERIFIED_FIRST`` puts every verified prediction first
(:func:`delf_retrieval.scoring.rerank.recognize_one`).

Runs on feature stores that a ``delf-retrieval recognize`` run with the same
``--work-dir`` already extracted. Each ``MODEL:PRESET`` is verified once
(:func:`delf_retrieval.tasks.recognition.recognize_stores`); both orders are then scored from
the same candidates and inlier counts with :func:`~delf_retrieval.scoring.rerank.recognize_one`,
so the two columns differ only by the rule. Also prints how many predictions are
verified and how many of those / of the others are right (landmark queries).

Usage::

    delf-retrieval recognize DATA --model aliked --config aliked --work-dir W -o /dev/null   # extracts
    python benchmarks/confidence.py DATA --work-dir W opencv-sift:opencv-sift aliked:aliked aliked:aliked-lightglue
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from cached_stores import add_store_arguments, open_stores, true_landmarks

import delf_retrieval
from delf_retrieval.config import load_config
from delf_retrieval.features.images import read_labels_csv
from delf_retrieval.kaggle.metrics import evaluate_recognition
from delf_retrieval.kaggle.submission import recognition_dataframe
from delf_retrieval.scoring.rerank import ScoringSettings, recognize_one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_store_arguments(parser)
    parser.add_argument("runs", nargs="+", metavar="MODEL:PRESET")
    args = parser.parse_args()
    labels = read_labels_csv(args.data / "train.csv")
    solution = args.data / "solution.csv"
    truth = true_landmarks(args.data)
    print(f"{args.data.name}: recognition GAP (All) with the host baseline's confidence order and with "
          "VERIFIED_FIRST; verified = the predicted landmark has a voting candidate with >= max(MIN_INLIERS, 1) inliers")
    print(f"{'model:preset':32s} {'GAP off':>8s} {'GAP on':>8s} {'verified':>9s} {'right/landmark q.':>18s} "
          f"{'unverified':>10s} {'right/landmark q.':>18s} {'verify s':>9s}")
    for spec in args.runs:
        model, preset = spec.split(":")
        _, stores = open_stores(args.work_dir, model)
        queries, train = stores["test"], stores["train"]
        on = load_config(preset).replace(VERIFIED_FIRST=True)
        off = on.replace(VERIFIED_FIRST=False)
        scoring_on, scoring_off = ScoringSettings.from_config(on), ScoringSettings.from_config(off)
        started = time.perf_counter()
        result = delf_retrieval.recognize_stores(queries, train, labels, on, progress=False)
        seconds = time.perf_counter() - started
        orders = {"off": {}, "on": {}}
        counts = {True: [0, 0, 0], False: [0, 0, 0]}  # verified or not: predictions, landmark queries, right
        for query_id in queries.ids:
            names = [labels.get(i) for i in result.neighbours[query_id]]
            cosine = np.asarray(result.similarities[query_id], np.float64)
            inliers = result.inliers.get(query_id)
            orders["off"][query_id] = recognize_one(names, cosine, inliers, scoring_off)
            orders["on"][query_id] = label, confidence = recognize_one(names, cosine, inliers, scoring_on)
            tally = counts[confidence == orders["off"][query_id][1]]  # the rule lowers exactly the unverified
            tally[0] += 1
            tally[1] += bool(truth.get(query_id))
            tally[2] += label in truth.get(query_id, frozenset())
        gap = {name: evaluate_recognition(recognition_dataframe(p, ids=queries.ids), solution)["All"]
               for name, p in orders.items()}
        v, u = counts[True], counts[False]
        print(f"{spec:32s} {gap['off']:8.4f} {gap['on']:8.4f} {v[0]:9d} {f'{v[2]}/{v[1]}':>18s} {u[0]:10d} "
              f"{f'{u[2]}/{u[1]}':>18s} {seconds:9.1f}", flush=True)


if __name__ == "__main__":
    main()
