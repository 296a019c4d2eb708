"""A loaded index answers from one consistent generation, and a damaged one refuses to answer.

Issue items: a ``Recognizer`` (and so ``serve``) keeps answering from the index as it was
opened while the folder is rebuilt under it; an index whose files disagree with each other
or with ``index.json`` (short search vectors, short per-photo arrays, a truncated
``labels.csv``) is refused with the file named (exit 2 from the CLI), never answered.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from delf_retrieval.cli.main import main
from delf_retrieval.demo.data import build_demo_dataset
from delf_retrieval.features.images import kaggle_image_path
from delf_retrieval.service.recognizer import Recognizer
from delf_retrieval.tasks.manifest import IndexFormatError, read_manifest

pytestmark = pytest.mark.slow  # builds datasets and indexes (RootSIFT extraction)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("consistency")
    build_demo_dataset(
        root,
        seed=3,
        landmarks=("astronaut", "rocket", "coffee"),
        train_views=2,
        query_views=1,
        nonlandmark_queries=("grass",),
        nonlandmark_set=("gravel", "moon"),
        image_size=240,
    )
    return root


def _build(data: Path, out: Path) -> None:
    assert main(["index", str(data), "--model", "opencv-sift", "--out", str(out), "--no-progress", "--thumbnail-size", "0"]) == 0


def _answers(recognizer: Recognizer, photos: list[Path]) -> list[tuple]:
    return [
        (p.landmark_id, p.confidence, [(n.image_id, n.inliers) for n in p.neighbours])
        for p in recognizer.predict_many(photos)
    ]


def test_a_loaded_index_keeps_answering_from_the_generation_it_opened(dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    index = tmp_path / "index"
    _build(data, index)
    queries = pd.read_csv(data / "sample_submission.csv", dtype=str)["id"].tolist()
    photos = [kaggle_image_path(data / "test", q) for q in queries]
    served = Recognizer.load(index)
    before = _answers(served, photos)

    # Rebuild the same folder with one more train photo of another landmark (a query photo
    # used as train): the train store gets a new generation and new labels.
    new_id = "0" * 16  # sorts first: every old row moves in the new generation
    target = kaggle_image_path(data / "train", new_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(photos[0], target)
    train = pd.read_csv(data / "train.csv", dtype=str)
    pd.concat([train, pd.DataFrame({"id": [new_id], "landmark_id": ["1002"]})]).to_csv(data / "train.csv", index=False)
    _build(data, index)

    assert _answers(served, photos) == before  # pinned: the old generation, its labels and vectors
    fresh = Recognizer.load(index)
    assert len(fresh.ids) == len(served.ids) + 1 and new_id in fresh.ids
    assert fresh.predict(photos[0]).neighbours[0].image_id == new_id  # the same photo, now in the index


@pytest.fixture(scope="module")
def built(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "index"
    _build(dataset, out)
    return out


def _damaged(built: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "index"
    shutil.copytree(built, copy)
    return copy


def test_short_search_vectors_are_refused_naming_the_file(built, tmp_path, capsys):
    index = _damaged(built, tmp_path)
    entry = read_manifest(index).derived["search_vectors"]
    vectors = np.load(index / entry["file"])
    np.save(index / entry["file"], vectors[:-2])
    with pytest.raises(IndexFormatError, match="search_vectors.npy"):
        Recognizer.load(index)
    assert main(["predict", str(index), str(index / "labels.csv")]) == 2
    assert "search_vectors.npy" in capsys.readouterr().err


def test_a_truncated_labels_csv_is_refused(built, tmp_path):
    index = _damaged(built, tmp_path)
    labels = pd.read_csv(index / "labels.csv", dtype=str)
    labels.iloc[:-3].to_csv(index / "labels.csv", index=False)
    with pytest.raises(IndexFormatError, match="labels.csv"):
        Recognizer.load(index)


def test_a_short_per_photo_array_is_refused(built, tmp_path):
    index = _damaged(built, tmp_path)
    manifest = read_manifest(index)
    entry = manifest.derived[manifest.train_nonlandmark]
    array = np.load(index / entry["file"])
    np.save(index / entry["file"], array[:-1])
    with pytest.raises(IndexFormatError, match="train_nonlandmark.npy"):
        Recognizer.load(index)
