"""Submission tables and files: building, round trips, solutions, validation messages."""

import pandas as pd
import pytest

from delf_retrieval.kaggle.submission import (
    check_submission,
    format_confidence,
    read_recognition_solution,
    read_recognition_submission,
    read_retrieval_solution,
    read_retrieval_submission,
    recognition_dataframe,
    retrieval_dataframe,
    validate_submission,
    write_recognition_submission,
    write_retrieval_submission,
)

A, B, C = "0a1b2c3d4e5f6789", "0000000000000012", "ffffffffffffffff"
SAMPLE = pd.DataFrame({"id": [A, B, C], "landmarks": ["", "", ""]})


# ----------------------------------------------------------------------------- build


def test_format_confidence_is_positional_and_exact():
    assert format_confidence(0.5) == "0.5"
    assert format_confidence(2.0) == "2.0"
    assert format_confidence(-1.25) == "-1.25"
    assert format_confidence(1e-7) == "0.0000001"
    assert format_confidence(1.5e16) == "15000000000000000.0"
    assert float(format_confidence(0.1 + 0.2)) == 0.1 + 0.2
    with pytest.raises(ValueError, match="finite"):
        format_confidence(float("inf"))


def test_recognition_dataframe():
    frame = recognition_dataframe({A: ("123", 0.5), B: (None, 0.3), C: ("7", 1e-7)})
    assert list(frame.columns) == ["id", "landmarks"]
    assert frame["id"].tolist() == [A, B, C]
    assert frame["landmarks"].tolist() == ["123 0.5", "", "7 0.0000001"]
    # ids set the rows and their order; missing predictions stay empty
    frame = recognition_dataframe({A: ("123", 0.5)}, ids=[C, A, B])
    assert frame["id"].tolist() == [C, A, B]
    assert frame["landmarks"].tolist() == ["", "123 0.5", ""]


def test_recognition_dataframe_bad_input():
    with pytest.raises(ValueError, match="1 predicted ids are not in ids"):
        recognition_dataframe({A: ("1", 0.5), "dead": ("1", 0.5)}, ids=[A])
    with pytest.raises(ValueError, match="ids repeat"):
        recognition_dataframe({}, ids=[A, A])
    with pytest.raises(ValueError, match="without spaces"):
        recognition_dataframe({A: ("1 2", 0.5)})
    with pytest.raises(ValueError, match="finite"):
        recognition_dataframe({A: ("1", float("nan"))})


def test_retrieval_dataframe_truncates_and_dedupes():
    frame = retrieval_dataframe({A: ["i1", "i2", "i1", "i3"], B: []}, top=2)
    assert frame["images"].tolist() == ["i1 i2", ""]
    frame = retrieval_dataframe({A: ["i1", "i2", "i1", "i3"]}, ids=[B, A])
    assert frame["images"].tolist() == ["", "i1 i2 i3"]
    with pytest.raises(ValueError, match="not a string"):
        retrieval_dataframe({A: "i1 i2"})
    with pytest.raises(ValueError, match="top"):
        retrieval_dataframe({A: ["i1"]}, top=0)


# ----------------------------------------------------------------------------- files


def test_recognition_round_trip(tmp_path):
    predictions = {A: ("123", 0.1 + 0.2), B: (None, 0.0), C: ("7", -3.5)}
    path = write_recognition_submission(tmp_path / "sub" / "submission.csv", predictions)
    assert path.read_text() == f"id,landmarks\n{A},123 0.30000000000000004\n{B},\n{C},7 -3.5\n"
    assert read_recognition_submission(path) == predictions
    assert [p.name for p in path.parent.iterdir()] == ["submission.csv"]  # no temporary left
    # overwrite in place
    write_recognition_submission(path, {A: ("9", 1.0)}, ids=[A, B])
    assert read_recognition_submission(path) == {A: ("9", 1.0), B: (None, 0.0)}


def test_retrieval_round_trip(tmp_path):
    predictions = {A: ["i1", "i2"], B: [], C: [f"{i:016x}" for i in range(120)]}
    path = write_retrieval_submission(tmp_path / "retrieval.csv", predictions)
    read = read_retrieval_submission(path)
    assert read[A] == ["i1", "i2"] and read[B] == []
    assert read[C] == [f"{i:016x}" for i in range(100)]
    assert list(read) == [A, B, C]


def test_readers_reject_malformed(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(f"id,landmarks\n{A},12\n")
    with pytest.raises(ValueError, match="expected '<landmark_id> <confidence>'"):
        read_recognition_submission(path)
    path.write_text(f"id,landmarks\n{A},12 x\n")
    with pytest.raises(ValueError, match="unparsable confidence"):
        read_recognition_submission(path)
    path.write_text(f"id,landmarks\n{A},\n{A},\n")
    with pytest.raises(ValueError, match="repeated"):
        read_recognition_submission(path)
    path.write_text("")
    with pytest.raises(ValueError, match="empty"):
        read_recognition_submission(path)
    path.write_text(f"id,images\n{A},i1\n")
    with pytest.raises(ValueError, match="lacks column"):
        read_recognition_submission(path)


def test_read_solutions(tmp_path):
    path = tmp_path / "solution.csv"
    path.write_text(f"id,landmarks,Usage\n{A},173569,Public\n{B},,Private\n{C},1 2,Ignored\n")
    solution = read_recognition_solution(path)
    assert solution.truth == {A: {"173569"}, B: set(), C: {"1", "2"}}
    assert solution.usage == {A: "Public", B: "Private", C: "Ignored"}
    assert solution.usages == ["Public", "Private"]
    assert solution.split() == {A: {"173569"}, B: set()}
    assert solution.split("Private") == {B: set()}
    assert solution.split("Ignored") == {C: {"1", "2"}}

    path = tmp_path / "retrieval_solution.csv"
    path.write_text(f"id,images,Usage\n{A},{B} {C},Private\n")
    solution = read_retrieval_solution(path)
    assert solution.truth == {A: {B, C}}
    assert solution.usages == ["Private"]

    path.write_text(f"id,images,Usage\n{A},{B},Secret\n")
    with pytest.raises(ValueError, match="unknown Usage 'Secret'"):
        read_retrieval_solution(path)


# ----------------------------------------------------------------------------- validate


def _recognition(cells, ids=(A, B, C)):
    return pd.DataFrame({"id": list(ids), "landmarks": list(cells)})


def test_valid_submissions_have_no_problems(tmp_path):
    assert validate_submission(_recognition(["1 0.5", "", "22 -0.125"]), SAMPLE) == []
    check_submission(_recognition(["1 0.5", "", "22 -0.125"]), SAMPLE)
    path = write_retrieval_submission(tmp_path / "r.csv", {A: ["x"] * 3, B: ["y"], C: []})
    assert validate_submission(path, SAMPLE, kind="retrieval") == []
    assert validate_submission(_recognition(["1 0.5"], ids=["zz"]), None) == []


@pytest.mark.parametrize(
    ("cells", "message"),
    [
        (["12", "", ""], f"1 rows are not '<landmark_id> <confidence>': {A!r}"),
        (["12 0.5 13", "", ""], f"1 rows are not '<landmark_id> <confidence>': {A!r}"),
        (["", "12 0.5 13 0.4", ""], f"1 rows have more than one prediction: {B!r}"),
        (["x12 0.5", "", ""], f"1 rows have an unparsable landmark id: {A!r}"),
        (["12 high", "", ""], f"1 rows have an unparsable confidence: {A!r}"),
        (["12 nan", "12 inf", ""], f"2 rows have a NaN or infinite confidence: {A!r}, {B!r}"),
        (
            ["12  0.5", " 12 0.5", "12 0.5 "],
            f"3 rows have irregular whitespace: {A!r}, {B!r}, {C!r}",
        ),
    ],
)
def test_recognition_cell_messages(cells, message):
    assert validate_submission(_recognition(cells), SAMPLE) == [message]


def test_id_messages():
    assert validate_submission(_recognition(["", ""], ids=[A, B]), SAMPLE) == [
        f"1 ids of the sample submission are missing: {C!r}"
    ]
    assert validate_submission(_recognition([""] * 4, ids=[A, B, C, "dd"]), SAMPLE) == [
        "1 ids are not in the sample submission: 'dd'"
    ]
    assert validate_submission(_recognition([""] * 4, ids=[A, B, C, A]), SAMPLE) == [
        f"1 ids appear more than once: {A!r}"
    ]
    assert validate_submission(_recognition([""] * 4, ids=[A, B, C, ""]), SAMPLE) == [
        "1 rows have an empty id, at row numbers: 3"
    ]


def test_many_problems_are_summarised():
    ids = [f"{i:016x}" for i in range(7)]
    frame = pd.DataFrame({"id": ids, "landmarks": ["1"] * 7})
    shown = ", ".join(repr(i) for i in ids[:5])
    assert validate_submission(frame, None) == [
        f"7 rows are not '<landmark_id> <confidence>': {shown}, ..."
    ]


def test_structure_messages(tmp_path):
    wrong = pd.DataFrame({"id": [A], "landmark": ["1 0.5"]})
    assert validate_submission(wrong, SAMPLE) == [
        "columns are ['id', 'landmark'], expected ['id', 'landmarks']"
    ]
    problems = validate_submission(tmp_path / "missing.csv", SAMPLE)
    assert len(problems) == 1 and problems[0].startswith("cannot read submission:")
    problems = validate_submission(_recognition(["", "", ""]), tmp_path / "missing.csv")
    assert len(problems) == 1 and problems[0].startswith("cannot read sample submission:")
    with pytest.raises(ValueError, match="kind must be"):
        validate_submission(SAMPLE, SAMPLE, kind="detection")
    with pytest.raises(ValueError, match="no 'id' column"):
        validate_submission(SAMPLE, pd.DataFrame({"key": [A]}))


def test_retrieval_messages():
    frame = pd.DataFrame({"id": [A, B, C], "images": [" ".join(["i"] * 101), "i1", "i1  i2"]})
    assert validate_submission(frame, SAMPLE, kind="retrieval") == [
        f"1 rows have irregular whitespace: {C!r}",
        f"1 rows have more than 100 index ids: {A!r}",
    ]
    assert validate_submission(_recognition(["", "", ""]), SAMPLE, kind="retrieval") == [
        "columns are ['id', 'landmarks'], expected ['id', 'images']"
    ]


def test_check_submission_joins_every_message():
    frame = _recognition(["12", "1 nan"], ids=[A, "dd"])
    with pytest.raises(ValueError) as info:
        check_submission(frame, SAMPLE)
    assert str(info.value) == (
        "invalid recognition submission:\n"
        f"- 2 ids of the sample submission are missing: {B!r}, {C!r}\n"
        "- 1 ids are not in the sample submission: 'dd'\n"
        f"- 1 rows are not '<landmark_id> <confidence>': {A!r}\n"
        "- 1 rows have a NaN or infinite confidence: 'dd'"
    )


def test_validation_does_not_mutate():
    frame = _recognition(["1 0.5", None, "2 0.25"])
    before = frame.copy()
    assert validate_submission(frame, SAMPLE) == []
    pd.testing.assert_frame_equal(frame, before)
