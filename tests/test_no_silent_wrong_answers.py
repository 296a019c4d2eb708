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
from delf_retrieval.demo.data import build_demo_dataset

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
