"""Connecting to Ray and placing actors: sessions, capacity checks, start-up waits.

Ray is imported only when a function here is called (:func:`import_ray`).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any

import numpy as np

from delf_retrieval.core.errors import RayClusterError

__all__ = ["ray_session"]


def import_ray() -> Any:
    """The ``ray`` module, or an ImportError saying how to install it."""
    try:
        import ray
    except ImportError as error:
        raise ImportError(
            "distributed runs need Ray: pip install 'delf_retrieval[ray]' (or 'ray[default]')"
        ) from error
    return ray


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
    ray = import_ray()
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


def local_cpus(num_workers: int | None, cpus_per_worker: float) -> int | None:
    """CPUs for a ``"local"`` Ray start that holds ``num_workers`` actors (None: all)."""
    if num_workers is None:
        return None
    return max(1, int(np.ceil(num_workers * cpus_per_worker)))


def cluster_resources() -> dict[str, float]:
    """Total resources of the connected cluster (``{"CPU": 4.0, "GPU": 1.0, ...}``)."""
    return dict(import_ray().cluster_resources())


def node_resources() -> list[dict[str, float]]:
    """Total resources of each live node."""
    return [dict(node["Resources"]) for node in import_ray().nodes() if node.get("Alive")]


def capacity(nodes: list[dict[str, float]], cpus: float, gpus: float) -> int:
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


def where() -> dict[str, Any]:
    """Process id and node of the calling actor (for logs, tests and failure messages)."""
    ray = import_ray()
    return {
        "pid": os.getpid(),
        "node": ray.get_runtime_context().get_node_id(),
        "host": socket.gethostname(),
    }


def wait_started(ray: Any, actors: list[Any], timeout: float, what: str) -> list[dict[str, Any]]:
    """``describe()`` of every new actor; a clear error instead of waiting forever when
    the cluster cannot place them (resources held by other actors)."""
    try:
        return ray.get([actor.describe.remote() for actor in actors], timeout=timeout)
    except ray.exceptions.GetTimeoutError as error:
        raise RayClusterError(
            f"{len(actors)} {what} did not start within {timeout:g} s: the Ray cluster has no "
            f"room for them now ({ray.available_resources()} free); stop other actors or ask for less"
        ) from error


def kill_all(actors: list[Any]) -> None:
    """Kill ``actors`` without restart (the ones already gone are skipped)."""
    if not actors:
        return
    ray = import_ray()
    for actor in actors:
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)
