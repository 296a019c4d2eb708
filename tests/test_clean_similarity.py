"""Cleaning's global-similarity rule: the threshold against a hand derivation, the
neighbour search, and each condition of the rule on a constructed train set."""

from __future__ import annotations

import numpy as np
import pytest

from delf_retrieval.cli.main import main
from delf_retrieval.tasks.clean import PairPlan, decide, plan_pairs
from delf_retrieval.tasks.clean_similarity import (
    MIN_VERIFIED_PAIRS,
    nearest_others,
    similarity_evidence,
    verified_pair_threshold,
)


def unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.float64)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def linear_quantile(values: list[float], q: float) -> float:
    """numpy's default ('linear') quantile, written out: h = (n - 1) q between sorted values."""
    ordered = sorted(values)
    h = (len(ordered) - 1) * q
    low = int(h)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (h - low) * (ordered[high] - ordered[low])


def test_the_threshold_is_the_quantile_of_the_verified_pairs_cosines():
    rng = np.random.default_rng(3)
    descriptors = unit(rng.normal(size=(30, 8))).astype(np.float32)
    pairs = np.array([(a, b) for a in range(30) for b in range(a + 1, 30)][:120], np.int64)
    inliers = rng.integers(0, 40, len(pairs))
    threshold, count = verified_pair_threshold(descriptors, pairs, inliers, min_inliers=20, quantile=0.1)
    cosines = [
        sum(float(x) * float(y) for x, y in zip(descriptors[a], descriptors[b], strict=True))
        for (a, b), n in zip(pairs, inliers, strict=True)
        if n >= 20
    ]
    assert count == len(cosines) > MIN_VERIFIED_PAIRS
    assert threshold == pytest.approx(linear_quantile(cosines, 0.1), abs=1e-12)
    few = np.where(np.arange(len(pairs)) < MIN_VERIFIED_PAIRS - 1, 50, 0)
    assert verified_pair_threshold(descriptors, pairs, few, min_inliers=20, quantile=0.1) == (None, MIN_VERIFIED_PAIRS - 1)
    with pytest.raises(ValueError, match="quantile"):
        verified_pair_threshold(descriptors, pairs, inliers, min_inliers=20, quantile=1.5)


def test_nearest_others_leave_the_photo_out_even_when_a_duplicate_ties_with_it():
    rng = np.random.default_rng(4)
    descriptors = unit(rng.normal(size=(12, 6))).astype(np.float32)
    descriptors[7] = descriptors[2]  # the same photo twice
    neighbours, cosines = nearest_others(descriptors, np.array([2, 7, 5]), 3, block_size=5)
    for row, found, sims in zip([2, 7, 5], neighbours, cosines, strict=True):
        brute = descriptors.astype(np.float64) @ descriptors[row].astype(np.float64)
        brute[row] = -np.inf
        assert found.tolist() == np.argsort(-brute, kind="stable")[:3].tolist()
        np.testing.assert_allclose(sims, brute[found], atol=1e-6)
    assert neighbours[0, 0] == 7 and neighbours[1, 0] == 2
    assert cosines[0, 0] == pytest.approx(1.0, abs=1e-6)


def constructed_train_set():
    """Three landmarks whose photos verify each other, plus one photo per condition of the
    rule. Directions: A, B, C, D (far away), L (a lookalike between A and B)."""
    e = np.eye(8)
    rng = np.random.default_rng(5)

    def near(direction, spread=0.02):
        return direction + spread * rng.normal(size=8)

    photos = {  # id -> (landmark, vector, verified with its class?)
        "a1": ("A", near(e[0]), True), "a2": ("A", near(e[0]), True), "a3": ("A", near(e[0]), True),
        "a4": ("A", near(e[0]), True),
        "b1": ("B", near(e[1]), True), "b2": ("B", near(e[1]), True), "b3": ("B", near(e[1]), True),
        "c1": ("C", near(e[2]), True), "c2": ("C", near(e[2]), True), "c3": ("C", near(e[2]), True),
        "c4": ("C", near(e[2]), True),
        # fails RANSAC (wide baseline), nearest to a2 and another A: the rule keeps it
        "genuine": ("A", None, False),
        # a photo of A moved to B: its nearest photos are A's
        "moved": ("B", near(e[0] - 0.2 * e[6], 0.01), False),
        # two shots of one non-landmark scene put into C: each other's nearest
        "noise1": ("C", e[3] + 0.01 * e[4], False), "noise2": ("C", e[3] - 0.01 * e[4], False),
        # labelled A, its nearest is a1, its second nearest a B photo that looks like A
        "split": ("A", None, False),
        "lookalike": ("B", None, False),
        # labelled A, both nearest are A's, but far less similar than verified pairs are
        "far": ("A", e[0] + 1.2 * e[5], False),
    }
    photos["genuine"] = ("A", near(photos["a2"][1], 0.005), False)
    a1 = photos["a1"][1] / np.linalg.norm(photos["a1"][1])
    photos["split"] = ("A", a1 + 0.03 * e[1], False)
    photos["lookalike"] = ("B", a1 + 0.07 * e[1], False)
    ids = sorted(photos)
    labels = {i: photos[i][0] for i in ids}
    descriptors = unit(np.stack([photos[i][1] for i in ids])).astype(np.float32)
    plan = plan_pairs(labels, ids, pairs="all")
    verified = {i for i in ids if photos[i][2]}
    inliers = np.array([40 if ids[a] in verified and ids[b] in verified else 3 for a, b in plan.pairs], np.int64)
    return labels, plan, inliers, descriptors


def test_the_rule_keeps_a_photo_its_landmark_vouches_for_and_none_of_the_noise():
    labels, plan, inliers, descriptors = constructed_train_set()
    failing = np.array([plan.ids.index(i) for i in ("far", "genuine", "lookalike", "moved", "noise1", "noise2", "split")])
    evidence, message = similarity_evidence(
        descriptors, failing, plan.pairs, inliers, min_inliers=11, neighbours=2, quantile=0.1
    )
    assert evidence is not None and "threshold" in message
    report = decide(labels, plan, inliers, min_inliers=11, similar=evidence).report.set_index("id")
    assert sorted(report.index[~report["kept"]]) == ["far", "lookalike", "moved", "noise1", "noise2", "split"]
    assert report.loc["genuine", "kept"] and "nearest photos by global cosine" in report.loc["genuine", "reason"]
    assert report.loc["genuine", "nearest"] == "a2"
    assert report.loc["moved", "nearest"].startswith("a")  # verified and close, but of A
    assert report.loc["noise1", "nearest"] == "noise2"  # consensus, but the nearest is not verified
    assert report.loc["split", "nearest"].startswith("a")  # verified and close, but no consensus
    assert report.loc["far", "nearest_cosine"] < evidence.threshold  # consensus, too far
    assert report.loc["a1", "nearest"] == "" and np.isnan(report.loc["a1", "nearest_cosine"])
    one = decide(
        labels, plan, inliers, similar=similarity_evidence(
            descriptors, failing, plan.pairs, inliers, min_inliers=11, neighbours=1, quantile=0.1
        )[0],
    ).report.set_index("id")
    assert one.loc["split", "kept"]  # one neighbour: no consensus to fail
    without = decide(labels, plan, inliers, min_inliers=11).report
    assert sorted(without.loc[~without["kept"], "id"]) == ["far", "genuine", "lookalike", "moved", "noise1", "noise2", "split"]


def test_too_few_verified_pairs_leave_the_decision_to_the_inliers():
    labels = {"a": "1", "b": "1", "c": "1"}
    plan = plan_pairs(labels, ["a", "b", "c"])
    descriptors = unit(np.eye(3) + 0.1).astype(np.float32)
    evidence, message = similarity_evidence(descriptors, np.array([2]), plan.pairs, np.array([30, 2, 2]), min_inliers=11)
    assert evidence is None and "1 verified pairs" in message
    with pytest.raises(ValueError, match="neighbours"):
        similarity_evidence(descriptors, np.array([2]), plan.pairs, np.array([30, 2, 2]), min_inliers=11, neighbours=0)


def test_decide_reports_nothing_looked_up_without_evidence():
    plan = PairPlan(pairs=np.array([[0, 1]]), ids=["a", "b"], classes={"1": ["a", "b"]})
    report = decide({"a": "1", "b": "1"}, plan, np.array([20])).report
    assert report.columns.tolist() == [
        "id", "landmark_id", "best_inliers", "best_partner", "nearest", "nearest_cosine", "kept", "reason",
    ]
    assert report["nearest"].tolist() == ["", ""] and report["nearest_cosine"].isna().all()


@pytest.mark.parametrize(("flag", "value"), [("--global-neighbours", "-1"), ("--global-quantile", "1.5")])
def test_the_cli_refuses_bad_rule_settings(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as stop:
        main(["clean", str(tmp_path), flag, value])
    assert stop.value.code == 2
    assert flag in capsys.readouterr().err
