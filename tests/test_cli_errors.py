"""Every user error of the CLI is one line on stderr and exit 2, found before any work;
Ctrl-C exits 130 with a resume hint; internal errors exit 3 (never 1 = invalid submission)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from delf_retrieval import __version__
from delf_retrieval.cli.main import main
from delf_retrieval.core.errors import WorkersLostError
from delf_retrieval.demo.data import bundled_photo, random_view

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def data(csv_only_data: Path) -> Path:
    """The CSV-only Kaggle folder (the errors below stop before any image)."""
    return csv_only_data


def run(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize(
    ("setting", "fragments"),
    [
        ("NUM_TO_RERANK=abc", ["NUM_TO_RERANK expects an integer, got 'abc'"]),
        ("NUM_TO_RERANK=2.5", ["NUM_TO_RERANK expects an integer, got '2.5'"]),
        ("MUTUAL_NEAREST_NEIGHBOR=maybe", ["MUTUAL_NEAREST_NEIGHBOR expects true or false, got 'maybe'"]),
        ("NOT_A_FIELD=1", ["unknown config field 'NOT_A_FIELD'", "valid fields: NUM_TO_RERANK, TOP_K"]),
        ("NUM_TO_RERNK=5", ["unknown config field 'NUM_TO_RERNK'; did you mean NUM_TO_RERANK"]),
        ("top_k=5", ["did you mean TOP_K"]),
        ("HOMOGRAPHY_CONFIDENCE=1.5", ["invalid config value(s): HOMOGRAPHY_CONFIDENCE=1.5"]),
        ("RATIO_TEST=nan", ["invalid config value(s): RATIO_TEST=nan"]),
        ("NUM_TO_RERANK", ["--set expects NAME=VALUE"]),
    ],
)
@pytest.mark.parametrize("command", ["recognize", "retrieve"])
def test_bad_set_values_are_refused_before_any_work(command, setting, fragments, data, tmp_path, capsys):
    work = tmp_path / "work"
    args = [command, str(data), "-o", str(tmp_path / "s.csv"), "--work-dir", str(work), "--set", setting]
    code, err = run(args + ["--no-progress"], capsys)
    assert code == 2
    assert_one_line_error(err, *fragments)
    assert not work.exists() and not (tmp_path / "s.csv").exists()


def test_set_values_are_typed_like_the_config_fields(data, tmp_path, monkeypatch):
    """Accepted values reach the run as the field's type (2.0 -> 2, 1 -> True)."""
    from delf_retrieval.cli import main as cli
    from delf_retrieval.tasks import recognition

    seen = {}

    def fake_recognize(data_dir, extractor, config, **kwargs):
        seen["config"] = config
        raise KeyboardInterrupt  # stop here: only the parsed config matters

    monkeypatch.setattr(recognition, "recognize", fake_recognize)
    sets = ["NUM_TO_RERANK=2.0", "MUTUAL_NEAREST_NEIGHBOR=1", "MAX_DESCRIPTOR_DISTANCE=inf", "RATIO_TEST=0.7"]
    args = ["recognize", str(data), "-o", str(tmp_path / "s.csv"), "--work-dir", str(tmp_path / "w")]
    assert cli.main(args + [arg for item in sets for arg in ("--set", item)]) == 130
    config = seen["config"]
    assert config.NUM_TO_RERANK == 2 and type(config.NUM_TO_RERANK) is int
    assert config.MUTUAL_NEAREST_NEIGHBOR is True
    assert config.MAX_DESCRIPTOR_DISTANCE == float("inf") and config.RATIO_TEST == 0.7


def test_output_that_is_a_directory_or_in_a_missing_folder(data, tmp_path, capsys):
    work = tmp_path / "work"
    base = ["recognize", str(data), "--work-dir", str(work), "--no-progress", "-o"]
    code, err = run(base + [str(tmp_path)], capsys)
    assert code == 2
    assert_one_line_error(err, f"-o {tmp_path} is a directory", "submission.csv")
    code, err = run(base + [str(tmp_path / "no" / "such" / "s.csv")], capsys)
    assert code == 2
    assert_one_line_error(err, f"folder {tmp_path / 'no' / 'such'} does not exist")
    assert not work.exists()  # refused before any work
    (tmp_path / "file").write_text("x")
    code, err = run(["extract", "--images", str(data), "--out", str(tmp_path / "file")], capsys)
    assert code == 2
    assert_one_line_error(err, "the feature store", "exists and is not a folder")


@contextlib.contextmanager
def read_only_folder(tmp_path: Path):
    """A folder nobody can write in: a read-only tmpfs as root (root ignores permission
    bits), else permission bits."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"running as root without permission to mount a read-only tmpfs: {mounted.stderr!r}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_read_only_output_folder_is_refused_before_any_work(data, tmp_path, capsys):
    work = tmp_path / "work"
    with read_only_folder(tmp_path) as folder:
        code, err = run(["recognize", str(data), "-o", str(folder / "s.csv"), "--work-dir", str(work)], capsys)
        assert code == 2
        assert_one_line_error(err, f"cannot write the submission in {folder}")
        assert not work.exists()
        code, err = run(["recognize", str(data), "-o", str(tmp_path / "s.csv"), "--work-dir", str(folder / "w")], capsys)
        assert code == 2
        assert_one_line_error(err, "cannot write the feature cache (--work-dir)")
        code, err = run(["extract", "--images", str(data), "--out", str(folder / "store")], capsys)
        assert code == 2
        assert_one_line_error(err, f"cannot write the feature store in {folder}")


def test_validate_and_evaluate_missing_files_exit_2(data, tmp_path, capsys):
    missing = tmp_path / "missing.csv"
    code, err = run(["validate", str(missing), "--sample", str(data / "sample_submission.csv")], capsys)
    assert code == 2
    assert_one_line_error(err, f"no such file: {missing}")
    code, err = run(["validate", str(data / "sample_submission.csv"), "--sample", str(missing)], capsys)
    assert code == 2
    code, err = run(["evaluate", "--submission", str(missing), "--solution", str(data / "train.csv")], capsys)
    assert code == 2
    assert_one_line_error(err, f"no such file: {missing}")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"delf-retrieval {__version__}"


def test_bad_numbers_in_flags_are_usage_errors(data, tmp_path, capsys):
    for flag in ("--batch-size", "--threads", "--max-image-size"):
        with pytest.raises(SystemExit) as exit_info:
            main(["extract", "--images", str(data), "--out", str(tmp_path / "s"), flag, "0"])
        assert exit_info.value.code == 2
        assert "expected an integer >= 1, got '0'" in capsys.readouterr().err


def test_lost_ray_workers_and_internal_errors_have_their_own_codes(data, tmp_path, monkeypatch, capsys):
    from delf_retrieval import distributed
    from delf_retrieval.models import extract

    def workers_lost(*args, **kwargs):
        raise WorkersLostError("every Ray extraction worker died (3 batches left); rerun to resume")

    monkeypatch.setattr(distributed, "extract_to_store_ray", workers_lost)
    args = ["extract", "--images", str(data / "train.csv"), "--out", str(tmp_path / "s"), "--no-progress"]
    code, err = run(args + ["--ray", "local"], capsys)
    assert code == 2
    assert_one_line_error(err, "every Ray extraction worker died")

    def bug(*args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'shape'")

    monkeypatch.setattr(extract, "extract_to_store", bug)
    code, err = run(args, capsys)
    assert code == 3  # not 1: that code means "invalid submission"
    assert "Traceback" in err and "internal error" in err.strip().splitlines()[-1]


def write_photos(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    photo = bundled_photo("astronaut")
    folder.mkdir(parents=True)
    for index in range(count):
        view = random_view(photo, rng, size=480)
        cv2.imwrite(str(folder / f"p{index:02d}.jpg"), cv2.cvtColor(view, cv2.COLOR_RGB2BGR))


@pytest.mark.slow
def test_ctrl_c_prints_how_to_resume_and_the_rerun_resumes(tmp_path):
    write_photos(tmp_path / "img", 12)
    store = tmp_path / "store"
    command = [sys.executable, "-m", "delf_retrieval.cli.main", "extract", "--images", str(tmp_path / "img")]
    command += ["--out", str(store), "--batch-size", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # A shell without job control starts background jobs with SIGINT ignored, and Python
    # keeps an inherited SIG_IGN: give the child the default so Ctrl-C reaches it however
    # the suite was launched.
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if len(list((store / "chunks").glob("chunk-*.npz"))) >= 2:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, (out, err)
    assert err.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"
    assert "Traceback" not in err
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    done = int(rerun.stdout.split(" extracted, ")[1].split(" already")[0])
    assert 2 <= done < 12 and "12 listed" in rerun.stdout
