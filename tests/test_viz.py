"""Pictures: rendered to PNG, checked for size, content, colours and line counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data as skimage_data
from matplotlib.collections import LineCollection
from PIL import Image

from delf_retrieval.features.images import load_image
from delf_retrieval.viz import (
    CORRECT_COLOR,
    OUTLIER_COLOR,
    figure_to_rgb,
    plot_matches,
    plot_neighbours,
    plot_prediction_gallery,
    prediction_extremes,
)

PHOTOS = Path(skimage_data.__file__).parent


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return load_image(PHOTOS / "astronaut.png")  # 512 x 512


@pytest.fixture(scope="module")
def chelsea() -> np.ndarray:
    return load_image(PHOTOS / "chelsea.png")  # 300 x 451


def green_pixels(rgb: np.ndarray) -> int:
    r, g, b = (rgb[..., c].astype(int) for c in range(3))
    return int(((g > 150) & (r < 80) & (b < 80)).sum())


def red_pixels(rgb: np.ndarray) -> int:
    r, g, b = (rgb[..., c].astype(int) for c in range(3))
    return int(((r > 80) & (g < 40) & (b < 40)).sum())


def saved_size(figure) -> tuple[int, int]:
    """What Agg renders: width and height in pixels, size * dpi truncated."""
    width, height = figure.get_size_inches() * figure.dpi
    return int(width), int(height)


def line_counts(figure) -> list[int]:
    return [
        len(collection.get_segments())
        for collection in figure.axes[0].collections
        if isinstance(collection, LineCollection)
    ]


def black(height: int, width: int) -> np.ndarray:
    return np.zeros((height, width, 3), np.uint8)


# Four matches between two black images: lines at different heights, well inside both.
KP1 = np.array([[10.0, 10.0], [20.0, 25.0], [30.0, 40.0], [40.0, 50.0]])
KP2 = np.array([[15.0, 12.0], [25.0, 20.0], [35.0, 30.0], [45.0, 38.0]])
MATCHES = np.array([[0, 0], [1, 1], [2, 2], [3, 3]])


# --- plot_matches ------------------------------------------------------------------------------


def test_matches_png_has_figure_size_and_real_content(tmp_path, astronaut, chelsea):
    rng = np.random.default_rng(0)
    kp1 = rng.uniform(0, 511, size=(80, 2))
    kp2 = rng.uniform(0, 299, size=(60, 2))
    matches = np.stack([np.arange(60), rng.permutation(60)], axis=1)
    inliers = rng.random(60) < 0.5
    path = tmp_path / "pictures" / "matches.png"
    figure = plot_matches(
        astronaut, kp1, chelsea, kp2, matches, inliers, title="two photos", path=path, dpi=50
    )
    assert path.is_file()
    with Image.open(path) as picture:
        assert picture.size == saved_size(figure)
        pixels = np.asarray(picture.convert("RGB"))
    assert saved_size(figure) == (600, 346)  # 12 in wide; 512 px of 963 px width -> 6.38 in
    assert pixels.std() > 30
    assert figure.axes[0].get_title() == f"two photos\n60 matches, {inliers.sum()} inliers"


def test_side_by_side_canvas_pads_the_shorter_image_with_white():
    red = np.zeros((2, 3, 3), np.uint8)
    red[..., 0] = 255
    gray = np.full((1, 2), 0.5)  # float grayscale in 0..1
    figure = plot_matches(red, np.zeros((0, 2)), gray, np.zeros((0, 2)), np.zeros((0, 2), int))
    canvas = np.asarray(figure.axes[0].images[0].get_array())
    assert canvas.shape == (2, 5, 3)
    np.testing.assert_array_equal(canvas[:, :3], red)
    np.testing.assert_array_equal(canvas[0, 3:], np.full((2, 3), 128))
    np.testing.assert_array_equal(canvas[1, 3:], np.full((2, 3), 255))


def test_lines_join_keypoints_with_image2_shifted_right():
    figure = plot_matches(
        black(60, 80), KP1, black(40, 50), KP2, MATCHES[[3, 0]], np.array([True, False])
    )
    outliers, inliers = figure.axes[0].collections
    np.testing.assert_allclose(outliers.get_segments()[0], [[10, 10], [95, 12]])
    np.testing.assert_allclose(inliers.get_segments()[0], [[40, 50], [125, 38]])


@pytest.mark.parametrize(
    ("inliers", "has_green", "has_red"),
    [
        ([True, True, False, False], True, True),
        ([True, True, True, True], True, False),
        ([False, False, False, False], False, True),
        (None, False, False),  # unverified matches are blue
    ],
)
def test_inliers_green_outliers_red(inliers, has_green, has_red):
    mask = None if inliers is None else np.array(inliers)
    figure = plot_matches(black(60, 80), KP1, black(40, 50), KP2, MATCHES, mask)
    rgb = figure_to_rgb(figure)
    assert (green_pixels(rgb) > 20) == has_green
    assert (red_pixels(rgb) > 20) == has_red
    assert (green_pixels(rgb) == 0) == (not has_green)
    assert (red_pixels(rgb) == 0) == (not has_red)


def test_max_lines_keeps_inliers_first():
    rng = np.random.default_rng(1)
    kp = rng.uniform(0, 99, size=(300, 2))
    matches = np.stack([np.arange(300), np.arange(300)], axis=1)
    inliers = np.zeros(300, bool)
    inliers[::10] = True  # 30 inliers
    image = black(100, 100)

    figure = plot_matches(image, kp, image, kp, matches, inliers, max_lines=50)
    assert line_counts(figure) == [20, 30]  # outliers, then inliers on top
    assert figure.axes[0].get_title() == "300 matches, 30 inliers, 50 drawn"

    assert line_counts(plot_matches(image, kp, image, kp, matches, inliers, max_lines=10)) == [10]
    assert line_counts(plot_matches(image, kp, image, kp, matches, inliers)) == [170, 30]
    assert line_counts(plot_matches(image, kp, image, kp, matches, None, max_lines=None)) == [300]
    assert line_counts(plot_matches(image, kp, image, kp, matches, inliers, max_lines=0)) == []


def test_thinned_lines_are_evenly_spaced():
    kp = np.arange(20, dtype=float)[:, None].repeat(2, axis=1)
    matches = np.stack([np.arange(20), np.arange(20)], axis=1)
    figure = plot_matches(black(30, 30), kp, black(30, 30), kp, matches, max_lines=4)
    starts = [segment[0][0] for segment in figure.axes[0].collections[0].get_segments()]
    assert starts == [0.0, 5.0, 10.0, 15.0]


def test_no_matches_gives_a_picture_without_lines():
    figure = plot_matches(black(20, 20), [], black(10, 10), [], np.zeros((0, 2), int), [])
    assert line_counts(figure) == []
    assert figure.axes[0].get_title() == "0 matches, 0 inliers"


def test_inputs_are_not_modified():
    kp1, kp2, matches = KP1.copy(), KP2.copy(), MATCHES.copy()
    mask = np.array([True, False, True, False])
    image = black(60, 80)
    plot_matches(image, kp1, image, kp2, matches, mask)
    np.testing.assert_array_equal(kp1, KP1)
    np.testing.assert_array_equal(kp2, KP2)
    np.testing.assert_array_equal(matches, MATCHES)
    np.testing.assert_array_equal(mask, [True, False, True, False])
    assert not image.any()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"matches": np.array([[0, 4]])}, "index keypoints2"),
        ({"matches": np.array([[-1, 0]])}, "index keypoints1"),
        ({"matches": np.array([0, 1])}, r"\[M, 2\]"),
        ({"matches": np.array([[0.0, 1.0]])}, "integer"),
        ({"inliers": np.array([True])}, "shape"),
        ({"inliers": np.array([1, 0, 1, 0])}, "boolean"),
        ({"image1": np.zeros((5, 5, 2))}, "image1"),
        ({"image2": np.zeros((0, 5, 3))}, "no pixels"),
        ({"keypoints1": np.zeros((4, 3))}, "keypoints1"),
        ({"max_lines": -1}, "max_lines"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    arguments = {
        "image1": black(60, 80),
        "keypoints1": KP1,
        "image2": black(40, 50),
        "keypoints2": KP2,
        "matches": MATCHES,
        "inliers": None,
    }
    arguments.update(change)
    max_lines = arguments.pop("max_lines", 200)
    with pytest.raises(ValueError, match=message):
        plot_matches(**arguments, max_lines=max_lines)


# --- plot_neighbours ---------------------------------------------------------------------------


def test_neighbours_png_titles_and_frames(tmp_path, astronaut, chelsea):
    path = tmp_path / "neighbours.png"
    titles = ["1234 cos 0.81 inl 37", "77 cos 0.52 inl 4", "1234 cos 0.50 inl 20"]
    figure = plot_neighbours(
        astronaut,
        [chelsea, astronaut[::2, ::3], None],
        titles,
        query_title="query abc",
        correct=[True, False, True],
        path=path,
        dpi=40,
    )
    with Image.open(path) as picture:
        assert picture.size == saved_size(figure)
        assert np.asarray(picture.convert("RGB")).std() > 30
    assert [axes.get_title() for axes in figure.axes] == ["query abc", *titles]
    frame_colors = [tuple(axes.spines["left"].get_edgecolor()[:3]) for axes in figure.axes[1:]]
    assert frame_colors == [CORRECT_COLOR, OUTLIER_COLOR, CORRECT_COLOR]
    assert [text.get_text() for text in figure.axes[3].texts] == ["image unavailable"]
    assert len(figure.axes[3].images) == 0


@pytest.mark.parametrize(
    ("correct", "has_green", "has_red"), [([True], True, False), ([False], False, True)]
)
def test_neighbour_frame_colour_shows_in_pixels(correct, has_green, has_red):
    gray = np.full((40, 40, 3), 128, np.uint8)
    rgb = figure_to_rgb(plot_neighbours(gray, [gray], ["n"], correct=correct, dpi=50))
    assert (green_pixels(rgb) > 100) == has_green
    assert (red_pixels(rgb) > 100) == has_red
    assert (green_pixels(rgb) == 0) == (not has_green)
    assert (red_pixels(rgb) == 0) == (not has_red)


def test_neighbours_without_titles_or_neighbours():
    gray = np.full((10, 20), 90, np.uint8)
    assert [axes.get_title() for axes in plot_neighbours(gray, [gray, gray]).axes] == [
        "query",
        "#1",
        "#2",
    ]
    assert len(plot_neighbours(gray, []).axes) == 1


def test_two_line_titles_get_a_taller_title_band():
    gray = np.zeros((10, 10), np.uint8)
    one = plot_neighbours(gray, [gray], ["a"], dpi=100)
    two_query = plot_neighbours(gray, [gray], ["a"], query_title="query\n-> 12", dpi=100)
    two_neighbour = plot_neighbours(gray, [gray], ["a\nb"], dpi=100)
    # 9-point lines at 1.4 line spacing: 0.175 in = 17.5 px more per line.
    assert saved_size(two_query)[1] - saved_size(one)[1] in (17, 18)
    assert saved_size(two_neighbour) == saved_size(two_query)
    assert saved_size(one)[0] == saved_size(two_query)[0]


def test_neighbours_need_one_title_and_verdict_each():
    gray = np.zeros((10, 10), np.uint8)
    with pytest.raises(ValueError, match="titles needs 2 entries"):
        plot_neighbours(gray, [gray, gray], ["only one"])
    with pytest.raises(ValueError, match="correct needs 2 entries"):
        plot_neighbours(gray, [gray, gray], correct=[True])


# --- plot_prediction_gallery -------------------------------------------------------------------


def gallery_rows(astronaut: np.ndarray, chelsea: np.ndarray) -> list[dict]:
    return [
        {
            "query_image": astronaut,
            "landmark_id": "12",
            "confidence": 0.912,
            "correct": True,
            "train_image": chelsea,
            "query_id": "q1",
            "caption": "most confident correct",
        },
        {"query_image": chelsea, "landmark_id": None, "confidence": 0.0, "correct": False},
        {"query_image": astronaut, "landmark_id": 7, "confidence": 0.4, "correct": False},
    ]


def test_gallery_grid_titles_frames_and_png(tmp_path, astronaut, chelsea):
    path = tmp_path / "gallery.png"
    figure = plot_prediction_gallery(gallery_rows(astronaut, chelsea), columns=2, path=path, dpi=30)
    with Image.open(path) as picture:
        assert picture.size == saved_size(figure)
        assert np.asarray(picture.convert("RGB")).std() > 30
    # Two grid rows of two predictions; the first has its train image, the others an empty cell.
    titles = [axes.get_title() for axes in figure.axes if axes.get_visible() and axes.axison]
    assert titles == [
        "most confident correct\nq1 -> 12 conf 0.91",
        "best train image",
        "no prediction",
        "-> 7 conf 0.40",
    ]
    assert len(figure.axes) == 6
    assert figure.axes[0].get_gridspec().get_geometry() == (2, 4)
    frames = [tuple(axes.spines["top"].get_edgecolor()[:3]) for axes in figure.axes if axes.axison]
    assert frames == [CORRECT_COLOR, CORRECT_COLOR, OUTLIER_COLOR, OUTLIER_COLOR]


def test_gallery_without_train_images_uses_one_panel_per_prediction(astronaut, chelsea):
    rows = gallery_rows(astronaut, chelsea)[1:]
    figure = plot_prediction_gallery(rows, columns=4)
    assert len(figure.axes) == 2
    assert figure.axes[0].get_gridspec().get_geometry() == (1, 2)


def test_empty_gallery_says_so():
    figure = plot_prediction_gallery([])
    assert figure.axes == []
    assert [text.get_text() for text in figure.texts] == ["no predictions to show"]


def test_gallery_rows_need_their_keys(astronaut):
    with pytest.raises(ValueError, match=r"rows\[0\] lacks key\(s\) \['correct'\]"):
        plot_prediction_gallery([{"query_image": astronaut, "landmark_id": 1, "confidence": 1}])
    with pytest.raises(ValueError, match="columns"):
        plot_prediction_gallery([], columns=0)


# --- prediction_extremes -----------------------------------------------------------------------

CONFIDENCE = np.array([0.9, 0.2, 0.5, 0.7, np.nan, 0.1, 0.3])
CORRECT = np.array([True, True, False, True, True, False, False])


def as_lists(groups: dict[str, np.ndarray]) -> dict[str, list[int]]:
    return {name: indices.tolist() for name, indices in groups.items()}


def test_extremes_one_per_group():
    assert as_lists(prediction_extremes(CONFIDENCE, CORRECT, per_group=1)) == {
        "most confident correct": [0],
        "least confident correct": [1],
        "most confident wrong": [2],
        "least confident wrong": [5],
    }


def test_extremes_never_repeat_a_query_and_skip_nan():
    assert as_lists(prediction_extremes(CONFIDENCE, CORRECT, per_group=2)) == {
        "most confident correct": [0, 3],
        "least confident correct": [1],
        "most confident wrong": [2, 6],
        "least confident wrong": [5],
    }


def test_extremes_ties_keep_input_order_and_empty_gives_empty():
    ties = prediction_extremes(np.array([0.5, 0.5, 0.5]), np.array([True, True, True]), 1)
    assert as_lists(ties)["most confident correct"] == [0]
    assert as_lists(ties)["least confident correct"] == [1]
    empty = prediction_extremes(np.zeros(0), np.zeros(0, bool))
    assert list(empty) == [
        "most confident correct",
        "least confident correct",
        "most confident wrong",
        "least confident wrong",
    ]
    assert all(indices.dtype == np.int64 and indices.size == 0 for indices in empty.values())


def test_extremes_reject_mismatched_inputs():
    with pytest.raises(ValueError, match="one length"):
        prediction_extremes(np.zeros(3), np.zeros(2, bool))
    with pytest.raises(ValueError, match="boolean"):
        prediction_extremes(np.zeros(2), np.array([1, 0]))


# --- figure_to_rgb -----------------------------------------------------------------------------


def test_figure_to_rgb_matches_the_saved_png(tmp_path):
    gray = np.full((30, 40), 200, np.uint8)
    path = tmp_path / "n.png"
    figure = plot_neighbours(gray, [gray], ["x"], correct=[True], path=path, dpi=40)
    rgb = figure_to_rgb(figure)
    width, height = saved_size(figure)
    assert rgb.shape == (height, width, 3)
    assert rgb.dtype == np.uint8
    with Image.open(path) as picture:
        np.testing.assert_array_equal(rgb, np.asarray(picture.convert("RGB")))
