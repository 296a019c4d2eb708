"""Extraction stage: images -> extractor -> feature store, resumable, with overlap.

Decoding and resizing run in a thread pool ahead of the model (they release the GIL in
Pillow/OpenCV, as does TensorFlow), so the model rarely waits for input. Finished batches
are written as atomic chunks; rerunning the same command skips what is done.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from delf_retrieval.features.containers import (
    ImageFeatures,
    non_finite_problem,
    rescale_features,
)
from delf_retrieval.features.images import (
    MIN_IMAGE_SIDE,
    ImageDecodeError,
    ImageRejectedError,
    ImageSource,
    check_min_side,
    decode_image_scaled,
    downscale_to_max_size,
)
from delf_retrieval.features.store import FeatureStore
from delf_retrieval.models.base import Extractor

DEFAULT_BATCH_SIZE = 64
# The smallest side accepted (the input rules live with decoding, features/images.py).
MIN_IMAGE_SIDE = MIN_IMAGE_SIDE


@dataclass
class ExtractionSummary:
    """What one extraction run did.

    ``images_per_second`` counts images extracted in this run (skipped ones excluded).
    """

    total: int
    extracted: int
    skipped: int
    failed: int
    seconds: float
    store_bytes: int
    bytes_per_image: float
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0

    def report(self) -> str:
        lines = [
            f"images: {self.total} listed, {self.extracted} extracted, "
            f"{self.skipped} already in store, {self.failed} failed",
            f"speed: {self.images_per_second:.2f} images/s over {self.seconds:.1f} s"
            if self.extracted
            else "speed: nothing left to extract (rerun of a finished or empty set)",
            f"store: {self.store_bytes / 1e6:.2f} MB, {self.bytes_per_image / 1e3:.1f} kB per image",
        ]
        lines += [f"  failed {image_id}: {reason}" for image_id, reason in self.failures[:20]]
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more (see the store's failures.json)")
        return "\n".join(lines)


@dataclass(frozen=True)
class Decoded:
    """One image ready for the model, or the reason it is not.

    ``image`` is RGB uint8 [H, W, 3] (or what the extractor's ``prepare_image`` made of it),
    at most the model's ``max_image_size`` on its longer side; ``factor`` = original size /
    that size (>= 1), which maps keypoints back to original pixels; ``error`` the reason
    the image cannot be used (``image`` is then None).
    """

    source: ImageSource
    image: Any
    factor: float
    error: str | None
    rejected: bool = False  # readable, but outside the input rules (ImageRejectedError)


def decode_for_model(
    data: bytes | np.ndarray,
    source: ImageSource,
    max_size: int | None,
    exif_transpose: bool = True,
    prepare: Callable[[np.ndarray], Any] | None = None,
) -> Decoded:
    """Decode encoded bytes (or take an RGB uint8 array) for the model: the one decoding of
    every path. Bytes are decoded reduced when larger than ``max_size``
    (:func:`~delf_retrieval.features.images.decode_image_scaled`), arrays are shrunk; then
    the size rule (:func:`~delf_retrieval.features.images.check_min_side`) and ``prepare``. Never raises: a failure is
    the returned ``error``."""
    try:
        if isinstance(data, np.ndarray):
            small, factor = downscale_to_max_size(data, max_size)
        else:
            small, factor = decode_image_scaled(data, max_size, exif_transpose=exif_transpose)
        check_min_side(small, max_size, factor)  # the rule of every path: batch, predict, serve
        if prepare is not None:  # e.g. a Keras model's resize + preprocessing, off the model thread
            small = prepare(small)
        return Decoded(source, small, factor, None)
    except ImageDecodeError as error:
        return Decoded(source, None, 1.0, str(error), rejected=isinstance(error, ImageRejectedError))
    except Exception as error:  # any decoder crash is one image's failure, not the run's
        return Decoded(source, None, 1.0, f"decode failed: {type(error).__name__}: {error}")


def _decode(
    source: ImageSource,
    max_size: int | None,
    exif_transpose: bool = True,
    prepare: Callable[[np.ndarray], Any] | None = None,
) -> Decoded:
    try:
        data = source.read_bytes()
    except ImageDecodeError as error:
        return Decoded(source, None, 1.0, str(error))
    except Exception as error:
        return Decoded(source, None, 1.0, f"decode failed: {type(error).__name__}: {error}")
    return decode_for_model(data, source, max_size, exif_transpose, prepare)


def iter_decoded(
    sources: Sequence[ImageSource],
    *,
    max_size: int | None = None,
    threads: int = 2,
    prefetch: int = 16,
    exif_transpose: bool = True,
    prepare: Callable[[np.ndarray], Any] | None = None,
) -> Iterator[Decoded]:
    """Decode (and downscale) images in a thread pool, yielding them in input order.

    ``prepare`` (e.g. ``KerasExtractor.prepare_image``) runs on each decoded image in the
    same threads; its result replaces the image.
    """
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="decode") as pool:
        pending: deque[Future[Decoded]] = deque()
        position = 0
        while position < len(sources) or pending:
            while position < len(sources) and len(pending) < prefetch:
                pending.append(pool.submit(_decode, sources[position], max_size, exif_transpose, prepare))
                position += 1
            yield pending.popleft().result()


def extract_decoded(extractor: Extractor, decoded: Decoded) -> tuple[ImageFeatures | None, str | None]:
    """Features of one decoded image in original pixels, or ``(None, reason)`` on failure.

    The one place where an image becomes features; the local runner and the Ray workers
    (:mod:`delf_retrieval.distributed`) both call it, so their results are identical.
    """
    if decoded.error is not None:
        return None, decoded.error
    try:
        features = rescale_features(extractor.extract(decoded.image), decoded.factor)
    except Exception as error:  # one bad image must not end a multi-day run
        return None, f"extraction failed: {type(error).__name__}: {error}"
    return _checked(features)


def extract_decoded_many(
    extractor: Extractor, decoded: Sequence[Decoded]
) -> list[tuple[ImageFeatures | None, str | None]]:
    """:func:`extract_decoded` of several images with one ``extractor.extract_many`` call.

    Extractors that batch (``batch_size`` > 1, e.g. Keras models) run the decoded images
    through the model together; if the batch fails, each image is retried alone so that
    one bad image fails only itself. Results are in input order.
    """
    good = [item for item in decoded if item.error is None]
    if len(good) <= 1:
        return [extract_decoded(extractor, item) for item in decoded]
    try:
        features = extractor.extract_many([item.image for item in good])
    except Exception:
        return [extract_decoded(extractor, item) for item in decoded]
    by_id = {id(item): _checked(rescale_features(f, item.factor)) for item, f in zip(good, features, strict=True)}
    return [by_id[id(item)] if item.error is None else (None, item.error) for item in decoded]


def _checked(features: ImageFeatures) -> tuple[ImageFeatures | None, str | None]:
    """``(features, None)``, or ``(None, reason)`` when they hold NaN or inf."""
    problem = non_finite_problem(features)
    return (None, problem) if problem else (features, None)


def pending_sources(
    sources: Sequence[ImageSource], store: FeatureStore, *, retry_failed: bool = False
) -> list[ImageSource]:
    """``sources`` whose ids the store has no chunk for yet (resume), in input order.

    With ``retry_failed``, ids recorded only as failures are pending again.
    """
    extracted, failed = store.chunk_ids()
    done = extracted if retry_failed else extracted | failed
    return [source for source in sources if source.id not in done]


def extract_to_store(
    extractor: Extractor,
    sources: Sequence[ImageSource],
    store: FeatureStore,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    decode_threads: int = 2,
    retry_failed: bool = False,
    progress: bool = True,
    description: str = "extract",
) -> ExtractionSummary:
    """Extract features of ``sources`` into ``store``, skipping ids already there.

    Parameters
    ----------
    batch_size : images per atomic chunk (a kill loses at most one chunk of work).
    decode_threads : threads decoding ahead of the model.
    retry_failed : also retry ids recorded as failures by an earlier run.

    Images that cannot be decoded or extracted are recorded as ``(id, reason)`` and the
    run goes on. The store is consolidated at the end. The store's extraction lock is
    held throughout (see :meth:`FeatureStore.writing`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with store.writing():  # one extraction per store; a second one waits, then skips our work
        return _extract_locked(extractor, sources, store, batch_size, decode_threads, retry_failed, progress, description)


def _extract_locked(
    extractor: Extractor,
    sources: Sequence[ImageSource],
    store: FeatureStore,
    batch_size: int,
    decode_threads: int,
    retry_failed: bool,
    progress: bool,
    description: str,
) -> ExtractionSummary:
    started = time.perf_counter()
    todo = pending_sources(sources, store, retry_failed=retry_failed)
    skipped = len(sources) - len(todo)
    # Downscaling happens in the decode threads; the extractor then sees a small image.
    max_size = extractor.params.max_image_size
    failures: list[tuple[str, str]] = []
    extracted = 0
    batch_ids: list[str] = []
    batch_features: list[ImageFeatures] = []
    batch_failures: list[tuple[str, str]] = []

    def flush() -> None:
        store.write_chunk(batch_ids, batch_features, batch_failures)
        batch_ids.clear()
        batch_features.clear()
        batch_failures.clear()

    # Extractors that batch their model calls (Keras) get this many decoded images at once.
    model_batch = max(1, int(getattr(extractor, "batch_size", 1)))
    pending: list[Decoded] = []

    def run_model() -> None:
        nonlocal extracted
        for decoded, (features, reason) in zip(pending, extract_decoded_many(extractor, pending), strict=True):
            image_id = decoded.source.id
            if features is None:
                batch_failures.append((image_id, reason))
                failures.append((image_id, reason))
            else:
                batch_ids.append(image_id)
                batch_features.append(features)
                extracted += 1
            if len(batch_ids) + len(batch_failures) >= batch_size:
                flush()
        bar.update(len(pending))
        bar.set_postfix(failed=len(failures), refresh=False)
        pending.clear()

    bar = tqdm(total=len(todo), desc=description, unit="img", disable=not progress or not todo, smoothing=0.1)
    prefetch = max(16, 2 * model_batch)
    prepare = getattr(extractor, "prepare_image", None)
    exif = extractor.params.exif_transpose
    decoded_images = iter_decoded(
        todo, max_size=max_size, threads=decode_threads, prefetch=prefetch, exif_transpose=exif, prepare=prepare
    )
    for decoded in decoded_images:
        pending.append(decoded)
        if len(pending) >= model_batch:
            run_model()
    run_model()
    flush()
    bar.close()
    return finish_extraction(store, len(sources), skipped, extracted, failures, started)


def finish_extraction(
    store: FeatureStore,
    total: int,
    skipped: int,
    extracted: int,
    failures: list[tuple[str, str]],
    started: float,
) -> ExtractionSummary:
    """Consolidate ``store`` and summarise a run that began at ``time.perf_counter()``
    ``started`` (the local runner and the Ray one end the same way)."""
    store.finalize()
    return ExtractionSummary(
        total=total,
        extracted=extracted,
        skipped=skipped,
        failed=len(failures),
        seconds=time.perf_counter() - started,
        store_bytes=store.nbytes(),
        bytes_per_image=store.bytes_per_image(),
        failures=failures,
    )
