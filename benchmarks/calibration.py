"""Score order vs calibrated probability: GAP, ECE and Brier score per dataset and preset.

For every ``DATA_DIR`` and every ``MODEL:PRESET`` the batch ``recognize`` runs three times
on the same cached feature stores (``--work-root/<dataset name>``): with
``CONFIDENCE="score"`` (the engine's score, today's order), and with
``CONFIDENCE="probability"`` under each confidence model (``logistic``, ``isotonic``),
each fitted by leave-one-out on that dataset's train photos and distractor set
(:mod:`delf_retrieval.scoring.leave_one_out`; no query is used to fit). The answers are the
same in all three runs; only their confidences (and so the GAP order) differ.

Columns: GAP (All) of each order; ECE (10 equal-width bins: sum over bins of ``|bin| / N *
|accuracy - mean confidence|``) and Brier score of each probability, over every answered
query (a prediction on a non-landmark query is wrong); then the most confident wrong
answers of the logistic model.

Usage::

    python benchmarks/calibration.py /work/shared/data/gldv2-mini-dev /work/shared/data/paris-dev \\
        --work-root /tmp/calibration opencv-sift:opencv-sift opencv-sift:kaggle2020-nonlandmark
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

try:
    import delf_retrieval  # noqa: F401
except ImportError:  # run from a checkout without installing
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import delf_retrieval
from delf_retrieval.config import load_config
from delf_retrieval.features.images import kaggle_image_path, load_image, read_labels_csv
from delf_retrieval.kaggle.metrics import (
    answer_correctness,
    evaluate_calibration,
    evaluate_recognition,
)
from delf_retrieval.models.loader import load_extractor
from delf_retrieval.viz import plot_prediction_gallery

MODELS = ("logistic", "isotonic")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, nargs="+", help="Kaggle-layout datasets with solution.csv")
    parser.add_argument("--work-root", type=Path, required=True, help="feature caches, one folder per dataset")
    parser.add_argument("--runs", nargs="+", default=["opencv-sift:opencv-sift"], metavar="MODEL:PRESET")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="config override for every run")
    parser.add_argument("--wrong", type=int, default=5, help="most confident wrong answers listed per run")
    parser.add_argument("--pictures", type=Path, default=None, help="folder for a picture of them per run")
    args = parser.parse_args()
    overrides = dict(delf_retrieval.config.parse_override(item) for item in args.set)
    header = (
        f"{'dataset':16s} {'model:preset':36s} {'GAP score':>9s} {'GAP logit':>9s} {'GAP iso':>8s} "
        f"{'ECE logit':>9s} {'ECE iso':>8s} {'Brier logit':>11s} {'Brier iso':>9s} {'answers':>7s} {'right':>6s} {'s':>5s}"
    )
    print(header)
    wrong_lines = []
    for data in args.data:
        solution = data / "solution.csv"
        for spec in args.runs:
            model, preset = spec.split(":")
            extractor = load_extractor(model)
            base = load_config(preset, **overrides)
            started = time.perf_counter()
            gap, calibration, runs = {}, {}, {}
            for name in ("score", *MODELS):
                config = base.replace(CONFIDENCE="score") if name == "score" else base.replace(
                    CONFIDENCE="probability", CONFIDENCE_MODEL=name, LANDMARK_THRESHOLD=0.5
                )
                run = delf_retrieval.recognize(
                    data, extractor, config, output=None, work_dir=args.work_root / data.name, progress=False,
                    log=lambda _: None,
                )
                runs[name] = run
                gap[name] = evaluate_recognition(run.submission, solution)["All"]
                if name != "score":
                    calibration[name] = evaluate_calibration(run.result.predictions, solution)
            seconds = time.perf_counter() - started
            logit, iso = calibration["logistic"], calibration["isotonic"]
            print(
                f"{data.name:16s} {spec:36s} {gap['score']:9.4f} {gap['logistic']:9.4f} {gap['isotonic']:8.4f} "
                f"{logit['ECE']:9.4f} {iso['ECE']:8.4f} {logit['Brier']:11.4f} {iso['Brier']:9.4f} "
                f"{int(logit['answers']):7d} {logit['accuracy']:6.3f} {seconds:5.0f}",
                flush=True,
            )
            result = runs["logistic"].result
            confidence, right, ids = answer_correctness(result.predictions, solution)
            wrong = sorted((c, i) for c, r, i in zip(confidence, right, ids, strict=True) if not r)[::-1][: args.wrong]
            if args.pictures is not None:
                labels = read_labels_csv(data / "train.csv")
                draw_wrong(data, result, labels, wrong, args.pictures / f"{data.name}-{spec.replace(':', '-')}.jpg")
            for probability, query in wrong:
                features = ", ".join(f"{k} {v:.3f}" for k, v in result.features[query].items())
                wrong_lines.append(
                    f"{data.name:16s} {spec:36s} {query} -> {result.predictions[query][0]} p={probability:.3f} ({features})"
                )
    print("\nmost confident wrong answers (logistic):")
    print("\n".join(wrong_lines))


def draw_wrong(data: Path, result, labels: dict[str, str], wrong: list[tuple[float, str]], path: Path) -> None:
    """The wrong answers beside the best train photo of the landmark they name."""
    rows = []
    for probability, query in wrong:
        label = result.predictions[query][0]
        best = next((i for i in result.neighbours[query] if labels.get(i) == label), None)
        rows.append({
            "query_image": load_image(kaggle_image_path(data / "test", query)),
            "train_image": None if best is None else load_image(kaggle_image_path(data / "train", best)),
            "landmark_id": label,
            "confidence": probability,
            "correct": False,
            "query_id": query,
            "caption": f"p = {probability:.2f}",
        })
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_prediction_gallery(rows, columns=2, path=path, panel_size=2.2, dpi=80)


if __name__ == "__main__":
    main()
