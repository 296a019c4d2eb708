"""End-to-end recognition and retrieval on a Kaggle-layout dataset (one import for all).

Each step is a plain function that a notebook can run alone:

1. :func:`extract_split` - features of one image set into a cached store;
2. :func:`ensure_global_descriptors` - VLAD globals for local-only models;
3. :func:`recognize_stores` / :func:`retrieve_stores` - search, verify, re-rank;
4. :func:`recognize` / :func:`retrieve` - all of the above plus the submission file.

Features are cached in ``work_dir/<model>-<fingerprint hash>/<split>/``; a second run
reuses them (and resumes an interrupted extraction).

This module only gathers the names; the code lives in :mod:`.run` (feature cache,
runners), :mod:`.recognition` and :mod:`.retrieval`.
"""

from __future__ import annotations

from .recognition import RecognitionResult, recognize, recognize_neighbours, recognize_stores
from .retrieval import RetrievalResult, predicted_landmarks, retrieve, retrieve_stores
from .run import (
    CODEBOOK_FILE,
    IndexFactory,
    KaggleData,
    LocalRunner,
    Log,
    Runner,
    RunOutput,
    ensure_global_descriptors,
    exact_index,
    extract_split,
    extract_splits,
    model_key,
    search_store,
)

__all__ = [
    "CODEBOOK_FILE",
    "IndexFactory",
    "KaggleData",
    "LocalRunner",
    "Log",
    "RecognitionResult",
    "RetrievalResult",
    "RunOutput",
    "Runner",
    "ensure_global_descriptors",
    "exact_index",
    "extract_split",
    "extract_splits",
    "model_key",
    "predicted_landmarks",
    "recognize",
    "recognize_neighbours",
    "recognize_stores",
    "retrieve",
    "retrieve_stores",
    "search_store",
]
