"""GAP and mAP@100 on small hand-computed cases."""

from fractions import Fraction

import pandas as pd
import pytest

from delf_retrieval.metrics import (
    evaluate_recognition,
    evaluate_retrieval,
    global_average_precision,
    mean_average_precision_at_k,
)
from delf_retrieval.submission import Solution

Q1, Q2, Q3, Q4, Q5 = (f"000000000000000{i}" for i in range(1, 6))

# three landmark queries (Q3 has two true labels), two non-landmark queries
SOLUTION = {Q1: {"10"}, Q2: {"20"}, Q3: {"30", "31"}, Q4: set(), Q5: set()}


def test_gap_hand_computed_with_tie_in_given_order():
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
    # ranks: Q1 (1/1), Q2, Q4, Q3 (2/4)
    assert global_average_precision(swapped, SOLUTION) == pytest.approx(0.5, abs=1e-15)
    # Google's reference order: ties by query id
    assert global_average_precision(swapped, SOLUTION, tie_break="id") == pytest.approx(
        5 / 9, abs=1e-15
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
        "qd": set(),  # no relevant image: not scored
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
    expected = float((ap_a + ap_b + 0) / 3)
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
