"""Issue 20: no silent wrong answers. Caches follow the CSV, ids stay inside their folder,
inputs are checked before any work, one photo costs bounded memory, and everything a
user can cause exits 2 with one line naming the cause."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import delf_retrieval
from delf_retrieval.cli.main import check_output_file, main
from delf_retrieval.config import load_config
from delf_retrieval.core.atomic import atomic_write_bytes
from delf_retrieval.demo.data import build_demo_dataset
from delf_retrieval.features.containers import ImageFeatures, LocalFeatures
from delf_retrieval.features.images import (
    MAX_IMAGE_PIXELS,
    MIN_IMAGE_SIDE,
    ImageRejectedError,
    ImageSource,
    decode_image,
    decode_image_scaled,
    kaggle_image_path,
    list_images,
)
from delf_retrieval.features.store import DiskSpaceError, FeatureStore, StoreCorruptError
from delf_retrieval.kaggle.submission import write_submission
from delf_retrieval.matching import device
from delf_retrieval.models.base import ExtractorParams
from delf_retrieval.search.vlad import searchable
from delf_retrieval.service.http import create_app
from delf_retrieval.service.recognizer import Recognizer
from delf_retrieval.tasks import build_index as build_index_module
from delf_retrieval.tasks import run as run_module
from delf_retrieval.tasks.build_index import build_index, check_index_folder, source_paths
from delf_retrieval.tasks.manifest import MANIFEST

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


# --------------------------------------------------------------------------- index: items 1, 3, 10, 15
def build(data: Path, out: Path, **options) -> None:
    build_index(data, MODEL, out, progress=False, log=quiet, **options)


@pytest.mark.slow
def test_a_rebuilt_index_holds_only_the_photos_the_csv_lists(two_datasets, tmp_path):
    a, _ = two_datasets
    out = tmp_path / "index"
    build(a, out)
    trimmed = tmp_path / "trimmed"
    shutil.copytree(a, trimmed)
    train = pd.read_csv(a / "train.csv", dtype=str)
    train.iloc[::2].to_csv(trimmed / "train.csv", index=False)
    build(trimmed, out)  # the same --out: its store still holds the dropped photos
    fresh = tmp_path / "fresh"
    build(trimmed, fresh)

    kept = set(train["id"].iloc[::2])
    again, alone = Recognizer.load(out), Recognizer.load(fresh)
    assert set(again.ids) == kept and len(pd.read_csv(out / "labels.csv")) == len(kept)
    photos = sorted((a / "test").rglob("*.jpg"))
    for got, expected in zip(again.predict_many(photos), alone.predict_many(photos), strict=True):
        assert {n.image_id for n in got.neighbours} <= kept
        assert (got.landmark_id, got.confidence) == (expected.landmark_id, expected.confidence)


@pytest.mark.parametrize("where", [".", "train", "train/sub", "nonlandmark"])
def test_index_refuses_an_out_folder_inside_the_dataset(where, csv_only_data, capsys):
    labels = (csv_only_data / "train.csv").read_bytes()
    out = csv_only_data / where
    code, err = run_cli(["index", csv_only_data, "--out", out, "--no-progress"], capsys)
    assert code == 2
    assert_one_line_error(err, "would write the index into the dataset")
    assert (csv_only_data / "train.csv").read_bytes() == labels
    assert not (csv_only_data / "labels.csv").exists() and not (csv_only_data / "train" / "meta.json").exists()
    with pytest.raises(ValueError, match="would write the index into the dataset"):
        check_index_folder(csv_only_data / "train", csv_only_data)  # the data inside the index's train/
    check_index_folder(csv_only_data, csv_only_data / "my-index")  # a new subfolder is fine


def test_index_writes_no_memory_map_and_counts_its_files_before_writing(two_datasets, tmp_path, monkeypatch):
    a, _ = two_datasets
    real_open_memmap, real_memmap = np.lib.format.open_memmap, np.memmap

    def no_write_open_memmap(*args, mode="r+", **kwargs):
        assert mode in ("r", "c"), f"a memory-mapped write ({mode})"
        return real_open_memmap(*args, mode=mode, **kwargs)

    class ReadOnlyMemmap(real_memmap):
        def __new__(cls, *args, mode="r+", **kwargs):
            assert mode in ("r", "c", "readonly", "copyonwrite"), f"a memory-mapped write ({mode})"
            return real_memmap.__new__(cls, *args, mode=mode, **kwargs)

    monkeypatch.setattr(np.lib.format, "open_memmap", no_write_open_memmap)
    monkeypatch.setattr(np, "memmap", ReadOnlyMemmap)
    out = tmp_path / "index"
    small = tmp_path / "small"
    shutil.copytree(a, small)
    (small / "nonlandmark.csv").unlink()
    build(small, out, thumbnail_size=0)
    vectors = np.load(out / "derived" / "search_vectors.npy")
    train = FeatureStore(out / "train")
    np.testing.assert_array_equal(vectors, np.asarray(searchable(train).global_descriptors(), np.float32))

    # The free-space check counts the float32 copy: a disk with less room refuses before writing it.
    (out / "derived" / "search_vectors.npy").unlink()
    (out / MANIFEST).unlink()
    needed = vectors.nbytes
    usage = shutil.disk_usage(out)
    monkeypatch.setattr(
        build_index_module.shutil, "disk_usage", lambda _: usage._replace(free=16 * 2**20 + needed // 2)
    )
    with pytest.raises(DiskSpaceError, match="free disk space"):
        build(small, out, thumbnail_size=0)
    assert not (out / "derived" / "search_vectors.npy").exists()


def test_index_matches_sources_to_ids_in_linear_time():
    """Item 15: 200 000 photos (``set(ids)`` rebuilt per photo took hours)."""
    ids = [f"{i:08x}" for i in range(200_000)]
    sources = [ImageSource(id=image_id, path=f"/x/{image_id}.jpg") for image_id in ids]
    started = time.perf_counter()
    paths = source_paths(sources, ids[::2])
    assert len(paths) == 100_000 and paths[ids[2]] == f"/x/{ids[2]}.jpg"
    assert time.perf_counter() - started < 2.0


# --------------------------------------------------------------------------- item 4
def special_files(tmp_path: Path) -> list[Path]:
    """A pipe, and /dev/full where the machine has it."""
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    return [fifo] + [Path("/dev/full")] * Path("/dev/full").exists()


def test_output_that_is_not_a_regular_file_is_refused_not_replaced(csv_only_data, tmp_path, capsys):
    for target in special_files(tmp_path):
        mode = target.stat().st_mode
        code, err = run_cli(["recognize", csv_only_data, "-o", target, "--work-dir", tmp_path / "w", "--no-progress"], capsys)
        assert code == 2
        assert_one_line_error(err, str(target), "not a regular file")
        assert target.stat().st_mode == mode  # still the pipe / the device
        with pytest.raises(ValueError, match="refusing to replace it"):
            atomic_write_bytes(target, b"id,landmarks\n")
        assert target.stat().st_mode == mode


def test_output_through_a_symlink_writes_its_target(tmp_path):
    real = tmp_path / "real" / "submission.csv"
    real.parent.mkdir()
    real.write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    check_output_file(link)
    write_submission(link, pd.DataFrame({"id": ["q1"], "landmarks": ["12 0.5"]}))
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() == "id,landmarks\nq1,12 0.5\n"
    assert sorted(p.name for p in real.parent.iterdir()) == ["submission.csv"]  # no temporary file left


# --------------------------------------------------------------------------- store views (item 1)
FINGERPRINT = {"family": "fake", "model_id": "fake", "params": {}, "local_dim": 4, "global_dim": 3}


def fake_features(seed: int) -> ImageFeatures:
    rng = np.random.default_rng(seed)
    count = int(rng.integers(0, 6))
    local = LocalFeatures(
        keypoints=rng.random((count, 2), np.float32) * 100,
        descriptors=rng.random((count, 4), np.float32),
        scores=rng.random(count, np.float32),
        scales=np.ones(count, np.float32),
    )
    return ImageFeatures(local=local, global_descriptor=rng.random(3, np.float32))


def fake_store(path: Path, ids: list[str]) -> FeatureStore:
    store = FeatureStore(path, FINGERPRINT, dtype="float16")
    store.write_chunk(ids, [fake_features(int(image_id, 16)) for image_id in ids])
    return store


def test_a_store_view_reads_as_a_fresh_store_of_its_ids(tmp_path):
    every = [f"{i:04x}" for i in range(40)]
    listed = every[3::3]
    view = fake_store(tmp_path / "cache", every).subset(listed + ["ffff"])  # ffff: never extracted
    fresh = fake_store(tmp_path / "fresh", listed)
    assert view.ids == fresh.ids == sorted(listed) and "0000" not in view
    np.testing.assert_array_equal(view.global_descriptors(), fresh.global_descriptors())
    for image_id in listed:
        np.testing.assert_array_equal(view.local_features(image_id).descriptors, fresh.local_features(image_id).descriptors)
    for count in (7, 10_000):  # a sample (the VLAD codebook's input), and all of them
        np.testing.assert_array_equal(view.local_descriptor_sample(count, seed=4), fresh.local_descriptor_sample(count, seed=4))
    with pytest.raises(KeyError):
        view.local_features("0000")
    view.write_derived("vlad", np.ones((len(listed), 2), np.float16))
    assert view.read_derived("vlad") is not None and view.store.read_derived("vlad") is None  # keyed by the ids
    assert view.store.subset(every) is view.store  # nothing to leave out: the store itself


# --------------------------------------------------------------------------- item 12
def test_damaged_store_files_are_user_errors_naming_the_file(tmp_path):
    store = fake_store(tmp_path / "store", ["aaa1", "aaa2", "aaa3"])
    store.finalize()
    generation = store.path / json.loads((store.path / "CURRENT").read_text())["name"]
    (generation / "ids.json").write_text(json.dumps(["aaa1", "aaa2"]))
    with pytest.raises(StoreCorruptError, match=r"global\.npy has 3 rows where 2 are due"):
        FeatureStore(store.path).global_descriptors()
    (generation / "ids.json").unlink()
    with pytest.raises(StoreCorruptError, match="has no ids.json"):
        len(FeatureStore(store.path))
    (generation / "ids.json").write_text('{"aaa1": ')
    with pytest.raises(StoreCorruptError, match=r"ids\.json is damaged \(not JSON"):
        len(FeatureStore(store.path))
    (generation / "ids.json").write_text(json.dumps(["aaa1", "aaa2", "aaa3"]))
    data = (generation / "global.npy").read_bytes()
    (generation / "global.npy").write_bytes(data[: len(data) - 4])
    with pytest.raises(StoreCorruptError, match=r"global\.npy is damaged \(truncated"):
        FeatureStore(store.path).global_descriptors()
    assert issubclass(StoreCorruptError, ValueError)  # the CLI's exit 2


@pytest.mark.parametrize(("manifest", "fragment"), [("[]", "a JSON list, not an object"), ('{"format": 1}', "no model"), ('{"model": ', "not JSON")])
def test_a_damaged_index_json_exits_2(manifest, fragment, tmp_path, capsys):
    index = tmp_path / "index"
    index.mkdir()
    (index / MANIFEST).write_text(manifest)
    code, err = run_cli(["predict", index, tmp_path / "photo.jpg"], capsys)
    assert code == 2
    assert_one_line_error(err, str(index / MANIFEST), fragment)


def test_serve_refuses_a_bad_or_busy_port_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(tmp_path), "--port", "99999"])
    assert exit_.value.code == 2 and "--port: expected a port number 0..65535, got '99999'" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, err = run_cli(["serve", tmp_path, "--port", port], capsys)
    assert code == 2
    assert_one_line_error(err, f"cannot listen on 127.0.0.1:{port}")


def test_a_gpu_match_device_without_a_gpu_is_refused_before_any_work(csv_only_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(device, "_tensorflow_gpus", lambda: 0)
    work = tmp_path / "work"
    for command in (["recognize", csv_only_data, "-o", tmp_path / "s.csv", "--work-dir", work], ["index", csv_only_data, "--out", tmp_path / "i"]):
        code, err = run_cli([*command, "--set", "MATCH_DEVICE=gpu", "--no-progress"], capsys)
        assert code == 2
        assert_one_line_error(err, "MATCH_DEVICE='gpu' but TensorFlow sees no GPU")
    assert not work.exists() and not (tmp_path / "i").exists()


# --------------------------------------------------------------------------- item 7
@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--score-threshold", "nan"], "argument --score-threshold: expected a finite number, got 'nan'"),
        (["--scales", "1.0", "nan"], "argument --scales: expected a finite number, got 'nan'"),
        (["--scales", "inf"], "argument --scales: expected a finite number, got 'inf'"),
        (["--global-scales", "-1"], "argument --global-scales: expected a number > 0, got '-1'"),
        (["--max-image-size", "nan"], "argument --max-image-size: expected an integer >= 1, got 'nan'"),
        (["--gem-p", "inf"], "argument --gem-p: expected a finite number, got 'inf'"),
    ],
)
def test_non_finite_flags_exit_2_naming_the_flag(flags, fragment, csv_only_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["recognize", str(csv_only_data), "-o", str(tmp_path / "s.csv"), *flags])
    assert exit_.value.code == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        ("NONLANDMARK_PENALTY=inf", "NONLANDMARK_PENALTY=inf (a finite number in range)"),
        ("QE_ALPHA=inf", "QE_ALPHA=inf (a finite number in range)"),
        ("MAX_REPROJECTION_ERROR=inf", "MAX_REPROJECTION_ERROR=inf"),
        ("LANDMARK_THRESHOLD=-inf", "LANDMARK_THRESHOLD=-inf"),
        # item 14: a text field's error lists what it takes
        ("RANSAC_METHOD=x", "RANSAC_METHOD='x' (one of 'magsac', 'opencv-ransac', 'degensac', 'skimage-affine')"),
    ],
)
def test_set_values_that_must_be_finite_or_chosen_exit_2(setting, fragment, csv_only_data, tmp_path, capsys):
    code, err = run_cli(["recognize", csv_only_data, "-o", tmp_path / "s.csv", "--work-dir", tmp_path / "w", "--set", setting], capsys)
    assert code == 2
    assert_one_line_error(err, fragment)
    assert load_config(None, MAX_DESCRIPTOR_DISTANCE=float("inf")).MAX_DESCRIPTOR_DISTANCE == float("inf")  # inf: no bound


def test_extractor_params_refuse_non_finite_values():
    for changes in ({"score_threshold": float("nan")}, {"image_scales": (1.0, float("nan"))}, {"global_scales": (float("inf"),)}):
        with pytest.raises(ValueError, match="finite"):
            ExtractorParams(**changes)


# --------------------------------------------------------------------------- item 14
def test_recognize_extracts_with_the_given_batch_size_and_threads(csv_only_data, tmp_path, capsys, monkeypatch):
    seen = {}

    def fake_extract(extractor, sources, store, **options):
        seen.update(options)
        raise KeyboardInterrupt  # stop: only the options matter

    monkeypatch.setattr(run_module, "extract_to_store", fake_extract)
    args = ["recognize", csv_only_data, "-o", tmp_path / "s.csv", "--work-dir", tmp_path / "w", "--batch-size", "3", "--threads", "5"]
    assert run_cli([*args, "--no-progress"], capsys)[0] == 130
    assert (seen["batch_size"], seen["decode_threads"]) == (3, 5)


@pytest.mark.parametrize(("content", "fragment"), [(b"", "train.csv is empty"), (b"id,landmark_id\n\xff\xfe,1\n", "train.csv is not a readable CSV file")])
def test_unreadable_csvs_name_the_file(content, fragment, csv_only_data, tmp_path, capsys):
    (csv_only_data / "train.csv").write_bytes(content)
    code, err = run_cli(["recognize", csv_only_data, "-o", tmp_path / "s.csv", "--work-dir", tmp_path / "w"], capsys)
    assert code == 2
    assert_one_line_error(err, str(csv_only_data / "train.csv"), fragment)


# --------------------------------------------------------------------------- items 9, 11
def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def huge_png() -> bytes:
    """13000 x 13000 pixels (169 MP, under Pillow's bomb limit) in 21 kB."""
    return png_bytes(Image.new("1", (13000, 13000)))


def test_one_photo_costs_bounded_memory_on_decode(huge_png):
    started = time.perf_counter()
    with pytest.raises(ImageRejectedError, match=r"13000x13000 px = 169 MP, more than the 40 MP"):
        decode_image_scaled(huge_png, 1024)  # refused from the header: no 2.4 GB array
    with pytest.raises(ImageRejectedError):
        decode_image(huge_png)
    assert time.perf_counter() - started < 1.0
    buffer = io.BytesIO()
    Image.new("L", (7000, 6000), 128).save(buffer, "JPEG")  # 42 MP: decoded at half size
    image, factor = decode_image_scaled(buffer.getvalue(), None)
    assert image.shape == (3000, 3500, 3) and factor == 2.0
    assert image.shape[0] * image.shape[1] <= MAX_IMAGE_PIXELS


@pytest.fixture(scope="module")
def index(two_datasets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "index"
    build(two_datasets[0], out, thumbnail_size=0)
    return out


@pytest.mark.slow
def test_serve_answers_422_to_photos_outside_the_input_rules(index, huge_png):
    client = TestClient(create_app(Recognizer.load(index)))
    health = client.get("/health").json()
    assert (health["max_image_pixels"], health["min_image_side"]) == (MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE)
    for photo, fragment in [
        (png_bytes(Image.new("RGB", (1, 300))), "image too small: 1x300 px"),
        (png_bytes(Image.new("RGB", (15, 15))), "image too small: 15x15 px"),
        (huge_png, "more than the 40 MP"),
    ]:
        answer = client.post("/predict", files={"file": ("photo.png", photo, "image/png")})
        assert answer.status_code == 422, answer.text
        assert fragment in answer.json()["detail"]


@pytest.mark.slow
def test_predict_answers_the_good_photos_and_reports_the_bad_one(index, two_datasets, tmp_path, capsys):
    thin = tmp_path / "thin.png"
    Image.new("RGB", (1, 200)).save(thin)
    good = sorted((two_datasets[0] / "test").rglob("*.jpg"))[0]
    code = main(["predict", str(index), str(thin), str(good)])
    captured = capsys.readouterr()
    assert code == 2
    assert f"{thin}: error: image too small: 1x200 px" in captured.err
    assert captured.out.startswith(f"{good}: ") and "landmark" in captured.out
