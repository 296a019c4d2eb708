"""delf_retrieval: landmark recognition and retrieval with DELF/DELG features.

The subpackages follow the data's way (each imports only the ones before it)::

    core -> features -> models -> config -> search -> matching -> scoring
         -> kaggle -> tasks -> service -> distributed -> demo -> cli

``features`` holds the containers, image decoding and the on-disk feature store;
``models`` the extractors (one adapter per family, found by name in a registry) and
batch extraction; ``search`` global descriptors and their index (VLAD, whitening,
alpha-QE/DBA); ``matching`` putative matches, RANSAC and the learned matchers;
``scoring`` candidate scores, landmark votes, classifiers and the one recognition
engine; ``kaggle`` submission files, metrics and dataset layout; ``tasks`` whole runs
(recognize, retrieve, clean, build an index); ``service`` one photo at a time
(``Recognizer``, the web service).

The names below are the public API, imported on first use so that ``import
delf_retrieval`` stays cheap (it never imports TensorFlow or PyTorch)::

    from delf_retrieval import recognize, retrieve, Recognizer, load_extractor, FeatureStore
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    "Config": "delf_retrieval.config",
    "load_config": "delf_retrieval.config",
    "PRESETS": "delf_retrieval.config",
    "ImageFeatures": "delf_retrieval.features.containers",
    "LocalFeatures": "delf_retrieval.features.containers",
    "FeatureStore": "delf_retrieval.features.store",
    "load_image": "delf_retrieval.features.images",
    "list_images": "delf_retrieval.features.images",
    "Extractor": "delf_retrieval.models.base",
    "ExtractorParams": "delf_retrieval.models.base",
    "load_extractor": "delf_retrieval.models.loader",
    "list_models": "delf_retrieval.models.loader",
    "default_model": "delf_retrieval.models.loader",
    "extract_to_store": "delf_retrieval.models.extract",
    "CosineIndex": "delf_retrieval.search.index",
    "cosine_topk": "delf_retrieval.search.index",
    "exact_index": "delf_retrieval.search.stores",
    "search_store": "delf_retrieval.search.stores",
    "ensure_global_descriptors": "delf_retrieval.search.vlad",
    "MatchingSettings": "delf_retrieval.matching.verify",
    "count_inliers": "delf_retrieval.matching.verify",
    "count_inliers_many": "delf_retrieval.matching.verify",
    "recognize_queries": "delf_retrieval.scoring.engine",
    "QueryFeatures": "delf_retrieval.scoring.engine",
    "RecognitionIndex": "delf_retrieval.scoring.engine",
    "RecognitionSettings": "delf_retrieval.scoring.engine",
    "KaggleData": "delf_retrieval.kaggle.dataset",
    "evaluate_recognition": "delf_retrieval.kaggle.metrics",
    "evaluate_retrieval": "delf_retrieval.kaggle.metrics",
    "validate_submission": "delf_retrieval.kaggle.submission",
    "LocalRunner": "delf_retrieval.tasks.run",
    "RunOutput": "delf_retrieval.tasks.run",
    "extract_split": "delf_retrieval.tasks.run",
    "extract_splits": "delf_retrieval.tasks.run",
    "model_key": "delf_retrieval.tasks.run",
    "recognize": "delf_retrieval.tasks.recognition",
    "recognize_stores": "delf_retrieval.tasks.recognition",
    "recognize_neighbours": "delf_retrieval.tasks.recognition",
    "RecognitionResult": "delf_retrieval.tasks.recognition",
    "retrieve": "delf_retrieval.tasks.retrieval",
    "retrieve_stores": "delf_retrieval.tasks.retrieval",
    "predicted_landmarks": "delf_retrieval.tasks.retrieval",
    "RetrievalResult": "delf_retrieval.tasks.retrieval",
    "clean_dataset": "delf_retrieval.tasks.clean",
    "build_index": "delf_retrieval.tasks.build_index",
    "Recognizer": "delf_retrieval.service.recognizer",
    "Prediction": "delf_retrieval.service.recognizer",
}

__all__ = ["__version__", *sorted(_PUBLIC)]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'delf_retrieval' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
