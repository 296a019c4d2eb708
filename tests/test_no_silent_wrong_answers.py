"""Issue 20: no silent wrong answers. Caches follow the CSV, ids stay inside their folder,
inputs are checked before any work, one photo costs bounded memory, and everything a
user can cause exits 2 with one line naming the cause."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import delf_retrieval
from delf_retrieval.cli.main import main
from delf_retrieval.demo.data import build_demo_dataset
from delf_retrieval.features.images import kaggle_image_path, list_images

MODEL = "opencv-sift"


def quiet(_: str) -> None:
    pass


def small_dataset(root: Path, seed: int) -> Path:
    """Three landmarks of two train photos each, one query each and one non-landmark query."""
    build_demo_dataset(
        root,
        seed=seed,
        landmarks=("astronaut", "rocket", "coffee"),
        nonlandmark_queries=("grass",),
        nonlandmark_set=("gravel",),
        train_views=2,
        query_views=1,
        image_size=240,
    )
    return root


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("datasets")
    return small_dataset(folder / "a", 1), small_dataset(folder / "b", 2)


def recognize(data: Path, work: Path) -> delf_retrieval.RunOutput:
    return delf_retrieval.recognize(data, MODEL, output=None, work_dir=work, progress=False, log=quiet)


# --------------------------------------------------------------------------- item 1
@pytest.mark.slow
def test_a_work_dir_searches_only_the_ids_of_the_current_csv(two_datasets, tmp_path):
    """Rows dropped from train.csv, and a second dataset sharing the work dir, change
    nothing: each run answers as with a fresh work dir."""
    a, b = two_datasets
    shared = tmp_path / "shared"
    recognize(a, shared)
    trimmed = tmp_path / "trimmed"
    shutil.copytree(a, trimmed)
    train = pd.read_csv(a / "train.csv", dtype=str)
    train.iloc[::2].to_csv(trimmed / "train.csv", index=False)  # one photo per landmark left

    old = recognize(trimmed, shared)
    fresh = recognize(trimmed, tmp_path / "fresh")
    kept = set(train["id"].iloc[::2])
    assert all(set(neighbours) <= kept for neighbours in old.result.neighbours.values())
    pd.testing.assert_frame_equal(old.submission, fresh.submission)
    assert old.result.neighbours == fresh.result.neighbours

    other = recognize(b, shared)  # the shared test store now holds a's queries too
    alone = recognize(b, tmp_path / "alone")
    pd.testing.assert_frame_equal(other.submission, alone.submission)


# --------------------------------------------------------------------------- CLI helpers
def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of one in-process CLI call."""
    code = main([str(arg) for arg in args])
    return code, capsys.readouterr().err


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def write_csv(path: Path, rows: dict[str, list[str]]) -> None:
    pd.DataFrame(rows).to_csv(path, index=False)


# --------------------------------------------------------------------------- items 6, 8, 13
@pytest.mark.parametrize(
    ("name", "rows", "fragments"),
    [
        # 6: one image, two landmarks: the last one used to win silently.
        ("train.csv", {"id": ["abc1", "abc1"], "landmark_id": ["7", "8"]}, ["'abc1' is listed twice with different landmarks (7 and 8)"]),
        # 6: GLDv2 landmark ids are integers (Arabic-Indic digits are \d but not an integer for Kaggle).
        ("train.csv", {"id": ["abc1"], "landmark_id": ["Eiffel"]}, ["landmark_id 'Eiffel' of image 'abc1' is not an integer"]),
        ("train.csv", {"id": ["abc1"], "landmark_id": ["\u0661\u0662"]}, ["is not an integer"]),
        # 13: a landmark id with a space, a missing landmark_id column, repeated query ids, an index id with a space.
        ("train.csv", {"id": ["abc1"], "landmark_id": ["7 8"]}, ["landmark_id '7 8' of image 'abc1' is not an integer"]),
        ("train.csv", {"id": ["abc1"], "landmark": ["7"]}, ["train.csv lacks column(s) ['landmark_id']"]),
        ("sample_submission.csv", {"id": ["def2", "def2"], "landmarks": ["", ""]}, ["image id 'def2' is listed more than once"]),
        # 8: ids that would leave the data folder.
        ("train.csv", {"id": ["..//etc/passwd"], "landmark_id": ["7"]}, ["image id '..//etc/passwd'", "not allowed"]),
        ("train.csv", {"id": ["abc/../../../../x/img"], "landmark_id": ["7"]}, ["image id 'abc/../../../../x/img'"]),
        ("sample_submission.csv", {"id": ["/abs/x"], "landmarks": [""]}, ["image id '/abs/x'"]),
        ("train.csv", {"id": ["ab\\c1"], "landmark_id": ["7"]}, ["not allowed"]),
        # 1: a header-only train.csv exits 2 whatever the work dir remembers.
        ("train.csv", {"id": [], "landmark_id": []}, ["train.csv lists no image"]),
    ],
)
def test_bad_csv_rows_are_refused_by_recognize_before_any_work(name, rows, fragments, csv_only_data, tmp_path, capsys):
    write_csv(csv_only_data / name, rows)
    work = tmp_path / "work"
    code, err = run_cli(["recognize", csv_only_data, "-o", tmp_path / "s.csv", "--work-dir", work, "--no-progress"], capsys)
    assert code == 2
    assert_one_line_error(err, *fragments)
    assert not work.exists()


def test_a_retrieval_index_id_with_a_space_is_refused_before_any_work(csv_only_data, tmp_path, capsys):
    write_csv(csv_only_data / "index.csv", {"id": ["abc 1"]})
    work = tmp_path / "work"
    code, err = run_cli(["retrieve", csv_only_data, "-o", tmp_path / "s.csv", "--work-dir", work, "--no-progress"], capsys)
    assert code == 2
    assert_one_line_error(err, "image id 'abc 1' contains whitespace")
    assert not work.exists()


def test_ids_never_become_paths_outside_their_folder(tmp_path):
    for bad in ("..//somewhere/secret", "abc/../../../../x/img", "/etc/passwd", "ab\x00c"):
        with pytest.raises(ValueError, match="not allowed"):
            kaggle_image_path(tmp_path, bad)
    write_csv(tmp_path / "train.csv", {"id": ["abc1", "..//somewhere/secret"], "landmark_id": ["1", "2"]})
    with pytest.raises(ValueError, match=r"'\.\.//somewhere/secret' in .*train\.csv is not allowed"):
        list_images(tmp_path / "train.csv")
    assert kaggle_image_path(tmp_path, "a..b") == tmp_path / "a" / "." / "." / "a..b.jpg"


def test_validate_calls_a_non_integer_landmark_id_a_problem(tmp_path, capsys):
    write_csv(tmp_path / "sample.csv", {"id": ["q1", "q2"], "landmarks": ["", ""]})
    write_csv(tmp_path / "s.csv", {"id": ["q1", "q2"], "landmarks": ["\u0661\u0662 0.5", "12 0.5"]})
    code = main(["validate", str(tmp_path / "s.csv"), "--sample", str(tmp_path / "sample.csv")])
    assert code == 1
    assert "1 rows have an unparsable landmark id: 'q1'" in capsys.readouterr().out
