"""The one way this package writes a file that readers may see: all or nothing.

A file is written under a temporary name in the same folder, flushed to disk and renamed
over the target (``os.replace`` is atomic on POSIX and Windows), so a killed process
leaves the old file or the new one, never a part. The temporary file is removed when
writing fails.

A target that is a symbolic link is written through: the link stays and the file it
points to is replaced (the temporary file lies beside that file, so the rename stays on
one file system). A target that exists and is not a regular file (a device such as
``/dev/full``, a folder, a pipe) is refused, never replaced by a file.
"""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes", "regular_target", "temporary_name"]


def temporary_name(path: Path) -> Path:
    """Hidden temporary sibling of ``path`` (``.<name>.tmp-<random>``), unique per call."""
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")


def regular_target(path: str | os.PathLike) -> Path:
    """The file a write to ``path`` replaces: ``path`` itself, or the file its symbolic
    link(s) point to. Raises ValueError when that exists and is not a regular file."""
    target = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    if target.exists() and not stat.S_ISREG(target.stat().st_mode):
        kind = "a folder" if target.is_dir() else "not a regular file (a device or a pipe)"
        raise ValueError(f"{path} is {kind}: refusing to replace it with a file; give a file name")
    return target


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(handle)`` on a temporary binary file, then rename it to ``path``.

    Parameters
    ----------
    path : target file; its folder must exist.
    write : writes the content, e.g. ``lambda f: np.save(f, array)``.

    Returns the path of the file written (a link's target for a link).
    """
    target = regular_target(path)
    tmp = temporary_name(target)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda handle: handle.write(data))
