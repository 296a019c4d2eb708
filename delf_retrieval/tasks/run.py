"""What recognition and retrieval runs share: the feature cache and the backends.

* :func:`model_key` names the cache folder of a model: ``work_dir/<model>/<split>/``;
* :func:`extract_split` / :func:`extract_splits` turn image sets into (cached) stores;
* :func:`ensure_global_descriptors` gives local-only stores VLAD globals (the codebook is
  cached in the database store);
* :class:`Runner` is where the work runs: :class:`LocalRunner` here, or
  ``delf_retrieval.distributed.RayRunner`` on a Ray cluster. A runner extracts into a
  store and builds the search index (:class:`~delf_retrieval.search.index.SearchIndex`) of
  a store;
* :func:`open_run`, :class:`KaggleData`, :class:`RunOutput` and :func:`finish_run`
  frame a whole run on a Kaggle-layout folder.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import pandas as pd

from delf_retrieval.config import Config, default_preset, load_config
from delf_retrieval.core.log import Log
from delf_retrieval.features.images import ImageSource, list_images
from delf_retrieval.features.store import FeatureStore, StoreView, fingerprint_key
from delf_retrieval.kaggle.dataset import KaggleData
from delf_retrieval.kaggle.submission import validate_submission, write_submission
from delf_retrieval.models import loader
from delf_retrieval.models.base import Extractor, ExtractorParams
from delf_retrieval.models.extract import ExtractionSummary, extract_to_store
from delf_retrieval.search.index import BACKENDS, SearchIndex
from delf_retrieval.search.stores import exact_index
from delf_retrieval.search.vlad import ensure_global_descriptors, searchable

# The result a task's run produced (RecognitionResult, RetrievalResult, ...).
ResultT = TypeVar("ResultT")


class Runner(Protocol):
    """Where a run's heavy work happens: extraction into stores and search indexes."""

    def extract_to_store(
        self, extractor: Extractor, sources: Sequence[ImageSource], store: FeatureStore, **options: Any
    ) -> ExtractionSummary:
        """Extract ``sources`` into ``store`` as :func:`~delf_retrieval.models.extract.extract_to_store`."""
        ...

    def index(self, store: FeatureStore, block_size: int) -> SearchIndex:
        """Search index over ``store``'s global descriptors (exact cosine top-k)."""
        ...


@dataclass(frozen=True)
class LocalRunner:
    """Extraction and exact search in this process; ``backend``: ``"numpy"`` or ``"faiss"``."""

    backend: str = "numpy"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown search backend {self.backend!r}; choose one of {BACKENDS}")

    def extract_to_store(
        self, extractor: Extractor, sources: Sequence[ImageSource], store: FeatureStore, **options: Any
    ) -> ExtractionSummary:
        return extract_to_store(extractor, sources, store, **options)

    def index(self, store: FeatureStore, block_size: int) -> SearchIndex:
        return exact_index(store, block_size, backend=self.backend)


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
    runner: Runner | None = None,
) -> tuple[FeatureStore | StoreView, ExtractionSummary]:
    """Extract (or reuse) features of one image set into ``work_dir/<model>/<split>``.

    Returns the features of exactly the listed images (:meth:`FeatureStore.subset`: the
    store may remember images the list no longer holds) and the extraction summary.

    ``runner`` runs the extraction (default: :class:`LocalRunner`; e.g.
    ``delf_retrieval.distributed.RayRunner`` runs it on Ray).
    """
    return extract_listed(
        extractor, images, Path(work_dir) / model_key(extractor) / split, split, dtype=dtype,
        batch_size=batch_size, decode_threads=decode_threads, progress=progress, log=log, runner=runner,
    )


def extract_listed(
    extractor: Extractor,
    images: str | Path | Sequence[str | Path],
    folder: Path,
    split: str,
    *,
    dtype: str = "float16",
    batch_size: int = 64,
    decode_threads: int = 2,
    progress: bool = True,
    log: Log = print,
    runner: Runner | None = None,
) -> tuple[FeatureStore | StoreView, ExtractionSummary]:
    """Extract (or reuse) the listed images into the store at ``folder`` (what
    :func:`extract_split` and an index build share); the view of exactly those images and
    the extraction summary, logged with ``[split]`` before each line."""
    runner = runner or LocalRunner()
    store = FeatureStore(folder, extractor.fingerprint(), dtype=dtype)
    sources = list_images(images)
    summary = runner.extract_to_store(
        extractor,
        sources,
        store,
        batch_size=batch_size,
        decode_threads=decode_threads,
        progress=progress,
        description=f"extract {split}",
    )
    log(f"[{split}] " + summary.report().replace("\n", f"\n[{split}] "))
    # The store caches every image set of this model and split (older versions of the
    # CSV, other datasets): the run sees only the images listed now.
    return store.subset(source.id for source in sources), summary


def extract_splits(
    extractor: Extractor,
    splits: dict[str, Path],
    database: str,
    work_dir: Path,
    *,
    dtype: str = "float16",
    batch_size: int = 64,
    decode_threads: int = 2,
    progress: bool = True,
    log: Log = print,
    runner: Runner | None = None,
) -> tuple[dict[str, FeatureStore], dict[str, ExtractionSummary]]:
    """:func:`extract_split` of every ``{split: csv}``, then global descriptors for all
    (VLAD fitted on the ``database`` split for local-only models). ``batch_size`` (images
    per store chunk) and ``decode_threads`` go to the extraction.

    Returns stores and extraction summaries by split.
    """
    stores, summaries = {}, {}
    for split, csv_path in splits.items():
        stores[split], summaries[split] = extract_split(
            extractor, csv_path, work_dir, split, dtype=dtype, batch_size=batch_size,
            decode_threads=decode_threads, progress=progress, log=log, runner=runner,
        )
    ensure_global_descriptors(stores[database], [s for k, s in stores.items() if k != database], log=log)
    return {split: searchable(store) for split, store in stores.items()}, summaries


@dataclass
class RunOutput(Generic[ResultT]):
    """What a whole run produced: ``RunOutput[RecognitionResult]`` from
    :func:`~delf_retrieval.tasks.recognition.recognize`, ``RunOutput[RetrievalResult]`` from
    :func:`~delf_retrieval.tasks.retrieval.retrieve`."""

    submission: pd.DataFrame
    submission_path: Path | None
    problems: list[str]
    result: ResultT
    stores: dict[str, FeatureStore]
    extraction: dict[str, ExtractionSummary]


def open_run(
    data_dir: str | Path,
    model: str | Extractor | None,
    config: Config | str | Path | None,
    work_dir: str | Path | None,
    params: ExtractorParams | None,
    log: Log,
) -> tuple[KaggleData, Extractor, Config, Path]:
    """Dataset, extractor (loaded from a spec unless given; None: the default model,
    :func:`.models.default_model`), config (the preset suiting the model by default) and
    cache folder of a whole run."""
    data = KaggleData(Path(data_dir))
    extractor = resolve_model(model, params)
    config = resolve_config(config, extractor)
    work = Path(work_dir) if work_dir is not None else Path.cwd() / "delf_work"
    log(f"model: {extractor!r}\nfeatures cached in: {work / model_key(extractor)}")
    return data, extractor, config, work


def resolve_model(model: str | Extractor | None, params: ExtractorParams | None = None) -> Extractor:
    """The extractor of a task: ``model`` itself, loaded from its spec, or the default model
    (:func:`delf_retrieval.models.loader.default_model`) when None."""
    if isinstance(model, Extractor):
        return model
    return loader.load_extractor(loader.default_model() if model is None else model, params)


def resolve_config(config: Config | str | Path | None, extractor: Extractor) -> Config:
    """The config of a task: ``config`` (a Config, preset name or file) or, when None, the
    preset suiting the model (a composite follows its local model, see the registry)."""
    return load_config(default_preset(extractor.family) if config is None else config)


def finish_run(
    data: KaggleData,
    frame: pd.DataFrame,
    output: str | Path | None,
    kind: str,
    seconds: dict[str, float],
    log: Log,
) -> tuple[Path | None, list[str]]:
    """Write the submission ``frame`` to ``output`` (None: nowhere), validate it against
    ``sample_submission.csv`` and log times, file and problems.

    Returns ``(path written or None, problems)``; ``kind``: recognition or retrieval.
    """
    path = write_submission(output, frame) if output else None
    problems = validate_submission(frame, data.sample(), kind=kind)
    log("time: " + ", ".join(f"{name} {value:.2f} s" for name, value in seconds.items()))
    if path:
        log(f"wrote {path}")
    for problem in problems:
        log(f"submission problem: {problem}")
    return path, problems
