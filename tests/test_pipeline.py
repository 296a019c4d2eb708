"""End to end: CLI recognize / retrieve / evaluate / validate on a generated Kaggle dataset."""

import subprocess
import sys

import pandas as pd
import pytest

import delf_retrieval
from delf_retrieval.cli.main import main
from delf_retrieval.config import load_config
from delf_retrieval.demo.data import build_demo_dataset
from delf_retrieval.kaggle.metrics import evaluate_recognition, evaluate_retrieval
from delf_retrieval.kaggle.submission import validate_submission


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("kaggle")
    build_demo_dataset(
        root,
        seed=3,
        landmarks=("astronaut", "rocket", "coffee", "chelsea", "camera"),
        nonlandmark_queries=("grass", "brick", "text"),
        nonlandmark_set=("gravel", "moon", "page", "cell"),
        image_size=360,
    )
    return root


@pytest.mark.slow
def test_recognize_cli_writes_a_valid_submission_and_reuses_features(dataset, tmp_path, capsys):
    out = tmp_path / "s.csv"
    args = ["recognize", str(dataset), "--model", "opencv-sift", "-o", str(out), "--work-dir", str(tmp_path / "w"), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "NUM_TO_RERANK = 10" in printed  # the config is echoed in the run's log
    assert "[train] images: 15 listed, 15 extracted" in printed
    assert validate_submission(out, dataset / "sample_submission.csv") == []
    gap = evaluate_recognition(out, dataset / "solution.csv")["All"]
    assert gap >= 0.9
    assert main(args) == 0  # second run: features come from the cache
    assert "[train] images: 15 listed, 0 extracted, 15 already in store" in capsys.readouterr().out
    assert main(["evaluate", "--submission", str(out), "--solution", str(dataset / "solution.csv")]) == 0
    assert f"All {gap:.4f}" in capsys.readouterr().out
    assert main(["validate", str(out), "--sample", str(dataset / "sample_submission.csv")]) == 0


@pytest.mark.slow
def test_verification_and_nonlandmark_handling_do_not_hurt(dataset, tmp_path):
    config = load_config("opencv-sift")
    kwargs = dict(output=None, work_dir=tmp_path / "w", progress=False, log=lambda _: None)
    plain = delf_retrieval.recognize(dataset, "opencv-sift", config, verify=False, **kwargs)
    verified = delf_retrieval.recognize(dataset, "opencv-sift", config, **kwargs)
    penalised = delf_retrieval.recognize(
        dataset, "opencv-sift", config.replace(NONLANDMARK_PENALTY=1.0), use_nonlandmark=True, **kwargs
    )
    scores = [evaluate_recognition(run.submission, dataset / "solution.csv")["All"] for run in (plain, verified, penalised)]
    assert scores[1] >= scores[0] and scores[2] >= scores[1] - 0.02
    inliers = verified.result.inliers
    solution = pd.read_csv(dataset / "solution.csv", dtype=str, keep_default_na=False)
    true_queries = solution[solution.landmarks != ""].id
    false_queries = solution[solution.landmarks == ""].id
    # Landmark queries verify against their own landmark; non-landmark ones hardly at all.
    assert min(inliers[q].max() for q in true_queries) >= 15
    assert max(inliers[q].max() for q in false_queries) < 15
    assert set(penalised.stores) == {"train", "test", "nonlandmark"}


@pytest.mark.slow
def test_retrieve_cli(dataset, tmp_path, capsys):
    out = tmp_path / "r.csv"
    args = ["retrieve", str(dataset), "-o", str(out), "--work-dir", str(tmp_path / "w"), "--no-progress"]
    assert main(args) == 0
    assert "mAP@100" in capsys.readouterr().out
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(frame.columns) == ["id", "images"]
    assert validate_submission(frame, dataset / "sample_submission.csv", kind="retrieval") == []
    assert evaluate_retrieval(frame, dataset / "retrieval_solution.csv")["All"] >= 0.9


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    assert main(["recognize", str(tmp_path), "--work-dir", str(tmp_path / "w"), "--no-progress"]) == 2
    assert "missing train.csv, sample_submission.csv" in capsys.readouterr().err
    assert main(["extract", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "s")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["recognize", str(tmp_path), "--set", "NUM_TO_RERANK", "--no-progress"]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err


@pytest.mark.slow
def test_extract_cli_summary(dataset, tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["extract", "--model", "opencv-sift", "--images", str(dataset / "train"), "--out", str(store), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "15 extracted" in printed and "kB per image" in printed
    assert main(["extract", "--model", "opencv-sift", "--images", str(dataset / "train"), "--out", str(store), "--no-progress"]) == 0
    assert "0 extracted, 15 already in store" in capsys.readouterr().out
    # Another model's settings must not be mixed into this store.
    assert main(["extract", "--images", str(dataset / "train"), "--out", str(store), "--max-features", "50", "--no-progress"]) == 2
    assert "another model or settings" in capsys.readouterr().err


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "delf_retrieval.cli.main", "--help"], capture_output=True, text=True, check=True)
    for command in ("extract", "recognize", "retrieve", "evaluate", "validate", "demo"):
        assert command in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model_fixture", "min_gap"),
    [("delg_tf2_model", 0.9), ("delg_tf1_model", 0.9), ("delg_tf2_global_model", 0.7), ("delf_hub_model", 0.8)],
)
def test_recognize_with_fixture_savedmodels(model_fixture, min_gap, dataset, tmp_path, request, capsys):
    model = request.getfixturevalue(model_fixture)
    out = tmp_path / "s.csv"
    args = ["recognize", str(dataset), "--model", str(model), "-o", str(out), "--work-dir", str(tmp_path / "w"), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "NUM_TO_RERANK = 3" in printed  # DELF/DELG models default to the kaggle2020 preset
    assert validate_submission(out, dataset / "sample_submission.csv") == []
    # Global-only models skip verification; DELF (local only) gets VLAD globals.
    assert evaluate_recognition(out, dataset / "solution.csv")["All"] >= min_gap


@pytest.mark.slow
def test_nonlandmark_flag_turns_the_penalty_on(dataset, tmp_path, capsys):
    out = tmp_path / "s.csv"
    args = ["recognize", str(dataset), "-o", str(out), "--work-dir", str(tmp_path / "w"), "--no-progress", "--nonlandmark"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "NONLANDMARK_PENALTY = 1.0" in printed
    assert "[nonlandmark] images: 4 listed, 4 extracted" in printed
    assert evaluate_recognition(out, dataset / "solution.csv")["All"] >= 0.9
