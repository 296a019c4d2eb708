"""Landmark recognition: which landmark does each query show, and how sure are we.

Data flow: query and train stores -> global top-k search of the train store
(:func:`~delf_retrieval.search.stores.search_store`) -> RANSAC inlier counts of the best
``NUM_TO_RERANK`` candidates (:mod:`.verify`; with a learned matcher optionally chosen
from more candidates by a cheap matcher, :mod:`.cascade`) -> per-landmark votes with optional
non-landmark and frequent-landmark penalties (:mod:`.rerank`) -> one ``(landmark,
confidence)`` per query -> ``submission.csv`` (:func:`recognize`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from delf_retrieval.config import Config
from delf_retrieval.core.log import Log
from delf_retrieval.features.images import read_labels_csv
from delf_retrieval.features.store import FeatureStore
from delf_retrieval.kaggle.submission import recognition_dataframe
from delf_retrieval.matching import cascade
from delf_retrieval.models.base import Extractor, ExtractorParams
from delf_retrieval.scoring import classifier
from delf_retrieval.scoring.candidates import recognize_candidates
from delf_retrieval.scoring.rerank import (
    nonlandmark_similarity,
    penalize_frequent_landmarks,
    recognize_one,
)
from delf_retrieval.search import whitening
from delf_retrieval.search.stores import IndexFactory, search_store
from delf_retrieval.tasks.run import Runner, RunOutput, extract_splits, finish_run, open_run

__all__ = ["RecognitionResult", "recognize", "recognize_candidates", "recognize_neighbours", "recognize_stores"]


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
    index_factory: IndexFactory | None = None,
) -> RecognitionResult:
    """Recognition from feature stores: cosine top-k, RANSAC re-ranking, landmark votes.

    Parameters
    ----------
    queries, database : stores of the same model (database = labelled train images).
    labels : train id -> landmark id.
    config : NUM_TO_RERANK candidates are verified, TOP_K vote (see :mod:`.rerank`).
    nonlandmark : store of distractor images; used when ``NONLANDMARK_PENALTY > 0``.
    verify : False predicts from global similarity only.
    index_factory : builds the search index of ``database`` (default: exact, local;
        ``RayRunner.index`` shards it over Ray).
    """
    started = time.perf_counter()
    similarities, rows = search_store(
        queries.global_descriptors(), database, cascade.num_candidates(config), config, index_factory
    )
    search_seconds = time.perf_counter() - started
    result = recognize_neighbours(
        queries, database, labels, config, similarities, rows, nonlandmark=nonlandmark, verify=verify, progress=progress
    )
    result.seconds = {"search": search_seconds, **result.seconds}
    return result


def recognize_neighbours(
    queries: FeatureStore,
    database: FeatureStore,
    labels: dict[str, str],
    config: Config,
    similarities: np.ndarray,
    rows: np.ndarray,
    *,
    nonlandmark: FeatureStore | None = None,
    verify: bool = True,
    progress: bool = True,
) -> RecognitionResult:
    """Recognition from the global neighbours already found for every query.

    ``similarities`` float [Q, K] and ``rows`` int [Q, K] are the database's top-K for
    ``queries`` in row order (``K >= cascade.num_candidates(config)`` or all rows); other
    arguments as :func:`recognize_stores`.
    """
    query_ids, database_ids = queries.ids, database.ids
    database_labels = [labels.get(image_id) for image_id in database_ids]
    query_penalty = candidate_penalty = None
    if nonlandmark is not None and config.NONLANDMARK_PENALTY > 0 and len(nonlandmark.ids):
        distractors = np.asarray(nonlandmark.global_descriptors(), np.float32)
        query_penalty = nonlandmark_similarity(queries.global_descriptors(), distractors, config.NONLANDMARK_TOP_K)
        candidate_penalty = nonlandmark_similarity(database.global_descriptors(), distractors, config.NONLANDMARK_TOP_K)
    use_local = verify and config.NUM_TO_RERANK > 0 and bool(queries.local_dim) and bool(database.local_dim)
    result = RecognitionResult(predictions={}, global_predictions={})
    global_config = config.replace(NONLANDMARK_PENALTY=0.0)  # global-only reference predictions
    started = time.perf_counter()
    description = "verify" if use_local else "rank"
    for row, query_id in enumerate(tqdm(query_ids, desc=description, unit="query", disable=not progress)):
        candidates = rows[row]
        cosine = similarities[row].astype(np.float64)
        candidate_labels = [database_labels[c] for c in candidates]
        result.global_predictions[query_id] = recognize_one(candidate_labels, cosine, None, global_config)
        label, confidence, inliers = recognize_candidates(
            queries.local_features(query_id) if use_local else None,
            candidates,
            cosine,
            database,
            database_labels,
            config,
            candidate_nonlandmark=candidate_penalty,
            query_nonlandmark=None if query_penalty is None else float(query_penalty[row]),
            verify=use_local,
        )
        if inliers is not None:
            result.inliers[query_id] = inliers
        result.predictions[query_id] = (label, confidence)
        result.neighbours[query_id] = [database_ids[c] for c in candidates]
        result.similarities[query_id] = similarities[row]
    result.seconds["verify"] = time.perf_counter() - started
    if config.FREQUENT_LANDMARK_PENALTY > 0 and result.predictions:
        ids = list(result.predictions)
        adjusted = penalize_frequent_landmarks(
            [result.predictions[i][0] for i in ids], np.array([result.predictions[i][1] for i in ids]), config
        )
        result.predictions = {i: (result.predictions[i][0], float(c)) for i, c in zip(ids, adjusted, strict=True)}
    return result




def recognize(
    data_dir: str | Path,
    model: str | Extractor | None = None,
    config: Config | str | Path | None = None,
    *,
    output: str | Path | None = "submission.csv",
    work_dir: str | Path | None = None,
    params: ExtractorParams | None = None,
    use_nonlandmark: bool | None = None,
    verify: bool = True,
    dtype: str = "float16",
    batch_size: int = 64,
    decode_threads: int = 2,
    progress: bool = True,
    log: Log = print,
    runner: Runner | None = None,
    classifiers: Sequence[classifier.Classifier] = (),
) -> RunOutput[RecognitionResult]:
    """Recognition submission for a Kaggle-layout dataset.

    Reads ``train.csv`` + ``train/`` (database) and ``sample_submission.csv`` + ``test/``
    (queries); with ``use_nonlandmark`` (default: when the config's NONLANDMARK_PENALTY
    > 0 and ``nonlandmark.csv`` exists) also ``nonlandmark.csv`` + ``nonlandmark/``
    (``use_nonlandmark=True`` with a zero penalty uses a penalty of 1.0).
    ``config`` defaults to the preset suiting the model (``opencv-sift`` or
    ``kaggle2020``). Writes ``output`` (None: write nothing) and validates it.
    ``runner`` runs extraction and search (default :class:`~delf_retrieval.tasks.run.LocalRunner`;
    ``delf_retrieval.distributed.RayRunner`` for Ray). ``classifiers`` (softmax models with
    their class mappings, :func:`delf_retrieval.scoring.classifier.load_classifier`) are used when
    ``CLASSIFIER_MODE`` is ``classifier`` or ``fused``; ``WHITENING_DIM`` whitens the global
    descriptors first (:mod:`delf_retrieval.search.whitening`).
    """
    data, extractor, config, work = open_run(data_dir, model, config, work_dir, params, log)
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
    stores, summaries = extract_splits(
        extractor, splits, "train", work, dtype=dtype, batch_size=batch_size, decode_threads=decode_threads,
        progress=progress, log=log, runner=runner,
    )
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
        index_factory=None if runner is None else runner.index,
    )
    result = classifier.apply_classifiers(  # hook (issue 11): no-op when CLASSIFIER_MODE is "off"
        result, classifiers, stores["test"], splits["test"], labels, config, progress=progress, log=log
    )
    frame = recognition_dataframe(result.predictions, ids=data.sample()["id"].tolist())
    path, problems = finish_run(data, frame, output, "recognition", result.seconds, log)
    return RunOutput(frame, path, problems, result, stores, summaries)
