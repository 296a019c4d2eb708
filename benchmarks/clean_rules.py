"""Which keep/remove rule of ``clean`` keeps genuine photos and removes planted noise?

Many noise draws on real photos, from one pool of features (extracted once):

* base train sets: ``paris-dev`` 's train photos (73, 5 landmarks), and its train + query
  photos together (244; classes of about 50, closer to GLDv2's sizes);
* planted noise: photos moved to a wrong landmark, plus photos inserted into random
  landmarks, either non-landmark photos (``gldv2-mini-dev`` 's ``nonlandmark/`` and its
  non-landmark queries: objects, interiors, street scenes) or photos of *other* landmarks
  (``gldv2-mini-dev`` 's train photos and landmark queries: domes, bridges, churches that
  look like Paris ones);
* ``--seeds`` draws of each.

Every same-landmark pair is verified (``--pairs all``) with the model's matching settings,
then each rule decides, and the totals over the draws are printed: genuine photos kept
and planted photos kept. Rules:

* ``inliers only``: ``clean --global-neighbours 0``;
* ``global K``: the shipped rule with K neighbours (:mod:`delf_retrieval.tasks.clean_similarity`;
  K = 2 is the default);
* ``nearest only``: keep when the nearest photo by global cosine is of the photo's
  landmark, with none of the other conditions (what the conditions guard against).

Usage::

    python benchmarks/clean_rules.py ../shared/data/paris-dev ../shared/data/gldv2-mini-dev \\
        --model efficientnet-lite2+opencv-sift --work /tmp/clean_rules
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

try:
    import delf_retrieval  # noqa: F401
except ImportError:  # run from a checkout without installing
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from delf_retrieval import model_key
from delf_retrieval.features.images import list_images
from delf_retrieval.features.store import FeatureStore
from delf_retrieval.matching.verify import MatchingSettings, count_inliers_many
from delf_retrieval.models.extract import extract_to_store
from delf_retrieval.models.loader import default_model, load_extractor
from delf_retrieval.search.vlad import ensure_global_descriptors, searchable
from delf_retrieval.tasks.clean import best_inliers, plan_pairs
from delf_retrieval.tasks.clean_similarity import similarity_evidence
from delf_retrieval.tasks.run import resolve_config

MIN_INLIERS = 11


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def pool_sets(paris: Path, gldv2: Path) -> tuple[dict[str, str], dict[str, str], list[str], list[str]]:
    """(paris train labels, paris query labels, non-landmark ids, other-landmark ids)."""
    train = dict(read(paris / "train.csv")[["id", "landmark_id"]].values)
    solution = read(paris / "solution.csv")
    queries = {i: label for i, label in zip(solution["id"], solution["landmarks"], strict=True) if label}
    gsolution = read(gldv2 / "solution.csv")
    nonlandmark = list(read(gldv2 / "nonlandmark.csv")["id"]) + [
        i for i, label in zip(gsolution["id"], gsolution["landmarks"], strict=True) if not label
    ]
    others = list(read(gldv2 / "train.csv")["id"]) + [
        i for i, label in zip(gsolution["id"], gsolution["landmarks"], strict=True) if label
    ]
    return train, queries, nonlandmark, others


def plant(base: dict[str, str], moved: int, pool: list[str], inserted: int, seed: int) -> tuple[dict[str, str], set[str]]:
    """Noisy labels (``moved`` photos relabelled, ``inserted`` pool photos added) and the planted ids."""
    rng = np.random.default_rng(seed)
    ids, landmarks = sorted(base), sorted(set(base.values()))
    labels, planted = dict(base), set()
    for row in rng.choice(len(ids), moved, replace=False):
        image_id = ids[row]
        labels[image_id] = rng.choice([lm for lm in landmarks if lm != base[image_id]])
        planted.add(image_id)
    for image_id in rng.choice(pool, inserted, replace=False):
        labels[str(image_id)] = landmarks[rng.integers(len(landmarks))]
        planted.add(str(image_id))
    return labels, planted


class Pool:
    """Local features and global descriptors of every pooled photo, with cached pair counts."""

    def __init__(self, store: FeatureStore, settings: MatchingSettings) -> None:
        self.store, self.settings = store, settings
        self.row = {image_id: row for row, image_id in enumerate(store.ids)}
        if not store.global_dim:
            ensure_global_descriptors(store, log=lambda _: None)
        self.descriptors = np.asarray(searchable(store).global_descriptors(), np.float32)
        self.native = bool(store.global_dim)
        self.counts: dict[tuple[str, str], int] = {}

    def inliers(self, ids: list[str], pairs: np.ndarray) -> np.ndarray:
        """Inlier counts of ``pairs`` (rows of ``ids``), the smaller id as image 1 as in clean."""
        todo: dict[str, list[str]] = {}
        for a, b in pairs:
            key = (ids[a], ids[b])
            if key not in self.counts:
                todo.setdefault(key[0], []).append(key[1])
        for query, candidates in todo.items():
            found = count_inliers_many(
                self.store.local_features(query), [self.store.local_features(c) for c in candidates], self.settings
            )
            self.counts.update({(query, c): int(n) for c, n in zip(candidates, found, strict=True)})
        return np.array([self.counts[(ids[a], ids[b])] for a, b in pairs], np.int64)


def decisions(pool: Pool, labels: dict[str, str], neighbours: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Rule name -> bool [N] kept, rows in sorted id order."""
    ids = sorted(labels)
    plan = plan_pairs(labels, ids, pairs="all")
    inliers = pool.inliers(ids, plan.pairs)
    best = best_inliers(plan, inliers)
    verified = best >= MIN_INLIERS
    failing = np.flatnonzero((best >= 0) & ~verified)
    descriptors = pool.descriptors[[pool.row[i] for i in ids]]
    row_labels = np.array([labels[i] for i in ids], dtype=object)
    kept = {"inliers only": verified}
    for k in neighbours:
        evidence, _ = similarity_evidence(descriptors, failing, plan.pairs, inliers, min_inliers=MIN_INLIERS, neighbours=k)
        rescued = np.zeros(len(ids), bool)
        if evidence is not None:
            rescued[evidence.rows[evidence.supported(row_labels, verified)]] = True
        kept[f"global {k}{' (default)' if k == 2 else ''}"] = verified | rescued
    sims = descriptors @ descriptors.T
    np.fill_diagonal(sims, -np.inf)
    nearest = np.argmax(sims, axis=1)
    kept["nearest only"] = verified | ((best >= 0) & (row_labels[nearest] == row_labels))
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paris", type=Path, help="paris-dev folder")
    parser.add_argument("gldv2", type=Path, help="gldv2-mini-dev folder (the noise)")
    parser.add_argument("--model", default=None, help="model spec (default: the package's default model)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--neighbours", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--work", type=Path, default=Path("clean_rules_work"))
    args = parser.parse_args()

    model = args.model or default_model()
    extractor = load_extractor(model)
    store = FeatureStore(args.work / model_key(extractor) / "pool", extractor.fingerprint())
    sources = list_images(
        [args.paris / "train.csv", args.paris / "sample_submission.csv", args.gldv2 / "train.csv",
         args.gldv2 / "sample_submission.csv", args.gldv2 / "nonlandmark.csv"]
    )
    started = time.perf_counter()
    extract_to_store(extractor, sources, store, progress=False)
    print(f"model {model}: {len(store.ids)} pooled photos ({time.perf_counter() - started:.0f} s to extract or load)")
    pool = Pool(store, MatchingSettings.from_config(resolve_config(None, extractor)))
    if not pool.native:
        print("(no global descriptor of its own: the global rows use VLAD, which clean itself never does)")
    train, queries, nonlandmark, others = pool_sets(args.paris, args.gldv2)
    scenarios = [
        ("paris train (73), 10 moved + 10 non-landmark", train, 10, nonlandmark, 10),
        ("paris train (73), 10 moved + 10 other landmarks", train, 10, others, 10),
        ("paris train+queries (244), 25 moved + 25 non-landmark", train | queries, 25, nonlandmark, 25),
        ("paris train+queries (244), 25 moved + 25 other landmarks", train | queries, 25, others, 25),
    ]
    started = time.perf_counter()
    for name, base, moved, noise, inserted in scenarios:
        totals: dict[str, list[int]] = {}
        for seed in range(args.seeds):
            labels, planted = plant(base, moved, noise, inserted, seed)
            is_planted = np.array([i in planted for i in sorted(labels)])
            for rule, kept in decisions(pool, labels, tuple(args.neighbours)).items():
                total = totals.setdefault(rule, [0, 0, 0, 0])
                total[0] += int(kept[~is_planted].sum())
                total[1] += int((~is_planted).sum())
                total[2] += int(kept[is_planted].sum())
                total[3] += int(is_planted.sum())
        print(f"\n{name}, seeds 0-{args.seeds - 1}")
        print(f"  {'rule':20s} {'genuine kept':>16s} {'planted kept':>14s}")
        for rule, (genuine_kept, genuine, planted_kept, planted_total) in totals.items():
            print(f"  {rule:20s} {genuine_kept:5d} of {genuine:<5d} ({genuine_kept / genuine:.3f}) {planted_kept:5d} of {planted_total}")
    print(f"\nverification and decisions: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
