"""Measured effect of cleaning: plant noise in a real train set, clean it, score it.

Builds a noisy copy of a Kaggle-layout dataset (``train.csv`` + ``train/``, queries in
``sample_submission.csv`` + ``test/`` with ``solution.csv``), seeded:

* ``--moved`` photos get the label of another, randomly chosen landmark;
* ``--inserted`` photos that show no landmark (``--distractors``: a folder in the Kaggle
  layout with its own CSV, e.g. ``gldv2-mini-dev`` 's ``nonlandmark.csv``) are added to
  random landmarks.

Then runs ``delf_retrieval.tasks.clean.clean_dataset`` on the noisy copy, once per
``--global-neighbours`` value (0: inliers alone; K: a photo that fails verification is
kept when its K nearest photos by the model's own global descriptor vouch for it), and
reports how many genuine photos each keeps, the precision and recall of the noise removal
(a removed photo is a true positive when it was planted) and the recognition GAP with the
original, the noisy and each cleaned train set
(``delf_retrieval.recognize``, same model and config, features cached once). Images are
linked, not copied.

Usage::

    python benchmarks/noisy_clean.py ../shared/data/paris-dev \\
        --distractors ../shared/data/gldv2-mini-dev --distractor-csv nonlandmark.csv \\
        --moved 10 --inserted 10 --work /tmp/noisy
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

try:
    import delf_retrieval  # noqa: F401
except ImportError:  # run from a checkout without installing
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import delf_retrieval
from delf_retrieval.config import load_config
from delf_retrieval.features.images import kaggle_image_path
from delf_retrieval.kaggle.metrics import evaluate_recognition
from delf_retrieval.models.loader import default_model, load_extractor
from delf_retrieval.tasks.clean import clean_dataset


def link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.symlink(source.resolve(), target)


def build_noisy_copy(
    data: Path, distractors: Path, distractor_csv: str, root: Path, moved: int, inserted: int, seed: int
) -> tuple[set[str], pd.DataFrame]:
    """Write the noisy dataset under ``root``; returns (planted ids, noisy train frame)."""
    rng = np.random.default_rng(seed)
    train = pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False)
    landmarks = sorted(train["landmark_id"].unique())
    noisy = train.copy()
    moved_rows = rng.choice(len(noisy), moved, replace=False)
    for row in moved_rows:
        others = [lm for lm in landmarks if lm != noisy.at[row, "landmark_id"]]
        noisy.at[row, "landmark_id"] = others[rng.integers(len(others))]
    extra = pd.read_csv(distractors / distractor_csv, dtype=str, keep_default_na=False)["id"].tolist()
    chosen = [extra[i] for i in rng.choice(len(extra), min(inserted, len(extra)), replace=False)]
    folder = distractors / Path(distractor_csv).stem
    for image_id in chosen:
        link(kaggle_image_path(folder, image_id), kaggle_image_path(root / "train", image_id))
    inserted_rows = pd.DataFrame({"id": chosen, "landmark_id": [landmarks[rng.integers(len(landmarks))] for _ in chosen]})
    noisy = pd.concat([noisy, inserted_rows], ignore_index=True)
    for image_id in train["id"]:
        link(kaggle_image_path(data / "train", image_id), kaggle_image_path(root / "train", image_id))
    queries = pd.read_csv(data / "sample_submission.csv", dtype=str, keep_default_na=False)
    for image_id in queries["id"]:
        link(kaggle_image_path(data / "test", image_id), kaggle_image_path(root / "test", image_id))
    for name in ("sample_submission.csv", "solution.csv"):
        link(data / name, root / name)
    noisy.to_csv(root / "train.csv", index=False)
    planted = {train.at[row, "id"] for row in moved_rows} | set(chosen)
    return planted, noisy


def cleaned_copy(noisy_root: Path, cleaned_csv: Path, root: Path) -> None:
    """A dataset folder identical to ``noisy_root`` but with the cleaned train.csv."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("train", "test", "sample_submission.csv", "solution.csv"):
        if not (root / name).exists():
            os.symlink((noisy_root / name).resolve(), root / name)
    (root / "train.csv").write_bytes(cleaned_csv.read_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--distractors", type=Path, required=True, help="Kaggle-layout folder holding non-landmark photos")
    parser.add_argument("--distractor-csv", default="nonlandmark.csv", help="CSV (id column) of those photos; images in the folder named like it")
    parser.add_argument("--moved", type=int, default=10)
    parser.add_argument("--inserted", type=int, default=10)
    parser.add_argument("--min-inliers", type=int, default=11)
    parser.add_argument("--pairs", default="all")
    parser.add_argument("--global-neighbours", type=int, nargs="+", default=[0, 2], help="clean once per value (0: inliers only)")
    parser.add_argument("--model", default=None, help="model spec (default: the package's default model)")
    parser.add_argument("--config", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("noisy_clean_work"))
    args = parser.parse_args()

    args.model = args.model or default_model()
    noisy_root = args.work / "noisy"
    planted, noisy = build_noisy_copy(
        args.data_dir, args.distractors, args.distractor_csv, noisy_root, args.moved, args.inserted, args.seed
    )
    print(f"noisy copy: {len(noisy)} train photos in {noisy['landmark_id'].nunique()} landmarks, "
          f"{args.moved} moved to a wrong landmark + {len(planted) - args.moved} non-landmark photos inserted (seed {args.seed})")
    # One feature cache per train set (a store's ids are its train set), sharing the
    # query features through a link.
    caches = {name: args.work / f"features-{name}" for name in ("original", "noisy", "cleaned")}
    config = load_config(args.config) if args.config else None
    genuine = set(noisy["id"]) - planted
    cleaned = []
    for neighbours in args.global_neighbours:
        started = time.perf_counter()
        output = args.work / f"train_clean_g{neighbours}.csv"
        result = clean_dataset(
            noisy_root, args.model, config, output=output, work_dir=caches["noisy"], pairs=args.pairs,
            min_inliers=args.min_inliers, global_neighbours=neighbours, progress=False, log=lambda _: None,
        )
        seconds = time.perf_counter() - started
        removed = set(result.removed_ids)
        caught = removed & planted
        precision = len(caught) / len(removed) if removed else float("nan")
        recall = len(caught) / len(planted) if planted else float("nan")
        rule = f"inliers + {neighbours} global neighbours" if neighbours else "inliers only"
        print(f"clean ({rule}; {args.pairs}, min inliers {args.min_inliers}): {len(result.pairs)} pairs, removed "
              f"{len(removed)} ({len(caught)} planted, {len(removed - caught)} genuine); kept "
              f"{len(genuine - removed)} of {len(genuine)} genuine photos; {seconds:.1f} s (incl. extraction)")
        print(f"  noise removal: precision {precision:.3f}, recall {recall:.3f}")
        cache = "cleaned" if neighbours == 0 else f"cleaned-g{neighbours}"
        caches[cache] = args.work / f"features-{cache}"
        cleaned.append((f"noisy, cleaned ({rule})", args.work / cache, output, cache))

    rows = []
    variants = [("original train set", args.data_dir, "original"), ("noisy train set", noisy_root, "noisy")]
    for name, root, output, cache in cleaned:
        cleaned_copy(noisy_root, output, root)
        variants.append((name, root, cache))
    key = delf_retrieval.model_key(load_extractor(args.model))
    for name, root, cache in variants:
        shared = caches["original"] / key / "test"
        if cache != "original" and shared.is_dir() and not (caches[cache] / key / "test").exists():
            (caches[cache] / key).mkdir(parents=True, exist_ok=True)
            os.symlink(shared.resolve(), caches[cache] / key / "test")
        run = delf_retrieval.recognize(root, args.model, config, output=None, work_dir=caches[cache], progress=False, log=lambda _: None)
        rows.append((name, evaluate_recognition(run.submission, root / "solution.csv")))
    print()
    width = max(len(name) for name, _ in rows)
    print(f"{'train set':{width}s} {'GAP Public':>10s} {'GAP Private':>11s} {'GAP All':>8s}")
    for name, scores in rows:
        print(f"{name:{width}s} {scores['Public']:10.4f} {scores['Private']:11.4f} {scores['All']:8.4f}")


if __name__ == "__main__":
    main()
