"""Clean a noisy train set by spatial verification within each landmark.

The recipe of the GLDv2 cleaning (and of the 2019 winners): match local features between
the photos of each landmark and keep a photo only when it has at least ``min_inliers``
RANSAC inliers (11 by default) against at least one other photo of its landmark.

Steps, each a plain function:

1. :func:`plan_pairs` - which pairs of same-landmark photos are verified
   (``"all"``: every photo against up to ``max_per_class`` photos of its class;
   ``"knn:K"``: every photo against its K nearest same-class photos by global cosine);
2. :func:`verify_pairs` - inlier counts of those pairs, cached in atomic chunk files so
   that a killed run repeats at most one chunk (``run_chunks`` replaces the local runner,
   e.g. by :class:`delf_retrieval.distributed.clean.RayChunkRunner`);
3. :func:`decide` - the best partner of every photo, what is kept, and the classes left
   with fewer than 2 photos;
4. :func:`clean_dataset` - all of it on a Kaggle-layout folder, writing the cleaned
   ``train.csv``, a report CSV and one picture per class of what was removed.

A pair ``(a, b)`` with ``a < b`` is verified once with ``a`` as image 1 (the query side of
:func:`delf_retrieval.matching.verify.count_inliers`); its inlier count counts for both photos.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from delf_retrieval.config import Config
from delf_retrieval.core.atomic import atomic_write, atomic_write_bytes
from delf_retrieval.features.images import (
    ImageDecodeError,
    kaggle_image_path,
    load_image,
    read_labels_csv,
)
from delf_retrieval.features.store import FeatureStore
from delf_retrieval.kaggle.dataset import KaggleData
from delf_retrieval.matching.verify import MatchingSettings, count_inliers_many
from delf_retrieval.search.vlad import ensure_global_descriptors, searchable
from delf_retrieval.tasks.clean_similarity import SimilarityEvidence, similarity_evidence
from delf_retrieval.tasks.run import extract_split, open_run
from delf_retrieval.viz import plot_neighbours

__all__ = [
    "SMALL_CLASS_POLICIES",
    "CleanResult",
    "PairPlan",
    "best_inliers",
    "clean_dataset",
    "decide",
    "parse_pairs",
    "plan_pairs",
    "verify_chunk",
    "verify_pairs",
    "write_removal_pictures",
]

SMALL_CLASS_POLICIES = ("keep", "drop")
REPORT_COLUMNS = ["id", "landmark_id", "best_inliers", "best_partner", "nearest", "nearest_cosine", "kept", "reason"]
DEFAULT_CHUNK_SIZE = 1024
# Config fields that change an inlier count; they name the cache folder of pair results.
_VERIFY_FIELDS = (
    "MAX_REPROJECTION_ERROR",
    "MAX_RANSAC_ITERATIONS",
    "HOMOGRAPHY_CONFIDENCE",
    "MAX_DESCRIPTOR_DISTANCE",
    "MUTUAL_NEAREST_NEIGHBOR",
    "RATIO_TEST",
    "RANSAC_METHOD",
    "RANSAC_SEED",
    "MIN_MATCHES",
    "MATCH_DTYPE",
)

Log = Callable[[str], None]
# (store, pairs [P, 2] of row indices, config) -> int64 [P] inlier counts
ChunkFn = Callable[[FeatureStore, np.ndarray, Config], np.ndarray]


# --------------------------------------------------------------------------- pairs
def parse_pairs(spec: str) -> tuple[str, int]:
    """``"all"`` -> ``("all", 0)``; ``"knn:K"`` -> ``("knn", K)`` with K >= 1."""
    text = str(spec).strip().lower()
    if text == "all":
        return "all", 0
    if text.startswith("knn:"):
        value = text[4:]
        if value.isdigit() and int(value) >= 1:
            return "knn", int(value)
    raise ValueError(f"--pairs must be 'all' or 'knn:K' with K >= 1, got {spec!r}")


@dataclass(frozen=True)
class PairPlan:
    """The pairs to verify, as rows of a feature store.

    Attributes
    ----------
    pairs : int64 [P, 2]
        ``(row a, row b)`` with ``ids[a] < ids[b]``, sorted (so pairs of one query row are
        consecutive); rows index :attr:`ids`.
    ids : list of str, length N
        The store's ids (sorted).
    classes : dict str -> list of str
        Landmark -> its photos that have features, sorted.
    """

    pairs: np.ndarray
    ids: list[str]
    classes: dict[str, list[str]]

    def key(self) -> str:
        """Short hash of the pair list (names the cache folder together with the config)."""
        digest = hashlib.sha1()
        digest.update("\n".join(self.ids).encode())
        digest.update(np.ascontiguousarray(self.pairs, np.int64).tobytes())
        return digest.hexdigest()[:16]


def plan_pairs(
    labels: dict[str, str],
    ids: Sequence[str],
    *,
    pairs: str = "all",
    max_per_class: int = 100,
    global_descriptors: np.ndarray | None = None,
    seed: int = 0,
) -> PairPlan:
    """Same-landmark pairs to verify.

    Parameters
    ----------
    labels : dict id -> landmark id
        The train labels; ids without features (absent from ``ids``) are left out.
    ids : sequence of str, length N
        Ids of the feature store, sorted (its rows).
    pairs : ``"all"`` or ``"knn:K"``
        ``"all"``: in a class of ``n`` photos, every photo is paired with every photo of a
        reference set: the whole class when ``n <= max_per_class``, otherwise a seeded
        sample of ``max_per_class`` of its photos (all pairs of a class up to the cap, about
        ``n * max_per_class`` pairs above it). ``"knn:K"``: every photo is paired with its
        ``K`` most similar other photos of its class by global cosine (ties: smaller row).
    max_per_class : int
        Reference-set cap for ``"all"`` (>= 2).
    global_descriptors : float array [N, Dg], optional
        L2-normalised rows aligned with ``ids``; needed for ``"knn:K"``.
    seed : int
        Seed of the reference-set samples.

    Returns
    -------
    PairPlan
        Unordered pairs, each once.
    """
    mode, k = parse_pairs(pairs)
    if max_per_class < 2:
        raise ValueError(f"max_per_class must be >= 2, got {max_per_class}")
    ids = list(ids)
    if ids != sorted(ids):
        raise ValueError("ids must be sorted (the rows of a feature store)")
    row = {image_id: index for index, image_id in enumerate(ids)}
    classes: dict[str, list[str]] = defaultdict(list)
    for image_id in sorted(labels):
        if image_id in row:
            classes[labels[image_id]].append(image_id)
    if mode == "knn":
        if global_descriptors is None:
            raise ValueError("--pairs knn:K needs global descriptors")
        if len(global_descriptors) != len(ids):
            raise ValueError(f"{len(global_descriptors)} global descriptors for {len(ids)} ids")
    rng = np.random.default_rng(seed)
    parts = [np.zeros((0, 2), np.int64)]
    for landmark in sorted(classes):
        rows = np.array([row[i] for i in classes[landmark]], np.int64)
        if len(rows) < 2:
            continue
        if mode == "all":
            reference = rows
            if len(rows) > max_per_class:
                reference = np.sort(rng.choice(rows, max_per_class, replace=False))
            a, b = np.repeat(rows, len(reference)), np.tile(reference, len(rows))
        else:
            vectors = np.asarray(global_descriptors[rows], np.float32)
            sims = vectors @ vectors.T
            np.fill_diagonal(sims, -np.inf)
            # Stable sort of -similarity: equal similarities keep the smaller row first.
            neighbours = np.argsort(-sims, axis=1, kind="stable")[:, : min(k, len(rows) - 1)]
            a, b = np.repeat(rows, neighbours.shape[1]), rows[neighbours.reshape(-1)]
        keep = a != b
        pair = np.stack([np.minimum(a, b)[keep], np.maximum(a, b)[keep]], axis=1)
        parts.append(np.unique(pair, axis=0))  # classes are disjoint: unique per class
    array = np.concatenate(parts)
    array = array[np.lexsort((array[:, 1], array[:, 0]))]
    return PairPlan(pairs=array, ids=ids, classes=dict(classes))


# --------------------------------------------------------------------------- verification
def verify_chunk(store: FeatureStore, pairs: np.ndarray, config: Config) -> np.ndarray:
    """Inlier counts of ``pairs`` (int [P, 2] store rows), one batched call per query row.

    Returns int64 [P]. Pure function of the features, the pairs and ``config``: a local
    and a Ray run give the same counts.
    """
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    counts = np.zeros(len(pairs), np.int64)
    if len(pairs) == 0:
        return counts
    ids = store.ids
    settings = MatchingSettings.from_config(config)
    starts = np.flatnonzero(np.r_[True, pairs[1:, 0] != pairs[:-1, 0]])
    stops = np.r_[starts[1:], len(pairs)]
    for start, stop in zip(starts, stops, strict=True):
        query = store.local_features(ids[pairs[start, 0]])
        candidates = [store.local_features(ids[b]) for b in pairs[start:stop, 1]]
        counts[start:stop] = count_inliers_many(query, candidates, settings)
    return counts


def _local_chunk(store: FeatureStore, pairs: np.ndarray, config: Config) -> np.ndarray:
    return verify_chunk(store, pairs, config)


def _cache_dir(store: FeatureStore, plan: PairPlan, config: Config) -> Path:
    settings = {name: getattr(config, name) for name in _VERIFY_FIELDS}
    digest = hashlib.sha1(json.dumps([plan.key(), settings], sort_keys=True, default=str).encode())
    return store.path / "clean" / digest.hexdigest()[:16]


def _chunk_path(folder: Path, index: int, pairs: np.ndarray) -> Path:
    digest = hashlib.sha1(np.ascontiguousarray(pairs, np.int64).tobytes()).hexdigest()[:12]
    return folder / f"chunk-{index:06d}-{digest}.npy"


def _read_chunk(path: Path, expected: int) -> np.ndarray | None:
    """A finished chunk's counts, or None when missing or unreadable."""
    if not path.is_file():
        return None
    try:
        counts = np.load(path)
    except (OSError, ValueError):
        return None
    return counts if counts.shape == (expected,) else None


def verify_pairs(
    store: FeatureStore,
    plan: PairPlan,
    config: Config,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    run_chunks: Callable[..., Any] | None = None,
    progress: bool = True,
    log: Log = print,
) -> np.ndarray:
    """Inlier counts of every planned pair, resumable.

    Pairs are cut into chunks of ``chunk_size``; each finished chunk is written atomically
    to ``STORE/clean/<hash of pairs and settings>/chunk-<i>-<hash>.npy`` and skipped by a
    rerun, so a killed run repeats at most the chunk it was working on (with Ray, the
    chunks in flight).

    Parameters
    ----------
    run_chunks : callable, optional
        ``run_chunks(store, chunks, config, on_done)`` computes each chunk of ``chunks``
        (list of ``(index, int64 [p, 2])``) and calls ``on_done(index, counts)`` as each
        one completes, in any order (see :mod:`delf_retrieval.distributed.clean`). Default: in this
        process, in order.

    Returns
    -------
    int64 [P]
        Aligned with ``plan.pairs``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    folder = _cache_dir(store, plan, config)
    folder.mkdir(parents=True, exist_ok=True)
    bounds = [(s, min(s + chunk_size, len(plan.pairs))) for s in range(0, len(plan.pairs), chunk_size)]
    counts = np.zeros(len(plan.pairs), np.int64)
    todo = []
    for index, (start, stop) in enumerate(bounds):
        cached = _read_chunk(_chunk_path(folder, index, plan.pairs[start:stop]), stop - start)
        if cached is None:
            todo.append((index, plan.pairs[start:stop]))
        else:
            counts[start:stop] = cached
    done_pairs = len(plan.pairs) - sum(len(p) for _, p in todo)
    log(f"verify: {len(plan.pairs)} pairs in {len(bounds)} chunks, {done_pairs} pairs cached in {folder}")
    bar = tqdm(total=len(plan.pairs), initial=done_pairs, desc="verify pairs", unit="pair", disable=not progress, smoothing=0.05)

    def on_done(index: int, chunk_counts: np.ndarray) -> None:
        start, stop = bounds[index]
        chunk_counts = np.asarray(chunk_counts, np.int64)
        atomic_write(_chunk_path(folder, index, plan.pairs[start:stop]), lambda handle: np.save(handle, chunk_counts))
        counts[start:stop] = chunk_counts
        bar.update(stop - start)

    try:
        if run_chunks is None:
            for index, pairs in todo:
                on_done(index, verify_chunk(store, pairs, config))
        elif todo:
            run_chunks(store, todo, config, on_done)
    finally:
        bar.close()
    return counts


# --------------------------------------------------------------------------- decisions
@dataclass
class CleanResult:
    """What cleaning decided.

    ``report`` has one row per labelled photo: ``id``, ``landmark_id``, ``best_inliers``
    (-1: never verified), ``best_partner`` ("" if none), ``nearest`` and
    ``nearest_cosine`` (its nearest photo by global cosine, for photos that failed
    verification and were looked up; "" and NaN otherwise), ``kept`` (bool) and ``reason``.
    ``small_classes`` lists the landmarks left with fewer than 2 verified photos.
    """

    report: pd.DataFrame
    small_classes: list[str]
    pairs: np.ndarray
    inliers: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def kept_ids(self) -> list[str]:
        return self.report.loc[self.report["kept"], "id"].tolist()

    @property
    def removed_ids(self) -> list[str]:
        return self.report.loc[~self.report["kept"], "id"].tolist()


def decide(
    labels: dict[str, str],
    plan: PairPlan,
    inliers: np.ndarray,
    *,
    min_inliers: int = 11,
    small_classes: str = "keep",
    similar: SimilarityEvidence | None = None,
) -> CleanResult:
    """Keep photos with at least ``min_inliers`` inliers against some photo of their class,
    and, with ``similar``, photos that failed but whose global neighbourhood vouches for them.

    Parameters
    ----------
    labels : dict id -> landmark id (every labelled photo gets a report row, in sorted id
        order; photos without features are never verified and removed).
    plan : the verified pairs.
    inliers : int [P], aligned with ``plan.pairs``.
    min_inliers : int
        Threshold (>= 0).
    small_classes : ``"keep"`` or ``"drop"``
        A class left with fewer than 2 verified photos (e.g. a class of one photo, or one
        whose photos match nothing) is listed in ``small_classes``; ``"keep"`` keeps all
        its photos unchanged (there is no evidence against them), ``"drop"`` removes them.
    similar : SimilarityEvidence, optional
        Nearest photos by global cosine of (some of) the photos that failed verification
        (:func:`~delf_retrieval.tasks.clean_similarity.similarity_evidence`, rows of
        ``plan.ids``); those it supports are kept (see that module for the rule).

    Best partner ties: more inliers first, then the smaller partner id.
    """
    if small_classes not in SMALL_CLASS_POLICIES:
        raise ValueError(f"small_classes must be one of {SMALL_CLASS_POLICIES}, got {small_classes!r}")
    if min_inliers < 0:
        raise ValueError(f"min_inliers must be >= 0, got {min_inliers}")
    inliers = np.asarray(inliers, np.int64)
    if inliers.shape != (len(plan.pairs),):
        raise ValueError(f"{inliers.shape[0]} inlier counts for {len(plan.pairs)} pairs")
    # Both directions of every pair, ordered by (photo, most inliers, smallest partner):
    # the first entry of each photo is its best partner (rows are in id order).
    me = np.r_[plan.pairs[:, 0], plan.pairs[:, 1]]
    other = np.r_[plan.pairs[:, 1], plan.pairs[:, 0]]
    both = np.r_[inliers, inliers]
    order = np.lexsort((other, -both, me))
    first = order[np.r_[True, me[order][1:] != me[order][:-1]]] if len(order) else order
    best = {plan.ids[m]: (int(c), plan.ids[o]) for m, c, o in zip(me[first], both[first], other[first], strict=True)}
    featured = {i for members in plan.classes.values() for i in members}
    nearest, vouched = _similar_photos(labels, plan, inliers, min_inliers, similar)
    rows = []
    for image_id in sorted(labels):
        count, partner = best.get(image_id, (-1, ""))
        near_id, near_cosine = nearest.get(image_id, ("", float("nan")))
        if image_id not in featured:
            reason, kept = "no features (image unreadable)", False
        elif count < 0:
            reason, kept = "no other photo in its class", False
        elif count >= min_inliers:
            reason, kept = "verified", True
        elif image_id in vouched:
            reason, kept = vouched[image_id], True
        else:
            reason, kept = f"fewer than {min_inliers} inliers with every other photo", False
        rows.append([image_id, labels[image_id], count, partner, near_id, near_cosine, kept, reason])
    report = pd.DataFrame(rows, columns=REPORT_COLUMNS)
    verified_per_class = report[report["kept"]].groupby("landmark_id").size()
    small = sorted(set(report["landmark_id"]) - set(verified_per_class[verified_per_class >= 2].index))
    if small:
        in_small = report["landmark_id"].isin(small)
        if small_classes == "keep":
            usable = in_small & (report["reason"] != "no features (image unreadable)")
            report.loc[usable, "kept"] = True
            report.loc[usable, "reason"] = "class left with < 2 verified photos: kept"
        else:
            report.loc[in_small, "kept"] = False
            report.loc[in_small, "reason"] = "class left with < 2 verified photos: dropped"
    return CleanResult(report=report, small_classes=small, pairs=plan.pairs, inliers=inliers)


def best_inliers(plan: PairPlan, inliers: np.ndarray) -> np.ndarray:
    """int64 [N]: the most inliers of each row of ``plan.ids`` with a photo of its class
    (-1: in no planned pair)."""
    best = np.full(len(plan.ids), -1, np.int64)
    np.maximum.at(best, plan.pairs[:, 0], inliers)
    np.maximum.at(best, plan.pairs[:, 1], inliers)
    return best


def _similar_photos(
    labels: dict[str, str],
    plan: PairPlan,
    inliers: np.ndarray,
    min_inliers: int,
    similar: SimilarityEvidence | None,
) -> tuple[dict[str, tuple[str, float]], dict[str, str]]:
    """(id -> (nearest id, cosine) of the looked-up photos, id -> reason of those kept)."""
    if similar is None:
        return {}, {}
    row_labels = np.array([labels.get(image_id, "") for image_id in plan.ids], dtype=object)
    supported = similar.supported(row_labels, best_inliers(plan, inliers) >= min_inliers)
    nearest, vouched = {}, {}
    for row, neighbours, cosines, keep in zip(similar.rows, similar.neighbours, similar.cosines, supported, strict=True):
        image_id = plan.ids[row]
        nearest[image_id] = (plan.ids[neighbours[0]], float(cosines[0]))
        if keep:
            vouched[image_id] = (
                f"fewer than {min_inliers} inliers, but its {len(neighbours)} nearest photos by global cosine "
                f"are of its landmark, the nearest verified ({cosines[0]:.3f} >= {similar.threshold:.3f})"
            )
    return nearest, vouched


# --------------------------------------------------------------------------- whole run
def clean_dataset(
    data_dir: str | Path,
    model: Any = None,
    config: Config | str | Path | None = None,
    *,
    output: str | Path = "train_clean.csv",
    report_path: str | Path | None = None,
    pictures_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    pairs: str = "all",
    max_per_class: int = 100,
    min_inliers: int = 11,
    small_classes: str = "keep",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    dtype: str = "float16",
    batch_size: int = 64,
    decode_threads: int = 2,
    seed: int = 0,
    global_neighbours: int = 2,
    global_quantile: float = 0.1,
    progress: bool = True,
    log: Log = print,
    runner: Any = None,
    run_chunks: Callable[..., Any] | None = None,
) -> CleanResult:
    """Clean ``DATA_DIR/train.csv`` (Kaggle layout: ``train.csv`` + ``train/``).

    Features are extracted (or reused) in ``work_dir/<model>/train`` as by
    :func:`delf_retrieval.recognize`, by ``runner`` (a
    :class:`delf_retrieval.tasks.run.Runner`; default local); pair results are cached below that
    store and computed by ``run_chunks`` (see :func:`verify_pairs`).

    A photo that fails verification is still kept when the model's own global descriptor
    vouches for it: its ``global_neighbours`` nearest photos are of its landmark, the
    nearest verified and at least as similar as the ``global_quantile`` of the verified
    pairs (:mod:`delf_retrieval.tasks.clean_similarity`). ``global_neighbours=0``, or a
    model without a global descriptor of its own (VLAD is not used), decides on inliers
    alone.

    Writes
    ------
    output : ``train.csv`` with the kept rows (same columns and order as the input).
    report_path : per photo ``id, landmark_id, best_inliers, best_partner, nearest,
        nearest_cosine, kept, reason`` (default: ``<output stem>_report.csv``).
    pictures_dir : ``<landmark_id>.png`` per class that lost photos: a kept photo next to
        the removed ones with their best inlier counts (default
        ``<output stem>_removed/``; ``""`` writes none).
    """

    started = time.perf_counter()
    KaggleData(Path(data_dir)).require("train.csv")
    if global_neighbours < 0:
        raise ValueError(f"global_neighbours must be >= 0, got {global_neighbours}")
    if not 0.0 <= global_quantile <= 1.0:
        raise ValueError(f"global_quantile must be in [0, 1], got {global_quantile}")
    mode, _ = parse_pairs(pairs)
    if small_classes not in SMALL_CLASS_POLICIES:
        raise ValueError(f"small_classes must be one of {SMALL_CLASS_POLICIES}, got {small_classes!r}")
    data, extractor, config, work = open_run(data_dir, model, config, work_dir, None, log)
    log(f"config:\n{config.describe()}")
    store, _ = extract_split(
        extractor, data.csv("train.csv"), work, "train", dtype=dtype, batch_size=batch_size,
        decode_threads=decode_threads, progress=progress, log=log, runner=runner,
    )
    if not store.local_dim:
        raise ValueError(f"model {extractor!r} gives no local features: cleaning needs them")
    labels = read_labels_csv(data.csv("train.csv"))
    globals_ = None
    if mode == "knn":
        ensure_global_descriptors(store, log=log)
        globals_ = searchable(store).global_descriptors()
    seconds = {"extract": time.perf_counter() - started}
    plan = plan_pairs(labels, store.ids, pairs=pairs, max_per_class=max_per_class, global_descriptors=globals_, seed=seed)
    started = time.perf_counter()
    inliers = verify_pairs(store, plan, config, chunk_size=chunk_size, run_chunks=run_chunks, progress=progress, log=log)
    seconds["verify"] = time.perf_counter() - started
    similar = None
    if global_neighbours and store.global_dim:
        started = time.perf_counter()
        similar, message = similarity_evidence(
            store.global_descriptors(), _unverified_rows(plan, inliers, min_inliers), plan.pairs, inliers,
            min_inliers=min_inliers, neighbours=global_neighbours, quantile=global_quantile,
            index=runner.index(store, config.SEARCH_BLOCK_SIZE) if runner is not None else None,
            block_size=config.SEARCH_BLOCK_SIZE,
        )
        seconds["global similarity"] = time.perf_counter() - started
        log(message)
    elif global_neighbours:
        log("global similarity not used: the model has no global descriptor of its own "
            "(VLAD of the local features that failed to match is no independent evidence)")
    result = decide(labels, plan, inliers, min_inliers=min_inliers, small_classes=small_classes, similar=similar)
    result.seconds = seconds

    output = Path(output)
    frame = pd.read_csv(data.csv("train.csv"), dtype=str, keep_default_na=False)
    kept = set(result.kept_ids)
    _write_csv(frame[frame["id"].isin(kept)], output)
    report_path = Path(report_path) if report_path else output.with_name(f"{output.stem}_report.csv")
    _write_csv(result.report, report_path)
    removed = result.report[~result.report["kept"]]
    log(
        f"clean: {len(result.report)} photos in {result.report['landmark_id'].nunique()} classes, "
        f"{len(plan.pairs)} pairs verified; kept {len(kept)}, removed {len(removed)}; "
        f"{len(result.small_classes)} classes left with < 2 verified photos ({small_classes})"
    )
    if result.small_classes:
        shown = ", ".join(result.small_classes[:20]) + (" ..." if len(result.small_classes) > 20 else "")
        log(f"classes left with < 2 verified photos ({small_classes}): {shown}")
    log(f"wrote {output} and {report_path}")
    if pictures_dir != "":
        folder = Path(pictures_dir) if pictures_dir else output.with_name(f"{output.stem}_removed")
        written = write_removal_pictures(result.report, data.root / "train", folder)
        if written:
            log(f"pictures of removed photos: {written} in {folder}")
    log("time: " + ", ".join(f"{name} {value:.2f} s" for name, value in seconds.items()))
    return result


def _unverified_rows(plan: PairPlan, inliers: np.ndarray, min_inliers: int) -> np.ndarray:
    """int64 rows of the photos that were verified against some photo of their class and
    never reached ``min_inliers``."""
    best = best_inliers(plan, inliers)
    return np.flatnonzero((best >= 0) & (best < min_inliers))


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, frame.to_csv(index=False).encode())


def write_removal_pictures(
    report: pd.DataFrame, image_root: str | Path, folder: str | Path, *, max_removed: int = 8
) -> int:
    """One ``<landmark_id>.png`` per class that lost photos; returns how many were written.

    Each picture shows a kept photo of the class (the first by id; none when the class
    lost all of them) and up to ``max_removed`` removed photos framed red, titled with
    their best inlier count and partner. Unreadable photos show as grey panels.
    """

    def read(image_id: str) -> np.ndarray | None:
        try:
            return load_image(kaggle_image_path(image_root, image_id))
        except (ImageDecodeError, OSError, ValueError):
            return None

    folder = Path(folder)
    written = 0
    for landmark, group in report.groupby("landmark_id", sort=True):
        removed = group[~group["kept"]].head(max_removed)
        if removed.empty:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        kept = group[group["kept"]]
        anchor = read(kept["id"].iloc[0]) if len(kept) else None
        anchor_title = f"kept: {kept['id'].iloc[0]}" if len(kept) else "no photo kept"
        titles = [
            f"removed {row.id}\nbest {max(int(row.best_inliers), 0)} inl" for row in removed.itertuples()
        ]
        images = [read(image_id) for image_id in removed["id"]]
        blank = np.full((64, 64, 3), 200, np.uint8)
        plot_neighbours(
            blank if anchor is None else anchor,
            images,
            titles,
            query_title=f"landmark {landmark}\n{anchor_title}",
            correct=[False] * len(images),
            path=folder / f"{_safe_name(str(landmark))}.png",
            panel_size=2.2,
            dpi=80,
        )
        written += 1
    return written


def _safe_name(text: str) -> str:
    return "".join(char if char.isalnum() or char in "-_." else "_" for char in text) or "_"
