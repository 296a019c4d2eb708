"""Recognition index, Recognizer.predict and `delf-retrieval predict`, against the batch pipeline."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import delf_retrieval
from delf_retrieval.cli.main import main
from delf_retrieval.config import Config
from delf_retrieval.demo.data import build_demo_dataset
from delf_retrieval.features.images import ImageDecodeError, kaggle_image_path, load_image
from delf_retrieval.features.store import FeatureStore
from delf_retrieval.search.vlad import searchable
from delf_retrieval.service.recognizer import Recognizer
from delf_retrieval.tasks.manifest import IndexFormatError, read_manifest

pytestmark = pytest.mark.slow  # builds a dataset and an index, runs the batch pipeline


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("kaggle")
    build_demo_dataset(
        root,
        seed=5,
        landmarks=("astronaut", "rocket", "coffee", "chelsea"),
        nonlandmark_queries=("grass", "brick"),
        nonlandmark_set=("gravel", "moon", "page"),
        image_size=320,
    )
    return root


@pytest.fixture(scope="module")
def index(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "idx"
    assert main(["index", str(dataset), "--model", "opencv-sift", "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def recognizer(index):
    return Recognizer.load(index)


def _queries(dataset):
    solution = pd.read_csv(dataset / "solution.csv", dtype=str, keep_default_na=False)
    return list(zip(solution["id"], solution["landmarks"], strict=True))


def test_index_folder_is_self_describing(dataset, index):
    manifest = read_manifest(index)
    assert manifest.counts == {"train": 12, "landmarks": 4, "nonlandmark": 3, "failed": 0}
    assert manifest.model == "opencv-sift" and manifest.dtype == "float16"
    assert manifest.config["NONLANDMARK_PENALTY"] == 1.0  # a distractor set turns the penalty on
    assert manifest.config["NUM_TO_RERANK"] == 10  # the model's preset
    assert manifest.query_steps == [{"step": "vlad", "codebook": "vlad_codebook"}]
    assert np.load(index / manifest.derived["vlad_codebook"]["file"]).shape == (64, 128)
    # The searched vectors: the store's float16 VLAD rows, widened to float32 (exact).
    assert manifest.search_vectors == "search_vectors"
    searched = np.load(index / manifest.derived["search_vectors"]["file"])
    stored = searchable(FeatureStore(index / "train")).global_descriptors()
    assert searched.dtype == np.float32 and stored.dtype == np.float16
    np.testing.assert_array_equal(searched, stored.astype(np.float32))
    # The per-train-photo distractor similarity, derived here directly from the two stores.
    train = searchable(FeatureStore(index / "train"))
    distractors = np.asarray(searchable(FeatureStore(index / "nonlandmark")).global_descriptors(), np.float64)
    vectors = np.asarray(train.global_descriptors(), np.float64)
    cosines = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)) @ (
        distractors / np.linalg.norm(distractors, axis=1, keepdims=True)
    ).T
    expected = np.sort(cosines, axis=1)[:, -manifest.config["NONLANDMARK_TOP_K"] :].mean(axis=1)
    np.testing.assert_allclose(np.load(index / "derived/train_nonlandmark.npy"), expected, atol=1e-5)
    # Labels and names come from train.csv and labels.csv.
    labels = pd.read_csv(index / "labels.csv", dtype=str)
    truth = pd.read_csv(dataset / "train.csv", dtype=str).set_index("id")["landmark_id"]
    assert dict(zip(labels["id"], labels["landmark_id"], strict=True)) == truth.to_dict()
    landmarks = pd.read_csv(index / "landmarks.csv", dtype=str)
    assert dict(zip(landmarks["landmark_id"], landmarks["name"], strict=True)) == {
        "1000": "astronaut", "1001": "rocket", "1002": "coffee", "1003": "chelsea"
    }
    # Train photo paths, original sizes and thumbnails (longer side 256 px).
    images = pd.read_csv(index / "images.csv", dtype=str).set_index("id")
    for image_id, row in images.iterrows():
        with Image.open(row["path"]) as photo:
            assert (int(row["width"]), int(row["height"])) == photo.size
        with Image.open(kaggle_image_path(index / "thumbnails", image_id)) as thumb:
            assert max(thumb.size) == 256


def test_rebuilding_resumes_from_the_index(dataset, index, capsys):
    assert main(["index", str(dataset), "--model", "opencv-sift", "--out", str(index), "--no-progress"]) == 0
    assert "[train] images: 12 listed, 0 extracted, 12 already in store" in capsys.readouterr().out


@pytest.mark.parametrize("penalty", [1.0, 0.0])
def test_predict_gives_the_batch_pipelines_answer(dataset, index, tmp_path, penalty):
    recognizer = Recognizer.load(index, NONLANDMARK_PENALTY=penalty)
    batch = delf_retrieval.recognize(
        dataset,
        "opencv-sift",
        recognizer.config,
        output=None,
        work_dir=tmp_path / "w",
        use_nonlandmark=penalty > 0,
        progress=False,
        log=lambda _: None,
    ).result
    for query_id, _ in _queries(dataset):
        prediction = recognizer.predict(kaggle_image_path(dataset / "test", query_id))
        label, confidence = batch.predictions[query_id]
        assert prediction.landmark_id == label
        assert prediction.confidence == pytest.approx(confidence, abs=1e-5)
        # Same candidates with the same inlier counts (ours are listed re-ranked).
        expected = dict(zip(batch.neighbours[query_id], batch.inliers[query_id].tolist(), strict=True))
        assert {n.image_id: n.inliers for n in prediction.neighbours} == expected


def test_answers_are_right_and_decided_by_the_threshold(dataset, recognizer):
    names = {"1000": "astronaut", "1001": "rocket", "1002": "coffee", "1003": "chelsea"}
    accepted = 0
    for query_id, truth in _queries(dataset):
        prediction = recognizer.predict(kaggle_image_path(dataset / "test", query_id))
        assert [n.score for n in prediction.neighbours] == sorted((n.score for n in prediction.neighbours), reverse=True)
        if not truth:
            assert not prediction.is_landmark, query_id  # no non-landmark photo passes the threshold
            continue
        assert (prediction.landmark_id, prediction.name) == (truth, names[truth])
        if prediction.is_landmark:
            accepted += 1
            best = prediction.neighbours[0]
            assert best.landmark_id == truth and best.inliers >= 15
        assert set(prediction.timings) == {"decode", "extract", "search", "verify", "total"}
        assert prediction.timings["total"] == pytest.approx(sum(v for k, v in prediction.timings.items() if k != "total"))
    assert accepted >= 6  # of 8 landmark photos; weakly verified ones may fall below the threshold
    query_id, truth = next(q for q in _queries(dataset) if q[1])
    confidence = recognizer.predict(kaggle_image_path(dataset / "test", query_id)).confidence
    path = kaggle_image_path(dataset / "test", query_id)
    stricter = Recognizer.load(recognizer.path, LANDMARK_THRESHOLD=confidence + 0.01).predict(path)
    assert (stricter.is_landmark, stricter.landmark_id, stricter.threshold) == (False, truth, confidence + 0.01)


def test_inputs_path_bytes_array_and_many_agree(dataset, recognizer):
    paths = [kaggle_image_path(dataset / "test", q) for q, _ in _queries(dataset)[:3]]
    one = [recognizer.predict(p) for p in paths]
    many = recognizer.predict_many([paths[0].read_bytes(), load_image(paths[1]), str(paths[2])])
    for a, b in zip(one, many, strict=True):  # one search for many: float32 sums may differ in the last bits
        assert a.landmark_id == b.landmark_id and a.confidence == pytest.approx(b.confidence, abs=1e-5)
        assert [(n.image_id, n.inliers) for n in a.neighbours] == [(n.image_id, n.inliers) for n in b.neighbours]
    assert one[0].image_size == Image.open(paths[0]).size
    assert recognizer.predict_many([]) == []


def test_bad_input_and_bad_index_give_clear_errors(recognizer, tmp_path):
    with pytest.raises(ImageDecodeError, match="empty"):
        recognizer.predict(b"")
    with pytest.raises(ImageDecodeError, match="not an image"):
        recognizer.predict(b"this is text")
    with pytest.raises(ImageDecodeError, match="RGB uint8"):
        recognizer.predict(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ImageDecodeError, match="missing file"):
        recognizer.predict(tmp_path / "nope.jpg")
    with pytest.raises(IndexFormatError, match="not a complete recognition index"):
        Recognizer.load(tmp_path)
    with pytest.raises(TypeError, match="unknown config"):
        Recognizer.load(recognizer.path, NOT_A_FIELD=1)


def test_index_is_memory_mapped(recognizer):
    assert isinstance(recognizer.index.database.global_descriptors(), np.memmap)
    assert all(isinstance(array, np.memmap) for array in recognizer.derived.values())
    assert recognizer.info()["train_images"] == 12 and recognizer.load_seconds < 5
    assert Config(**read_manifest(recognizer.path).config) == recognizer.config


def test_predict_cli_json_text_and_picture(dataset, index, recognizer, tmp_path, capsys):
    query_id, truth = next(q for q in _queries(dataset) if q[1])
    photo = kaggle_image_path(dataset / "test", query_id)
    assert main(["predict", str(index), str(photo), "--json"]) == 0
    [answer] = json.loads(capsys.readouterr().out)
    expected = recognizer.predict(photo).to_dict()
    assert answer["photo"] == str(photo) and answer["landmark_id"] == truth
    assert {k: v for k, v in answer.items() if k not in ("photo", "timings")} == {
        k: v for k, v in expected.items() if k != "timings"
    }
    assert main(["predict", str(index), str(photo), "--json", "--set", "LANDMARK_THRESHOLD=99"]) == 0
    [strict] = json.loads(capsys.readouterr().out)
    assert (strict["threshold"], strict["is_landmark"], strict["landmark_id"]) == (99.0, False, truth)
    picture = tmp_path / "show.png"
    assert main(["predict", str(index), str(photo), "--show", str(picture)]) == 0
    printed = capsys.readouterr().out
    assert f"{photo}: {expected['name']} (landmark {truth}): {expected['verdict']}," in printed
    assert expected["verdict"].startswith("landmark, ") and expected["verdict"].endswith("%")  # "landmark, 87%"
    with Image.open(picture) as image:
        width, height = image.size
    assert width > 1000 and height > 500  # neighbours band + matches band
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a photo")
    assert main(["predict", str(index), str(bad), str(photo)]) == 2
    captured = capsys.readouterr()
    assert "bad.jpg: error: not an image" in captured.err and str(photo) in captured.out


def test_index_of_a_delg_savedmodel_predicts_like_recognize(dataset, delg_tf2_model, tmp_path):
    """A model with its own global descriptor: no query steps, the model folder in the manifest."""
    out = tmp_path / "idx"
    assert main(["index", str(dataset), "--model", str(delg_tf2_model), "--out", str(out), "--no-progress"]) == 0
    manifest = read_manifest(out)
    assert manifest.model == str(delg_tf2_model.resolve()) and manifest.query_steps == []
    assert manifest.config["NUM_TO_RERANK"] == 3 and manifest.config["LANDMARK_THRESHOLD"] == 0.0  # kaggle2020
    recognizer = Recognizer.load(out)
    batch = delf_retrieval.recognize(
        dataset, delg_tf2_model, recognizer.config, output=None, work_dir=tmp_path / "w",
        use_nonlandmark=True, progress=False, log=lambda _: None,
    ).result
    for query_id, _ in _queries(dataset):
        prediction = recognizer.predict(kaggle_image_path(dataset / "test", query_id))
        label, confidence = batch.predictions[query_id]
        assert prediction.landmark_id == label
        assert prediction.confidence == pytest.approx(confidence, abs=1e-5)
        expected = dict(zip(batch.neighbours[query_id], batch.inliers[query_id].tolist(), strict=True))
        assert {n.image_id: n.inliers for n in prediction.neighbours if n.inliers is not None} == {
            k: v for k, v in expected.items() if k in batch.neighbours[query_id][:3]
        }
