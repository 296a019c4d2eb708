"""Scale out on Ray: distributed feature extraction and sharded exact search.

Optional: needs ``pip install delf_retrieval[ray]``. Importing this module does not
import Ray; every function imports it when called.

Extraction (:func:`extract_to_store_ray`, :class:`RayExtractorPool`)
    One model-holding actor per GPU (or per CPU slot when the cluster has no GPU). Each
    actor loads the extractor once with :func:`~delf_retrieval.models.loader.load_extractor`
    and turns batches of :class:`~delf_retrieval.images.ImageSource` into features with
    the same code as the local runner (:func:`~delf_retrieval.extract.iter_decoded` +
    :func:`~delf_retrieval.extract.extract_decoded`). Features travel back to the driver,
    which writes each batch as one atomic store chunk, so workers need no shared
    filesystem (only the images, readable at the same path on every node). The driver
    takes results **as they complete** (``ray.wait``), not in submission order: a slow
    batch never holds back the writing of others, and the store does not depend on the
    order because consolidation sorts by id. Only ids missing from the store are
    batched, so a local and a Ray run resume each other. A worker killed mid-batch is
    restarted by Ray (``max_restarts``) and its batches re-run (``max_task_retries``);
    when it cannot come back, the driver hands its batches to the other workers. A batch
    is written once, after it has completed, under a name hashed from its ids.

Search (:class:`ShardedIndex`, :func:`sharded_cosine_topk`)
    Each shard actor memory-maps its own row range of an ``.npy`` index file (nothing is
    shipped through the object store but the queries and the partial results), runs
    :func:`~delf_retrieval.search.cosine_topk` on it and returns the top-k with global row
    ids; the driver merges them with :func:`~delf_retrieval.search.merge_topk`.

Pipeline hooks (:class:`RayRunner`)
    ``extract`` and ``search`` callables for :func:`delf_retrieval.pipeline.recognize` /
    :func:`~delf_retrieval.pipeline.retrieve` (``--ray`` on the command line).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .extract import (
    DEFAULT_BATCH_SIZE,
    ExtractionSummary,
    extract_decoded,
    iter_decoded,
    pending_sources,
)
from .features import ImageFeatures
from .images import ImageSource
from .models.base import Extractor, ExtractorParams, fingerprint_key
from .search import cosine_topk, merge_topk
from .store import FeatureStore

__all__ = [
    "RayExtractorPool",
    "RayRunner",
    "ShardedIndex",
    "extract_to_store_ray",
    "ray_session",
    "shard_bounds",
    "sharded_cosine_topk",
]

DEFAULT_SEARCH_BLOCK_SIZE = 65536
DEFAULT_QUERY_BLOCK_SIZE = 1024
_BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise ImportError(
            "distributed runs need Ray: pip install 'delf_retrieval[ray]' (or 'ray[default]')"
        ) from error
    return ray


# --------------------------------------------------------------------------- connection
@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[Any]:
    """Connect to (or start) Ray for the duration of a ``with`` block; yields the module.

    Parameters
    ----------
    address : str, optional
        ``None``: keep this process's connection if there is one, else Ray's default
        (``RAY_ADDRESS``, or a new local instance). ``"local"``: start a new Ray on this
        machine with ``num_cpus`` CPUs (default: all). ``"auto"``: the cluster started on
        this machine with ``ray start``. ``"host:6379"``: a cluster's GCS address.
        ``"ray://host:10001"``: Ray Client.
    num_cpus : int, optional
        CPUs of a ``"local"`` start (ignored when connecting to a cluster).

    When this process is already connected, that connection is used whatever
    ``address`` says. Ray is shut down on exit only when this call made the connection.
    """
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    if address == "local":
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    elif address is None:
        ray.init()
    else:
        ray.init(address=address)
    try:
        yield ray
    finally:
        ray.shutdown()


def _cluster_resources() -> dict[str, float]:
    return dict(_import_ray().cluster_resources())


def _node_resources() -> list[dict[str, float]]:
    """Total resources of each live node."""
    return [dict(node["Resources"]) for node in _import_ray().nodes() if node.get("Alive")]


def _capacity(nodes: list[dict[str, float]], cpus: float, gpus: float) -> int:
    """How many actors needing ``cpus`` and ``gpus`` the nodes hold at once (an actor
    cannot straddle nodes, so totals are not enough). -1: unlimited (needs nothing)."""
    if cpus <= 0 and gpus <= 0:
        return -1
    count = 0
    for node in nodes:
        fits = [
            int(np.floor(node.get(name, 0.0) / need + 1e-9))
            for name, need in (("CPU", cpus), ("GPU", gpus))
            if need > 0
        ]
        count += min(fits)
    return count


def _where() -> dict[str, Any]:
    """Process id and node of the calling actor (for logs, tests and failure messages)."""
    ray = _import_ray()
    return {
        "pid": os.getpid(),
        "node": ray.get_runtime_context().get_node_id(),
        "host": socket.gethostname(),
    }


def _get_started(ray: Any, actors: list[Any], timeout: float, what: str) -> list[dict[str, Any]]:
    """``describe()`` of every new actor; a clear error instead of waiting forever when
    the cluster cannot place them (resources held by other actors)."""
    try:
        return ray.get([actor.describe.remote() for actor in actors], timeout=timeout)
    except ray.exceptions.GetTimeoutError as error:
        raise RuntimeError(
            f"{len(actors)} {what} did not start within {timeout:g} s: the Ray cluster has no "
            f"room for them now ({ray.available_resources()} free); stop other actors or ask for less"
        ) from error


def _same_fingerprint(a: dict[str, Any], b: dict[str, Any]) -> bool:
    # Compare through JSON like FeatureStore does (tuples and lists are the same there).
    return json.loads(fingerprint_key(a)) == json.loads(fingerprint_key(b))


# --------------------------------------------------------------------------- extraction
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
        from .models.loader import load_extractor

        self._extractor = load_extractor(model_spec, params)

    def describe(self) -> dict[str, Any]:
        return {**_where(), "fingerprint": self._extractor.fingerprint()}

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
        resources = _cluster_resources()
        gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
        per_gpu = (
            (1.0 if gpus >= 1 else 0.0)
            if self.num_gpus_per_worker == "auto"
            else float(self.num_gpus_per_worker)
        )
        capacity = _capacity(_node_resources(), self.num_cpus_per_worker, per_gpu)
        if self.num_workers is not None:
            count = self.num_workers
        else:
            count = max(capacity if capacity >= 0 else int(cpus), 1)
        # A request the cluster can never hold would wait forever: refuse it now.
        if 0 <= capacity < count:
            raise ValueError(
                f"{count} workers x ({self.num_cpus_per_worker:g} CPU, {per_gpu:g} GPU) do not fit "
                f"the Ray cluster ({cpus:g} CPUs, {gpus:g} GPUs); lower num_workers"
            )
        return count, per_gpu

    def start(self) -> None:
        """Start the actors (each loads the model) unless they are running."""
        if self._actors:
            return
        ray = _import_ray()
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
            described = _get_started(ray, self._actors, self.startup_timeout, "extraction workers")
        except Exception:
            self.close()
            raise
        fingerprints = [info["fingerprint"] for info in described]
        for info in described[1:]:
            if not _same_fingerprint(info["fingerprint"], fingerprints[0]):
                self.close()
                raise ValueError(
                    f"workers disagree on the model (host {described[0]['host']} vs {info['host']}): "
                    "install the same package, OpenCV/TensorFlow and model files on every node"
                )
        self._fingerprint = fingerprints[0]

    def close(self) -> None:
        """Stop the actors (the pool starts again when used)."""
        if self._actors:
            ray = _import_ray()
            for actor in self._actors:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
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
        ray = _import_ray()
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
        """Drop-in for :func:`delf_retrieval.extract.extract_to_store`, run by the actors.

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
        todo = pending_sources(sources, store, retry_failed=retry_failed)
        if todo:
            self.start()
            assert self._fingerprint is not None
            if not _same_fingerprint(self._fingerprint, store.fingerprint):
                raise ValueError(
                    f"the Ray workers' model does not match feature store {store.path}: "
                    f"workers {fingerprint_key(self._fingerprint)}, store {fingerprint_key(store.fingerprint)}"
                )
            if extractor is not None and not _same_fingerprint(
                self._fingerprint, extractor.fingerprint()
            ):
                raise ValueError(f"the Ray workers' model differs from {extractor!r} of the driver")
        extracted, failures = self._run(
            todo, store, batch_size, decode_threads, progress, description, on_progress
        )
        return _summary(len(sources), len(sources) - len(todo), extracted, failures, store, started)

    def _run(
        self,
        todo: list[ImageSource],
        store: FeatureStore,
        batch_size: int,
        decode_threads: int,
        progress: bool,
        description: str,
        on_progress: Callable[[int, int], None] | None,
    ) -> tuple[int, list[tuple[str, str]]]:
        """Send batches of ``todo`` to the actors and write results as they complete."""
        if not todo:
            return 0, []
        ray = _import_ray()
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
                        with contextlib.suppress(Exception):
                            ray.kill(self._actors[index], no_restart=True)
                    queue.appendleft(batch)
                    if not any(self._alive):
                        raise RuntimeError(
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


def _summary(
    total: int,
    skipped: int,
    extracted: int,
    failures: list[tuple[str, str]],
    store: FeatureStore,
    started: float,
) -> ExtractionSummary:
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

    Same result as :func:`delf_retrieval.extract.extract_to_store` with
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
    todo = pending_sources(sources, store, retry_failed=retry_failed)
    skipped = len(sources) - len(todo)
    if not todo:
        return _summary(len(sources), skipped, 0, [], store, started)
    pool = RayExtractorPool(
        model_spec,
        params,
        num_workers=num_workers,
        num_gpus_per_worker=num_gpus_per_worker,
        num_cpus_per_worker=num_cpus_per_worker,
        max_restarts=max_restarts,
        max_task_retries=max_task_retries,
    )
    local_cpus = (
        None if num_workers is None else max(1, int(np.ceil(num_workers * num_cpus_per_worker)))
    )
    with ray_session(address, num_cpus=local_cpus), pool:
        # Same checks as the pool's own entry point, without scanning the store twice.
        if not _same_fingerprint(pool.fingerprint, store.fingerprint):
            raise ValueError(
                f"model {os.fspath(model_spec)!r} with these parameters did not make feature "
                f"store {store.path}; build the store from load_extractor(spec, params).fingerprint()"
            )
        extracted, failures = pool._run(
            todo, store, batch_size, decode_threads, progress, description, None
        )
    return _summary(len(sources), skipped, extracted, failures, store, started)


# --------------------------------------------------------------------------- search
def shard_bounds(num_rows: int, num_shards: int, block_size: int) -> list[tuple[int, int]]:
    """Row ranges ``[(start, stop), ...]`` of the shards of an index.

    Shards start on multiples of ``block_size`` so that each one multiplies exactly the
    blocks :func:`~delf_retrieval.search.cosine_topk` multiplies on the whole index (the
    float32 sums of a matrix product depend on its shape). The ``ceil(num_rows /
    block_size)`` blocks are dealt out as evenly as possible; there are fewer shards than
    ``num_shards`` when there are fewer blocks, none for an empty index.

    Examples
    --------
    >>> shard_bounds(10, 3, 2)
    [(0, 2), (2, 6), (6, 10)]
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    num_blocks = -(-num_rows // block_size)
    shards = min(num_shards, num_blocks)
    edges = [(s * num_blocks) // shards * block_size for s in range(shards)] + [num_rows]
    return [(edges[s], min(edges[s + 1], num_rows)) for s in range(shards)]


def _index_file(
    source: FeatureStore | str | os.PathLike | np.memmap,
) -> tuple[str, tuple[int, int], str]:
    """``(path, shape, dtype)`` of the ``.npy`` file behind ``source``."""
    if isinstance(source, FeatureStore):
        source = source.global_descriptors()
    if isinstance(source, np.ndarray):
        filename = getattr(source, "filename", None)
        if not isinstance(source, np.memmap) or filename is None:
            raise ValueError(
                "sharded search reads the index from its .npy file: pass a FeatureStore, a "
                "path, or an array from np.load(path, mmap_mode='r'), not an in-memory array"
            )
        path, expected = str(filename), (source.shape, str(source.dtype))
    else:
        path, expected = os.fspath(source), None
    if not Path(path).is_file():
        raise FileNotFoundError(f"index file {path} does not exist")
    try:
        array = np.load(path, mmap_mode="r")
    except ValueError as error:
        raise ValueError(f"{path} is not a .npy array file: {error}") from error
    if array.ndim != 2:
        raise ValueError(f"index {path} must be 2-D [N, D], got shape {array.shape}")
    if expected is not None and expected != (array.shape, str(array.dtype)):
        raise ValueError(f"the memmap is a part of {path}, not the whole file; pass the path")
    return str(Path(path).resolve()), tuple(array.shape), str(array.dtype)


def _default_blas_threads() -> int:
    """BLAS threads of this process's numpy (OpenBLAS reads these variables at import)."""
    for name in _BLAS_THREAD_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _default_cpus_per_shard(nodes: list[dict[str, float]], num_shards: int) -> float:
    """1 CPU per shard, or 1/2, 1/3, ... when that many shards do not fit the nodes."""
    for divisor in range(1, num_shards + 1):
        # Rounded down to Ray's 1e-4 CPU unit (3 x 0.6667 > 2).
        cpus = np.floor(1e4 / divisor) / 1e4
        if _capacity(nodes, cpus, 0.0) >= num_shards:
            return float(cpus)
    return 0.0


class _SearchShard:
    """Body of one search actor: rows ``start:stop`` of a memory-mapped ``.npy`` index."""

    def __init__(
        self, path: str, start: int, stop: int, shape: tuple[int, int], dtype: str
    ) -> None:
        array = np.load(path, mmap_mode="r")
        if tuple(array.shape) != tuple(shape) or str(array.dtype) != dtype:
            raise ValueError(
                f"{path} on host {socket.gethostname()} is {array.dtype} {array.shape}, the driver "
                f"saw {dtype} {tuple(shape)}: every node must see the same index file"
            )
        self._rows = array[start:stop]
        self._start = start

    def describe(self) -> dict[str, Any]:
        return _where()

    def search(
        self, queries: np.ndarray, k: int, block_size: int, query_block_size: int, normalize: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        sims, ids = cosine_topk(
            queries,
            self._rows,
            k,
            block_size=block_size,
            query_block_size=query_block_size,
            normalize=normalize,
        )
        return sims, ids + self._start


class ShardedIndex:
    """Exact cosine top-k over an ``.npy`` index split between Ray actors, reused per search.

    Results equal :func:`~delf_retrieval.search.cosine_topk` on the whole index with the
    same ``block_size``, ``query_block_size`` and ``normalize``, bit for bit and with the
    same tie order, when the shards run on the same kind of CPU with the same BLAS and
    ``blas_threads`` as the local run: shards start on block boundaries
    (:func:`shard_bounds`) and OpenBLAS's float32 sums depend on how a product is split
    between threads, so the shards use as many BLAS threads as this process by default.

    Parameters
    ----------
    source : a :class:`FeatureStore` (its global descriptors, or VLAD for local-only
        models), an ``.npy`` path, or an ``np.load(..., mmap_mode="r")`` array. The file
        must be readable at the same path on every node that hosts a shard.
    num_shards : actors (fewer when the index has fewer than ``num_shards`` blocks).
    address : Ray address to connect to when this process is not connected yet (see
        :func:`ray_session`); that connection is closed with the index.
    num_cpus_per_shard : CPUs reserved per actor; default 1, or less when the cluster has
        fewer CPUs than shards (all shards must fit at once). Actors are spread over nodes.
    blas_threads : BLAS threads per actor; default: this process's count (exact results),
        e.g. ``cores // shards per node`` for speed without over-subscription.
    startup_timeout : seconds to wait for the actors to be placed.
    """

    def __init__(
        self,
        source: FeatureStore | str | os.PathLike | np.memmap,
        num_shards: int,
        *,
        address: str | None = None,
        block_size: int = DEFAULT_SEARCH_BLOCK_SIZE,
        query_block_size: int = DEFAULT_QUERY_BLOCK_SIZE,
        normalize: bool = False,
        num_cpus_per_shard: float | None = None,
        blas_threads: int | None = None,
        startup_timeout: float = 300.0,
    ) -> None:
        if query_block_size < 1:
            raise ValueError(f"query_block_size must be >= 1, got {query_block_size}")
        if blas_threads is not None and blas_threads < 1:
            raise ValueError(f"blas_threads must be >= 1, got {blas_threads}")
        self.path, self.shape, self.dtype = _index_file(source)
        self.bounds = shard_bounds(self.shape[0], num_shards, block_size)
        self.block_size = block_size
        self.query_block_size = query_block_size
        self.normalize = normalize
        self.blas_threads = blas_threads or _default_blas_threads()
        self._exit = contextlib.ExitStack()
        self._actors: list[Any] = []
        if not self.bounds:
            return
        ray = self._exit.enter_context(ray_session(address))
        nodes = _node_resources()
        if num_cpus_per_shard is None:
            num_cpus_per_shard = _default_cpus_per_shard(nodes, self.num_shards)
        cpus = sum(node.get("CPU", 0.0) for node in nodes)
        # A request the cluster can never hold would wait forever: refuse it now.
        if (
            num_cpus_per_shard < 0
            or 0 <= _capacity(nodes, num_cpus_per_shard, 0.0) < self.num_shards
        ):
            self.close()
            raise ValueError(
                f"{self.num_shards} shards x {num_cpus_per_shard:g} CPU do not fit the Ray cluster "
                f"({cpus:g} CPUs); lower num_cpus_per_shard or num_shards"
            )
        threads = str(self.blas_threads)
        actor_class = ray.remote(_SearchShard).options(
            num_cpus=num_cpus_per_shard,
            scheduling_strategy="SPREAD",
            runtime_env={"env_vars": {name: threads for name in _BLAS_THREAD_VARIABLES}},
        )
        self._actors = [
            actor_class.remote(self.path, start, stop, self.shape, self.dtype)
            for start, stop in self.bounds
        ]
        try:
            _get_started(ray, self._actors, startup_timeout, "search shards")
        except Exception:
            self.close()
            raise

    @property
    def num_shards(self) -> int:
        return len(self.bounds)

    def __len__(self) -> int:
        return self.shape[0]

    def workers(self) -> list[dict[str, Any]]:
        """``{"pid", "node", "host"}`` of each shard actor."""
        if not self._actors:
            return []
        ray = _import_ray()
        return ray.get([actor.describe.remote() for actor in self._actors])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows by inner product for each query.

        Parameters
        ----------
        queries : float array [Q, D]
        k : neighbours per query (>= 1).

        Returns
        -------
        similarities : float32 [Q, min(k, N)], descending along each row.
        indices : int64 [Q, min(k, N)], rows of the whole index; ties: smaller row first.
        """
        queries = np.asarray(queries)
        if queries.ndim != 2 or not (
            np.issubdtype(queries.dtype, np.floating) or np.issubdtype(queries.dtype, np.integer)
        ):
            raise ValueError(
                f"queries must be a real 2-D array [Q, D], got {queries.dtype} {queries.shape}"
            )
        if queries.shape[1] != self.shape[1]:
            raise ValueError(
                f"queries have dimension {queries.shape[1]}, the index has {self.shape[1]}"
            )
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        kk = min(int(k), self.shape[0])
        if queries.shape[0] == 0 or not self._actors:
            return np.zeros((queries.shape[0], kk), np.float32), np.zeros(
                (queries.shape[0], kk), np.int64
            )
        ray = _import_ray()
        shared = ray.put(np.ascontiguousarray(queries, dtype=np.float32))
        refs = [
            actor.search.remote(
                shared, int(k), self.block_size, self.query_block_size, self.normalize
            )
            for actor in self._actors
        ]
        return merge_topk(ray.get(refs), int(k))

    def close(self) -> None:
        """Stop the shard actors (and the Ray connection this index made)."""
        if self._actors:
            ray = _import_ray()
            for actor in self._actors:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
            self._actors = []
        self._exit.close()

    def __enter__(self) -> ShardedIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ShardedIndex({self.path!r}, shape={self.shape}, shards={self.bounds})"


def sharded_cosine_topk(
    queries: np.ndarray,
    store_or_array_path: FeatureStore | str | os.PathLike | np.memmap,
    k: int,
    *,
    num_shards: int,
    address: str | None = None,
    block_size: int = DEFAULT_SEARCH_BLOCK_SIZE,
    query_block_size: int = DEFAULT_QUERY_BLOCK_SIZE,
    normalize: bool = False,
    num_cpus_per_shard: float | None = None,
    blas_threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One search with a temporary :class:`ShardedIndex` (same arguments and results).

    Returns
    -------
    similarities : float32 [Q, min(k, N)]
    indices : int64 [Q, min(k, N)]
        Global rows; equal to ``cosine_topk(queries, index, k, block_size=block_size)``.
    """
    with ShardedIndex(
        store_or_array_path,
        num_shards,
        address=address,
        block_size=block_size,
        query_block_size=query_block_size,
        normalize=normalize,
        num_cpus_per_shard=num_cpus_per_shard,
        blas_threads=blas_threads,
    ) as index:
        return index.search(queries, k)


# --------------------------------------------------------------------------- pipeline
class RayRunner:
    """Ray-backed ``extract_fn`` and ``search_fn`` for :mod:`delf_retrieval.pipeline`.

    ``runner.extract`` has the signature of :func:`~delf_retrieval.extract.extract_to_store`
    and ``runner.search`` that of :func:`~delf_retrieval.search.cosine_topk` (arguments
    ``block_size``, ``query_block_size``, ``normalize``). The first search stops the
    extraction actors (their CPUs/GPUs go to the shard actors; a later extraction starts
    them again). With ``num_shards <= 1``, or for an index that is not an ``.npy``
    memmap, search runs locally.

    Examples
    --------
    >>> with RayRunner("opencv-sift", None, address="local", num_shards=2) as runner:  # doctest: +SKIP
    ...     pipeline.recognize(data, "opencv-sift", extract_fn=runner.extract, search_fn=runner.search)
    """

    def __init__(
        self,
        model_spec: str | os.PathLike,
        params: ExtractorParams | None = None,
        *,
        address: str | None = None,
        num_workers: int | None = None,
        num_shards: int = 1,
        num_gpus_per_worker: float | str = "auto",
        num_cpus_per_worker: float = 1.0,
    ) -> None:
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        self.pool = RayExtractorPool(
            model_spec,
            params,
            num_workers=num_workers,
            num_gpus_per_worker=num_gpus_per_worker,
            num_cpus_per_worker=num_cpus_per_worker,
        )
        self.num_shards = num_shards
        self.sharded_searches = 0  # searches that ran on shard actors (the rest ran locally)
        self._indexes: dict[tuple[Any, ...], ShardedIndex] = {}
        self._exit = contextlib.ExitStack()
        local_cpus = (
            None if num_workers is None else max(1, int(np.ceil(num_workers * num_cpus_per_worker)))
        )
        self._exit.enter_context(ray_session(address, num_cpus=local_cpus))

    def extract(
        self,
        extractor: Extractor | None,
        sources: Sequence[ImageSource],
        store: FeatureStore,
        **kwargs: Any,
    ) -> ExtractionSummary:
        """:meth:`RayExtractorPool.extract_to_store` (keyword arguments as there)."""
        return self.pool.extract_to_store(extractor, sources, store, **kwargs)

    def search(
        self,
        queries: np.ndarray,
        index: np.ndarray,
        k: int,
        *,
        block_size: int = DEFAULT_SEARCH_BLOCK_SIZE,
        query_block_size: int = DEFAULT_QUERY_BLOCK_SIZE,
        normalize: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k as :func:`~delf_retrieval.search.cosine_topk`, sharded over Ray."""
        filename = getattr(index, "filename", None)
        if self.num_shards <= 1 or not isinstance(index, np.memmap) or filename is None:
            return cosine_topk(
                queries,
                index,
                k,
                block_size=block_size,
                query_block_size=query_block_size,
                normalize=normalize,
            )
        self.pool.close()
        stat = os.stat(filename)
        key = (
            str(filename),
            stat.st_mtime_ns,
            index.shape,
            str(index.dtype),
            block_size,
            query_block_size,
            normalize,
        )
        if key not in self._indexes:
            # One sharded index at a time: its actors hold the CPUs the next one needs.
            for sharded in self._indexes.values():
                sharded.close()
            self._indexes = {}
            self._indexes[key] = ShardedIndex(
                index,
                self.num_shards,
                block_size=block_size,
                query_block_size=query_block_size,
                normalize=normalize,
            )
        self.sharded_searches += 1
        return self._indexes[key].search(queries, k)

    def close(self) -> None:
        """Stop every actor and the Ray connection this runner made."""
        for sharded in self._indexes.values():
            sharded.close()
        self._indexes = {}
        self.pool.close()
        self._exit.close()

    def __enter__(self) -> RayRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
