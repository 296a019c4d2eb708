"""What the accuracy benchmarks share: the feature stores a ``delf-retrieval recognize`` /
``retrieve`` run with ``--work-dir`` already extracted, and the true landmarks of the
queries. Imported by ``cascade.py``, ``reranking.py`` and ``confidence.py`` (run from this
folder, so it is importable by name, as ``clean.py`` imports ``verification``)."""

from __future__ import annotations

import argparse
from pathlib import Path

try:
    import delf_retrieval  # noqa: F401
except ImportError:  # run from a checkout without installing
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import delf_retrieval
from delf_retrieval.features.store import FeatureStore
from delf_retrieval.kaggle.submission import read_recognition_solution
from delf_retrieval.models.base import Extractor
from delf_retrieval.models.loader import load_extractor
from delf_retrieval.search.vlad import searchable

SPLITS = ("train", "test", "index")


def add_store_arguments(parser: argparse.ArgumentParser, model: str | None = None) -> None:
    """``DATA`` and ``--work-dir``; with ``model``, also ``--model`` (that default) and
    ``--preset`` (default: the model's)."""
    parser.add_argument("data", type=Path, help="Kaggle-layout dataset (train.csv, solution.csv)")
    parser.add_argument("--work-dir", type=Path, required=True, help="the --work-dir of the run that extracted")
    if model is not None:
        parser.add_argument("--model", default=model)
        parser.add_argument("--preset", default=None, help="default: the model's")


def open_stores(
    work_dir: Path, model: str | Extractor, extra: list[FeatureStore] = ()
) -> tuple[Extractor, dict[str, FeatureStore]]:
    """The model's extractor and its stores among ``train``, ``test``, ``index`` in
    ``work_dir``, with global descriptors for all of them and ``extra`` (VLAD is fitted on
    ``train`` for models without global descriptors)."""
    extractor = model if isinstance(model, Extractor) else load_extractor(model)
    root = work_dir / delf_retrieval.model_key(extractor)
    stores = {split: FeatureStore(root / split) for split in SPLITS if (root / split / "meta.json").is_file()}
    if "train" not in stores or "test" not in stores:
        raise SystemExit(f"no train/test stores of {extractor.family} in {root}: run `delf-retrieval recognize "
                         f"DATA --model ... --work-dir {work_dir}` first")
    delf_retrieval.ensure_global_descriptors(stores["train"], [s for k, s in stores.items() if k != "train"] + list(extra))
    return extractor, {split: searchable(store) for split, store in stores.items()}


def true_landmarks(data: Path) -> dict[str, frozenset[str]]:
    """Query id -> its landmarks from ``data/solution.csv`` (empty: no landmark; ``Ignored``
    rows left out), parsed as the metric parses it."""
    return read_recognition_solution(data / "solution.csv").split(None)
