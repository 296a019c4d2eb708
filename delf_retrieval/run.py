"""What recognition and retrieval runs share: the feature cache and the backends.

* :func:`model_key` names the cache folder of a model: ``work_dir/<model>/<split>/``;
* :func:`extract_split` / :func:`extract_splits` turn image sets into (cached) stores;
* :func:`ensure_global_descriptors` gives local-only stores VLAD globals (the codebook is
  cached in the database store);
* :class:`Runner` is where the work runs: :class:`LocalRunner` here, or
  ``delf_retrieval.distributed.RayRunner`` on a Ray cluster. A runner extracts into a
  store and builds the search index (:class:`~delf_retrieval.search.SearchIndex`) of
  a store;
* :func:`open_run`, :class:`KaggleData`, :class:`RunOutput` and :func:`finish_run`
  frame a whole run on a Kaggle-layout folder.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from . import aggregation
from .atomic import atomic_write, atomic_write_bytes
from .config import Config, default_preset, load_config
from .extract import ExtractionSummary, extract_to_store
from .images import ImageSource, list_images
from .models.base import Extractor, ExtractorParams
from .query_expansion import expand_globals
from .search import BACKENDS, CosineIndex, SearchIndex
from .store import FeatureStore, fingerprint_key, ids_hash
from .submission import validate_submission, write_submission

if TYPE_CHECKING:
    from .recognition import RecognitionResult
    from .retrieval import RetrievalResult

Log = Callable[[str], None]
# Builds the search index over a store's global descriptors: (store, block_size) -> index.
IndexFactory = Callable[[FeatureStore, int], SearchIndex]
CODEBOOK_FILE = "vlad_codebook.npy"


# --------------------------------------------------------------------------- backends
def exact_index(store: FeatureStore, block_size: int = 65536, *, backend: str = "numpy") -> CosineIndex:
    """Exact cosine index over ``store``'s global descriptors (memory-mapped, not copied).

    ``block_size`` database rows are multiplied at once; ``backend`` is ``"numpy"`` or
    ``"faiss"`` (see :func:`~delf_retrieval.search.cosine_topk`).
    """
    index = CosineIndex(block_size=block_size, backend=backend)
    index.add(store.global_descriptors())
    return index


class Runner(Protocol):
    """Where a run's heavy work happens: extraction into stores and search indexes."""

    def extract_to_store(
        self, extractor: Extractor, sources: Sequence[ImageSource], store: FeatureStore, **options: Any
    ) -> ExtractionSummary:
        """Extract ``sources`` into ``store`` as :func:`~delf_retrieval.extract.extract_to_store`."""
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
) -> tuple[FeatureStore, ExtractionSummary]:
    """Extract (or reuse) features of one image set into ``work_dir/<model>/<split>``.

    ``runner`` runs the extraction (default: :class:`LocalRunner`; e.g.
    ``delf_retrieval.distributed.RayRunner`` runs it on Ray).
    """
    runner = runner or LocalRunner()
    store = FeatureStore(Path(work_dir) / model_key(extractor) / split, extractor.fingerprint(), dtype=dtype)
    summary = runner.extract_to_store(
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


def extract_splits(
    extractor: Extractor,
    splits: dict[str, Path],
    database: str,
    work_dir: Path,
    *,
    dtype: str = "float16",
    progress: bool = True,
    log: Log = print,
    runner: Runner | None = None,
) -> tuple[dict[str, FeatureStore], dict[str, ExtractionSummary]]:
    """:func:`extract_split` of every ``{split: csv}``, then global descriptors for all
    (VLAD fitted on the ``database`` split for local-only models).

    Returns stores and extraction summaries by split.
    """
    stores, summaries = {}, {}
    for split, csv_path in splits.items():
        stores[split], summaries[split] = extract_split(
            extractor, csv_path, work_dir, split, dtype=dtype, progress=progress, log=log, runner=runner
        )
    ensure_global_descriptors(stores[database], [s for k, s in stores.items() if k != database], log=log)
    return stores, summaries


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
    codebook = _vlad_codebook(database, num_clusters, seed, log)
    codebook_hash = hashlib.sha1(codebook.tobytes()).hexdigest()[:16]
    for store in (database, *others):
        existing = store.read_derived("vlad")
        if existing is not None and existing[1].get("codebook") == codebook_hash:
            continue
        vectors = np.zeros((len(store.ids), codebook.size), np.float32)
        for row, image_id in enumerate(store.ids):
            vectors[row] = aggregation.vlad(store.local_features(image_id).descriptors, codebook)
        store.write_derived("vlad", vectors.astype(store.dtype), {"codebook": codebook_hash})


def _vlad_codebook(database: FeatureStore, num_clusters: int, seed: int, log: Log) -> np.ndarray:
    """The VLAD codebook cached in ``database/derived``, fitted when missing or stale."""
    codebook_path = database.path / "derived" / CODEBOOK_FILE
    codebook_info = database.path / "derived" / "vlad_codebook.json"
    database_hash = ids_hash(database.ids)
    info = json.loads(codebook_info.read_text()) if codebook_info.is_file() else {}
    if codebook_path.is_file() and info.get("ids_hash") == database_hash and info.get("num_clusters") == num_clusters:
        return np.load(codebook_path)
    started = time.perf_counter()
    sample = database.local_descriptor_sample(aggregation.DEFAULT_MAX_SAMPLES, seed=seed)
    if sample.shape[0] == 0:
        raise ValueError(f"cannot fit a VLAD codebook: store {database.path} has no local descriptors")
    codebook = aggregation.fit_codebook(sample, num_clusters, seed=seed)
    codebook_path.parent.mkdir(exist_ok=True)
    atomic_write(codebook_path, lambda handle: np.save(handle, codebook))
    record = {"ids_hash": database_hash, "num_clusters": num_clusters, "seed": seed}
    atomic_write_bytes(codebook_info, json.dumps(record).encode())
    log(
        f"VLAD codebook: {codebook.shape[0]} clusters fitted on {sample.shape[0]} descriptors "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return codebook


def search_store(
    queries: np.ndarray,
    database: FeatureStore,
    k: int,
    config: Config,
    index_factory: IndexFactory | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows of ``database`` (global cosine) for each query vector.

    Parameters
    ----------
    queries : float [Q, D] global descriptors.
    database : the store searched; its index is built by ``index_factory``
        (default :func:`exact_index`) with ``config.SEARCH_BLOCK_SIZE``.

    Returns
    -------
    similarities : float32 [Q, min(k, N)], descending; rows : int64 [Q, min(k, N)].

    With ``QE_TOP_K`` or ``DBA_TOP_K`` > 0 the queries and the database are first
    augmented (:func:`~delf_retrieval.query_expansion.expand_globals`) and searched
    exactly here, whatever ``index_factory`` says.
    """
    if config.QE_TOP_K or config.DBA_TOP_K:
        # alpha-QE / DBA change the vectors, so the search runs over the augmented ones
        # (exact and local: DBA needs every database vector's neighbours anyway).
        queries, vectors = expand_globals(queries, database.global_descriptors(), config)
        index = CosineIndex(block_size=config.SEARCH_BLOCK_SIZE)
        index.add(vectors)
        return index.search(queries, k)
    index = (index_factory or exact_index)(database, config.SEARCH_BLOCK_SIZE)
    return index.search(queries, k)


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

    def sample(self) -> pd.DataFrame:
        """``sample_submission.csv``, every cell as text."""
        return pd.read_csv(self.csv("sample_submission.csv"), dtype=str, keep_default_na=False)


@dataclass
class RunOutput:
    """What :func:`~delf_retrieval.recognition.recognize` /
    :func:`~delf_retrieval.retrieval.retrieve` produced."""

    submission: pd.DataFrame
    submission_path: Path | None
    problems: list[str]
    result: RecognitionResult | RetrievalResult
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
    if isinstance(model, Extractor):
        extractor = model
    else:
        from .models.loader import default_model, load_extractor

        extractor = load_extractor(default_model() if model is None else model, params)
    if config is None:  # a composite (e.g. keras+opencv-sift) follows its local model
        config = default_preset(extractor.family)
    config = load_config(config)
    work = Path(work_dir) if work_dir is not None else Path.cwd() / "delf_work"
    log(f"model: {extractor!r}\nfeatures cached in: {work / model_key(extractor)}")
    return data, extractor, config, work


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
