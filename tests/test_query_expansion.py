"""alpha-QE, DBA and the non-landmark rules on hand-made vectors with exact results."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from delf_retrieval.config import Config
from delf_retrieval.scoring.rerank import ScoringSettings, candidate_scores, recognize_one
from delf_retrieval.search.expansion import alpha_query_expansion, database_augmentation
from delf_retrieval.search.stores import SearchSettings, StoreSearch


def _unit(*values: float) -> np.ndarray:
    vector = np.array(values, np.float64)
    return vector / np.linalg.norm(vector)


def test_alpha_qe_adds_the_nearest_neighbours_weighted_by_cosine_to_the_alpha():
    database = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    query = np.array([[0.8, 0.6, 0.0]], np.float32)
    # k = 1: only e1 (cosine 0.8) joins; alpha = 3 weighs it 0.512.
    expanded = alpha_query_expansion(query, database, top_k=1, alpha=3.0)
    np.testing.assert_allclose(expanded[0], _unit(0.8 + 0.512, 0.6, 0.0), atol=1e-6)
    # k = 2, alpha = 1: e1 with 0.8 and e2 with 0.6.
    expanded = alpha_query_expansion(query, database, top_k=2, alpha=1.0)
    np.testing.assert_allclose(expanded[0], _unit(1.6, 1.2, 0.0), atol=1e-6)
    # k = 0 only normalises.
    np.testing.assert_allclose(alpha_query_expansion(2 * query, database, 0), query, atol=1e-7)


def test_negative_cosines_weigh_nothing():
    database = np.array([[-1.0, 0.0], [0.0, 1.0]], np.float32)
    query = np.array([[0.6, 0.8]], np.float32)
    expanded = alpha_query_expansion(query, database, top_k=2, alpha=0.5)
    # (-1, 0) has cosine -0.6 -> weight 0; (0, 1) has 0.8 -> weight sqrt(0.8).
    np.testing.assert_allclose(expanded[0], _unit(0.6, 0.8 + np.sqrt(0.8)), atol=1e-6)


def test_dba_uses_the_other_database_vectors_only():
    database = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], np.float32)
    augmented = database_augmentation(database, top_k=1, alpha=1.0)
    np.testing.assert_allclose(augmented[0], _unit(1.0 + 0.8 * 0.8, 0.8 * 0.6), atol=1e-6)
    np.testing.assert_allclose(augmented[1], _unit(0.8 + 0.8, 0.6), atol=1e-6)
    np.testing.assert_allclose(augmented[2], _unit(0.6 * 0.8, 1.0 + 0.6 * 0.6), atol=1e-6)


def test_dba_with_a_duplicate_row_adds_the_duplicate_once():
    database = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    augmented = database_augmentation(database, top_k=1, alpha=2.0)
    np.testing.assert_allclose(augmented[:2], [[1.0, 0.0], [1.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(augmented[2], [0.0, 1.0], atol=1e-6)


class _Vectors:
    """The one thing a search needs of a store: its global descriptors."""

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = vectors

    def global_descriptors(self) -> np.ndarray:
        return self.vectors


def test_the_store_search_runs_dba_first_then_qe_against_the_augmented_database():
    database = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], np.float32)
    query = np.array([[0.0, 1.0]], np.float32)
    settings = SearchSettings.from_config(Config(DBA_TOP_K=1, DBA_ALPHA=1.0, QE_TOP_K=1, QE_ALPHA=1.0))
    search = StoreSearch(_Vectors(database), settings)
    row2 = _unit(0.48, 1.36)  # DBA of (0, 1), see the test above
    np.testing.assert_allclose(search.augmented()[2], row2, atol=1e-6)
    expanded = _unit(row2[0] * row2[1], 1.0 + row2[1] * row2[1])
    np.testing.assert_allclose(search.query_vectors(query)[0], expanded, atol=1e-6)
    similarities, rows = search.search(query, 3)
    assert rows[0].tolist() == np.argsort(-(search.augmented() @ expanded)).tolist()
    plain = StoreSearch(_Vectors(database), SearchSettings.from_config(Config()))
    assert plain.query_vectors(query) is query


@pytest.mark.parametrize("bad", [{"QE_TOP_K": -1}, {"DBA_ALPHA": -0.5}, {"NONLANDMARK_RULE": "drop"}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        Config(**bad)


def test_unverified_rule_penalises_only_where_no_match_is_verified():
    cosine = np.array([0.5, 0.3, 0.2])
    inliers = np.array([3, 40, 0])
    nonlandmark = np.array([0.4, 0.45, 0.1])
    subtract = ScoringSettings.from_config(Config(NONLANDMARK_PENALTY=2.0, MIN_INLIERS=10, MAX_INLIER_SCORE=40))
    unverified = replace(subtract, nonlandmark_rule="unverified")
    # subtract: every candidate loses 2 * nl; inlier terms 0 (3 < 10), 1.0, 0.
    np.testing.assert_allclose(
        candidate_scores(cosine, inliers, subtract, nonlandmark), [0.5 - 0.8, 0.3 + 1.0 - 0.9, 0.2 - 0.2], atol=1e-6
    )
    # unverified: candidate 1 (40 >= 10 inliers) keeps its score.
    np.testing.assert_allclose(
        candidate_scores(cosine, inliers, unverified, nonlandmark), [0.5 - 0.8, 0.3 + 1.0, 0.2 - 0.2], atol=1e-6
    )
    # Without inlier counts nothing is verified: the rules agree.
    np.testing.assert_allclose(
        candidate_scores(cosine, None, unverified, nonlandmark), candidate_scores(cosine, None, subtract, nonlandmark)
    )
    labels = ["a", "b", "c"]
    top1 = replace(unverified, top_k=1)
    # Landmark b wins with a verified vote: the query's similarity to the distractors is ignored.
    assert recognize_one(labels, cosine, inliers, top1, nonlandmark, 0.7) == ("b", pytest.approx(1.3))
    # Nothing verified: b's 40 inliers are under a gate of 50, so the query loses 2 * 0.7.
    gated = replace(top1, min_inliers=50)
    label, confidence = recognize_one(labels, cosine, inliers, gated, None, 0.7)
    assert label == "a" and confidence == pytest.approx(0.5 - 1.4)


def test_excess_rule_penalises_only_what_exceeds_the_landmark_evidence():
    cosine = np.array([0.5, 0.3])
    nonlandmark = np.array([0.4, 0.45])
    excess = ScoringSettings.from_config(Config(NONLANDMARK_PENALTY=2.0, NONLANDMARK_RULE="excess"))
    # Candidate 0 is nearer to the query than the distractors are: no penalty; 1 loses 2 * 0.15.
    np.testing.assert_allclose(candidate_scores(cosine, None, excess, nonlandmark), [0.5, 0.3 - 0.3], atol=1e-6)
    top1 = replace(excess, top_k=1)
    assert recognize_one(["a", "b"], cosine, None, top1, None, 0.45) == ("a", 0.5)
    # 0.7 exceeds the best cosine 0.5 by 0.2: the confidence loses 2 * 0.2.
    label, confidence = recognize_one(["a", "b"], cosine, None, top1, None, 0.7)
    assert label == "a" and confidence == pytest.approx(0.5 - 0.4)
