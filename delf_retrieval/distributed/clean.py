"""Pair verification of :mod:`delf_retrieval.tasks.clean` on a Ray cluster.

Optional: needs ``pip install delf_retrieval[ray]``; Ray is imported when used. The Ray
connection is made with :func:`delf_retrieval.distributed.ray_session`.

Each actor opens the feature store once (memory-mapped: the store folder must be readable
at the same path on every node, as for sharded search) and verifies whole chunks of pairs
with :func:`delf_retrieval.tasks.clean.verify_chunk`, one BLAS thread and one RANSAC thread per
actor (the actors are the parallel level). The driver writes each chunk as it completes,
so a Ray run and a local run resume each other and give the same counts.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from delf_retrieval.config import Config
from delf_retrieval.core.threads import bounded_blas_threads
from delf_retrieval.distributed import ray_session
from delf_retrieval.features.store import FeatureStore
from delf_retrieval.tasks.clean import verify_chunk

__all__ = ["RayChunkRunner"]


class _CleanWorker:
    """Body of one verification actor: one open feature store."""

    def __init__(self, store_path: str) -> None:
        self._store = FeatureStore(store_path)
        self._store.ids  # noqa: B018 - open the consolidated generation now

    def verify(self, pairs: np.ndarray, config: dict[str, Any]) -> np.ndarray:
        settings = Config(**config).replace(WORKERS=1)
        with bounded_blas_threads(1):
            return verify_chunk(self._store, pairs, settings)


class RayChunkRunner:
    """``run_chunks`` for :func:`delf_retrieval.tasks.clean.verify_pairs` on Ray actors.

    Parameters
    ----------
    address : Ray address (see :func:`delf_retrieval.distributed.ray_session`); ignored
        when this process is already connected.
    num_workers : actors; default one per CPU of the cluster (``num_cpus_per_worker`` each).
    num_cpus_per_worker : CPUs reserved per actor.
    inflight_per_worker : chunks queued per actor.
    release : called once before the actors start (e.g. to stop extraction actors that
        hold the CPUs).
    max_restarts, max_task_retries : Ray fault tolerance of the actors.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        num_workers: int | None = None,
        num_cpus_per_worker: float = 1.0,
        inflight_per_worker: int = 2,
        release: Callable[[], None] | None = None,
        max_restarts: int = 3,
        max_task_retries: int = 3,
    ) -> None:
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if inflight_per_worker < 1:
            raise ValueError(f"inflight_per_worker must be >= 1, got {inflight_per_worker}")
        self.address = address
        self.num_workers = num_workers
        self.num_cpus_per_worker = float(num_cpus_per_worker)
        self.inflight_per_worker = inflight_per_worker
        self.release = release
        self.max_restarts = max_restarts
        self.max_task_retries = max_task_retries

    def __call__(
        self,
        store: FeatureStore,
        chunks: Sequence[tuple[int, np.ndarray]],
        config: Config,
        on_done: Callable[[int, np.ndarray], None],
    ) -> None:
        if not chunks:
            return
        if self.release is not None:
            self.release()
        local_cpus = None if self.num_workers is None else max(1, int(np.ceil(self.num_workers * self.num_cpus_per_worker)))
        with ray_session(self.address, num_cpus=local_cpus) as ray:
            count = self.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1) // max(self.num_cpus_per_worker, 1e-4)))
            count = min(count, len(chunks))
            actor_class = ray.remote(_CleanWorker).options(
                num_cpus=self.num_cpus_per_worker,
                max_restarts=self.max_restarts,
                max_task_retries=self.max_task_retries,
                scheduling_strategy="SPREAD",
            )
            actors = [actor_class.remote(str(store.path)) for _ in range(count)]
            try:
                self._run(ray, actors, chunks, config.to_dict(), on_done)
            finally:
                for actor in actors:
                    with contextlib.suppress(Exception):
                        ray.kill(actor, no_restart=True)

    def _run(self, ray, actors, chunks, settings, on_done) -> None:
        queue: deque[int] = deque(range(len(chunks)))
        pending: dict[Any, tuple[int, int]] = {}  # result ref -> (chunk position, actor)
        load = [0] * len(actors)
        alive = [True] * len(actors)

        def fill() -> None:
            for index, actor in enumerate(actors):
                while alive[index] and queue and load[index] < self.inflight_per_worker:
                    position = queue.popleft()
                    pending[actor.verify.remote(chunks[position][1], settings)] = (position, index)
                    load[index] += 1

        fill()
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            position, index = pending.pop(ref)
            load[index] -= 1
            try:
                counts = ray.get(ref)
            except ray.exceptions.RayActorError as error:
                # Ray's restarts are used up: another actor takes the chunk.
                alive[index] = False
                queue.appendleft(position)
                if not any(alive):
                    raise RuntimeError("every Ray verification actor died; rerun to resume") from error
                fill()
                continue
            on_done(chunks[position][0], counts)
            fill()
