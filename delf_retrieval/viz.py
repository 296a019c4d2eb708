"""Pictures of matches, neighbours and predictions (matplotlib, no display needed).

Every plotting function builds a :class:`matplotlib.figure.Figure` directly, without
``pyplot``: nothing is shown, no global figure list grows, and the functions work under
any backend (Agg included). Each returns the figure and, when ``path`` is given, also
writes it there (PNG unless the suffix names another format) at the figure's own dpi, so
the saved picture is ``figsize * dpi`` pixels. In a notebook, run ``%matplotlib inline``
once and a returned figure displays itself.

Images are RGB ``[H, W, 3]`` or grayscale ``[H, W]``: uint8 in 0..255, or float in
0..1 (clipped). Keypoints are ``(x, y)`` pixels of the image they belong to, x to the
right and y downwards, pixel centres at integer coordinates (the package convention).

Colours: green = inlier / correct, red = outlier / wrong, blue = unverified match.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from PIL import Image

__all__ = [
    "CORRECT_COLOR",
    "OUTLIER_COLOR",
    "UNVERIFIED_COLOR",
    "figure_to_rgb",
    "plot_matches",
    "plot_neighbours",
    "plot_prediction_gallery",
    "prediction_extremes",
]

CORRECT_COLOR = (0.0, 0.8, 0.0)  # inlier lines, frames of correct results
OUTLIER_COLOR = (0.9, 0.0, 0.0)  # outlier lines, frames of wrong results
UNVERIFIED_COLOR = (0.0, 0.6, 1.0)  # matches drawn without an inlier mask
_NEUTRAL_COLOR = (0.55, 0.55, 0.55)  # frames when correctness is unknown
_QUERY_COLOR = (0.1, 0.2, 0.6)
_FRAME_WIDTH = 4.0  # points

_PANEL_INCHES = 3.0
_MARGIN_INCHES = 0.05
_GAP_INCHES = 0.15  # between panels of one row

GALLERY_KEYS = ("query_image", "landmark_id", "confidence", "correct")
EXTREME_GROUPS = (
    "most confident correct",
    "least confident correct",
    "most confident wrong",
    "least confident wrong",
)

PathLike = str | os.PathLike


# --- matches ---------------------------------------------------------------------------------


def plot_matches(
    image1: np.ndarray,
    keypoints1: np.ndarray,
    image2: np.ndarray,
    keypoints2: np.ndarray,
    matches: np.ndarray,
    inliers: np.ndarray | None = None,
    *,
    max_lines: int | None = 200,
    title: str | None = None,
    path: PathLike | None = None,
    width: float = 12.0,
    dpi: int = 100,
) -> Figure:
    """Two photos side by side with a line between the keypoints of every match.

    Parameters
    ----------
    image1, image2 : uint8 or float array [H, W, 3] or [H, W]
        The photos (heights may differ; the shorter is padded with white below).
    keypoints1 : float array [N1, 2]
        ``(x, y)`` pixels in ``image1``.
    keypoints2 : float array [N2, 2]
        ``(x, y)`` pixels in ``image2``.
    matches : int array [M, 2]
        ``(index into keypoints1, index into keypoints2)`` per match, as returned by
        :func:`delf_retrieval.matching.verify.putative_matches`.
    inliers : bool array [M] or None
        RANSAC verdict per match: inliers are drawn green and bold, outliers red, thin
        and faded. ``None`` draws every match blue (not verified).
    max_lines : int or None
        At most this many lines are drawn (``None``: all). Inliers are kept first; each
        group is thinned to evenly spaced matches, so the choice is deterministic.
    title : str or None
        First title line; the second gives the counts (matches, inliers, lines shown).
    path : str or path-like or None
        Where to save the picture.
    width : float
        Figure width in inches; the height follows the photos' aspect ratio.
    dpi : int
        Dots per inch of the figure and of the saved picture.

    Returns
    -------
    matplotlib.figure.Figure
        One axes holding the side-by-side image and the line collections (outliers
        first, inliers on top).
    """
    rgb1 = _as_rgb(image1, "image1")
    rgb2 = _as_rgb(image2, "image2")
    points1 = _as_points(keypoints1, "keypoints1")
    points2 = _as_points(keypoints2, "keypoints2")
    pairs = _as_matches(matches, len(points1), len(points2))
    mask = _as_mask(inliers, len(pairs), "inliers")
    if max_lines is not None and max_lines < 0:
        raise ValueError(f"max_lines must be >= 0 or None, got {max_lines}")
    _check_size(width, dpi)

    canvas = _side_by_side(rgb1, rgb2)
    height_px, width_px = canvas.shape[:2]
    band = _title_band(1 if title is None else 2, 11)
    image_inches = width * height_px / width_px
    figure = _blank_figure((width, image_inches + band), dpi)
    axes = figure.add_axes((0.0, 0.0, 1.0, 1.0 - band / figure.get_figheight()))
    _show_image(axes, canvas)

    offset = np.array([rgb1.shape[1], 0.0], np.float64)
    if mask is None:
        groups = [(_evenly_spaced(np.arange(len(pairs)), max_lines), UNVERIFIED_COLOR, 1.0, 0.8)]
    else:
        kept_inliers = _evenly_spaced(np.flatnonzero(mask), max_lines)
        room = None if max_lines is None else max_lines - len(kept_inliers)
        kept_outliers = _evenly_spaced(np.flatnonzero(~mask), room)
        groups = [
            (kept_outliers, OUTLIER_COLOR, 0.8, 0.6),
            (kept_inliers, CORRECT_COLOR, 1.2, 0.95),
        ]
    shown = 0
    for indices, color, linewidth, alpha in groups:
        if len(indices) == 0:
            continue
        starts = points1[pairs[indices, 0]]
        ends = points2[pairs[indices, 1]] + offset
        lines = LineCollection(
            np.stack([starts, ends], axis=1),
            colors=[color],
            linewidths=linewidth,
            alpha=alpha,
        )
        axes.add_collection(lines, autolim=False)
        shown += len(indices)

    counts = f"{len(pairs)} matches"
    counts += " (not verified)" if mask is None else f", {int(mask.sum())} inliers"
    if shown < len(pairs):
        counts += f", {shown} drawn"
    axes.set_title(counts if title is None else f"{title}\n{counts}", fontsize=11)
    return _finish(figure, path)


# --- neighbours ------------------------------------------------------------------------------


def plot_neighbours(
    query_image: np.ndarray,
    neighbour_images: Sequence[np.ndarray | None],
    titles: Sequence[str] | None = None,
    *,
    query_title: str | None = None,
    correct: Sequence[bool] | None = None,
    path: PathLike | None = None,
    panel_size: float = _PANEL_INCHES,
    dpi: int = 100,
) -> Figure:
    """A query photo and its nearest neighbours in one row, best first.

    Parameters
    ----------
    query_image : uint8 or float array [H, W, 3] or [H, W]
        The query photo (leftmost panel, dark blue frame).
    neighbour_images : sequence of arrays or None, length K
        Neighbour photos, best first. ``None`` (an image that could not be read) shows a
        grey "image unavailable" panel.
    titles : sequence of str, length K, or None
        One title per neighbour, e.g. ``"1234 cos 0.81 inl 37"``.
    query_title : str or None
        Title of the query panel (default ``"query"``).
    correct : sequence of bool, length K, or None
        Frames neighbours green (same landmark as the query) or red (different); grey
        frames when None.
    path : str or path-like or None
        Where to save the picture.
    panel_size : float
        Width and picture height of each panel, in inches.
    dpi : int
        Dots per inch of the figure and of the saved picture.

    Returns
    -------
    matplotlib.figure.Figure
        ``1 + K`` axes in one row, query first.
    """
    query = _as_rgb(query_image, "query_image")
    neighbours = [
        None if image is None else _as_rgb(image, f"neighbour_images[{i}]")
        for i, image in enumerate(neighbour_images)
    ]
    count = len(neighbours)
    titles = _as_list(titles, count, "titles")
    flags = _as_list(correct, count, "correct")
    _check_size(panel_size, dpi)

    labels = ["query" if query_title is None else str(query_title)]
    labels += [f"#{k + 1}" for k in range(count)] if titles is None else [str(t) for t in titles]
    title_lines = max(label.count("\n") + 1 for label in labels)
    figure, grid = _panel_grid(1, count + 1, panel_size, _title_band(title_lines, 9), dpi)
    axes = [figure.add_subplot(grid[0, column]) for column in range(count + 1)]
    _framed_panel(axes[0], query, labels[0], _QUERY_COLOR)
    for k, image in enumerate(neighbours):
        color = _NEUTRAL_COLOR if flags is None else _verdict_color(flags[k])
        _framed_panel(axes[k + 1], image, labels[k + 1], color)
    return _finish(figure, path)


# --- prediction gallery ----------------------------------------------------------------------


def plot_prediction_gallery(
    rows: Sequence[Mapping[str, Any]],
    *,
    columns: int = 4,
    path: PathLike | None = None,
    panel_size: float = 2.5,
    dpi: int = 100,
) -> Figure:
    """A grid of recognition predictions, each framed green (correct) or red (wrong).

    Parameters
    ----------
    rows : sequence of mappings
        One per prediction, with keys

        * ``query_image``: uint8 or float array [H, W, 3] or [H, W];
        * ``landmark_id``: the predicted landmark (str or int; None for no prediction);
        * ``confidence``: float;
        * ``correct``: bool;
        * ``train_image`` (optional): the best train image of the predicted landmark,
          shown to the right of the query (None or missing: no second panel);
        * ``query_id`` (optional): shown in the title;
        * ``caption`` (optional): a first title line, e.g. ``"most confident wrong"``.
    columns : int
        Predictions per grid row.
    path : str or path-like or None
        Where to save the picture.
    panel_size : float
        Width and picture height of each panel, in inches.
    dpi : int
        Dots per inch of the figure and of the saved picture.

    Returns
    -------
    matplotlib.figure.Figure
        A grid of ``ceil(len(rows) / columns)`` rows; each prediction takes one panel,
        or two when any row has a ``train_image``. No rows give a small figure saying
        so.
    """
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    _check_size(panel_size, dpi)
    items = [_gallery_item(row, i) for i, row in enumerate(rows)]
    if not items:
        figure = _blank_figure((4.0, 1.0), dpi)
        figure.text(0.5, 0.5, "no predictions to show", ha="center", va="center")
        return _finish(figure, path)

    per_item = 2 if any(item["train_image"] is not None for item in items) else 1
    grid_rows = math.ceil(len(items) / columns)
    grid_columns = min(len(items), columns) * per_item
    title_lines = max(item["title"].count("\n") + 1 for item in items)
    band = _title_band(title_lines, 9)
    figure, grid = _panel_grid(grid_rows, grid_columns, panel_size, band, dpi)
    for i, item in enumerate(items):
        row, column = divmod(i, columns)
        color = _verdict_color(item["correct"])
        axes = figure.add_subplot(grid[row, column * per_item])
        _framed_panel(axes, item["query_image"], item["title"], color)
        if per_item == 2:
            axes = figure.add_subplot(grid[row, column * per_item + 1])
            if item["train_image"] is None:
                axes.set_axis_off()
            else:
                _framed_panel(axes, item["train_image"], "best train image", color)
    return _finish(figure, path)


def prediction_extremes(
    confidence: np.ndarray, correct: np.ndarray, per_group: int = 2
) -> dict[str, np.ndarray]:
    """Pick the most and least confident correct and wrong predictions.

    Parameters
    ----------
    confidence : float array [Q]
        Confidence of each query's prediction; NaN (no prediction) puts the query in no
        group.
    correct : bool array [Q]
        Whether each prediction is right.
    per_group : int
        At most this many queries per group.

    Returns
    -------
    dict of str -> int64 array
        Keys, in this order: ``"most confident correct"``, ``"least confident
        correct"``, ``"most confident wrong"``, ``"least confident wrong"``; values are
        indices into the inputs, the most confident first in "most" groups and the least
        confident first in "least" groups. A query is never in both groups of its
        verdict; ties keep input order.
    """
    scores = np.asarray(confidence, dtype=np.float64)
    verdicts = np.asarray(correct)
    if scores.ndim != 1 or verdicts.shape != scores.shape:
        raise ValueError(
            f"confidence and correct must be 1-D of one length, got shapes {scores.shape} "
            f"and {verdicts.shape}"
        )
    if verdicts.size and verdicts.dtype != np.bool_:
        raise ValueError(f"correct must be boolean, got dtype {verdicts.dtype}")
    if per_group < 0:
        raise ValueError(f"per_group must be >= 0, got {per_group}")
    result: dict[str, np.ndarray] = {}
    for verdict, word in ((True, "correct"), (False, "wrong")):
        members = np.flatnonzero((verdicts == verdict) & np.isfinite(scores))
        descending = members[np.argsort(-scores[members], kind="stable")]
        most = descending[:per_group]
        rest = descending[len(most) :]
        ascending = rest[np.argsort(scores[rest], kind="stable")]
        result[f"most confident {word}"] = most.astype(np.int64)
        result[f"least confident {word}"] = ascending[:per_group].astype(np.int64)
    return {name: result[name] for name in EXTREME_GROUPS}


# --- figure helpers --------------------------------------------------------------------------


def figure_to_rgb(figure: Figure) -> np.ndarray:
    """Render ``figure`` as it would be saved: uint8 ``[H, W, 3]``, H, W = size * dpi.

    The figure is drawn through an in-memory PNG at its own dpi; it is not modified.
    """

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=figure.dpi)
    buffer.seek(0)
    with Image.open(buffer) as picture:
        return np.asarray(picture.convert("RGB"), dtype=np.uint8).copy()


def _finish(figure: Figure, path: PathLike | None) -> Figure:
    if path is not None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(target, format=target.suffix[1:].lower() or "png", dpi=figure.dpi)
    return figure


def _blank_figure(size: tuple[float, float], dpi: int) -> Figure:
    """A white figure of whole pixels: ``int(size * dpi)`` is what Agg renders."""
    # A hair above a whole number keeps the truncation from losing a pixel to rounding.
    figure = Figure(
        figsize=[(max(1, round(inches * dpi)) + 0.01) / dpi for inches in size], dpi=dpi
    )
    figure.set_facecolor("white")
    return figure


def _title_band(lines: int, fontsize: float) -> float:
    """Inches above a picture that hold ``lines`` title lines of ``fontsize`` points."""
    return 0.12 + lines * fontsize * 1.4 / 72.0


def _panel_grid(rows: int, columns: int, panel: float, band: float, dpi: int):
    """A figure and grid whose cells are ``panel`` inches square with ``band`` above each."""
    width = 2 * _MARGIN_INCHES + columns * panel + (columns - 1) * _GAP_INCHES
    height = _MARGIN_INCHES + rows * (band + panel)
    figure = _blank_figure((width, height), dpi)
    width, height = figure.get_size_inches()
    # Grid spacing is a fraction of the mean cell size: these give the sizes above exactly.
    grid = figure.add_gridspec(
        rows,
        columns,
        left=_MARGIN_INCHES / width,
        right=1.0 - _MARGIN_INCHES / width,
        bottom=_MARGIN_INCHES / height,
        top=1.0 - band / height,
        wspace=_GAP_INCHES / panel,
        hspace=band / panel,
    )
    return figure, grid


def _show_image(axes: Axes, image: np.ndarray) -> None:
    height, width = image.shape[:2]
    axes.imshow(image, interpolation="antialiased")
    axes.set_xlim(-0.5, width - 0.5)
    axes.set_ylim(height - 0.5, -0.5)
    axes.set_axis_off()


def _framed_panel(axes: Axes, image: np.ndarray | None, title: str, color: tuple) -> None:
    """One picture with a coloured frame (or a grey placeholder) and a title."""
    if image is None:
        axes.set_facecolor((0.85, 0.85, 0.85))
        axes.text(0.5, 0.5, "image unavailable", ha="center", va="center", fontsize=9)
    else:
        axes.imshow(image, interpolation="antialiased")
    axes.set_xticks([])
    axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(_FRAME_WIDTH)
    axes.set_title(title, fontsize=9)


def _verdict_color(flag: bool) -> tuple:
    return CORRECT_COLOR if flag else OUTLIER_COLOR


def _gallery_item(row: Mapping[str, Any], index: int) -> dict[str, Any]:
    if not isinstance(row, Mapping):
        raise ValueError(f"rows[{index}] must be a mapping, got {type(row).__name__}")
    missing = [key for key in GALLERY_KEYS if key not in row]
    if missing:
        raise ValueError(f"rows[{index}] lacks key(s) {missing} (needs {list(GALLERY_KEYS)})")
    confidence = float(row["confidence"])
    landmark = row["landmark_id"]
    prediction = "no prediction" if landmark is None else f"-> {landmark} conf {confidence:.2f}"
    query_id = row.get("query_id")
    lines = [str(row["caption"])] if row.get("caption") else []
    lines.append(prediction if query_id is None else f"{query_id} {prediction}")
    train = row.get("train_image")
    return {
        "query_image": _as_rgb(row["query_image"], f"rows[{index}]['query_image']"),
        "train_image": None if train is None else _as_rgb(train, f"rows[{index}]['train_image']"),
        "correct": bool(row["correct"]),
        "title": "\n".join(lines),
    }


# --- input checks ----------------------------------------------------------------------------


def _as_rgb(image: Any, name: str) -> np.ndarray:
    """RGB uint8 [H, W, 3] from uint8/int, float in 0..1, or bool; gray or RGBA accepted."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"{name} must be [H, W], [H, W, 3] or [H, W, 4], got {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} has no pixels (shape {array.shape})")
    array = array[:, :, :3]
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        values = np.clip(np.nan_to_num(array.astype(np.float64)), 0.0, 1.0)
        return (values * 255.0 + 0.5).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        return np.clip(array, 0, 255).astype(np.uint8)
    raise ValueError(f"{name} must hold numbers, got dtype {array.dtype}")


def _as_points(points: Any, name: str) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 2), np.float64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"{name} must be [N, 2] (x, y), got shape {array.shape}")
    return array


def _as_matches(matches: Any, count1: int, count2: int) -> np.ndarray:
    array = np.asarray(matches)
    if array.size == 0:
        return np.zeros((0, 2), np.int64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"matches must be [M, 2], got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"matches must hold integer indices, got dtype {array.dtype}")
    array = array.astype(np.int64)
    for column, count, name in ((0, count1, "keypoints1"), (1, count2, "keypoints2")):
        if array[:, column].min() < 0 or array[:, column].max() >= count:
            raise ValueError(f"matches[:, {column}] must index {name} (0..{count - 1})")
    return array


def _as_mask(mask: Any, length: int, name: str) -> np.ndarray | None:
    if mask is None:
        return None
    array = np.asarray(mask)
    if array.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {array.shape}")
    if length and array.dtype != np.bool_:
        raise ValueError(f"{name} must be boolean, got dtype {array.dtype}")
    return array.astype(bool)


def _as_list(values: Sequence[Any] | None, length: int, name: str) -> list[Any] | None:
    if values is None:
        return None
    items = list(values)
    if len(items) != length:
        raise ValueError(f"{name} needs {length} entries (one per neighbour), got {len(items)}")
    return items


def _check_size(inches: float, dpi: int) -> None:
    if not inches > 0 or not dpi > 0:
        raise ValueError(f"figure size and dpi must be positive, got {inches} in, {dpi} dpi")


def _side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``left`` then ``right`` on one white canvas [max(H1, H2), W1 + W2, 3]."""
    height = max(left.shape[0], right.shape[0])
    canvas = np.full((height, left.shape[1] + right.shape[1], 3), 255, np.uint8)
    canvas[: left.shape[0], : left.shape[1]] = left
    canvas[: right.shape[0], left.shape[1] :] = right
    return canvas


def _evenly_spaced(indices: np.ndarray, limit: int | None) -> np.ndarray:
    """At most ``limit`` of ``indices``, evenly spaced, in their order."""
    if limit is None or len(indices) <= limit:
        return indices
    if limit <= 0:
        return indices[:0]
    return indices[(np.arange(limit) * len(indices)) // limit]


def plot_reliability(
    counts: np.ndarray,
    accuracy: np.ndarray,
    mean_confidence: np.ndarray,
    *,
    title: str = "",
    path: PathLike | None = None,
    dpi: int = 100,
) -> Figure:
    """Reliability diagram of confidences that are probabilities, from equal-width bins.

    Parameters
    ----------
    counts : int [B] answers per bin (bin ``b`` covers ``[b/B, (b+1)/B)``).
    accuracy : float [B] fraction right per bin (NaN: empty bin).
    mean_confidence : float [B] mean confidence per bin (NaN: empty bin).
    title : text above the plot (e.g. the ECE).

    Returns
    -------
    Figure: bars of accuracy per bin (green), the bins' mean confidence (red dots), the
    diagonal of perfect calibration, and a strip of answer counts below.
    """
    bins = len(counts)
    edges = np.arange(bins) / bins
    figure = _blank_figure((5.0, 5.6), dpi)
    grid = figure.add_gridspec(2, 1, height_ratios=(4, 1), hspace=0.08)
    top = figure.add_subplot(grid[0])
    used = np.asarray(counts) > 0
    top.bar(edges[used], np.asarray(accuracy)[used], width=1.0 / bins, align="edge", color="#4caf50",
            edgecolor="black", linewidth=0.6, label="fraction right")
    top.scatter(np.asarray(mean_confidence)[used], np.asarray(accuracy)[used], color="#d32f2f", zorder=3, s=18,
                label="bin: (mean confidence, fraction right)")
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="calibrated")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="fraction of answers right", title=title)
    top.tick_params(labelbottom=False)
    top.legend(loc="upper left", fontsize=8)
    bottom = figure.add_subplot(grid[1], sharex=top)
    bottom.bar(edges, counts, width=1.0 / bins, align="edge", color="#90a4ae", edgecolor="black", linewidth=0.6)
    bottom.set(xlabel="confidence (probability that the answer is right)", ylabel="answers")
    return _finish(figure, path)
