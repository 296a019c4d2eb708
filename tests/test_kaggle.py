"""Every GLDv2 competition layout is recognised by its files; anything else stops with a reason."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from delf_retrieval.features.images import kaggle_image_path, list_images
from delf_retrieval.kaggle.competition import CompetitionError, find_competition, identify


def photo(folder: Path, image_id: str) -> None:
    path = kaggle_image_path(folder, image_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"jpeg")


def recognition(root: Path, *, year: int, photos: bool = True) -> Path:
    """The files of landmark-recognition-<year> (2019: train.csv has a url column)."""
    root.mkdir(parents=True)
    train = {"id": ["abc1", "abd2"], "landmark_id": [7, 8]}
    if year == 2019:
        train = {"id": train["id"], "url": ["http://a", "http://b"], "landmark_id": train["landmark_id"]}
    pd.DataFrame(train).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"id": ["fed1"], "landmarks": ["7 0.5"]}).to_csv(root / "sample_submission.csv", index=False)
    if photos:
        photo(root / "train", "abc1")
        photo(root / "test", "fed1")
    return root


def retrieval(root: Path, *, year: int, photos: bool = True) -> Path:
    """The files of landmark-retrieval-<year> (2019: index.csv + test.csv; 2021: no index.csv)."""
    root.mkdir(parents=True)
    pd.DataFrame({"id": ["fed1"], "images": ["abc1 abd2"]}).to_csv(root / "sample_submission.csv", index=False)
    if year == 2019:
        pd.DataFrame({"id": ["abc1", "abd2"]}).to_csv(root / "index.csv", index=False)
        pd.DataFrame({"id": ["fed1"]}).to_csv(root / "test.csv", index=False)
    else:
        pd.DataFrame({"id": ["999a"], "landmark_id": [7]}).to_csv(root / "train.csv", index=False)
        photo(root / "train", "999a")
    if photos:
        photo(root / "index", "abc1")
        photo(root / "index", "abd2")
        photo(root / "test", "fed1")
    return root


def models_dataset(root: Path) -> Path:
    (root / "local_and_global" / "variables").mkdir(parents=True)
    (root / "local_and_global" / "saved_model.pb").write_bytes(b"")
    return root


@pytest.mark.parametrize("year", [2019, 2020, 2021])
def test_recognition_competitions(year, tmp_path):
    root = recognition(tmp_path / "input" / f"landmark-recognition-{year}", year=year)
    models_dataset(tmp_path / "input" / "delg-saved-models")
    competition = find_competition("recognition", tmp_path / "input")
    assert competition.root == root and competition.kind == "recognition"
    assert competition.layout == ("recognition 2019" if year == 2019 else "recognition 2020/2021")
    assert competition.data_dir(tmp_path / "work") == root  # read in place
    with pytest.raises(CompetitionError, match="is a recognition competition .* but this notebook makes retrieval"):
        find_competition("retrieval", tmp_path / "input")


@pytest.mark.parametrize("year", [2019, 2021])
def test_retrieval_competitions(year, tmp_path):
    root = retrieval(tmp_path / "input" / f"landmark-retrieval-{year}", year=year)
    competition = find_competition("retrieval", tmp_path / "input")
    assert competition.root == root and competition.layout == f"retrieval {year}"
    data = competition.data_dir(tmp_path / "work")
    # The pipeline reads index.csv + index/; 2021 has no index.csv: a view of links gets one.
    assert [source.id for source in list_images(data / "index.csv")] == ["abc1", "abd2"]
    assert list_images(data / "index.csv")[0].read_bytes() == b"jpeg"
    assert (data / "sample_submission.csv").read_text() == (root / "sample_submission.csv").read_text()
    if year == 2021:
        assert data == tmp_path / "work" / "kaggle_data" and not (root / "index.csv").exists()
        assert (data / "train.csv").is_file() and (data / "train").is_dir()
        assert competition.data_dir(tmp_path / "work") == data  # a second call reuses it
    else:
        assert data == root


def test_competitions_without_photos_say_how_to_get_them(tmp_path):
    recognition(tmp_path / "input" / "landmark-recognition-2019", year=2019, photos=False)
    with pytest.raises(CompetitionError, match="recognition 2019.*no photos \\(train/, test/ missing\\).*GLDv2 tar"):
        find_competition("recognition", tmp_path / "input")
    root = retrieval(tmp_path / "r" / "landmark-retrieval-2019", year=2019, photos=False)
    with pytest.raises(CompetitionError, match="retrieval 2019.*index/, test/ missing"):
        identify(root)


def test_retrieval_2020_and_unknown_competitions_are_refused(tmp_path):
    root = tmp_path / "input" / "landmark-retrieval-2020"
    for folder in ("index", "test", "train"):
        (root / folder).mkdir(parents=True)
    pd.DataFrame({"id": ["a"], "landmark_id": [1]}).to_csv(root / "train.csv", index=False)
    with pytest.raises(CompetitionError, match="landmark-retrieval-2020, which scored a submitted model"):
        find_competition("retrieval", tmp_path / "input")
    other = tmp_path / "other" / "titanic"
    other.mkdir(parents=True)
    pd.DataFrame({"PassengerId": [1], "Survived": [0]}).to_csv(other / "sample_submission.csv", index=False)
    with pytest.raises(CompetitionError, match="unrecognised competition in .*titanic.*'PassengerId', 'Survived'"):
        find_competition("recognition", tmp_path / "other")


def test_nothing_or_several_attached(tmp_path):
    models_dataset(tmp_path / "input" / "delg-saved-models")
    with pytest.raises(CompetitionError, match="no landmark recognition competition found .*attached: delg-saved-models"):
        find_competition("recognition", tmp_path / "input")
    recognition(tmp_path / "input" / "landmark-recognition-2020", year=2020)
    recognition(tmp_path / "input" / "landmark-recognition-2021", year=2021)
    with pytest.raises(CompetitionError, match="several recognition competitions"):
        find_competition("recognition", tmp_path / "input")
    with pytest.raises(ValueError, match="kind must be"):
        find_competition("classification", tmp_path / "input")
