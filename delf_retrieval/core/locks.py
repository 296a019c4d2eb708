"""Advisory file locks (``fcntl.flock``) that keep processes sharing a feature store apart.

A lock is held as long as its open file is; the operating system drops it when the
process dies, so a killed run never leaves a stale lock behind. Where ``fcntl`` does not
exist (Windows) the locks do nothing.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from delf_retrieval.core.errors import DelfError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LockedError", "exclusive_lock", "release", "shared_lock", "try_exclusive_lock"]


class LockedError(DelfError):
    """Another process holds the lock and the caller chose not to wait."""


def _open(path: Path) -> IO[str]:
    return open(path, "a+", encoding="utf-8")  # created if missing, never truncated


def _holder(handle: IO[str]) -> str:
    """Who holds an exclusive lock, as its holder wrote it (``process 123 on host``)."""
    try:
        handle.seek(0)
        info = json.loads(handle.read() or "{}")
    except (OSError, ValueError):
        return "another process"
    since = time.strftime("%H:%M:%S", time.localtime(info.get("since", 0)))
    return f"process {info.get('pid', '?')} on {info.get('host', '?')} (since {since})"


def exclusive_lock(
    path: str | os.PathLike,
    *,
    wait: bool = True,
    what: str = "this resource",
    notify: Callable[[str], None] | None = None,
) -> IO[str]:
    """Hold an exclusive lock on ``path`` (created if missing); returns the open file,
    which :func:`release` closes.

    When another process holds it: with ``wait``, ``notify`` (default: print to stderr)
    gets one line saying who holds it and the call blocks until it is free; without,
    :class:`LockedError` says who holds it. The holder's pid, host and start time are
    written into the file for those messages.
    """
    handle = _open(Path(path))
    if fcntl is None:
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(handle)
        if not wait:
            handle.close()
            raise LockedError(f"{what} is in use by {holder}; wait for it to finish or use another folder") from None
        (notify or _print)(f"waiting: {what} is in use by {holder} (Ctrl-C to stop)")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except BaseException:
            handle.close()
            raise
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
    handle.flush()
    return handle


def try_exclusive_lock(path: str | os.PathLike) -> IO[str] | None:
    """An exclusive lock on ``path`` if nobody holds any lock on it now, else None."""
    handle = _open(Path(path))
    if fcntl is None:
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def shared_lock(path: str | os.PathLike) -> IO[str] | None:
    """A shared lock on ``path`` (created if missing; blocks only while someone holds it
    exclusively). Raises FileNotFoundError when the folder of ``path`` is gone.

    On a read-only file system (a store attached as a Kaggle dataset) the file is opened
    for reading, or, when it does not exist there, None is returned: nobody can delete
    anything on such a disk, so no lock is needed.
    """
    path = Path(path)
    try:
        handle = _open(path)
    except OSError as error:
        if error.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        try:
            handle = open(path, encoding="utf-8")
        except FileNotFoundError:
            if path.parent.is_dir():
                return None
            raise
    if fcntl is not None:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
        except BaseException:
            handle.close()
            raise
    return handle


def release(handle: IO[str] | None) -> None:
    """Drop a lock taken by the functions above (closing its file)."""
    if handle is not None and not handle.closed:
        handle.close()


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
