"""Find the GLDv2 competition attached to a Kaggle notebook, by its files.

Kaggle mounts an attached competition at ``/kaggle/input/<slug>``. The Google Landmark
competitions lay their data out in a few ways, told apart here by the files themselves
(the folder may be renamed, or a copy attached as a dataset):

============================  =================================================================
competition (slug)            files
============================  =================================================================
landmark-recognition-2020,    ``train.csv`` (id, landmark_id), ``sample_submission.csv``
landmark-recognition-2021     (id, landmarks), ``train/`` and ``test/`` as ``a/b/c/<id>.jpg``
landmark-recognition-2019     the same CSVs (``train.csv`` also has ``url``); the photos came
                              as GLDv2 tar files, so ``train/`` and ``test/`` may be absent
landmark-retrieval-2021       ``sample_submission.csv`` (id, images), ``index/``, ``test/``,
                              ``train/``, ``train.csv``; no ``index.csv``
landmark-retrieval-2019       ``index.csv``, ``test.csv``, ``sample_submission.csv`` (id,
                              images); photos as GLDv2 tar files
landmark-retrieval-2020       ``index/``, ``test/``, ``train/``, ``train.csv`` and no
                              ``sample_submission.csv``: it scored a submitted model, not a
                              CSV, so it cannot be used here
============================  =================================================================

:func:`find_competition` returns the one competition of the wanted kind, or raises
:class:`CompetitionError` with a message saying what was found and what to do, so that a
notebook stops instead of silently running on other data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from delf_retrieval.core.errors import DelfError
from delf_retrieval.features.images import IMAGE_EXTENSIONS

KAGGLE_INPUT = Path("/kaggle/input")
KINDS = ("recognition", "retrieval")
SUPPORTED = (
    "landmark-recognition-2019/2020/2021 (recognition_submission.ipynb, explore_matches.ipynb), "
    "landmark-retrieval-2019/2021 (retrieval_submission.ipynb)"
)


class CompetitionError(DelfError, ValueError):
    """No usable competition is attached, or it is not the kind a notebook makes."""


@dataclass(frozen=True)
class Competition:
    """One attached competition.

    Attributes
    ----------
    kind : ``"recognition"`` or ``"retrieval"``.
    root : its folder (``/kaggle/input/<slug>``).
    layout : which layout its files match, e.g. ``"recognition 2020/2021"``.
    """

    kind: str
    root: Path
    layout: str

    def data_dir(self, work_dir: str | os.PathLike) -> Path:
        """A folder in the layout :mod:`delf_retrieval` reads.

        The competition folder itself, except for retrieval 2021, which has no
        ``index.csv``: then ``work_dir/kaggle_data`` gets links to every file and folder
        of the competition plus an ``index.csv`` listing the ``index/`` photos.
        """
        if self.kind != "retrieval" or (self.root / "index.csv").is_file():
            return self.root
        view = Path(work_dir) / "kaggle_data"
        view.mkdir(parents=True, exist_ok=True)
        for entry in self.root.iterdir():
            link = view / entry.name
            if not link.exists() and not link.is_symlink():
                link.symlink_to(entry, target_is_directory=entry.is_dir())
        index_csv = view / "index.csv"
        if not index_csv.is_file():
            ids = sorted(
                path.stem
                for path in (self.root / "index").rglob("*")
                if path.suffix.lower() in IMAGE_EXTENSIONS
            )
            tmp = index_csv.with_name(".index.csv.tmp")
            pd.DataFrame({"id": ids}).to_csv(tmp, index=False)
            tmp.replace(index_csv)
        return view


def _columns(csv_path: Path) -> list[str]:
    try:
        return pd.read_csv(csv_path, nrows=0).columns.tolist()
    except (OSError, ValueError, pd.errors.ParserError):
        return []


def identify(folder: str | os.PathLike) -> Competition | None:
    """The competition layout ``folder`` holds, or None for anything else (a dataset of
    models or wheels). Raises CompetitionError for a landmark competition that cannot be
    used (retrieval 2020, photos missing) or a ``sample_submission.csv`` of no known kind."""
    root = Path(folder)
    sample = root / "sample_submission.csv"
    has = {name: (root / name).is_dir() for name in ("train", "test", "index")}
    if not sample.is_file():
        if has["index"] and has["test"] and (root / "train.csv").is_file():
            raise CompetitionError(
                f"{root} is landmark-retrieval-2020, which scored a submitted model, not a "
                f"submission file: it cannot be used here. Supported: {SUPPORTED}"
            )
        return None
    columns = _columns(sample)
    if columns[:2] == ["id", "landmarks"]:
        kind, needed = "recognition", ("train", "test")
        if "landmark_id" not in _columns(root / "train.csv"):
            raise CompetitionError(f"{root} looks like a recognition competition but has no train.csv with id,landmark_id")
        layout = "recognition 2019" if "url" in _columns(root / "train.csv") else "recognition 2020/2021"
    elif columns[:2] == ["id", "images"]:
        kind, needed = "retrieval", ("index", "test")
        layout = "retrieval 2019" if (root / "index.csv").is_file() else "retrieval 2021"
    else:
        raise CompetitionError(
            f"unrecognised competition in {root}: sample_submission.csv has columns {columns}, "
            f"expected id,landmarks (recognition) or id,images (retrieval). Supported: {SUPPORTED}"
        )
    missing = [f"{name}/" for name in needed if not has[name]]
    if missing:
        raise CompetitionError(
            f"{root} ({layout}) holds no photos ({', '.join(missing)} missing): this competition "
            "shipped them as GLDv2 tar files. Unpack them as <folder>/a/b/c/<id>.jpg beside copies "
            "of the CSVs and set DELF_DATA_DIR to that folder"
        )
    return Competition(kind, root, layout)


def find_competition(kind: str, input_root: str | os.PathLike = KAGGLE_INPUT) -> Competition:
    """The one attached competition of ``kind`` below ``input_root``.

    Raises
    ------
    CompetitionError
        When none is attached, only one of the other kind, several of this kind, or a
        folder is a competition that cannot be used (see :func:`identify`).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    root = Path(input_root)
    folders = sorted(path for path in root.iterdir() if path.is_dir()) if root.is_dir() else []
    found = [competition for competition in map(identify, folders) if competition is not None]
    mine = [competition for competition in found if competition.kind == kind]
    if len(mine) == 1:
        return mine[0]
    if len(mine) > 1:
        names = ", ".join(str(c.root) for c in mine)
        raise CompetitionError(f"several {kind} competitions are attached ({names}): set DELF_DATA_DIR to one")
    if found:
        other = found[0]
        raise CompetitionError(
            f"{other.root} is a {other.kind} competition ({other.layout}) but this notebook makes "
            f"{kind} submissions. Supported: {SUPPORTED}"
        )
    listed = ", ".join(path.name for path in folders) or "nothing"
    raise CompetitionError(
        f"no landmark {kind} competition found in {root} (attached: {listed}). "
        f"Attach one of {SUPPORTED}, or set DELF_DATA_DIR to a Kaggle-layout folder"
    )
