"""GAP and mAP@100: hand-computed cases and a randomized comparison with the reference.

The reference is tensorflow/models research/delf/delf/python/datasets/
google_landmarks_dataset/metrics.py (GlobalAveragePrecision, MeanAveragePrecision) with
dataset_file_io.py (ReadSolution, ReadPredictions); ``_official_*`` below restate those
published definitions in plain Python, independent of delf_retrieval.
"""

from fractions import Fraction

import pandas as pd
import pytest

from delf_retrieval.kaggle.metrics import (
    evaluate_recognition,
    evaluate_retrieval,
    global_average_precision,
    mean_average_precision_at_k,
)
from delf_retrieval.kaggle.submission import Solution

Q1, Q2, Q3, Q4, Q5 = (f"000000000000000{i}" for i in range(1, 6))

# three landmark queries (Q3 has two true labels), two non-landmark queries
SOLUTION = {Q1: {"10"}, Q2: {"20"}, Q3: {"30", "31"}, Q4: set(), Q5: set()}


def test_gap_hand_computed_ties_in_reference_and_given_order():
    predictions = {
        Q1: ("10", 0.9),  # right
        Q2: ("99", 0.8),  # wrong
        Q3: ("31", 0.5),  # right, tied with Q4
        Q4: ("10", 0.5),  # non-landmark query: wrong, stays in the list
        Q5: (None, 0.0),  # no prediction
    }
    # ranks: Q1 (1/1), Q2, Q3 (2/3), Q4; M = 3
    assert global_average_precision(predictions, SOLUTION) == pytest.approx(5 / 9, abs=1e-15)
    swapped = {Q1: ("10", 0.9), Q2: ("99", 0.8), Q4: ("10", 0.5), Q3: ("31", 0.5)}
    # default = the reference's order: ties by query id, whatever the input order
    assert global_average_precision(swapped, SOLUTION) == pytest.approx(5 / 9, abs=1e-15)
    # given order on request: Q1 (1/1), Q2, Q4, Q3 (2/4)
    assert global_average_precision(swapped, SOLUTION, tie_break="input") == pytest.approx(
        0.5, abs=1e-15
    )


def test_gap_missing_prediction_adds_nothing():
    predictions = {Q1: ("10", 0.9), Q3: ("31", 0.5), Q4: ("10", 0.5)}
    # ranks: Q1 (1/1), Q3 (2/2), Q4; M = 3
    assert global_average_precision(predictions, SOLUTION) == pytest.approx(2 / 3, abs=1e-15)


def test_gap_perfect_and_edge_cases():
    perfect = {Q1: ("10", 0.2), Q2: ("20", 0.9), Q3: ("30", 0.1), Q4: (None, 0.0)}
    assert global_average_precision(perfect, SOLUTION) == 1.0
    assert global_average_precision({}, SOLUTION) == 0.0
    assert global_average_precision({Q4: ("1", 1.0)}, {Q4: set()}) == 0.0
    # predictions for ids outside the solution are ignored
    assert global_average_precision({Q1: ("10", 1.0), "ffff": ("1", 9.0)}, {Q1: {"10"}}) == 1.0
    # a wrong, confident non-landmark prediction costs precision
    assert global_average_precision({Q4: ("1", 1.0), Q1: ("10", 0.5)}, SOLUTION) == pytest.approx(
        (1 / 2) / 3, abs=1e-15
    )


def test_gap_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        global_average_precision({Q1: ("10", float("nan"))}, SOLUTION)
    with pytest.raises(ValueError, match="tie_break"):
        global_average_precision({}, SOLUTION, tie_break="random")


def test_gap_dataframes_in_kaggle_formats():
    submission = pd.DataFrame(
        {"id": [Q1, Q2, Q3, Q4, Q5], "landmarks": ["10 0.9", "99 0.8", "31 0.5", "10 0.5", ""]}
    )
    solution = pd.DataFrame(
        {
            "id": [Q1, Q2, Q3, Q4, Q5],
            "landmarks": ["10", "20", "30 31", "", ""],
            "Usage": ["Public"] * 5,
        }
    )
    assert global_average_precision(submission, solution) == pytest.approx(5 / 9, abs=1e-15)


def test_evaluate_recognition_splits():
    solution = pd.DataFrame(
        {
            "id": [Q1, Q2, Q3, Q4, Q5],
            "landmarks": ["10", "20", "30 31", "", "50"],
            "Usage": ["Public", "Public", "Private", "Private", "Ignored"],
        }
    )
    submission = pd.DataFrame(
        {
            "id": [Q5, Q1, Q2, Q3, Q4],
            "landmarks": ["50 1.0", "10 0.9", "99 0.8", "31 0.5", "10 0.5"],
        }
    )
    scores = evaluate_recognition(submission, solution)
    assert list(scores) == ["Public", "Private", "All"]
    # Public: Q1 right, Q2 wrong, M = 2; Private: Q3 then Q4, M = 1; Q5 is ignored
    assert scores["Public"] == pytest.approx(0.5, abs=1e-15)
    assert scores["Private"] == 1.0
    assert scores["All"] == pytest.approx(5 / 9, abs=1e-15)


def test_evaluate_recognition_without_usage_and_from_files(tmp_path):
    (tmp_path / "solution.csv").write_text("id,landmarks\n0a,7\n0b,\n")
    (tmp_path / "submission.csv").write_text("id,landmarks\n0a,7 0.25\n0b,7 0.5\n")
    scores = evaluate_recognition(tmp_path / "submission.csv", tmp_path / "solution.csv")
    assert scores == {"All": pytest.approx(0.5, abs=1e-15)}
    only_private = Solution({"0a": frozenset({"7"})}, {"0a": "Private"})
    assert evaluate_recognition({"0a": ("7", 1.0)}, only_private) == {"Private": 1.0, "All": 1.0}


def _harmonic(n):
    return sum(Fraction(1, i) for i in range(1, n + 1))


def test_map_at_100_hand_computed():
    many = [f"r{i:03d}" for i in range(150)]
    solution = {
        "qa": {"i1", "i2", "i3"},
        "qb": set(many),  # more than 100 relevant: divide by 100
        "qc": {"i9"},  # no prediction: 0
        "qd": set(),  # no relevant image: counts with AP 0, as in the reference
    }
    predictions = {
        # hits at ranks 1, 3, 5; the repeated i1 takes rank 4 but scores nothing
        "qa": ["i1", "x", "i2", "i1", "i3"],
        # miss at rank 1, hits at ranks 2..100 (the rest lies beyond k)
        "qb": ["x", *many[:119]],
        "qd": ["i1"],
        "qz": ["i1"],  # not in the solution: ignored
    }
    ap_a = (1 + Fraction(2, 3) + Fraction(3, 5)) / 3
    ap_b = sum(Fraction(j, j + 1) for j in range(1, 100)) / 100
    assert ap_b == (100 - _harmonic(100)) / 100
    expected = float((ap_a + ap_b + 0 + 0) / 4)
    assert mean_average_precision_at_k(predictions, solution) == pytest.approx(expected, abs=1e-15)


def test_map_small_k_and_edges():
    solution = {"qa": {"i1", "i2", "i3"}}
    # k = 2: hits at rank 1 only, divided by min(3, 2)
    assert mean_average_precision_at_k({"qa": ["i1", "x", "i2"]}, solution, k=2) == 0.5
    assert mean_average_precision_at_k({"qa": ["i3", "i1", "i2"]}, solution) == 1.0
    assert mean_average_precision_at_k({}, solution) == 0.0
    assert mean_average_precision_at_k({"qa": ["i1"]}, {"qa": set()}) == 0.0
    with pytest.raises(ValueError, match="k must be"):
        mean_average_precision_at_k({}, solution, k=0)
    with pytest.raises(ValueError, match="not a string"):
        mean_average_precision_at_k({"qa": "i1 i2"}, solution)


def test_evaluate_retrieval_splits_and_dataframes():
    solution = pd.DataFrame(
        {
            "id": ["qa", "qb", "qc", "qd"],
            "images": ["i1 i2", "i3", "i4", "i5"],
            "Usage": ["Public", "Private", "Private", "Ignored"],
        }
    )
    submission = pd.DataFrame(
        {"id": ["qa", "qb", "qc", "qd"], "images": ["i2 x i1", "x i3", "", "i5"]}
    )
    scores = evaluate_retrieval(submission, solution)
    # qa: (1/1 + 2/3) / 2; qb: 1/2; qc: 0; qd ignored
    assert scores["Public"] == pytest.approx(5 / 6, abs=1e-15)
    assert scores["Private"] == pytest.approx(0.25, abs=1e-15)
    assert scores["All"] == pytest.approx((5 / 6 + 1 / 2) / 3, abs=1e-15)
    assert list(scores) == ["Public", "Private", "All"]


# ----------------------------------------------------------------------------------------
# Reference behaviours, one hand-computed case each
# ----------------------------------------------------------------------------------------


def test_gap_landmark_ids_are_integers():
    # ReadSolution/ReadPredictions parse landmark ids with int(): "007" is landmark 7
    assert global_average_precision({Q1: ("007", 0.5)}, {Q1: {"7"}}) == 1.0
    assert global_average_precision({Q1: ("7", 0.5)}, {Q1: {"0007"}}) == 1.0
    # ties order landmark ids as integers: (Q1, 9) before (Q1, 10) is moot (one per query),
    # but across queries the id decides first: Q1 before Q2
    predictions = {Q2: ("20", 0.5), Q1: ("11", 0.5)}
    # Q1 wrong at rank 1, Q2 right at rank 2: (1/2) / 2
    assert global_average_precision(predictions, {Q1: {"10"}, Q2: {"20"}}) == 0.25


def test_gap_split_without_landmark_query_is_zero():
    # the reference divides by zero here; we return 0.0 (documented)
    assert global_average_precision({Q4: ("1", 1.0)}, {Q4: set(), Q5: set()}) == 0.0
    solution = Solution({Q1: frozenset({"1"}), Q4: frozenset()}, {Q1: "Public", Q4: "Private"})
    assert evaluate_recognition({Q1: ("1", 1.0), Q4: ("1", 1.0)}, solution) == {
        "Public": 1.0,
        "Private": 0.0,
        "All": 1.0,
    }


def test_map_empty_ground_truth_rows_count_as_zero(tmp_path):
    (tmp_path / "solution.csv").write_text(
        "id,images,Usage\nqa,i1,Public\nqb,,Public\nqc,i3,Ignored\n"
    )
    (tmp_path / "submission.csv").write_text("id,images\nqa,i1\nqb,i1\nqc,i3\n")
    scores = evaluate_retrieval(tmp_path / "submission.csv", tmp_path / "solution.csv")
    # qa: 1; qb: empty ground truth, not Ignored: AP 0 but counted; qc ignored
    assert scores == {"Public": 0.5, "All": 0.5}
    assert mean_average_precision_at_k({}, {}) == 0.0


def test_duplicate_and_missing_predictions():
    # a duplicate index id keeps its position but scores once: hits at ranks 1 and 3
    assert mean_average_precision_at_k({"qa": ["i1", "i1", "i2"]}, {"qa": {"i1", "i2"}}) == (
        pytest.approx((1 + 2 / 3) / 2, abs=1e-15)
    )
    # a repeated query row is malformed: the reference raises, so do we
    with pytest.raises(ValueError, match="repeated"):
        evaluate_recognition(
            pd.DataFrame({"id": [Q1, Q1], "landmarks": ["1 0.5", "1 0.4"]}), {Q1: {"1"}}
        )
    # a landmark query without a prediction lowers GAP through M only
    assert global_average_precision({Q1: ("10", 0.9)}, SOLUTION) == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------
# Randomized comparison with the published definitions, on files
# ----------------------------------------------------------------------------------------


def _official_read_solution(path, task):
    """dataset_file_io.ReadSolution restated: (public, private, ignored ids)."""
    import csv

    public, private, ignored = {}, {}, []
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        next(reader, None)
        for row in reader:
            if row[2] == "Ignored":
                ignored.append(row[0])
                continue
            if task == "recognition":
                truth = [int(x) for x in row[1].split(" ")] if row[1] else []
            else:
                truth = row[1].split(" ")  # an empty cell gives ['']
            (public if row[2] == "Public" else private)[row[0]] = truth
    return public, private, ignored


def _official_read_predictions(path, public_ids, private_ids, ignored_ids, task):
    """dataset_file_io.ReadPredictions restated."""
    import csv

    public, private = {}, {}
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        next(reader, None)
        for row in reader:
            if not row or row[0] in ignored_ids or not row[1]:
                continue
            parts = row[1].split(" ")
            if not parts[-1]:
                parts = parts[:-1]
            if task == "recognition":
                entry = {"class": int(parts[0]), "score": float(parts[1])}
            else:
                entry = parts
            (public if row[0] in public_ids else private)[row[0]] = entry
    return public, private


def _official_gap(predictions, solution):
    """metrics.GlobalAveragePrecision restated (ignore_non_gt_test_images=False)."""
    positives = sum(1 for v in solution.values() if v)
    ordered = sorted(predictions.items(), key=lambda item: (item[0], item[1]["class"]))
    ordered = sorted(ordered, key=lambda item: item[1]["score"], reverse=True)
    gap, total, correct = 0.0, 0, 0
    for key, prediction in ordered:
        total += 1
        if prediction["class"] in solution[key]:
            correct += 1
            gap += correct / total
    return gap / positives


def _official_map(predictions, solution, max_predictions=100):
    """metrics.MeanAveragePrecision restated."""
    mean_ap = 0.0
    for key, prediction in predictions.items():
        ap, seen, correct = 0.0, set(), 0
        expected = min(len(solution[key]), max_predictions)
        for i in range(min(len(prediction), max_predictions)):
            if prediction[i] not in seen:
                if prediction[i] in solution[key]:
                    correct += 1
                    ap += correct / (i + 1)
                seen.add(prediction[i])
        mean_ap += ap / expected
    return mean_ap / len(solution)


def _random_recognition_files(rng, folder, index):
    n = int(rng.integers(3, 40))
    ids = [f"{i:016x}" for i in rng.choice(10**6, n, replace=False)]
    usages = ["Public", "Private"] + list(rng.choice(["Public", "Private", "Ignored"], n - 2))
    landmark_pool = [0, 7, 9, 10, 11, 123]
    solution_rows, submission_rows = [], []
    for key, usage in zip(ids, usages, strict=True):
        truth = rng.choice(landmark_pool, int(rng.integers(0, 3)), replace=False)
        solution_rows.append(f"{key},{' '.join(str(x) for x in truth)},{usage}")
        if rng.random() < 0.8:  # some queries have no prediction
            label = int(rng.choice(landmark_pool))
            text = f"{label:03d}" if rng.random() < 0.3 else str(label)  # 007 == 7
            score = float(rng.choice([0.1, 0.5, 0.5, 0.9, rng.random()]))  # many ties
            submission_rows.append(f"{key},{text} {score!r}")
        else:
            submission_rows.append(f"{key},")
    order = rng.permutation(len(submission_rows))
    solution = folder / f"solution{index}.csv"
    submission = folder / f"submission{index}.csv"
    solution.write_text("id,landmarks,Usage\n" + "\n".join(solution_rows) + "\n")
    submission.write_text("id,landmarks\n" + "\n".join(submission_rows[i] for i in order) + "\n")
    return submission, solution


def _random_retrieval_files(rng, folder, index):
    n = int(rng.integers(2, 30))
    ids = [f"q{i:05d}" for i in rng.choice(10**5, n, replace=False)]
    usages = ["Public", "Private"] + list(rng.choice(["Public", "Private", "Ignored"], n - 2))
    pool = [f"i{i:03d}" for i in range(40)]
    solution_rows, submission_rows = [], []
    for key, usage in zip(ids, usages, strict=True):
        relevant = rng.choice(pool, int(rng.integers(0, 6)), replace=False)
        solution_rows.append(f"{key},{' '.join(relevant)},{usage}")
        if rng.random() < 0.85:
            ranked = list(rng.choice(pool, int(rng.integers(0, 25)), replace=True))  # repeats
            submission_rows.append(f"{key},{' '.join(ranked)}")
    solution = folder / f"rsolution{index}.csv"
    submission = folder / f"rsubmission{index}.csv"
    solution.write_text("id,images,Usage\n" + "\n".join(solution_rows) + "\n")
    submission.write_text("id,images\n" + "\n".join(submission_rows) + "\n")
    return submission, solution


def _official_scores(submission, solution, task):
    public, private, ignored = _official_read_solution(solution, task)
    predicted = _official_read_predictions(
        submission, set(public), set(private), set(ignored), task
    )
    score = _official_gap if task == "recognition" else _official_map
    positives = (lambda s: any(s.values())) if task == "recognition" else bool
    result = {}
    for name, truth, prediction in zip(
        ("Public", "Private"), (public, private), predicted, strict=True
    ):
        result[name] = score(prediction, truth) if positives(truth) else 0.0
    return result


@pytest.mark.parametrize("task", ["recognition", "retrieval"])
@pytest.mark.slow
def test_random_files_equal_the_reference_definitions(tmp_path, task):
    import numpy as np

    rng = np.random.default_rng(9 if task == "recognition" else 10)
    make = _random_recognition_files if task == "recognition" else _random_retrieval_files
    evaluate = evaluate_recognition if task == "recognition" else evaluate_retrieval
    for index in range(300):
        submission, solution = make(rng, tmp_path, index)
        ours = evaluate(submission, solution)
        official = _official_scores(submission, solution, task)
        for split, value in official.items():
            assert ours[split] == pytest.approx(value, abs=1e-12), (index, split)


def test_cli_evaluate_prints_the_reference_numbers(tmp_path, capsys):
    import numpy as np

    from delf_retrieval.cli.main import main

    rng = np.random.default_rng(11)
    for task, make in (
        ("recognition", _random_recognition_files),
        ("retrieval", _random_retrieval_files),
    ):
        submission, solution = make(rng, tmp_path, 0)
        official = _official_scores(submission, solution, task)
        assert main(["evaluate", "--submission", str(submission), "--solution", str(solution)]) == 0
        printed = capsys.readouterr().out
        for split, value in official.items():
            assert f"{split} {value:.4f}" in printed, (task, printed)
