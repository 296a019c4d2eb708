"""A recognition index: one self-describing folder holding everything ``predict`` needs.

Layout (``INDEX/`` is what ``delf-retrieval index DATA_DIR --out INDEX`` writes)::

    INDEX/index.json            manifest (written last: a folder without it is incomplete)
    INDEX/train/                feature store of the labelled train photos (memory-mapped)
    INDEX/labels.csv            id,landmark_id of every train photo in the store
    INDEX/landmarks.csv         landmark_id,name (names from the data's labels.csv, else empty)
    INDEX/images.csv            id,path,width,height: source file and original size (pixels,
                                after EXIF rotation) of each train photo; size empty if unreadable
    INDEX/thumbnails/a/b/c/<id>.jpg   JPEG thumbnails of the train photos (optional)
    INDEX/nonlandmark/          feature store of the distractor set (optional)
    INDEX/derived/<name>.npy    derived arrays, each listed in the manifest's ``derived``: the
                                VLAD codebook, a float32 copy of the searched train vectors,
                                the train photos' non-landmark similarity
    INDEX/derived/confidence.json   the confidence model (``CONFIDENCE="probability"``), fitted
                                by leave-one-out on the train photos and the distractor set

Derived data is generic: the manifest's ``derived`` maps a name to its file, its ``kind``
and any facts about it; ``query_steps`` is the ordered list of steps that turn a query's
extractor output into the vector compared with the train vectors (today ``vlad`` for
local-only models; a whitening step plugs in as one more entry, see
:data:`delf_retrieval.service.recognizer.QUERY_STEPS`); ``search_vectors`` names the derived array
searched instead of the train store's global descriptors (None: the store's own, which
for local-only models is its VLAD array). ``train_nonlandmark`` names the per-train-image
non-landmark similarity used by the penalty.

The build reuses the batch pipeline's pieces: :func:`.extract.extract_to_store` (so it
resumes after a kill: rerun the same command), :func:`.pipeline.ensure_global_descriptors`
(VLAD codebook) and :func:`.rerank.nonlandmark_similarity`.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from delf_retrieval.config import Config
from delf_retrieval.core.atomic import atomic_write
from delf_retrieval.features.images import (
    CSV_IMAGE_FOLDERS,
    ImageSource,
    check_image_id,
    check_pixel_budget,
    kaggle_image_path,
    list_images,
    oriented_size,
    read_labels_csv,
)
from delf_retrieval.features.store import (
    DiskSpaceError,
    FeatureStore,
    StoreView,
    atomic_write_bytes,
)
from delf_retrieval.kaggle.dataset import KaggleData
from delf_retrieval.models.base import Extractor, ExtractorParams
from delf_retrieval.models.loader import model_spec
from delf_retrieval.scoring.classifier import Classifier
from delf_retrieval.scoring.engine import RecognitionIndex, RecognitionSettings
from delf_retrieval.scoring.leave_one_out import ConfidenceSettings, ensure_confidence
from delf_retrieval.search import whitening
from delf_retrieval.search.vlad import CODEBOOK_FILE, ensure_global_descriptors, searchable
from delf_retrieval.tasks.manifest import (
    MANIFEST,
    IndexManifest,
)
from delf_retrieval.tasks.run import extract_listed, resolve_config, resolve_model

DEFAULT_THUMBNAIL_SIZE = 256
Log = Callable[[str], None]
# What an index folder holds besides its files (check_index_folder keeps the data out of them).
INDEX_FOLDERS = ("train", "nonlandmark", "derived", "thumbnails")
# Free-space estimate of the index step: CSV bytes per photo and JPEG thumbnail bytes
# per pixel (quality 85 stays well below), plus a reserve.
_CSV_BYTES_PER_PHOTO = 512
_THUMBNAIL_BYTES_PER_PIXEL = 0.5
_SPACE_MARGIN = 16 * 2**20


def build_index(
    data_dir: str | Path,
    model: str | Extractor | None = None,
    out: str | Path = "index",
    *,
    config: Config | str | Path | None = None,
    params: ExtractorParams | None = None,
    use_nonlandmark: bool | None = None,
    thumbnail_size: int = DEFAULT_THUMBNAIL_SIZE,
    dtype: str = "float16",
    search_dtype: str = "float32",
    batch_size: int = 64,
    decode_threads: int = 2,
    progress: bool = True,
    log: Log = print,
    classifiers: Sequence[Classifier] = (),
) -> IndexManifest:
    """Build (or finish building) a recognition index from a Kaggle-layout folder.

    Parameters
    ----------
    data_dir : folder with ``train.csv`` + ``train/`` (and optionally ``labels.csv``,
        ``nonlandmark.csv`` + ``nonlandmark/``), as :func:`.pipeline.recognize` takes it.
    model : model spec or extractor (see :func:`.models.load_extractor`); default
        :func:`.models.default_model` (xfeat with the [learned] extra, else opencv-sift).
    out : index folder; an interrupted build resumes when rerun with the same arguments.
    config : preset, file or Config stored in the index (default: the model's preset).
    use_nonlandmark : keep the distractor set (default: when ``nonlandmark.csv`` exists);
        a config without a penalty then gets ``NONLANDMARK_PENALTY = 1.0``, as in
        ``recognize --nonlandmark``.
    thumbnail_size : longer side of the thumbnails served by the web page (0: none).
    dtype : descriptor dtype of the stores.
    search_dtype : ``"float32"`` also writes the train vectors as float32
        (``derived/search_vectors.npy``, the same values: float16 -> float32 is exact), so a
        query's search reads them as they are instead of converting every block (about 10x
        faster per photo, twice the disk of the float16 vectors); ``"float16"``: search the
        store's own vectors.
    classifiers : softmax classifiers kept for ``CLASSIFIER_MODE`` (their class mappings are
        copied into the index; a classifier on the index's own model is stored as such).

    Returns
    -------
    IndexManifest
        What was written to ``out/index.json``.
    """
    started = time.perf_counter()
    data = KaggleData(Path(data_dir))
    data.require("train.csv")
    check_index_folder(data.root, Path(out))
    if thumbnail_size < 0:
        raise ValueError(f"thumbnail_size must be >= 0, got {thumbnail_size}")
    if search_dtype not in ("float32", "float16"):
        raise ValueError(f"search_dtype must be float32 or float16, got {search_dtype!r}")
    extractor = resolve_model(model, params)
    spec = model_spec(extractor) if isinstance(model, Extractor) or model is None else (
        str(Path(model).resolve()) if Path(model).exists() else str(model)
    )
    config = resolve_config(config, extractor)
    if use_nonlandmark is None:
        use_nonlandmark = data.has("nonlandmark.csv")
    if use_nonlandmark:
        data.require("nonlandmark.csv")
        if config.NONLANDMARK_PENALTY == 0:
            config = config.replace(NONLANDMARK_PENALTY=1.0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"model: {extractor!r}\nindex: {out}")

    stores: dict[str, FeatureStore | StoreView] = {}
    failed = 0
    for split in ("train", "nonlandmark") if use_nonlandmark else ("train",):
        # A rebuild after rows left the CSV: the index holds the listed photos only
        # (labels.csv names them; Recognizer.load reads the store through them).
        stores[split], _ = extract_listed(
            extractor, data.csv(f"{split}.csv"), out / split, split, dtype=dtype, batch_size=batch_size,
            decode_threads=decode_threads, progress=progress, log=log,
        )
        failed += len(stores[split].failures()) if split == "train" else 0
    train = stores["train"]
    if not train.ids:
        raise ValueError(f"no train photo of {data.csv('train.csv')} could be read; the index would be empty")
    ensure_global_descriptors(train, [s for s in stores.values() if s is not train], log=log)
    stores = {split: searchable(store) for split, store in stores.items()}  # VLAD for local-only models
    train = stores["train"]

    manifest = IndexManifest(
        model=spec,
        fingerprint=extractor.fingerprint(),
        config=config.to_dict(),
        dtype=dtype,
        counts={},
        thumbnail_size=thumbnail_size,
        source=str(data.root.resolve()),
    )
    derived = out / "derived"
    derived.mkdir(exist_ok=True)
    _check_free_space(out, _bytes_to_write(train, extractor, search_dtype, dtype, "nonlandmark" in stores, out, thumbnail_size))
    if not extractor.global_dim:
        codebook = np.load(train.path / "derived" / CODEBOOK_FILE)
        _save_derived(manifest, out, "vlad_codebook", codebook, kind="vlad-codebook", clusters=int(codebook.shape[0]))
        manifest.query_steps.append({"step": "vlad", "codebook": "vlad_codebook"})
    if search_dtype == "float32" and np.dtype(dtype) != np.float32:
        _save_float32_copy(manifest, out, "search_vectors", train.global_descriptors())
        manifest.search_vectors = "search_vectors"
    # The searched space as the batch run makes it: whitened (cached in the stores) or not.
    whitening_fit = whitening.ensure_whitening(train, config.WHITENING_DIM, log=log) if config.WHITENING_DIM else None
    searched = stores if whitening_fit is None else whitening.whiten_stores(stores, whitening_fit)
    settings = RecognitionSettings.from_config(config)
    if "nonlandmark" in stores:
        recognition = RecognitionIndex(
            searched["train"], [None] * len(train.ids), settings, nonlandmark=searched["nonlandmark"].global_descriptors()
        )
        space = "raw" if whitening_fit is None else whitening_fit.digest()
        _save_derived(
            manifest,
            out,
            "train_nonlandmark",
            recognition.database_nonlandmark,
            kind="nonlandmark-similarity",
            top_k=config.NONLANDMARK_TOP_K,
            space=space,
        )
        manifest.train_nonlandmark = "train_nonlandmark"
    manifest.classifiers = _save_classifiers(out, classifiers, extractor)

    labels = read_labels_csv(data.csv("train.csv"))
    ids = train.ids
    if config.CONFIDENCE == "probability":
        distractors = searched.get("nonlandmark")
        recognition = RecognitionIndex.from_labels(
            searched["train"], labels, settings,
            nonlandmark=None if distractors is None else distractors.global_descriptors(),
        )
        model = ensure_confidence(
            recognition, settings, ConfidenceSettings.from_config(config),
            distractors if distractors is not None and len(distractors.ids) else None,
            log=log, progress=progress,
        )
        if model is not None:
            manifest.confidence = "derived/confidence.json"
            atomic_write_bytes(out / manifest.confidence, model.to_json().encode())
    label_frame = pd.DataFrame({"id": ids, "landmark_id": [labels.get(i, "") for i in ids]})
    _write_csv(out / "labels.csv", label_frame)
    landmarks = sorted({label for label in label_frame["landmark_id"] if label})
    names = _landmark_names(data.csv("labels.csv")) if data.has("labels.csv") else {}
    _write_csv(out / "landmarks.csv", pd.DataFrame({"landmark_id": landmarks, "name": [names.get(x, "") for x in landmarks]}))
    sizes = write_thumbnails(
        source_paths(list_images(data.csv("train.csv")), ids),
        out / "thumbnails",
        thumbnail_size,
        exif_transpose=extractor.params.exif_transpose,
        progress=progress,
    )
    _write_csv(
        out / "images.csv",
        pd.DataFrame(
            {
                "id": ids,
                "path": [sizes[i][0] for i in ids],
                "width": [sizes[i][1] for i in ids],
                "height": [sizes[i][2] for i in ids],
            }
        ),
    )
    manifest.counts = {
        "train": len(ids),
        "landmarks": len(landmarks),
        "nonlandmark": len(stores["nonlandmark"].ids) if "nonlandmark" in stores else 0,
        "failed": failed,
    }
    manifest.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    atomic_write_bytes(out / MANIFEST, manifest.to_json().encode())
    log(
        f"index: {len(ids)} train photos of {len(landmarks)} landmarks"
        + (f", {manifest.counts['nonlandmark']} distractors" if use_nonlandmark else "")
        + f" in {out} ({time.perf_counter() - started:.1f} s)"
    )
    return manifest


def _save_classifiers(out: Path, classifiers: Sequence[Classifier], extractor: Extractor) -> list[dict[str, str]]:
    """Copy each classifier's class mapping into ``out/classifiers/`` and describe it for
    the manifest (``model`` empty: the index's own model, else the classifier's spec)."""
    entries = []
    own = {id(extractor), id(getattr(extractor, "global_extractor", None))}
    for number, classifier in enumerate(classifiers):
        relative = f"classifiers/{number}.csv"
        (out / "classifiers").mkdir(exist_ok=True)
        frame = pd.DataFrame({"class_index": range(len(classifier.landmarks)), "landmark_id": classifier.landmarks})
        _write_csv(out / relative, frame)
        model = "" if id(classifier.extractor) in own else model_spec(classifier.extractor)
        entries.append({"model": model, "classes": relative})
    return entries


def source_paths(sources: Sequence[ImageSource], ids: Sequence[str]) -> dict[str, str]:
    """``id -> path`` of the sources whose id is in ``ids`` (linear in both)."""
    wanted = set(ids)
    return {source.id: source.path for source in sources if source.id in wanted}


def check_index_folder(data_dir: Path, out: Path) -> None:
    """Raise ValueError when the index folder ``out`` would write into the dataset.

    The index writes ``labels.csv``, ``images.csv``, ``index.json`` and the folders
    ``train/``, ``nonlandmark/``, ``derived/`` and ``thumbnails/``: ``out`` may not be
    the data folder, lie inside one of its image folders, or hold the data folder in one
    of those folders of its own. A new subfolder of the data folder is fine.
    """
    data, index = data_dir.resolve(), out.resolve()
    image_folders = [data / folder for folder in sorted(set(CSV_IMAGE_FOLDERS.values()))]
    written = [index / folder for folder in INDEX_FOLDERS]
    if index == data or any(index.is_relative_to(folder) for folder in image_folders) or any(
        data.is_relative_to(folder) for folder in written
    ):
        raise ValueError(
            f"--out {out} would write the index into the dataset {data_dir} (its labels.csv and image "
            f"folders); choose a folder outside it, e.g. {data_dir.name}-index"
        )


def _bytes_to_write(
    train: FeatureStore | StoreView,
    extractor: Extractor,
    search_dtype: str,
    dtype: str,
    nonlandmark: bool,
    out: Path,
    thumbnail_size: int,
) -> int:
    """Bytes the index step writes after extraction (the stores count their own): the
    float32 search copy, the VLAD codebook, the distractor similarity, the CSVs and the
    thumbnails not written yet (an upper estimate per thumbnail)."""
    count = len(train.ids)
    width = train.global_descriptors().shape[1] if count else 0
    total = 4096 + _CSV_BYTES_PER_PHOTO * count
    if search_dtype == "float32" and np.dtype(dtype) != np.float32:
        total += 4 * count * width
    if not extractor.global_dim:
        total += 4 * width
    if nonlandmark:
        total += 4 * count
    if thumbnail_size:
        folder = out / "thumbnails"
        missing = sum(not (folder / _thumbnail_name(image_id)).is_file() for image_id in train.ids)
        total += missing * int(_THUMBNAIL_BYTES_PER_PIXEL * thumbnail_size * thumbnail_size)
    return total


def _check_free_space(out: Path, needed: int) -> None:
    """DiskSpaceError before writing when ``out``'s disk lacks ``needed`` bytes (+ a margin)."""
    free = shutil.disk_usage(out).free
    if free < needed + _SPACE_MARGIN:
        raise DiskSpaceError(
            f"the index {out} needs about {(needed + _SPACE_MARGIN) / 1e6:.1f} MB more of free disk space, only "
            f"{free / 1e6:.1f} MB is free there; free some space, then rerun the same command to resume"
        )


def _save_derived(manifest: IndexManifest, out: Path, name: str, array: np.ndarray, **info: Any) -> None:
    relative = f"derived/{name}.npy"
    atomic_write(out / relative, lambda handle: np.save(handle, array))
    manifest.derived[name] = {"file": relative, "shape": list(array.shape), "dtype": str(array.dtype), **info}


def _save_float32_copy(manifest: IndexManifest, out: Path, name: str, array: np.ndarray, block: int = 65536) -> None:
    """``array`` [N, D] as a float32 derived array, converted and written block by block
    (bounded memory; plain writes, so a full disk is an ``OSError``, never the SIGBUS of a
    write through a memory map)."""
    relative = f"derived/{name}.npy"
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": tuple(array.shape)}

    def write(handle: BinaryIO) -> None:
        np.lib.format.write_array_header_1_0(handle, header)
        for start in range(0, array.shape[0], block):
            handle.write(np.ascontiguousarray(array[start : start + block], dtype=np.float32).tobytes())

    atomic_write(out / relative, write)
    manifest.derived[name] = {"file": relative, "shape": list(array.shape), "dtype": "float32", "kind": "search-vectors"}


def _thumbnail_name(image_id: str) -> Path:
    """Where ``write_thumbnails`` puts an id's thumbnail, relative to its folder."""
    return kaggle_image_path(".", image_id) if len(image_id) >= 3 else Path(f"{image_id}.jpg")


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    atomic_write_bytes(path, frame.to_csv(index=False).encode())


def _landmark_names(path: Path) -> dict[str, str]:
    """``landmark_id -> name`` from a ``labels.csv`` (``landmark_id`` + a name column)."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "landmark_id" not in frame.columns or len(frame.columns) < 2:
        raise ValueError(f"{path} needs a landmark_id column and a name column, has {list(frame.columns)}")
    name_column = "name" if "name" in frame.columns else [c for c in frame.columns if c != "landmark_id"][0]
    return dict(zip(frame["landmark_id"], frame[name_column], strict=True))


def write_thumbnails(
    paths: dict[str, str],
    folder: Path,
    size: int,
    *,
    exif_transpose: bool = True,
    threads: int = 2,
    progress: bool = True,
) -> dict[str, tuple[str, str, str]]:
    """JPEG thumbnails (longer side ``size`` px) at ``folder/a/b/c/<id>.jpg``, skipping existing ones.

    Returns ``id -> (path, width, height)`` with the original size in the pixels the
    features use (after EXIF rotation when ``exif_transpose``, as the extraction decoded;
    empty strings when the file cannot be read). ``size = 0`` writes nothing but still
    reads the sizes.
    """

    def one(item: tuple[str, str]) -> tuple[str, tuple[str, str, str]]:
        image_id, path = item
        check_image_id(image_id)  # the thumbnail stays inside the index folder
        target = folder / _thumbnail_name(image_id)
        try:
            width, height = _thumbnail(Path(path), target, size, exif_transpose)
        except Exception:  # an unreadable source has no thumbnail; the index still works
            return image_id, (path, "", "")
        return image_id, (path, str(width), str(height))

    result: dict[str, tuple[str, str, str]] = {}
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        items = pool.map(one, paths.items())
        for image_id, row in tqdm(items, total=len(paths), desc="thumbnails", unit="img", disable=not progress):
            result[image_id] = row
    return result


def _thumbnail(source: Path, target: Path, size: int, exif_transpose: bool) -> tuple[int, int]:
    """Write one thumbnail (unless present); returns the original ``(width, height)``."""
    with Image.open(source) as image:
        check_pixel_budget(image)  # from the header, as extraction decodes: bounded memory
        width, height = oriented_size(image, exif_transpose)
        if size and not target.is_file():
            image.draft("RGB", (size, size))
            picture = (ImageOps.exif_transpose(image) if exif_transpose else image).convert("RGB")
            picture.thumbnail((size, size))
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            picture.save(tmp, format="JPEG", quality=85)
            tmp.replace(target)
    return width, height
