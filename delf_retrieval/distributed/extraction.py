"""Feature extraction on Ray: model-holding actors fed batches of images.

One actor per GPU (or per CPU slot when the cluster has no GPU). Each actor loads the
extractor once with :func:`~delf_retrieval.models.loader.load_extractor` and turns
batches of :class:`~delf_retrieval.features.images.ImageSource` into features with the same code
as the local runner (:func:`~delf_retrieval.models.extract.iter_decoded` +
:func:`~delf_retrieval.models.extract.extract_decoded`). Features travel back to the driver,
which writes each batch as one atomic store chunk, so workers need no shared filesystem
(only the images, readable at the same path on every node). The driver takes results
**as they complete** (``ray.wait``), not in submission order: a slow batch never holds
back the writing of others, and the store does not depend on the order because
consolidation sorts by id. Only ids missing from the store are batched, so a local and
a Ray run resume each other. A worker killed mid-batch is restarted by Ray
(``max_restarts``) and its batches re-run (``max_task_retries``); when it cannot come
back, the driver hands its batches to the other workers. A batch is written once, after
it has completed, under a name hashed from its ids.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from delf_retrieval.core.errors import WorkersLostError
from delf_retrieval.distributed.cluster import (
    capacity,
    cluster_resources,
    import_ray,
    kill_all,
    local_cpus,
    node_resources,
    ray_session,
    wait_started,
    where,
)
from delf_retrieval.features.containers import ImageFeatures
from delf_retrieval.features.images import ImageSource
from delf_retrieval.features.store import FeatureStore, fingerprint_key, same_fingerprint
from delf_retrieval.models.base import Extractor, ExtractorParams
from delf_retrieval.models.extract import (
    DEFAULT_BATCH_SIZE,
    ExtractionSummary,
    extract_decoded,
    finish_extraction,
    iter_decoded,
    pending_sources,
)
from delf_retrieval.models.loader import load_extractor

__all__ = ["RayExtractorPool", "extract_to_store_ray"]


def _as_store_dtype(features: ImageFeatures, dtype: np.dtype) -> ImageFeatures:
    """Descriptors converted to the store's dtype on the worker (half the transfer for
    float16 stores; the store would make the same conversion, so nothing changes)."""
    if dtype == np.float32:
        return features
    local = features.local
    if local is not None:
        local = dataclasses.replace(local, descriptors=np.asarray(local.descriptors, dtype=dtype))
    vector = features.global_descriptor
    if vector is not None:
        vector = np.asarray(vector, dtype=dtype)
    return ImageFeatures(local=local, global_descriptor=vector)


class _ExtractionWorker:
    """Body of one extraction actor: holds one extractor, loaded once."""

    def __init__(self, model_spec: str | os.PathLike, params: ExtractorParams | None) -> None:
        self._extractor = load_extractor(model_spec, params)

    def describe(self) -> dict[str, Any]:
        return {**where(), "fingerprint": self._extractor.fingerprint()}

    def extract(
        self, sources: Sequence[ImageSource], dtype: str, decode_threads: int
    ) -> tuple[list[str], list[ImageFeatures], list[tuple[str, str]]]:
        """Features of ``sources``: ``(ids, features, [(id, reason), ...] failures)``."""
        ids: list[str] = []
        features: list[ImageFeatures] = []
        failures: list[tuple[str, str]] = []
        max_size = self._extractor.params.max_image_size
        exif = self._extractor.params.exif_transpose
        for decoded in iter_decoded(sources, max_size=max_size, threads=decode_threads, exif_transpose=exif):
            result, reason = extract_decoded(self._extractor, decoded)
            if result is None:
                failures.append((decoded.source.id, reason or "unknown failure"))
            else:
                ids.append(decoded.source.id)
                features.append(_as_store_dtype(result, np.dtype(dtype)))
        return ids, features, failures


class RayExtractorPool:
    """Extraction actors on a Ray cluster, reusable for several image sets.

    Actors start on first use (or :meth:`start`) and stay until :meth:`close`; a closed
    pool starts again when used. Ray must be connected (see :func:`ray_session`).

    Parameters
    ----------
    model_spec : model name or SavedModel folder, as :func:`load_extractor` takes it. A
        folder must exist at the same path on every node.
    params : extraction parameters (the family's defaults when None).
    num_workers : actors; default one per GPU of the cluster (``num_gpus_per_worker``
        each), or one per ``num_cpus_per_worker`` CPUs when it has no GPU.
    num_gpus_per_worker : GPUs per actor, ``"auto"`` = 1 when the cluster has GPUs, else 0.
        Fractions put several actors on one GPU.
    num_cpus_per_worker : CPUs reserved per actor (they decode images too).
    max_restarts, max_task_retries : Ray's actor fault tolerance: a killed actor process
        is restarted up to ``max_restarts`` times and its batches re-run up to
        ``max_task_retries`` times; beyond that the driver gives them to other actors.
    inflight_per_worker : batches queued per actor, so an actor never waits for the driver.
    startup_timeout : seconds to wait for every actor to be placed and load the model.
    """

    def __init__(
        self,
        model_spec: str | os.PathLike,
        params: ExtractorParams | None = None,
        *,
        num_workers: int | None = None,
        num_gpus_per_worker: float | str = "auto",
        num_cpus_per_worker: float = 1.0,
        max_restarts: int = 3,
        max_task_retries: int = 3,
        inflight_per_worker: int = 2,
        startup_timeout: float = 600.0,
    ) -> None:
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if num_gpus_per_worker != "auto" and (
            isinstance(num_gpus_per_worker, str) or num_gpus_per_worker < 0
        ):
            raise ValueError(
                f"num_gpus_per_worker must be >= 0 or 'auto', got {num_gpus_per_worker!r}"
            )
        if num_cpus_per_worker < 0:
            raise ValueError(f"num_cpus_per_worker must be >= 0, got {num_cpus_per_worker}")
        if inflight_per_worker < 1:
            raise ValueError(f"inflight_per_worker must be >= 1, got {inflight_per_worker}")
        self.model_spec = os.fspath(model_spec)
        self.params = params
        self.num_workers = num_workers
        self.num_gpus_per_worker = num_gpus_per_worker
        self.num_cpus_per_worker = float(num_cpus_per_worker)
        self.max_restarts = max_restarts
        self.max_task_retries = max_task_retries
        self.inflight_per_worker = inflight_per_worker
        self.startup_timeout = startup_timeout
        self._actors: list[Any] = []
        self._alive: list[bool] = []
        self._fingerprint: dict[str, Any] | None = None

    # ------------------------------------------------------------------ lifetime
    def _resolve(self) -> tuple[int, float]:
        """(number of actors, GPUs per actor) for the connected cluster."""
        resources = cluster_resources()
        gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
        per_gpu = (
            (1.0 if gpus >= 1 else 0.0)
            if self.num_gpus_per_worker == "auto"
            else float(self.num_gpus_per_worker)
        )
        room = capacity(node_resources(), self.num_cpus_per_worker, per_gpu)
        if self.num_workers is not None:
            count = self.num_workers
        else:
            count = max(room if room >= 0 else int(cpus), 1)
        # A request the cluster can never hold would wait forever: refuse it now.
        if 0 <= room < count:
            raise ValueError(
                f"{count} workers x ({self.num_cpus_per_worker:g} CPU, {per_gpu:g} GPU) do not fit "
                f"the Ray cluster ({cpus:g} CPUs, {gpus:g} GPUs); lower num_workers"
            )
        return count, per_gpu

    def start(self) -> None:
        """Start the actors (each loads the model) unless they are running."""
        if self._actors:
            return
        ray = import_ray()
        count, per_gpu = self._resolve()
        actor_class = ray.remote(_ExtractionWorker).options(
            num_cpus=self.num_cpus_per_worker,
            num_gpus=per_gpu,
            max_restarts=self.max_restarts,
            max_task_retries=self.max_task_retries,
            scheduling_strategy="SPREAD",
        )
        self._actors = [actor_class.remote(self.model_spec, self.params) for _ in range(count)]
        self._alive = [True] * count
        try:
            described = wait_started(ray, self._actors, self.startup_timeout, "extraction workers")
        except Exception:
            self.close()
            raise
        fingerprints = [info["fingerprint"] for info in described]
        for info in described[1:]:
            if not same_fingerprint(info["fingerprint"], fingerprints[0]):
                self.close()
                raise ValueError(
                    f"workers disagree on the model (host {described[0]['host']} vs {info['host']}): "
                    "install the same package, OpenCV/TensorFlow and model files on every node"
                )
        self._fingerprint = fingerprints[0]

    def close(self) -> None:
        """Stop the actors (the pool starts again when used)."""
        kill_all(self._actors)
        self._actors, self._alive, self._fingerprint = [], [], None

    def __enter__(self) -> RayExtractorPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What the workers' extractor makes (starts the pool)."""
        self.start()
        assert self._fingerprint is not None
        return self._fingerprint

    def workers(self) -> list[dict[str, Any]]:
        """``{"pid", "node", "host", "alive"}`` of each actor (asks the live ones).

        The answer queues behind batches already sent to an actor.
        """
        self.start()
        ray = import_ray()
        answers = []
        for actor, alive in zip(self._actors, self._alive, strict=True):
            info = {"pid": None, "node": None, "host": None}
            if alive:
                try:
                    info = ray.get(actor.describe.remote())
                except ray.exceptions.RayActorError:
                    alive = False
            answers.append({k: info[k] for k in ("pid", "node", "host")} | {"alive": alive})
        return answers

    # ------------------------------------------------------------------ work
    def extract_to_store(
        self,
        extractor: Extractor | None,
        sources: Sequence[ImageSource],
        store: FeatureStore,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        decode_threads: int = 2,
        retry_failed: bool = False,
        progress: bool = True,
        description: str = "extract",
        on_progress: Callable[[int, int], None] | None = None,
    ) -> ExtractionSummary:
        """Drop-in for :func:`delf_retrieval.models.extract.extract_to_store`, run by the actors.

        Parameters
        ----------
        extractor : the driver's extractor of the same model, only used to check that the
            workers make the same features (fingerprint); None skips that check. The
            store's fingerprint is always checked.
        batch_size : images per batch = per atomic store chunk.
        decode_threads : decoding threads inside each actor.
        on_progress : called as ``on_progress(images_done, images_to_do)`` after each
            batch is written (in the driver).

        ``seconds`` in the summary counts from this call; it includes the actors' start-up
        only when the pool was not started yet (see :meth:`start`).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        started = time.perf_counter()
        with store.writing():  # one extraction per store (see FeatureStore.writing)
            todo = pending_sources(sources, store, retry_failed=retry_failed)
            extracted, failures = self.extract_pending(
                todo,
                store,
                extractor=extractor,
                batch_size=batch_size,
                decode_threads=decode_threads,
                progress=progress,
                description=description,
                on_progress=on_progress,
            )
            return finish_extraction(store, len(sources), len(sources) - len(todo), extracted, failures, started)

    def extract_pending(
        self,
        todo: Sequence[ImageSource],
        store: FeatureStore,
        *,
        extractor: Extractor | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        decode_threads: int = 2,
        progress: bool = True,
        description: str = "extract",
        on_progress: Callable[[int, int], None] | None = None,
    ) -> tuple[int, list[tuple[str, str]]]:
        """Extract exactly ``todo`` (what :func:`~delf_retrieval.models.extract.pending_sources`
        found missing) into ``store``, writing batches as they complete.

        Returns ``(images extracted, [(id, reason), ...] failures in input order)``; the
        store is not consolidated yet. Other arguments as :meth:`extract_to_store`.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not todo:
            return 0, []
        self.start()
        self._check_model(store, extractor)
        ray = import_ray()
        batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
        queue: deque[int] = deque(range(len(batches)))
        pending: dict[Any, tuple[int, int]] = {}  # result ref -> (batch, actor)
        load = [0] * len(self._actors)
        failures: list[tuple[str, str]] = []
        extracted = done = 0

        def fill() -> None:
            for index, actor in enumerate(self._actors):
                while self._alive[index] and queue and load[index] < self.inflight_per_worker:
                    batch = queue.popleft()
                    ref = actor.extract.remote(batches[batch], store.dtype, decode_threads)
                    pending[ref] = (batch, index)
                    load[index] += 1

        bar = tqdm(
            total=len(todo), desc=description, unit="img", disable=not progress, smoothing=0.1
        )
        try:
            fill()
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                batch, index = pending.pop(ref)
                load[index] -= 1
                try:
                    ids, features, batch_failures = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as error:
                    # Ray's own restarts and retries are used up: the actor (or the node
                    # holding the result) is gone for good. Another actor takes the batch.
                    if isinstance(error, ray.exceptions.RayActorError) and self._alive[index]:
                        self._alive[index] = False
                        kill_all([self._actors[index]])
                    queue.appendleft(batch)
                    if not any(self._alive):
                        raise WorkersLostError(
                            f"every Ray extraction worker died ({len(queue)} batches left); the "
                            f"finished batches are in {store.path}: rerun to resume"
                        ) from error
                    fill()
                    continue
                store.write_chunk(ids, features, batch_failures)
                extracted += len(ids)
                failures.extend(batch_failures)
                done += len(batches[batch])
                bar.update(len(batches[batch]))
                bar.set_postfix(failed=len(failures), workers=sum(self._alive), refresh=False)
                if on_progress is not None:
                    on_progress(done, len(todo))
                fill()
        finally:
            bar.close()
        order = {source.id: position for position, source in enumerate(todo)}
        failures.sort(key=lambda failure: order[failure[0]])
        return extracted, failures

    def _check_model(self, store: FeatureStore, extractor: Extractor | None) -> None:
        """The workers must make ``store``'s features (and ``extractor``'s, if given)."""
        assert self._fingerprint is not None
        if not same_fingerprint(self._fingerprint, store.fingerprint):
            raise ValueError(
                f"model {self.model_spec!r} with these parameters did not make feature store "
                f"{store.path} (workers {fingerprint_key(self._fingerprint)}, store "
                f"{fingerprint_key(store.fingerprint)}); build the store from "
                "load_extractor(spec, params).fingerprint()"
            )
        if extractor is not None and not same_fingerprint(self._fingerprint, extractor.fingerprint()):
            raise ValueError(f"the Ray workers' model differs from {extractor!r} of the driver")


def extract_to_store_ray(
    model_spec: str | os.PathLike,
    params: ExtractorParams | None,
    sources: Sequence[ImageSource],
    store: FeatureStore,
    *,
    address: str | None = None,
    num_workers: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_gpus_per_worker: float | str = "auto",
    num_cpus_per_worker: float = 1.0,
    decode_threads: int = 2,
    progress: bool = True,
    retry_failed: bool = False,
    description: str = "extract",
    max_restarts: int = 3,
    max_task_retries: int = 3,
) -> ExtractionSummary:
    """Extract features of ``sources`` into ``store`` on a Ray cluster, skipping ids done.

    Same result as :func:`delf_retrieval.models.extract.extract_to_store` with
    ``load_extractor(model_spec, params)`` (same ids, failures and arrays, bit for bit):
    make ``store`` with that extractor's ``fingerprint()`` so that local and Ray runs
    resume each other. See :class:`RayExtractorPool` for the worker options and
    :func:`ray_session` for ``address`` (``"local"`` starts ``num_workers`` CPUs).

    ``seconds`` (hence ``images_per_second``) includes connecting to Ray and starting
    the actors. Nothing is started when every id is already in the store.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    started = time.perf_counter()
    with store.writing():  # one extraction per store (see FeatureStore.writing)
        todo = pending_sources(sources, store, retry_failed=retry_failed)
        skipped = len(sources) - len(todo)
        if not todo:
            return finish_extraction(store, len(sources), skipped, 0, [], started)
        pool = RayExtractorPool(
            model_spec,
            params,
            num_workers=num_workers,
            num_gpus_per_worker=num_gpus_per_worker,
            num_cpus_per_worker=num_cpus_per_worker,
            max_restarts=max_restarts,
            max_task_retries=max_task_retries,
        )
        with ray_session(address, num_cpus=local_cpus(num_workers, num_cpus_per_worker)), pool:
            extracted, failures = pool.extract_pending(
                todo,
                store,
                batch_size=batch_size,
                decode_threads=decode_threads,
                progress=progress,
                description=description,
            )
        return finish_extraction(store, len(sources), skipped, extracted, failures, started)
