"""End-to-end recognition and retrieval on a Kaggle-layout dataset.

Each step is a plain function that a notebook can run alone:

1. :func:`extract_split` - features of one image set into a cached store;
2. :func:`ensure_global_descriptors` - VLAD globals for local-only models;
3. :func:`recognize_stores` / :func:`retrieve_stores` - search, verify, re-rank;
4. :func:`recognize` / :func:`retrieve` - all of the above plus the submission file.

Features are cached in ``work_dir/<model>-<fingerprint hash>/<split>/``; a second run
reuses them (and resumes an interrupted extraction).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import aggregation, classifier, whitening
from .config import Config, load_config
from .extract import ExtractionSummary, extract_to_store
from .images import list_images, read_labels_csv
from .models.base import Extractor, ExtractorParams, fingerprint_key
from .rerank import (
    nonlandmark_similarity,
    penalize_frequent_landmarks,
    recognize_one,
    rerank_retrieval,
)
from .search import cosine_topk
from .store import FeatureStore, atomic_write_bytes, ids_hash
from .submission import (
    recognition_dataframe,
    retrieval_dataframe,
    validate_submission,
    write_recognition_submission,
    write_retrieval_submission,
)
from .verify import count_inliers_many

Log = Callable[[str], None]
# Hooks that replace the local extraction runner and search (e.g. by Ray, see
# delf_retrieval.distributed.RayRunner); same signatures as extract_to_store / cosine_topk.
ExtractFn = Callable[..., ExtractionSummary]
SearchFn = Callable[..., tuple[np.ndarray, np.ndarray]]
CODEBOOK_FILE = "vlad_codebook.npy"


# --------------------------------------------------------------------------- features
def model_key(extractor: Extractor) -> str:
    """Folder name for an extractor's features: family + short hash of its fingerprint."""
    digest = hashlib.sha1(fingerprint_key(extractor.fingerprint()).encode()).hexdigest()[:10]
    return f"{extractor.family}-{digest}"


def extract_split(
    extractor: Extractor,
    images: str | Path | Sequence[str | Path],
    work_dir: str | Path,
    split: str,
    *,
    dtype: str = "float16",
    batch_size: int = 64,
    decode_threads: int = 2,
    progress: bool = True,
    log: Log = print,
    extract_fn: ExtractFn = extract_to_store,
) -> tuple[FeatureStore, ExtractionSummary]:
    """Extract (or reuse) features of one image set into ``work_dir/<model>/<split>``.

    ``extract_fn`` runs the extraction (signature of :func:`.extract.extract_to_store`);
    e.g. ``RayRunner.extract`` of :mod:`delf_retrieval.distributed` runs it on Ray.
    """
    store = FeatureStore(Path(work_dir) / model_key(extractor) / split, extractor.fingerprint(), dtype=dtype)
    summary = extract_fn(
        extractor,
        list_images(images),
        store,
        batch_size=batch_size,
        decode_threads=decode_threads,
        progress=progress,
        description=f"extract {split}",
    )
    log(f"[{split}] " + summary.report().replace("\n", f"\n[{split}] "))
    return store, summary


def ensure_global_descriptors(
    database: FeatureStore,
    others: Sequence[FeatureStore] = (),
    *,
    num_clusters: int = aggregation.DEFAULT_NUM_CLUSTERS,
    seed: int = 0,
    log: Log = print,
) -> None:
    """Give local-only stores VLAD global descriptors (codebook fitted on ``database``).

    The codebook is saved in the database store and reused; queries and other stores
    are (re-)encoded when their VLAD was made with another codebook. Stores of models
    with a native global descriptor are left alone.
    """
    if database.global_dim:
        return
    codebook_path = database.path / "derived" / CODEBOOK_FILE
    codebook_info = database.path / "derived" / "vlad_codebook.json"
    database_hash = ids_hash(database.ids)
    info = json.loads(codebook_info.read_text()) if codebook_info.is_file() else {}
    if codebook_path.is_file() and info.get("ids_hash") == database_hash and info.get("num_clusters") == num_clusters:
        codebook = np.load(codebook_path)
    else:
        started = time.perf_counter()
        sample = database.local_descriptor_sample(aggregation.DEFAULT_MAX_SAMPLES, seed=seed)
        if sample.shape[0] == 0:
            raise ValueError(f"cannot fit a VLAD codebook: store {database.path} has no local descriptors")
        codebook = aggregation.fit_codebook(sample, num_clusters, seed=seed)
        codebook_path.parent.mkdir(exist_ok=True)
        np.save(codebook_path, codebook)
        record = {"ids_hash": database_hash, "num_clusters": num_clusters, "seed": seed}
        atomic_write_bytes(codebook_info, json.dumps(record).encode())
        log(
            f"VLAD codebook: {codebook.shape[0]} clusters fitted on {sample.shape[0]} descriptors "
            f"in {time.perf_counter() - started:.1f} s"
        )
    codebook_hash = hashlib.sha1(codebook.tobytes()).hexdigest()[:16]
    for store in (database, *others):
        existing = store.read_derived("vlad")
        if existing is not None and existing[1].get("codebook") == codebook_hash:
            continue
        vectors = np.zeros((len(store.ids), codebook.size), np.float32)
        for row, image_id in enumerate(store.ids):
            vectors[row] = aggregation.vlad(store.local_features(image_id).descriptors, codebook)
        store.write_derived("vlad", vectors.astype(store.dtype), {"codebook": codebook_hash})


# --------------------------------------------------------------------------- recognition
@dataclass
class RecognitionResult:
    """Predictions of one recognition run.

    ``predictions`` maps query id -> (landmark id or None, confidence) after verification
    and penalties; ``global_predictions`` the same from global similarity alone.
    ``neighbours`` maps query id -> train ids in retrieval order, ``inliers`` the inlier
    counts of the verified ones (aligned with ``neighbours``).
    """

    predictions: dict[str, tuple[str | None, float]]
    global_predictions: dict[str, tuple[str | None, float]]
    neighbours: dict[str, list[str]] = field(default_factory=dict)
    similarities: dict[str, np.ndarray] = field(default_factory=dict)
    inliers: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def recognize_stores(
    queries: FeatureStore,
    database: FeatureStore,
    labels: dict[str, str],
    config: Config,
    *,
    nonlandmark: FeatureStore | None = None,
    verify: bool = True,
    progress: bool = True,
    search_fn: SearchFn = cosine_topk,
) -> RecognitionResult:
    """Recognition from feature stores: cosine top-k, RANSAC re-ranking, landmark votes.

    Parameters
    ----------
    queries, database : stores of the same model (database = labelled train images).
    labels : train id -> landmark id.
    config : NUM_TO_RERANK candidates are verified, TOP_K vote (see :mod:`.rerank`).
    nonlandmark : store of distractor images; used when ``NONLANDMARK_PENALTY > 0``.
    verify : False predicts from global similarity only.
    search_fn : the exact top-k search (signature of :func:`.search.cosine_topk`).
    """
    started = time.perf_counter()
    query_ids, database_ids = queries.ids, database.ids
    num_candidates = max(config.NUM_TO_RERANK, config.TOP_K)
    similarities, indices = search_fn(
        queries.global_descriptors(), database.global_descriptors(), num_candidates, block_size=config.SEARCH_BLOCK_SIZE
    )
    seconds = {"search": time.perf_counter() - started}
    database_labels = [labels.get(image_id) for image_id in database_ids]
    query_penalty = candidate_penalty = None
    if nonlandmark is not None and config.NONLANDMARK_PENALTY > 0 and len(nonlandmark.ids):
        distractors = np.asarray(nonlandmark.global_descriptors(), np.float32)
        query_penalty = nonlandmark_similarity(queries.global_descriptors(), distractors, config.NONLANDMARK_TOP_K)
        candidate_penalty = nonlandmark_similarity(database.global_descriptors(), distractors, config.NONLANDMARK_TOP_K)
    use_local = verify and config.NUM_TO_RERANK > 0 and bool(queries.local_dim) and bool(database.local_dim)
    result = RecognitionResult(predictions={}, global_predictions={}, seconds=seconds)
    global_config = config.replace(NONLANDMARK_PENALTY=0.0)  # global-only reference predictions
    started = time.perf_counter()
    description = "verify" if use_local else "rank"
    for row, query_id in enumerate(tqdm(query_ids, desc=description, unit="query", disable=not progress)):
        candidates = indices[row]
        cosine = similarities[row].astype(np.float64)
        candidate_labels = [database_labels[c] for c in candidates]
        candidate_nl = None if candidate_penalty is None else candidate_penalty[candidates]
        query_nl = None if query_penalty is None else float(query_penalty[row])
        result.global_predictions[query_id] = recognize_one(candidate_labels, cosine, None, global_config)
        inliers = None
        if use_local:
            verified = candidates[: config.NUM_TO_RERANK]
            inliers = np.zeros(len(candidates), np.int64)
            inliers[: len(verified)] = count_inliers_many(
                queries.local_features(query_id),
                [database.local_features(database_ids[c]) for c in verified],
                config,
            )
            result.inliers[query_id] = inliers
        result.predictions[query_id] = recognize_one(
            candidate_labels, cosine, inliers, config, candidate_nl, query_nl
        )
        result.neighbours[query_id] = [database_ids[c] for c in candidates]
        result.similarities[query_id] = similarities[row]
    seconds["verify"] = time.perf_counter() - started
    if config.FREQUENT_LANDMARK_PENALTY > 0 and result.predictions:
        ids = list(result.predictions)
        adjusted = penalize_frequent_landmarks(
            [result.predictions[i][0] for i in ids], np.array([result.predictions[i][1] for i in ids]), config
        )
        result.predictions = {i: (result.predictions[i][0], float(c)) for i, c in zip(ids, adjusted, strict=True)}
    return result


# --------------------------------------------------------------------------- retrieval
@dataclass
class RetrievalResult:
    """``rankings`` maps query id -> index ids, best first (``RETRIEVAL_TOP`` of them);
    ``global_rankings`` the same before re-ranking."""

    rankings: dict[str, list[str]]
    global_rankings: dict[str, list[str]]
    seconds: dict[str, float] = field(default_factory=dict)


def _predicted_labels(
    vectors: np.ndarray,
    database: FeatureStore,
    labels: dict[str, str],
    config: Config,
    search_fn: SearchFn = cosine_topk,
) -> list[str | None]:
    """Landmark of each vector by global top-k voting over the labelled database."""
    similarities, indices = search_fn(vectors, database.global_descriptors(), config.TOP_K, block_size=config.SEARCH_BLOCK_SIZE)
    ids = database.ids
    return [
        recognize_one([labels.get(ids[c]) for c in row_ids], row_sims.astype(np.float64), None, config)[0]
        for row_sims, row_ids in zip(similarities, indices, strict=True)
    ]


def retrieve_stores(
    queries: FeatureStore,
    index: FeatureStore,
    config: Config,
    *,
    train: FeatureStore | None = None,
    labels: dict[str, str] | None = None,
    verify: bool = True,
    progress: bool = True,
    search_fn: SearchFn = cosine_topk,
) -> RetrievalResult:
    """Retrieval: cosine top ``RETRIEVAL_TOP``, the first ``RETRIEVAL_NUM_TO_RERANK``
    re-ordered by inliers and, when a labelled ``train`` store is given, by agreement of
    predicted landmarks (see :func:`.rerank.rerank_retrieval`).

    Index images get the landmark voted by their global neighbours in ``train``; a query
    gets the landmark of its verified recognition, and only when its best candidate has
    at least ``max(MIN_INLIERS, 1)`` inliers (global similarity alone when not verifying).
    """
    started = time.perf_counter()
    index_ids = index.ids
    similarities, indices = search_fn(
        queries.global_descriptors(), index.global_descriptors(), config.RETRIEVAL_TOP, block_size=config.SEARCH_BLOCK_SIZE
    )
    seconds = {"search": time.perf_counter() - started}
    query_labels: list[str | None] = [None] * len(queries.ids)
    index_labels: list[str | None] | None = None
    use_local = verify and bool(queries.local_dim) and bool(index.local_dim)
    if train is not None and labels:
        index_labels = _predicted_labels(index.global_descriptors(), train, labels, config, search_fn)
        if use_local and train.local_dim and config.NUM_TO_RERANK > 0:
            # A query's landmark counts only when verified: a wrong global guess would
            # boost a whole wrong landmark to the top of the list.
            recognition = recognize_stores(
                queries, train, labels, config, verify=True, progress=False, search_fn=search_fn
            )
            gate = max(config.MIN_INLIERS, 1)
            query_labels = [
                recognition.predictions[q][0] if recognition.inliers[q].max(initial=0) >= gate else None
                for q in queries.ids
            ]
        else:
            query_labels = _predicted_labels(queries.global_descriptors(), train, labels, config, search_fn)
    use_local = use_local and config.RETRIEVAL_NUM_TO_RERANK > 0
    result = RetrievalResult(rankings={}, global_rankings={}, seconds=seconds)
    started = time.perf_counter()
    description = "verify" if use_local else "rank"
    for row, query_id in enumerate(tqdm(queries.ids, desc=description, unit="query", disable=not progress)):
        candidates = indices[row]
        inliers = None
        if use_local:
            verified = candidates[: config.RETRIEVAL_NUM_TO_RERANK]
            inliers = count_inliers_many(
                queries.local_features(query_id), [index.local_features(index_ids[c]) for c in verified], config
            )
        candidate_labels = None if index_labels is None else [index_labels[c] for c in candidates]
        order = rerank_retrieval(similarities[row], inliers, candidate_labels, query_labels[row], config)
        result.global_rankings[query_id] = [index_ids[c] for c in candidates]
        result.rankings[query_id] = [index_ids[candidates[o]] for o in order]
    seconds["verify"] = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------- whole runs
@dataclass
class KaggleData:
    """Paths of a dataset in the Kaggle GLDv2 layout (any of them may be absent)."""

    root: Path

    def csv(self, name: str) -> Path:
        return self.root / name

    def has(self, name: str) -> bool:
        return (self.root / name).is_file()

    def require(self, *names: str) -> None:
        missing = [name for name in names if not self.has(name)]
        if missing:
            raise FileNotFoundError(
                f"{self.root} is not a Kaggle-layout dataset: missing {', '.join(missing)} "
                "(expected train.csv + train/, sample_submission.csv + test/, for retrieval index.csv + index/)"
            )


@dataclass
class RunOutput:
    """What :func:`recognize` / :func:`retrieve` produced."""

    submission: pd.DataFrame
    submission_path: Path | None
    problems: list[str]
    result: RecognitionResult | RetrievalResult
    stores: dict[str, FeatureStore]
    extraction: dict[str, ExtractionSummary]


def _prepare(
    data_dir: str | Path,
    model: str | Extractor,
    config: Config | str | Path | None,
    work_dir: str | Path | None,
    params: ExtractorParams | None,
    log: Log,
) -> tuple[KaggleData, Extractor, Config, Path]:
    data = KaggleData(Path(data_dir))
    if isinstance(model, Extractor):
        extractor = model
    else:
        from .models.loader import load_extractor

        extractor = load_extractor(model, params)
    if config is None and extractor.family.split("+")[-1] == "opencv-sift":  # also keras+opencv-sift
        config = "opencv-sift"
    config = load_config(config)
    work = Path(work_dir) if work_dir is not None else Path.cwd() / "delf_work"
    log(f"model: {extractor!r}\nfeatures cached in: {work / model_key(extractor)}")
    return data, extractor, config, work


def recognize(
    data_dir: str | Path,
    model: str | Extractor = "opencv-sift",
    config: Config | str | Path | None = None,
    *,
    output: str | Path | None = "submission.csv",
    work_dir: str | Path | None = None,
    params: ExtractorParams | None = None,
    use_nonlandmark: bool | None = None,
    verify: bool = True,
    dtype: str = "float16",
    progress: bool = True,
    log: Log = print,
    extract_fn: ExtractFn = extract_to_store,
    search_fn: SearchFn = cosine_topk,
    classifiers: Sequence[classifier.Classifier] = (),
) -> RunOutput:
    """Recognition submission for a Kaggle-layout dataset.

    Reads ``train.csv`` + ``train/`` (database) and ``sample_submission.csv`` + ``test/``
    (queries); with ``use_nonlandmark`` (default: when the config's NONLANDMARK_PENALTY
    > 0 and ``nonlandmark.csv`` exists) also ``nonlandmark.csv`` + ``nonlandmark/``
    (``use_nonlandmark=True`` with a zero penalty uses a penalty of 1.0).
    ``config`` defaults to the preset suiting the model (``opencv-sift`` or
    ``kaggle2020``). Writes ``output`` (None: write nothing) and validates it.
    ``extract_fn`` / ``search_fn`` replace the local extraction runner and search (see
    :class:`delf_retrieval.distributed.RayRunner`). ``classifiers`` (softmax models with
    their class mappings, :func:`delf_retrieval.classifier.load_classifier`) are used when
    ``CLASSIFIER_MODE`` is ``classifier`` or ``fused``; ``WHITENING_DIM`` whitens the global
    descriptors first (:mod:`delf_retrieval.whitening`).
    """
    data, extractor, config, work = _prepare(data_dir, model, config, work_dir, params, log)
    data.require("train.csv", "sample_submission.csv")
    if use_nonlandmark is None:
        use_nonlandmark = config.NONLANDMARK_PENALTY > 0 and data.has("nonlandmark.csv")
    splits = {"train": data.csv("train.csv"), "test": data.csv("sample_submission.csv")}
    if use_nonlandmark and config.NONLANDMARK_PENALTY == 0:
        config = config.replace(NONLANDMARK_PENALTY=1.0)  # a distractor set with no weight does nothing
    log(f"config:\n{config.describe()}")
    if use_nonlandmark:
        data.require("nonlandmark.csv")
        splits["nonlandmark"] = data.csv("nonlandmark.csv")
    stores, summaries = _extract_splits(extractor, splits, work, dtype, progress, log, extract_fn)
    ensure_global_descriptors(stores["train"], [s for k, s in stores.items() if k != "train"], log=log)
    searched = whitening.whiten_for_run(stores, "train", config.WHITENING_DIM, log=log)  # hook (issue 11)
    labels = read_labels_csv(data.csv("train.csv"))
    result = recognize_stores(
        searched["test"],
        searched["train"],
        labels,
        config,
        nonlandmark=searched.get("nonlandmark"),
        verify=verify,
        progress=progress,
        search_fn=search_fn,
    )
    result = classifier.apply_classifiers(  # hook (issue 11): no-op when CLASSIFIER_MODE is "off"
        result, classifiers, stores["test"], splits["test"], labels, config, progress=progress, log=log
    )
    sample = pd.read_csv(data.csv("sample_submission.csv"), dtype=str, keep_default_na=False)
    frame = recognition_dataframe(result.predictions, ids=sample["id"].tolist())
    path = write_recognition_submission(output, result.predictions, ids=sample["id"].tolist()) if output else None
    problems = validate_submission(frame, sample, kind="recognition")
    _report(result.seconds, path, problems, log)
    return RunOutput(frame, path, problems, result, stores, summaries)


def retrieve(
    data_dir: str | Path,
    model: str | Extractor = "opencv-sift",
    config: Config | str | Path | None = None,
    *,
    output: str | Path | None = "submission.csv",
    work_dir: str | Path | None = None,
    params: ExtractorParams | None = None,
    use_labels: bool = True,
    verify: bool = True,
    dtype: str = "float16",
    progress: bool = True,
    log: Log = print,
    extract_fn: ExtractFn = extract_to_store,
    search_fn: SearchFn = cosine_topk,
) -> RunOutput:
    """Retrieval submission (``id,images``) for a Kaggle-layout dataset.

    Reads ``index.csv`` + ``index/`` (database) and ``sample_submission.csv`` + ``test/``;
    with ``use_labels`` and a ``train.csv``, predicted landmarks re-order the top list.
    ``extract_fn`` / ``search_fn`` as in :func:`recognize`.
    """
    data, extractor, config, work = _prepare(data_dir, model, config, work_dir, params, log)
    data.require("index.csv", "sample_submission.csv")
    log(f"config:\n{config.describe()}")
    splits = {"index": data.csv("index.csv"), "test": data.csv("sample_submission.csv")}
    labelled = use_labels and data.has("train.csv")
    if labelled:
        splits["train"] = data.csv("train.csv")
    stores, summaries = _extract_splits(extractor, splits, work, dtype, progress, log, extract_fn)
    ensure_global_descriptors(stores["index"], [s for k, s in stores.items() if k != "index"], log=log)
    searched = whitening.whiten_for_run(stores, "index", config.WHITENING_DIM, log=log)  # hook (issue 11)
    result = retrieve_stores(
        searched["test"],
        searched["index"],
        config,
        train=searched.get("train"),
        labels=read_labels_csv(data.csv("train.csv")) if labelled else None,
        verify=verify,
        progress=progress,
        search_fn=search_fn,
    )
    sample = pd.read_csv(data.csv("sample_submission.csv"), dtype=str, keep_default_na=False)
    ids = sample["id"].tolist()
    frame = retrieval_dataframe(result.rankings, ids=ids, top=config.RETRIEVAL_TOP)
    path = write_retrieval_submission(output, result.rankings, ids=ids, top=config.RETRIEVAL_TOP) if output else None
    problems = validate_submission(frame, sample, kind="retrieval")
    _report(result.seconds, path, problems, log)
    return RunOutput(frame, path, problems, result, stores, summaries)


def _extract_splits(
    extractor: Extractor,
    splits: dict[str, Path],
    work: Path,
    dtype: str,
    progress: bool,
    log: Log,
    extract_fn: ExtractFn,
) -> tuple[dict[str, FeatureStore], dict[str, ExtractionSummary]]:
    """:func:`extract_split` of every ``{split: csv}``; returns stores and summaries by split."""
    stores, summaries = {}, {}
    for split, csv_path in splits.items():
        stores[split], summaries[split] = extract_split(
            extractor, csv_path, work, split, dtype=dtype, progress=progress, log=log, extract_fn=extract_fn
        )
    return stores, summaries


def _report(seconds: dict[str, float], path: Path | None, problems: list[str], log: Log) -> None:
    log("time: " + ", ".join(f"{name} {value:.2f} s" for name, value in seconds.items()))
    if path:
        log(f"wrote {path}")
    for problem in problems:
        log(f"submission problem: {problem}")
