"""Re-ranking, landmark votes and non-landmark penalties on hand-computed cases."""

import math
import operator

import numpy as np
import pytest

from delf_retrieval.config import Config
from delf_retrieval.scoring.rerank import (
    ScoringSettings,
    aggregate_landmarks,
    candidate_scores,
    nonlandmark_similarity,
    penalize_frequent_landmarks,
    recognize_one,
    rerank,
    rerank_retrieval,
)


def scoring(**changes) -> ScoringSettings:
    """The scoring settings of ``Config(MAX_INLIER_SCORE=20, TOP_K=3, **changes)``."""
    return ScoringSettings.from_config(Config(**{"MAX_INLIER_SCORE": 20, "TOP_K": 3, **changes}))


BASE = scoring()


# ----------------------------------------------------------------------------- scores


def test_candidate_scores_baseline_and_clipping():
    cosine = np.array([0.5, 0.25, 0.75, -0.5])
    inliers = np.array([10, 40, 0, 20])
    scores = candidate_scores(cosine, inliers, BASE)
    assert scores.dtype == np.float32
    # 10/20 + .5, min(40, 20)/20 + .25, 0 + .75, 20/20 - .5
    np.testing.assert_array_equal(scores, [1.0, 1.25, 0.75, 0.5])


def test_candidate_scores_min_inliers_gate():
    scores = candidate_scores(
        [0.5, 0.25, 0.75, -0.5], [10, 40, 0, 20], scoring(MIN_INLIERS=15)
    )
    np.testing.assert_array_equal(scores, [0.5, 1.25, 0.75, 0.5])
    # exactly MIN_INLIERS keeps its term
    np.testing.assert_array_equal(
        candidate_scores([0.0], [15], scoring(MIN_INLIERS=15)), [0.75]
    )


def test_candidate_scores_without_inliers_is_cosine():
    np.testing.assert_array_equal(candidate_scores([0.5, -0.25], None, BASE), [0.5, -0.25])


def test_candidate_scores_nonlandmark_penalty():
    cosine, inliers, nl = [0.5, 0.25, 0.75, -0.5], [10, 40, 0, 20], [0.5, 0.0, 1.0, 0.25]
    scores = candidate_scores(cosine, inliers, scoring(NONLANDMARK_PENALTY=0.5), nl)
    np.testing.assert_array_equal(scores, [0.75, 1.25, 0.25, 0.375])
    # penalty 0 ignores the similarities
    np.testing.assert_array_equal(
        candidate_scores(cosine, inliers, BASE, nl), [1.0, 1.25, 0.75, 0.5]
    )


def test_candidate_scores_does_not_mutate():
    cosine = np.array([0.5, 0.25])
    inliers = np.array([3, 4])
    candidate_scores(cosine, inliers, BASE)
    np.testing.assert_array_equal(cosine, [0.5, 0.25])
    np.testing.assert_array_equal(inliers, [3, 4])


@pytest.mark.parametrize(
    ("cosine", "inliers", "match"),
    [
        ([0.5], [-1], "non-negative integers"),
        ([0.5], [1.5], "non-negative integers"),
        ([0.5, 0.1], [1], "inliers has 1 entries"),
        ([[0.5]], None, "one-dimensional"),
        ([np.nan], None, "NaN"),
    ],
)
def test_candidate_scores_bad_input(cosine, inliers, match):
    with pytest.raises(ValueError, match=match):
        candidate_scores(cosine, inliers, BASE)


def test_candidate_scores_nonlandmark_length_checked():
    with pytest.raises(ValueError, match="nonlandmark has 1 entries"):
        candidate_scores([0.5, 0.1], None, scoring(NONLANDMARK_PENALTY=1.0), [0.2])


def test_empty_candidates():
    assert candidate_scores([], [], BASE).shape == (0,)
    order, scores = rerank(np.zeros(0), None, BASE)
    assert order.shape == (0,) and scores.shape == (0,)
    assert recognize_one([], [], [], BASE) == (None, 0.0)
    assert rerank_retrieval([], None, None, None, BASE).shape == (0,)


# ----------------------------------------------------------------------------- rerank


def test_rerank_order_with_stable_ties():
    order, scores = rerank([0.5, 0.75, 0.25, 0.5], [10, 0, 10, 10], BASE)
    # scores 1.0, 0.75, 0.75, 1.0: ties keep retrieval order
    np.testing.assert_array_equal(order, [0, 3, 1, 2])
    np.testing.assert_array_equal(scores, [1.0, 1.0, 0.75, 0.75])
    assert order.dtype == np.int64


def test_rerank_global_only():
    order, scores = rerank([0.5, 0.75, 0.25, 0.5], None, BASE)
    np.testing.assert_array_equal(order, [1, 0, 3, 2])
    np.testing.assert_array_equal(scores, [0.75, 0.5, 0.5, 0.25])


def test_rerank_stable_on_many_ties():
    # long enough that an unstable sort (introsort beyond 16 elements) would reorder ties
    rng = np.random.default_rng(2)
    cosine = rng.integers(0, 3, 64) / 4
    inliers = rng.integers(0, 2, 64) * 20
    expected = sorted(range(64), key=lambda i: -(cosine[i] + inliers[i] / 20))
    order, _ = rerank(cosine, inliers, BASE)
    np.testing.assert_array_equal(order, expected)
    np.testing.assert_array_equal(rerank_retrieval(cosine, inliers, None, None, BASE, num_to_rerank=64), expected)


# ----------------------------------------------------------------------------- votes


def test_aggregate_top_k_smaller_than_candidates():
    labels, scores = ["a", "b", "a", "c"], [1.0, 1.5, 0.75, 3.0]
    assert aggregate_landmarks(labels, scores, 3) == ("a", 1.75)
    assert aggregate_landmarks(labels, scores, 4) == ("c", 3.0)
    assert aggregate_landmarks(labels, scores, 1) == ("a", 1.0)


def test_aggregate_tie_goes_to_first_seen():
    assert aggregate_landmarks(["b", "a", "a", "b"], [1.0, 1.0, 1.0, 1.0], 4) == ("b", 2.0)
    assert aggregate_landmarks(["a", "b"], [0.5, 0.5], 5) == ("a", 0.5)


def test_aggregate_empty_and_unlabelled():
    assert aggregate_landmarks([], [], 3) == (None, 0.0)
    assert aggregate_landmarks([None, "x", None], [5.0, 0.25, 7.0], 3) == ("x", 0.25)
    assert aggregate_landmarks([None], [1.0], 3) == (None, 0.0)


def test_aggregate_negative_scores():
    # all sums negative: the largest (closest to 0) still wins
    assert aggregate_landmarks(["a", "b", "a"], [-0.5, -0.75, -0.5], 3) == ("b", -0.75)


def test_aggregate_matches_baseline_get_prediction_map():
    def baseline(labels, scores, top_k):
        sums = {}
        for label, score in list(zip(labels, scores, strict=True))[:top_k]:
            sums.setdefault(label, 0)
            sums[label] += score
        return max(sums.items(), key=operator.itemgetter(1))

    rng = np.random.default_rng(0)
    for _ in range(200):
        size = int(rng.integers(1, 8))
        labels = [str(v) for v in rng.integers(0, 3, size)]
        # quarter steps make equal sums (ties) frequent
        scores = (rng.integers(0, 8, size) / 4).tolist()
        top_k = int(rng.integers(1, 9))
        assert aggregate_landmarks(labels, scores, top_k) == baseline(labels, scores, top_k)


def test_aggregate_bad_input():
    with pytest.raises(ValueError, match="top_k"):
        aggregate_landmarks(["a"], [1.0], 0)
    with pytest.raises(ValueError, match="labels has 2 entries"):
        aggregate_landmarks(["a", "b"], [1.0], 3)
    with pytest.raises(ValueError, match="not a single string"):
        aggregate_landmarks("ab", [1.0, 2.0], 3)


# ----------------------------------------------------------------------------- non-landmark


def test_nonlandmark_similarity_exact():
    distractors = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    vectors = np.array([[1.0, 0.0], [0.0, -2.0]])  # second row is normalised inside
    # similarities: [1, 0, -1] and [0, -1, 0]
    result = nonlandmark_similarity(vectors, distractors, top_k=2)
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, [0.5, 0.0])
    np.testing.assert_array_equal(nonlandmark_similarity(vectors, distractors, 1), [1.0, 0.0])
    # top_k above M averages all M
    np.testing.assert_allclose(
        nonlandmark_similarity(vectors, distractors, 5), [0.0, -1 / 3], rtol=1e-7
    )


def test_nonlandmark_similarity_blockwise_matches_brute_force():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(37, 8))
    distractors = rng.normal(size=(11, 8))
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    d = distractors / np.linalg.norm(distractors, axis=1, keepdims=True)
    expected = np.sort(v @ d.T, axis=1)[:, -4:].mean(axis=1)
    for block_size in (None, 1, 5, 100):
        result = nonlandmark_similarity(vectors, distractors, 4, block_size=block_size)
        np.testing.assert_allclose(result, expected, atol=1e-6)


def test_nonlandmark_similarity_empty_and_bad():
    assert nonlandmark_similarity(np.zeros((0, 3)), np.ones((2, 3)), 2).shape == (0,)
    np.testing.assert_array_equal(
        nonlandmark_similarity(np.ones((2, 3)), np.zeros((0, 3)), 2), [0, 0]
    )
    with pytest.raises(ValueError, match="widths differ"):
        nonlandmark_similarity(np.ones((2, 3)), np.ones((2, 4)), 2)
    with pytest.raises(ValueError, match="2-D"):
        nonlandmark_similarity(np.ones(3), np.ones((2, 3)), 2)
    with pytest.raises(ValueError, match="top_k"):
        nonlandmark_similarity(np.ones((2, 3)), np.ones((2, 3)), 0)


def test_penalize_frequent_landmarks():
    labels = ["a", "b", "a", None, "a", "c", "c"]
    confidences = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    ln2, ln3 = math.log(2), math.log(3)
    result = penalize_frequent_landmarks(labels, confidences, weight=1.0)
    np.testing.assert_allclose(
        result, [1 - ln3, 2, 3 - ln3, 4, 5 - ln3, 6 - ln2, 7 - ln2], rtol=0, atol=1e-12
    )
    result = penalize_frequent_landmarks(labels, confidences, weight=2.0, min_count=2)
    ln15 = 2 * math.log(1.5)
    np.testing.assert_allclose(
        result, [1 - ln15, 2, 3 - ln15, 4, 5 - ln15, 6, 7], rtol=0, atol=1e-12
    )
    # off by default, and the input is never changed
    np.testing.assert_array_equal(
        penalize_frequent_landmarks(labels, confidences, weight=0.0), confidences
    )
    np.testing.assert_array_equal(confidences, [1, 2, 3, 4, 5, 6, 7])
    assert penalize_frequent_landmarks([], [], weight=2.0, min_count=2).shape == (0,)
    with pytest.raises(ValueError, match="labels has 1 entries"):
        penalize_frequent_landmarks(["a"], [1.0, 2.0], weight=2.0, min_count=2)


# ----------------------------------------------------------------------------- one query


def test_recognize_one_verified():
    labels, cosine, inliers = ["x", "y", "x", "y"], [0.75, 0.5, 0.5, 0.25], [0, 20, 0, 20]
    # scores 0.75, 1.5, 0.5, 1.25 -> order 1, 3, 0 -> y: 1.5 + 1.25
    assert recognize_one(labels, cosine, inliers, BASE) == ("y", 2.75)


def test_recognize_one_global_only():
    # order 0, 1, 2 (0.5 tie keeps retrieval order) -> x: 0.75 + 0.5, y: 0.5
    assert recognize_one(["x", "y", "x", "y"], [0.75, 0.5, 0.5, 0.25], None, BASE) == ("x", 1.25)


def test_recognize_one_nonlandmark():
    config = scoring(NONLANDMARK_PENALTY=0.5)
    labels, cosine, inliers = ["x", "y", "x", "y"], [0.75, 0.5, 0.5, 0.25], [0, 20, 0, 20]
    # scores 0.75, 1.0, 0.5, 0.75 -> order 1, 0, 3 -> y: 1.0 + 0.75 = 1.75, minus 0.5 * 0.5
    result = recognize_one(labels, cosine, inliers, config, [0.0, 1.0, 0.0, 1.0], 0.5)
    assert result == ("y", 1.5)
    # without the query's similarity only the candidates are penalised
    assert recognize_one(labels, cosine, inliers, config, [0.0, 1.0, 0.0, 1.0]) == ("y", 1.75)


def test_verified_first_ranks_a_verified_answer_above_summed_unverified_votes():
    # Query A: three unverified candidates of x (cosine 0.5 each); query B: one candidate of y
    # with 10 of MAX_INLIER_SCORE 20 inliers (term 0.5) at cosine 0.2, and one of z.
    a = (["x", "x", "x"], [0.5, 0.5, 0.5], [0, 3, 0])
    b = (["y", "z"], [0.2, 0.1], [10, 0])
    baseline = scoring(MIN_INLIERS=5)
    assert recognize_one(*a, baseline) == ("x", 1.5)
    assert recognize_one(*b, baseline) == ("y", pytest.approx(0.7))  # below A: the baseline's order
    first = scoring(MIN_INLIERS=5, VERIFIED_FIRST=True)
    # unverified: 1.5 - 2 * TOP_K (no non-landmark penalty) = 1.5 - 6
    assert recognize_one(*a, first) == ("x", -4.5)
    assert recognize_one(*b, first) == ("y", pytest.approx(0.7))
    # Without inlier counts nothing is verified or unverified: global predictions are unchanged.
    assert recognize_one(*a[:2], None, first) == ("x", 1.5)


@pytest.mark.parametrize("rule", ["subtract", "unverified", "excess"])
def test_verified_first_holds_at_the_extremes_of_every_score(rule):
    # One landmark per query (every candidate votes), so which queries are verified is known
    # by construction: a candidate with >= MIN_INLIERS inliers. Cosines and non-landmark
    # similarities are drawn from {-1, 1} and uniform [-1, 1], penalties up to 3.
    rng = np.random.default_rng(7)
    for _ in range(200):
        config = scoring(
            VERIFIED_FIRST=True,
            MIN_INLIERS=int(rng.integers(0, 4)),
            TOP_K=int(rng.integers(1, 5)),
            NONLANDMARK_PENALTY=float(rng.choice([0.0, 0.5, 3.0])),
            NONLANDMARK_RULE=rule,
        )
        gate = max(config.min_inliers, 1)
        size = config.top_k

        def draw(verified, size=size, gate=gate, config=config):
            extreme = rng.random() < 0.5
            cosine = rng.choice([-1.0, 1.0], size) if extreme else rng.uniform(-1, 1, size)
            nonlandmark = rng.choice([-1.0, 1.0], size) if extreme else rng.uniform(-1, 1, size)
            inliers = rng.integers(0, gate, size)
            if verified:
                inliers[rng.integers(size)] = gate
            query_nl = float(rng.choice([-1.0, 1.0]))
            return recognize_one(["l"] * size, cosine, inliers, config, nonlandmark, query_nl)[1]

        verified = min(draw(True) for _ in range(20))
        unverified = max(draw(False) for _ in range(20))
        assert unverified < verified, config


def test_recognize_one_length_mismatch():
    with pytest.raises(ValueError, match="cand_labels has 2 entries"):
        recognize_one(["x", "y"], [0.5], None, BASE)


# ----------------------------------------------------------------------------- retrieval


def test_rerank_retrieval_verification_and_labels():
    options = dict(num_to_rerank=3, label_boost=1.0)
    cosine = [0.875, 0.75, 0.625, 0.5, 0.375]
    inliers = [0, 20, 10, 20, 20]
    labels = ["a", "b", "a", "b", "a"]
    # head scores 0.875 + 1, 0.75 + 1, 0.625 + 0.5 + 1; tail 3, 4 unchanged
    np.testing.assert_array_equal(
        rerank_retrieval(cosine, inliers, labels, "a", BASE, **options), [2, 0, 1, 3, 4]
    )
    # verification only: 0.875, 1.75, 1.125
    np.testing.assert_array_equal(
        rerank_retrieval(cosine, inliers, None, None, BASE, **options), [1, 2, 0, 3, 4]
    )
    np.testing.assert_array_equal(
        rerank_retrieval(cosine, inliers, labels, None, BASE, **options), [1, 2, 0, 3, 4]
    )
    np.testing.assert_array_equal(
        rerank_retrieval(cosine, inliers[:3], labels, "b", BASE, **options), [1, 2, 0, 3, 4]
    )
    # labels only: 0.875 + 1, 0.75, 0.625 + 1
    np.testing.assert_array_equal(
        rerank_retrieval(cosine, None, labels, "a", BASE, **options), [0, 2, 1, 3, 4]
    )


def test_rerank_retrieval_stable_and_bounds():
    np.testing.assert_array_equal(
        rerank_retrieval([0.5, 0.5, 0.5], None, None, None, BASE, num_to_rerank=10), [0, 1, 2]
    )
    # nothing to re-rank keeps the input order
    np.testing.assert_array_equal(
        rerank_retrieval([0.25, 0.5], [20, 0], ["a", "a"], "a", BASE, num_to_rerank=0), [0, 1]
    )
    with pytest.raises(ValueError, match="cand_inliers has 1 entries"):
        rerank_retrieval([0.25, 0.5], [20], None, None, BASE, num_to_rerank=2)


def test_config_new_fields_checked():
    with pytest.raises(ValueError, match="FREQUENT_LANDMARK_PENALTY"):
        Config(FREQUENT_LANDMARK_PENALTY=-1.0)
    with pytest.raises(ValueError, match="FREQUENT_LANDMARK_MIN_COUNT"):
        Config(FREQUENT_LANDMARK_MIN_COUNT=0)
    with pytest.raises(ValueError, match="RETRIEVAL_LABEL_BOOST"):
        Config(RETRIEVAL_LABEL_BOOST=-0.5)
