"""Errors a user can act on (the CLI prints their message on one line and exits 2).

``ValueError`` (bad input), ``OSError`` (files, disk space) and ``ImportError`` (a missing
optional extra) are treated the same way; the classes here cover the rest.
"""

from __future__ import annotations


class DelfError(Exception):
    """Base of the errors below: the run cannot go on, and the message says why."""


class RayClusterError(DelfError, RuntimeError):
    """The Ray cluster cannot start or keep the workers a run needs."""


class WorkersLostError(RayClusterError):
    """Every Ray worker died; the finished batches are kept and a rerun resumes."""
