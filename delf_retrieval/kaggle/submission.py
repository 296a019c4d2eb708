"""Kaggle submission and solution files: build, write, read, validate.

Formats (Google Landmark Recognition / Retrieval 2019-2021):

* recognition submission ``id,landmarks``: ``"<landmark_id> <confidence>"`` or empty;
* retrieval submission ``id,images``: up to 100 space-separated index ids, best first;
* ``solution.csv`` ``id,landmarks,Usage``: zero or more space-separated landmark ids
  (empty = the query shows no landmark);
* ``retrieval_solution.csv`` ``id,images,Usage``: space-separated relevant index ids.

``Usage`` is ``Public``, ``Private`` or ``Ignored``. All ids and labels are strings:
files are read with ``dtype=str`` so ids such as ``"0123..."`` keep their zeros.
Confidences are written in positional notation with as many digits as it takes to read
back the same float (never scientific notation), so writing and reading a submission
does not create ties that were not there.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from delf_retrieval.core.atomic import atomic_write_bytes

RECOGNITION_COLUMNS = ("id", "landmarks")
RETRIEVAL_COLUMNS = ("id", "images")
KAGGLE_RETRIEVAL_TOP = 100
USAGES = ("Public", "Private", "Ignored")

_LANDMARK_ID = re.compile(r"[0-9]+")  # ASCII digits: GLDv2 landmark ids are integers
_EXAMPLES = 5

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------- cells


def _text(value: Any) -> str:
    """A CSV cell as text; None and NaN (pandas' empty cell) become ""."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def format_confidence(confidence: float) -> str:
    """Shortest positional text that reads back as the same float64 (``0.5``, ``-1.25``)."""
    value = float(confidence)
    if not math.isfinite(value):
        raise ValueError(f"confidence must be finite, got {confidence!r}")
    return np.format_float_positional(value, unique=True, trim="0")


def _check_token(token: str, what: str) -> str:
    if not token or token != "".join(token.split()) or "," in token:
        raise ValueError(f"{what} {token!r} must be non-empty without spaces or commas")
    return token


def parse_recognition_cell(text: str) -> tuple[str | None, float]:
    """Parse ``"<landmark_id> <confidence>"``; empty text gives ``(None, 0.0)``."""
    text = _text(text).strip()
    if not text:
        return None, 0.0
    tokens = text.split()
    if len(tokens) != 2:
        raise ValueError(f"expected '<landmark_id> <confidence>', got {text!r}")
    try:
        confidence = float(tokens[1])
    except ValueError:
        raise ValueError(f"unparsable confidence in {text!r}") from None
    if not math.isfinite(confidence):
        raise ValueError(f"confidence must be finite in {text!r}")
    return tokens[0], confidence


def parse_retrieval_cell(text: str) -> list[str]:
    """Split space-separated index ids (empty text gives ``[]``)."""
    return _text(text).split()


# ----------------------------------------------------------------------------- build


def _row_ids(predictions: Mapping[str, Any], ids: Iterable[str] | None) -> list[str]:
    if ids is None:
        return [str(key) for key in predictions]
    rows = [str(key) for key in ids]
    duplicated = [key for key, n in Counter(rows).items() if n > 1]
    if duplicated:
        raise ValueError(f"ids repeat: {duplicated[:_EXAMPLES]}")
    unknown = sorted(set(map(str, predictions)) - set(rows))
    if unknown:
        raise ValueError(f"{len(unknown)} predicted ids are not in ids, e.g. {unknown[:_EXAMPLES]}")
    return rows


def recognition_dataframe(
    predictions: Mapping[str, tuple[str | None, float] | None],
    ids: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Recognition predictions as a submission table.

    Parameters
    ----------
    predictions : mapping id -> (label or None, confidence) or None
        One prediction per query; a None label (or entry) writes an empty cell.
    ids : iterable of str or None
        Row ids in order (typically ``sample_submission.csv``'s); ids without a prediction
        get an empty cell, predictions for other ids raise ``ValueError``. None writes the
        predictions' ids in their order.

    Returns
    -------
    DataFrame with string columns ``id``, ``landmarks``.
    """
    rows = _row_ids(predictions, ids)
    lookup = {str(key): value for key, value in predictions.items()}
    cells = []
    for key in rows:
        entry = lookup.get(key)
        label = None if entry is None else entry[0]
        if label is None or _text(label) == "":
            cells.append("")
            continue
        label = _check_token(str(label), "landmark id")
        cells.append(f"{label} {format_confidence(entry[1])}")
    return pd.DataFrame({"id": rows, "landmarks": cells}, dtype=object)


def retrieval_dataframe(
    predictions: Mapping[str, Sequence[str] | None],
    ids: Iterable[str] | None = None,
    top: int = KAGGLE_RETRIEVAL_TOP,
) -> pd.DataFrame:
    """Retrieval predictions as a submission table.

    Parameters
    ----------
    predictions : mapping id -> sequence of index ids (best first) or None
        Repeated index ids keep their first position only.
    ids : iterable of str or None
        As in :func:`recognition_dataframe`.
    top : int
        Index ids kept per query (Kaggle scores the first 100).

    Returns
    -------
    DataFrame with string columns ``id``, ``images``.
    """
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    rows = _row_ids(predictions, ids)
    lookup = {str(key): value for key, value in predictions.items()}
    cells = []
    for key in rows:
        entry = lookup.get(key)
        if isinstance(entry, str):
            raise ValueError(f"prediction for {key} must be a sequence of ids, not a string")
        unique = dict.fromkeys(_check_token(str(i), "index id") for i in (entry or ()))
        cells.append(" ".join(list(unique)[:top]))
    return pd.DataFrame({"id": rows, "images": cells}, dtype=object)


# ----------------------------------------------------------------------------- write


def write_submission(path: PathLike, frame: pd.DataFrame) -> Path:
    """Write a submission ``frame`` (from :func:`recognition_dataframe` or
    :func:`retrieval_dataframe`) to ``path`` atomically; returns the path written."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = frame.to_csv(index=False, lineterminator="\n")
    return atomic_write_bytes(target, text.encode("utf-8"))


def write_recognition_submission(
    path: PathLike,
    predictions: Mapping[str, tuple[str | None, float] | None],
    ids: Iterable[str] | None = None,
) -> Path:
    """Write ``id,landmarks`` to ``path`` atomically (temporary file, then rename).

    Arguments as :func:`recognition_dataframe`; returns the path written.
    """
    return write_submission(path, recognition_dataframe(predictions, ids))


def write_retrieval_submission(
    path: PathLike,
    predictions: Mapping[str, Sequence[str] | None],
    ids: Iterable[str] | None = None,
    top: int = KAGGLE_RETRIEVAL_TOP,
) -> Path:
    """Write ``id,images`` to ``path`` atomically (temporary file, then rename).

    Arguments as :func:`retrieval_dataframe`; returns the path written.
    """
    return write_submission(path, retrieval_dataframe(predictions, ids, top))


# ----------------------------------------------------------------------------- read


def read_csv_text(path: PathLike) -> pd.DataFrame:
    """Read a Kaggle CSV with every cell as text (empty cells are "")."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty") from None


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [name for name in columns if name not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}; has {list(frame.columns)}")


def parse_recognition_submission(frame: pd.DataFrame) -> dict[str, tuple[str | None, float]]:
    """Recognition submission table -> ``{id: (label or None, confidence)}``.

    Empty cells give ``(None, 0.0)``; malformed cells and repeated ids raise ``ValueError``.
    """
    _require_columns(frame, RECOGNITION_COLUMNS, "recognition submission")
    result: dict[str, tuple[str | None, float]] = {}
    for key, cell in zip(frame["id"], frame["landmarks"], strict=True):
        key = _text(key)
        if key in result:
            raise ValueError(f"id {key} is repeated")
        try:
            result[key] = parse_recognition_cell(cell)
        except ValueError as error:
            raise ValueError(f"row {key}: {error}") from None
    return result


def parse_retrieval_submission(frame: pd.DataFrame) -> dict[str, list[str]]:
    """Retrieval submission table -> ``{id: [index ids]}``; repeated ids raise."""
    _require_columns(frame, RETRIEVAL_COLUMNS, "retrieval submission")
    result: dict[str, list[str]] = {}
    for key, cell in zip(frame["id"], frame["images"], strict=True):
        key = _text(key)
        if key in result:
            raise ValueError(f"id {key} is repeated")
        result[key] = parse_retrieval_cell(cell)
    return result


def read_recognition_submission(path: PathLike) -> dict[str, tuple[str | None, float]]:
    """Read a recognition submission file; see :func:`parse_recognition_submission`."""
    return parse_recognition_submission(read_csv_text(path))


def read_retrieval_submission(path: PathLike) -> dict[str, list[str]]:
    """Read a retrieval submission file; see :func:`parse_retrieval_submission`."""
    return parse_retrieval_submission(read_csv_text(path))


@dataclass(frozen=True)
class Solution:
    """Ground truth of a recognition or retrieval solution file.

    Attributes
    ----------
    truth : dict id -> frozenset of str
        True landmark ids (recognition; empty = non-landmark query) or relevant index ids
        (retrieval), for every row including ignored ones.
    usage : dict id -> str
        ``Public``, ``Private`` or ``Ignored``; empty when the file has no ``Usage``
        column (then every row counts).
    """

    truth: dict[str, frozenset[str]]
    usage: dict[str, str] = field(default_factory=dict)

    @property
    def usages(self) -> list[str]:
        """Scored splits present, in the order ``Public``, ``Private``."""
        present = set(self.usage.values())
        return [name for name in USAGES[:2] if name in present]

    def split(self, usage: str | None = None) -> dict[str, frozenset[str]]:
        """Rows with this ``Usage``; None gives every row not marked ``Ignored``."""
        if usage is None:
            return {k: v for k, v in self.truth.items() if self.usage.get(k) != "Ignored"}
        return {k: v for k, v in self.truth.items() if self.usage.get(k) == usage}


def parse_solution(frame: pd.DataFrame, kind: str) -> Solution:
    """Solution table (``id,landmarks[,Usage]`` or ``id,images[,Usage]``) -> :class:`Solution`."""
    value_column = _columns(kind)[1]
    _require_columns(frame, ("id", value_column), f"{kind} solution")
    has_usage = "Usage" in frame.columns
    usages = frame["Usage"] if has_usage else [""] * len(frame)
    truth: dict[str, frozenset[str]] = {}
    usage: dict[str, str] = {}
    for key, cell, tag in zip(frame["id"], frame[value_column], usages, strict=True):
        key = _text(key)
        if key in truth:
            raise ValueError(f"solution id {key} is repeated")
        truth[key] = frozenset(_text(cell).split())
        if has_usage:
            tag = _text(tag)
            if tag not in USAGES:
                raise ValueError(f"solution id {key} has unknown Usage {tag!r}")
            usage[key] = tag
    return Solution(truth, usage)


def read_recognition_solution(path: PathLike) -> Solution:
    """Read ``solution.csv`` (``id,landmarks,Usage``)."""
    return parse_solution(read_csv_text(path), "recognition")


def read_retrieval_solution(path: PathLike) -> Solution:
    """Read ``retrieval_solution.csv`` (``id,images,Usage``)."""
    return parse_solution(read_csv_text(path), "retrieval")


# ----------------------------------------------------------------------------- validate


def _columns(kind: str) -> tuple[str, str]:
    if kind == "recognition":
        return RECOGNITION_COLUMNS
    if kind == "retrieval":
        return RETRIEVAL_COLUMNS
    raise ValueError(f"kind must be 'recognition' or 'retrieval', got {kind!r}")


def _problem(problems: list[str], keys: list[Any], message: str, show: Any = repr) -> None:
    """Append ``"<n> <message>: <first ids>"`` when ``keys`` is not empty."""
    if keys:
        shown = ", ".join(show(k) for k in keys[:_EXAMPLES])
        more = ", ..." if len(keys) > _EXAMPLES else ""
        problems.append(f"{len(keys)} {message}: {shown}{more}")


def _recognition_cell_problems(rows: list[tuple[str, str]], problems: list[str]) -> None:
    malformed, several, bad_label, bad_confidence, not_finite = [], [], [], [], []
    for key, cell in rows:
        if cell == "":
            continue
        tokens = cell.split(" ")
        if len(tokens) > 2 and len(tokens) % 2 == 0:
            several.append(key)
            continue
        if len(tokens) != 2:
            malformed.append(key)
            continue
        if not _LANDMARK_ID.fullmatch(tokens[0]):
            bad_label.append(key)
        try:
            confidence = float(tokens[1])
        except ValueError:
            bad_confidence.append(key)
            continue
        if not math.isfinite(confidence):
            not_finite.append(key)
    _problem(problems, malformed, "rows are not '<landmark_id> <confidence>'")
    _problem(problems, several, "rows have more than one prediction")
    _problem(problems, bad_label, "rows have an unparsable landmark id")
    _problem(problems, bad_confidence, "rows have an unparsable confidence")
    _problem(problems, not_finite, "rows have a NaN or infinite confidence")


def _retrieval_cell_problems(rows: list[tuple[str, str]], problems: list[str]) -> None:
    too_many = [key for key, cell in rows if len(cell.split()) > KAGGLE_RETRIEVAL_TOP]
    _problem(problems, too_many, f"rows have more than {KAGGLE_RETRIEVAL_TOP} index ids")


def _load(source: PathLike | pd.DataFrame, what: str, problems: list[str]) -> pd.DataFrame | None:
    if isinstance(source, pd.DataFrame):
        return source
    try:
        return read_csv_text(source)
    except (OSError, ValueError, pd.errors.ParserError) as error:
        problems.append(f"cannot read {what}: {error}")
        return None


def validate_submission(
    submission: PathLike | pd.DataFrame,
    sample_submission: PathLike | pd.DataFrame | None,
    kind: str = "recognition",
) -> list[str]:
    """List what would make Kaggle reject or misread a submission.

    Checks the header (exactly ``id,landmarks`` or ``id,images``); ids missing from,
    absent from, or repeated against the sample submission, and empty ids; cells with
    irregular whitespace (leading, trailing or double spaces, which Kaggle's
    ``split(' ')`` turns into empty tokens); for recognition, cells that are not
    ``"<landmark_id> <confidence>"``, hold more than one prediction, or have a
    non-integer landmark id, an unparsable confidence or a NaN/infinite one; for
    retrieval, more than 100 index ids.

    Parameters
    ----------
    submission : path or DataFrame
        The submission.
    sample_submission : path or DataFrame or None
        Gives the expected ids (its ``id`` column); None skips the id set checks.
    kind : {"recognition", "retrieval"}

    Returns
    -------
    problems : list of str
        One human-readable message per kind of problem, naming up to five ids;
        empty when the submission is valid.
    """
    columns = _columns(kind)
    problems: list[str] = []
    frame = _load(submission, "submission", problems)
    expected = None
    if sample_submission is not None:
        sample = _load(sample_submission, "sample submission", problems)
        if sample is not None:
            if "id" not in sample.columns:
                raise ValueError("sample_submission has no 'id' column")
            expected = [_text(key) for key in sample["id"]]
    if frame is None:
        return problems
    if tuple(frame.columns) != columns:
        problems.append(f"columns are {list(frame.columns)}, expected {list(columns)}")
        return problems

    keys = [_text(key) for key in frame["id"]]
    cells = [_text(cell) for cell in frame[columns[1]]]
    empty = [i for i, key in enumerate(keys) if not key]
    _problem(problems, empty, "rows have an empty id, at row numbers", show=str)
    counts = Counter(keys)
    _problem(problems, [k for k, n in counts.items() if n > 1 and k], "ids appear more than once")
    if expected is not None:
        present = set(keys)
        wanted = set(expected)
        _problem(
            problems,
            [k for k in expected if k not in present],
            "ids of the sample submission are missing",
        )
        _problem(
            problems,
            [k for k in dict.fromkeys(keys) if k and k not in wanted],
            "ids are not in the sample submission",
        )
    rows = list(zip(keys, cells, strict=True))
    _problem(
        problems,
        [k for k, cell in rows if cell != " ".join(cell.split())],
        "rows have irregular whitespace",
    )
    regular = [(k, cell) for k, cell in rows if cell == " ".join(cell.split())]
    if kind == "recognition":
        _recognition_cell_problems(regular, problems)
    else:
        _retrieval_cell_problems(regular, problems)
    return problems


def check_submission(
    submission: PathLike | pd.DataFrame,
    sample_submission: PathLike | pd.DataFrame | None,
    kind: str = "recognition",
) -> None:
    """Raise ``ValueError`` listing every problem :func:`validate_submission` finds."""
    problems = validate_submission(submission, sample_submission, kind)
    if problems:
        raise ValueError(f"invalid {kind} submission:\n- " + "\n- ".join(problems))
