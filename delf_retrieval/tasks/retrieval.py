"""Landmark retrieval: every index image showing the query's landmark, best first.

Data flow: query and index stores -> global top ``RETRIEVAL_TOP`` search of the index
store (:func:`~delf_retrieval.search.stores.search_store`) -> RANSAC inlier counts of the first
``RETRIEVAL_NUM_TO_RERANK`` (:mod:`.verify`) -> re-ordering by inliers and by agreement
of predicted landmarks (:func:`~delf_retrieval.scoring.rerank.rerank_retrieval`; the landmarks
come from one search of a labelled train store) -> ``submission.csv``
(:func:`retrieve`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from delf_retrieval.config import Config
from delf_retrieval.core.log import Log
from delf_retrieval.features.images import read_labels_csv
from delf_retrieval.features.store import FeatureStore
from delf_retrieval.kaggle.submission import retrieval_dataframe
from delf_retrieval.matching.verify import count_inliers_many
from delf_retrieval.models.base import Extractor, ExtractorParams
from delf_retrieval.scoring.engine import (
    RecognitionIndex,
    RecognitionSettings,
    recognize_queries,
    store_queries,
)
from delf_retrieval.scoring.rerank import ScoringSettings, recognize_one, rerank_retrieval
from delf_retrieval.search import whitening
from delf_retrieval.search.stores import IndexFactory, search_store
from delf_retrieval.tasks.run import Runner, RunOutput, extract_splits, finish_run, open_run

__all__ = ["RetrievalResult", "predicted_landmarks", "retrieve", "retrieve_stores"]

Labels = list[str | None]


@dataclass
class RetrievalResult:
    """``rankings`` maps query id -> index ids, best first (``RETRIEVAL_TOP`` of them);
    ``global_rankings`` the same before re-ranking."""

    rankings: dict[str, list[str]]
    global_rankings: dict[str, list[str]]
    seconds: dict[str, float] = field(default_factory=dict)


def retrieve_stores(
    queries: FeatureStore,
    index: FeatureStore,
    config: Config,
    *,
    train: FeatureStore | None = None,
    labels: dict[str, str] | None = None,
    verify: bool = True,
    progress: bool = True,
    index_factory: IndexFactory | None = None,
) -> RetrievalResult:
    """Retrieval: cosine top ``RETRIEVAL_TOP``, the first ``RETRIEVAL_NUM_TO_RERANK``
    re-ordered by inliers and, when a labelled ``train`` store is given, by agreement of
    predicted landmarks (see :func:`.rerank.rerank_retrieval` and
    :func:`predicted_landmarks`).

    ``index_factory`` builds the search index of a store (default: exact, local;
    ``RayRunner.index`` shards it over Ray).
    """
    settings = RecognitionSettings.from_config(config)
    matching, scoring = settings.verification.matching, settings.scoring
    started = time.perf_counter()
    index_ids = index.ids
    similarities, rows = search_store(
        queries.global_descriptors(), index, config.RETRIEVAL_TOP, settings.search, index_factory
    )
    seconds = {"search": time.perf_counter() - started}
    query_labels: Labels = [None] * len(queries.ids)
    index_labels: Labels | None = None
    use_local = verify and bool(queries.local_dim) and bool(index.local_dim)
    if train is not None and labels:
        query_labels, index_labels = predicted_landmarks(
            queries, index, train, labels, config, verify=use_local, index_factory=index_factory
        )
    use_local = use_local and config.RETRIEVAL_NUM_TO_RERANK > 0
    result = RetrievalResult(rankings={}, global_rankings={}, seconds=seconds)
    started = time.perf_counter()
    description = "verify" if use_local else "rank"
    for row, query_id in enumerate(tqdm(queries.ids, desc=description, unit="query", disable=not progress)):
        candidates = rows[row]
        inliers = None
        if use_local:
            verified = candidates[: config.RETRIEVAL_NUM_TO_RERANK]
            inliers = count_inliers_many(
                queries.local_features(query_id), [index.local_features(index_ids[c]) for c in verified], matching
            )
        candidate_labels = None if index_labels is None else [index_labels[c] for c in candidates]
        order = rerank_retrieval(
            similarities[row],
            inliers,
            candidate_labels,
            query_labels[row],
            scoring,
            num_to_rerank=config.RETRIEVAL_NUM_TO_RERANK,
            label_boost=config.RETRIEVAL_LABEL_BOOST,
        )
        result.global_rankings[query_id] = [index_ids[c] for c in candidates]
        result.rankings[query_id] = [index_ids[candidates[o]] for o in order]
    seconds["verify"] = time.perf_counter() - started
    return result


def predicted_landmarks(
    queries: FeatureStore,
    index: FeatureStore,
    train: FeatureStore,
    labels: dict[str, str],
    config: Config,
    *,
    verify: bool = True,
    index_factory: IndexFactory | None = None,
) -> tuple[Labels, Labels]:
    """Landmarks of the queries and of the index images, from one search of ``train``.

    Index images get the landmark voted by their ``TOP_K`` global neighbours in
    ``train``. A query gets the landmark of its verified recognition
    (the recognition engine, :func:`~delf_retrieval.scoring.engine.recognize_queries`), and only when its best
    candidate has at least ``max(MIN_INLIERS, 1)`` inliers: a wrong global guess would
    boost a whole wrong landmark to the top of the list. Without verification (or local
    features) queries are voted like index images.

    Returns ``(query_labels, index_labels)``, aligned with ``queries.ids`` and
    ``index.ids`` (None: no landmark).
    """
    settings = RecognitionSettings.from_config(config)
    recognise = verify and bool(train.local_dim) and config.NUM_TO_RERANK > 0
    k = settings.num_candidates if recognise else config.TOP_K
    num_index = len(index.ids)
    vectors = np.concatenate([index.global_descriptors(), queries.global_descriptors()], dtype=np.float32)
    similarities, rows = search_store(vectors, train, k, settings.search, index_factory)
    index_labels = _votes(similarities[:num_index], rows[:num_index], train, labels, settings.scoring)
    if not recognise:
        return _votes(similarities[num_index:], rows[num_index:], train, labels, settings.scoring), index_labels
    recognition = recognize_queries(
        queries.ids,
        queries.global_descriptors(),
        store_queries(queries),
        RecognitionIndex.from_labels(train, labels, settings),
        settings,
        neighbours=(similarities[num_index:], rows[num_index:]),
    )
    gate = max(config.MIN_INLIERS, 1)
    query_labels = [
        recognition.predictions[q][0] if recognition.inliers[q].max(initial=0) >= gate else None
        for q in queries.ids
    ]
    return query_labels, index_labels


def _votes(
    similarities: np.ndarray, rows: np.ndarray, train: FeatureStore, labels: dict[str, str], scoring: ScoringSettings
) -> Labels:
    """Landmark of each search result row by global voting of its first ``TOP_K``."""
    ids = train.ids
    top = scoring.top_k
    return [
        recognize_one([labels.get(ids[c]) for c in row_ids], row_sims.astype(np.float64), None, scoring)[0]
        for row_sims, row_ids in zip(similarities[:, :top], rows[:, :top], strict=True)
    ]


def retrieve(
    data_dir: str | Path,
    model: str | Extractor | None = None,
    config: Config | str | Path | None = None,
    *,
    output: str | Path | None = "submission.csv",
    work_dir: str | Path | None = None,
    params: ExtractorParams | None = None,
    use_labels: bool = True,
    verify: bool = True,
    dtype: str = "float16",
    batch_size: int = 64,
    decode_threads: int = 2,
    progress: bool = True,
    log: Log = print,
    runner: Runner | None = None,
) -> RunOutput[RetrievalResult]:
    """Retrieval submission (``id,images``) for a Kaggle-layout dataset.

    Reads ``index.csv`` + ``index/`` (database) and ``sample_submission.csv`` + ``test/``;
    with ``use_labels`` and a ``train.csv``, predicted landmarks re-order the top list.
    ``runner`` as in :func:`~delf_retrieval.tasks.recognition.recognize`.
    """
    data, extractor, config, work = open_run(data_dir, model, config, work_dir, params, log)
    data.require("index.csv", "sample_submission.csv")
    log(f"config:\n{config.describe()}")
    splits = {"index": data.csv("index.csv"), "test": data.csv("sample_submission.csv")}
    labelled = use_labels and data.has("train.csv")
    if labelled:
        splits["train"] = data.csv("train.csv")
    stores, summaries = extract_splits(
        extractor, splits, "index", work, dtype=dtype, batch_size=batch_size, decode_threads=decode_threads,
        progress=progress, log=log, runner=runner,
    )
    searched = whitening.whiten_for_run(stores, "index", config.WHITENING_DIM, log=log)  # hook (issue 11)
    result = retrieve_stores(
        searched["test"],
        searched["index"],
        config,
        train=searched.get("train"),
        labels=read_labels_csv(data.csv("train.csv")) if labelled else None,
        verify=verify,
        progress=progress,
        index_factory=None if runner is None else runner.index,
    )
    frame = retrieval_dataframe(result.rankings, ids=data.sample()["id"].tolist(), top=config.RETRIEVAL_TOP)
    path, problems = finish_run(data, frame, output, "retrieval", result.seconds, log)
    return RunOutput(frame, path, problems, result, stores, summaries)
