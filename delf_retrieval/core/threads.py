"""Bound the threads of OpenCV, BLAS/OpenMP and TensorFlow in this process.

A server answering ``C`` requests at once on ``P`` cores gives each request about
``P / C`` threads; without a bound every library starts one thread per core for every
request and ``C * P`` threads fight over ``P`` cores.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import cv2


def available_cores() -> int:
    """Cores this process may run on (the CPU affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def limit_threads(threads: int) -> dict[str, Any]:
    """Limit OpenCV, BLAS/OpenMP (threadpoolctl) and TensorFlow to ``threads`` threads each.

    TensorFlow's settings can only change before its runtime starts; when it has started
    already, its entry says so. Returns what was set, per library.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    from threadpoolctl import threadpool_limits

    done: dict[str, Any] = {}
    cv2.setNumThreads(threads)
    done["opencv"] = cv2.getNumThreads()
    threadpool_limits(limits=threads)  # stays in force for the process
    done["blas/openmp"] = threads
    done["tensorflow"] = _limit_tensorflow(threads)
    return done


def _limit_tensorflow(threads: int) -> str:
    if "tensorflow" not in sys.modules:
        # Not imported yet: the variables reach it when a model loads it later.
        os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
        os.environ["TF_NUM_INTEROP_THREADS"] = "1"
        return f"{threads} (environment, before import)"
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError as error:  # runtime already initialised
        return f"unchanged ({error})"
    return str(threads)


@contextlib.contextmanager
def bounded_blas_threads(limit: int) -> Iterator[None]:
    """Hold BLAS/OpenMP pools to ``limit`` threads inside the block, then restore them.

    For code that is already parallel at an outer level (threads over candidates, Ray
    workers). Uses ``threadpoolctl``; without it, does nothing.
    """
    controller = _threadpool_controller()
    if controller is None:  # pragma: no cover - threadpoolctl comes with scikit-image/scipy stacks
        yield
        return
    with controller.limit(limits=limit):
        yield


def _threadpool_controller():
    """A ``threadpoolctl.ThreadpoolController`` (None without threadpoolctl), kept while
    no module was imported since: making one scans every loaded library (about 2 ms,
    which count_inliers_many would pay per query), and a new BLAS or OpenMP library only
    arrives with a new extension module."""
    key = len(sys.modules)
    if _CONTROLLER.get("key") != key:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover
            return None
        _CONTROLLER.update(key=len(sys.modules), controller=ThreadpoolController())
    return _CONTROLLER["controller"]


_CONTROLLER: dict = {}
