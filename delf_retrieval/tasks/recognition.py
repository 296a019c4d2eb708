"""Landmark recognition of a Kaggle-layout dataset: which landmark each query shows.

Data flow: extract (or reuse) the train, test and distractor stores
(:func:`~delf_retrieval.tasks.run.extract_splits`) -> whiten them when ``WHITENING_DIM``
is set (:mod:`delf_retrieval.search.whitening`) -> the class probabilities of the
queries when a classifier mode is on -> the recognition engine
(:func:`delf_retrieval.scoring.engine.recognize_queries`: search, verify, vote, penalise)
-> with ``CONFIDENCE="probability"``, the confidence model fitted by leave-one-out on the
train photos and the distractor set (:func:`delf_retrieval.scoring.leave_one_out.ensure_confidence`,
cached in the work dir) -> ``submission.csv`` (:func:`recognize`). ``predict`` and the web service run the same
engine on one photo at a time (:mod:`delf_retrieval.service.recognizer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from delf_retrieval.config import Config
from delf_retrieval.core.log import Log
from delf_retrieval.features.images import read_labels_csv
from delf_retrieval.kaggle.submission import recognition_dataframe
from delf_retrieval.models.base import Extractor, ExtractorParams
from delf_retrieval.scoring import classifier
from delf_retrieval.scoring.engine import (
    RecognitionIndex,
    RecognitionResult,
    RecognitionSettings,
    recognize_queries,
    store_queries,
)
from delf_retrieval.scoring.leave_one_out import ConfidenceSettings, ensure_confidence
from delf_retrieval.search import whitening
from delf_retrieval.search.stores import IndexFactory
from delf_retrieval.tasks.run import Runner, RunOutput, extract_splits, finish_run, open_run

__all__ = ["RecognitionResult", "recognize", "recognize_stores"]


def recognize_stores(
    queries: Any,
    database: Any,
    labels: dict[str, str],
    config: Config,
    *,
    nonlandmark: Any | None = None,
    verify: bool = True,
    progress: bool = True,
    index_factory: IndexFactory | None = None,
    class_probabilities: Sequence[dict[str, float]] | None = None,
    confidence_distractors: Any | None = None,
    log: Log = print,
) -> RecognitionResult:
    """Recognition from feature stores (or whitened views of them): the engine
    (:func:`~delf_retrieval.scoring.engine.recognize_queries`) on every query of ``queries``.

    Parameters
    ----------
    queries, database : stores of the same model (database = labelled train images).
    labels : train id -> landmark id.
    config : NUM_TO_RERANK candidates are verified, TOP_K vote (see :mod:`.rerank`); read
        once into the engine's :class:`~delf_retrieval.scoring.engine.RecognitionSettings`.
    nonlandmark : store of distractor images; used when ``NONLANDMARK_PENALTY > 0``.
    verify : False predicts from global similarity only.
    index_factory : builds the search index of ``database`` (default: exact, local;
        ``RayRunner.index`` shards it over Ray).
    class_probabilities : per query (``queries.ids`` order), landmark -> probability, for
        ``CLASSIFIER_MODE`` ``classifier``/``fused``.
    confidence_distractors : store of distractor images run as (wrong) queries to fit the
        confidence model (``CONFIDENCE="probability"``); default ``nonlandmark``.
    """
    distractors = None
    if nonlandmark is not None and len(nonlandmark.ids):
        distractors = nonlandmark.global_descriptors()
    settings = RecognitionSettings.from_config(config)
    index = RecognitionIndex.from_labels(
        database, labels, settings, nonlandmark=distractors, index_factory=index_factory
    )
    if config.CONFIDENCE == "probability":
        fit_set = nonlandmark if confidence_distractors is None else confidence_distractors
        index.confidence = ensure_confidence(
            index,
            settings,
            ConfidenceSettings.from_config(config),
            fit_set if fit_set is not None and len(fit_set.ids) else None,
            log=log,
            progress=progress,
        )
    query_ids = queries.ids
    return recognize_queries(
        query_ids,
        queries.global_descriptors(),
        store_queries(queries),
        index,
        settings,
        verify=verify,
        class_probabilities=class_probabilities,
        progress=progress,
    )


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
    With ``CONFIDENCE="probability"`` the distractor set (when ``nonlandmark.csv`` exists
    and ``use_nonlandmark`` is not False) is also read to fit the confidence model, and the
    submission's confidences are probabilities.
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
    # The distractor set also fits the confidence model, unless use_nonlandmark=False.
    fit_distractors = use_nonlandmark is not False and config.CONFIDENCE == "probability" and data.has("nonlandmark.csv")
    if use_nonlandmark is None:
        use_nonlandmark = config.NONLANDMARK_PENALTY > 0 and data.has("nonlandmark.csv")
    splits = {"train": data.csv("train.csv"), "test": data.csv("sample_submission.csv")}
    if use_nonlandmark and config.NONLANDMARK_PENALTY == 0:
        config = config.replace(NONLANDMARK_PENALTY=1.0)  # a distractor set with no weight does nothing
    log(f"config:\n{config.describe()}")
    if use_nonlandmark:
        data.require("nonlandmark.csv")
    if use_nonlandmark or fit_distractors:
        splits["nonlandmark"] = data.csv("nonlandmark.csv")
    stores, summaries = extract_splits(
        extractor, splits, "train", work, dtype=dtype, batch_size=batch_size, decode_threads=decode_threads,
        progress=progress, log=log, runner=runner,
    )
    searched = whitening.whiten_for_run(stores, "train", config.WHITENING_DIM, log=log)
    labels = read_labels_csv(data.csv("train.csv"))
    probabilities = None
    if config.CLASSIFIER_MODE != "off":
        probabilities = classifier.store_class_probabilities(
            classifiers, stores["test"], splits["test"], progress=progress
        )
        log(f"classifier: {config.CLASSIFIER_MODE} predictions from {len(classifiers)} classifier(s)")
    result = recognize_stores(
        searched["test"],
        searched["train"],
        labels,
        config,
        nonlandmark=searched.get("nonlandmark") if use_nonlandmark else None,
        confidence_distractors=searched.get("nonlandmark"),
        log=log,
        verify=verify,
        progress=progress,
        index_factory=None if runner is None else runner.index,
        class_probabilities=probabilities,
    )
    frame = recognition_dataframe(result.predictions, ids=data.sample()["id"].tolist())
    path, problems = finish_run(data, frame, output, "recognition", result.seconds, log)
    return RunOutput(frame, path, problems, result, stores, summaries)
