"""The notebooks run headless, top to bottom, on a tiny demo dataset."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from delf_retrieval.demo.data import build_demo_dataset
from delf_retrieval.kaggle.submission import validate_submission

pytestmark = pytest.mark.notebooks

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
SUBMISSION_NOTEBOOKS = {
    "recognition_submission.ipynb": ("recognition", "GAP"),
    "retrieval_submission.ipynb": ("retrieval", "mAP@100"),
}
ALL_NOTEBOOKS = [*SUBMISSION_NOTEBOOKS, "explore_matches.ipynb"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small demo dataset and one feature cache that all notebooks share (speed)."""
    root = tmp_path_factory.mktemp("notebook_demo")
    dataset = build_demo_dataset(
        root / "data",
        landmarks=("astronaut", "chelsea", "coffee", "rocket"),
        train_views=2,
        query_views=2,
        nonlandmark_queries=("grass", "text"),
        nonlandmark_set=("grass", "gravel"),
        image_size=320,
    )
    return dataset.root, root / "work"


def execute(name: str, data_dir: Path | None, work_dir: Path, cwd: Path, **extra_env: str):
    """Run one notebook in a fresh python3 kernel; errors raise CellExecutionError."""
    import nbclient  # imported here: a quick `-m "not slow"` run does not pay for Jupyter
    import nbformat

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    # DELF_RETRIEVAL_DEFAULT_MODEL (pinned by conftest) stays: the default model, not torch.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELF_") or k == "DELF_RETRIEVAL_DEFAULT_MODEL"}
    env.update({"DELF_WORK_DIR": str(work_dir), "DELF_KAGGLE_INPUT": str(cwd / "no-kaggle-here"), **extra_env})
    if data_dir is not None:
        env["DELF_DATA_DIR"] = str(data_dir)
    # The kernel must import this checkout even when the package is not installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=300,
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute(env=env, cwd=str(cwd))
    return notebook


def outputs(notebook) -> list[dict]:
    return [
        output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    ]


def printed(notebook) -> str:
    return "".join(output.get("text", "") for output in outputs(notebook))


def pictures(notebook) -> int:
    return sum("image/png" in output.get("data", {}) for output in outputs(notebook))


def test_notebooks_are_stored_clean_with_a_parameters_cell():
    assert sorted(path.name for path in NOTEBOOKS.glob("*.ipynb")) == sorted(ALL_NOTEBOOKS)
    for name in ALL_NOTEBOOKS:
        raw = json.loads((NOTEBOOKS / name).read_text())
        code = [cell for cell in raw["cells"] if cell["cell_type"] == "code"]
        assert all(cell["outputs"] == [] and cell["execution_count"] is None for cell in code), name
        tagged = [cell for cell in code if "parameters" in cell["metadata"].get("tags", [])]
        assert len(tagged) == 1, name
        assert "DELF_DATA_DIR" in "".join(tagged[0]["source"]), name
        assert raw["cells"][0]["cell_type"] == "markdown", name


@pytest.mark.parametrize("name", list(SUBMISSION_NOTEBOOKS))
def test_submission_notebooks_write_a_valid_submission(name, demo, tmp_path):
    data_dir, work_dir = demo
    notebook = execute(name, data_dir, work_dir, tmp_path)
    kind, metric = SUBMISSION_NOTEBOOKS[name]
    written = tmp_path / "submission.csv"
    assert written.is_file()
    assert validate_submission(written, data_dir / "sample_submission.csv", kind=kind) == []
    assert f"{written.name}: valid" in printed(notebook)
    assert re.search(rf"{metric} \(re-ranked\): Public \d\.\d{{4}}, Private", printed(notebook))
    assert pictures(notebook) == 1


def test_explore_matches_draws_neighbours_matches_and_gallery(demo, tmp_path):
    data_dir, work_dir = demo
    notebook = execute("explore_matches.ipynb", data_dir, work_dir, tmp_path)
    # Neighbours, two match pictures (same and other landmark) and the gallery.
    assert pictures(notebook) == 4
    assert not (tmp_path / "submission.csv").exists()


@pytest.mark.parametrize("name", ALL_NOTEBOOKS)
def test_notebooks_on_kaggle_stop_on_an_unrecognised_competition(name, tmp_path):
    """With another competition attached they used to build the demo data and write a
    22-row submission that their own check called valid."""
    import nbclient

    kaggle_input = tmp_path / "input"
    (kaggle_input / "some-other-competition").mkdir(parents=True)
    (kaggle_input / "some-other-competition" / "sample_submission.csv").write_text("id,label\n1,0\n")
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="unrecognised competition in .*some-other-competition"):
        execute(name, None, tmp_path / "work", tmp_path, DELF_KAGGLE_INPUT=str(kaggle_input))
    assert not (tmp_path / "submission.csv").exists()


def test_recognition_notebook_with_your_own_keras_model(demo, tmp_path, keras_classifier):
    """Issue 11: a Keras model for search + RootSIFT for re-ranking, fused with its softmax head."""
    data_dir, work_dir = demo
    notebook = execute(
        "recognition_submission.ipynb",
        data_dir,
        work_dir,
        tmp_path,
        DELF_GLOBAL_MODEL=str(keras_classifier / "model.keras"),
        DELF_LOCAL_MODEL="opencv-sift",
        DELF_MODEL_OPTIONS=json.dumps({"preprocess": "tf", "image_size": 64}),
        DELF_CLASSES=str(keras_classifier / "classes.csv"),
        DELF_PRESET="knn-classifier",
    )
    written = tmp_path / "submission.csv"
    assert validate_submission(written, data_dir / "sample_submission.csv", kind="recognition") == []
    text = printed(notebook)
    assert "KerasExtractor(" in text and "classifier: fused predictions from 1 classifier(s)" in text
    assert any(path.name.startswith("keras+opencv-sift-") for path in work_dir.iterdir())


@pytest.mark.parametrize("name", ["recognition_submission.ipynb", "retrieval_submission.ipynb", "explore_matches.ipynb"])
def test_values_edited_in_the_parameters_cell_are_the_last_word(name, monkeypatch):
    """A user who edits PRESET (and GLOBAL_MODEL) in place keeps them: nothing in the
    parameters cell recomputes them afterwards."""
    for variable in ("DELF_PRESET", "DELF_GLOBAL_MODEL", "DELF_MODEL"):
        monkeypatch.delenv(variable, raising=False)
    cell = next(c for c in json.loads((NOTEBOOKS / name).read_text())["cells"] if "parameters" in c["metadata"].get("tags", []))
    source = "".join(cell["source"])
    edited = re.sub(r"^PRESET = .*$", 'PRESET = "kaggle2020"', source, flags=re.M)
    edited = re.sub(r"^GLOBAL_MODEL = .*$", 'GLOBAL_MODEL = "my.keras"', edited, flags=re.M)
    assert edited != source
    namespace: dict = {}
    exec(compile(edited, name, "exec"), namespace)
    assert namespace["PRESET"] == "kaggle2020"
