"""Verification cascade (delf_retrieval.matching.cascade) on generated features with known matches."""

from __future__ import annotations

import numpy as np
import pytest

from delf_retrieval.config import Config, load_config
from delf_retrieval.features.containers import LocalFeatures
from delf_retrieval.matching import cascade, verify
from delf_retrieval.matching.cascade import VerificationSettings
from delf_retrieval.matching.verify import count_inliers_many

SHIFT = np.array([10.0, 5.0], np.float32)  # candidate = query moved by this many pixels
SHARED = [0, 8, 20, 0, 40, 15]  # query features copied into each candidate, global order


def _features(keypoints: np.ndarray, descriptors: np.ndarray) -> LocalFeatures:
    n = keypoints.shape[0]
    return LocalFeatures(keypoints, descriptors, np.ones(n, np.float32), np.ones(n, np.float32))


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    d = rng.normal(size=(n, 128)).astype(np.float32)
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def _scene(n: int = 200, seed: int = 0) -> tuple[LocalFeatures, list[LocalFeatures]]:
    """A query and one candidate per SHARED entry: its first ``k`` features are the
    query's first ``k`` shifted by SHIFT (same descriptors), the rest are unrelated random
    features (random 128-d unit descriptors fail the 0.9 ratio test against each other)."""
    rng = np.random.default_rng(seed)
    points = rng.uniform(0, 600, size=(n, 2)).astype(np.float32)
    query = _features(points, _unit(rng, n))
    candidates = []
    for k in SHARED:
        keypoints = np.concatenate([points[:k] + SHIFT, rng.uniform(0, 600, size=(n - k, 2)).astype(np.float32)])
        descriptors = np.concatenate([query.descriptors[:k], _unit(rng, n - k)])
        candidates.append(_features(keypoints, descriptors))
    return query, candidates


def _config(**changes) -> VerificationSettings:
    base = dict(
        MATCHER="lightglue",
        MATCHER_FEATURES="aliked",
        NUM_TO_RERANK=2,
        CASCADE_CANDIDATES=6,
        CASCADE_MIN_INLIERS=12,
        MUTUAL_NEAREST_NEIGHBOR=True,
        RATIO_TEST=0.9,
        MAX_DESCRIPTOR_DISTANCE=float("inf"),
        MAX_REPROJECTION_ERROR=10.0,
        WORKERS=1,
    )
    return VerificationSettings.from_config(Config(**{**base, **changes}))


@pytest.fixture
def fake_learned(monkeypatch):
    """Replaces the verification of a pair (``verify._verify_pair``, which the learned
    matcher goes through; nearest neighbours are batched without it): candidate i of
    :func:`_scene` gets 1000 + i inliers. Records the ``(candidate, settings)`` pairs, in order."""
    _, scene = _scene()
    position = {candidate.keypoints.tobytes(): i for i, candidate in enumerate(scene)}
    calls = []

    def pair(query, candidate, settings):
        calls.append((candidate, settings))
        count = 1000 + position[candidate.keypoints.tobytes()]
        return np.zeros((count, 2), np.int64), np.ones(count, bool)

    monkeypatch.setattr(verify, "_verify_pair", pair)
    return calls


def test_cheap_matcher_finds_the_shared_features():
    query, candidates = _scene()
    counts = count_inliers_many(query, candidates, _config(MATCHER="nn", MATCHER_FEATURES="").matching)
    # every copied feature is a mutual nearest neighbour on one translation: all inliers
    assert counts.tolist() == SHARED


@pytest.mark.parametrize(
    "counts, count, gate, expected",
    [
        ([0, 8, 20, 0, 40, 15], 2, 12, [4, 2]),
        ([0, 8, 20, 0, 40, 15], 4, 12, [4, 2, 5, 0]),  # then global order: 0 before 1 (8 < gate)
        ([0, 8, 20, 0, 40, 15], 4, 0, [4, 2, 5, 1]),
        ([3, 0, 11], 2, 12, [0, 1]),  # no evidence: exactly the global top
        ([12, 30, 12], 3, 12, [1, 0, 2]),  # equal evidence keeps global order
        ([5], 3, 0, [0]),
    ],
)
def test_cascade_choice(counts, count, gate, expected):
    assert cascade.cascade_choice(np.array(counts), count, gate).tolist() == expected


def _recording(candidates):
    """``candidate(p)`` for verify_candidates, and the positions it was asked for."""
    read = []

    def candidate(p):
        read.append(p)
        return candidates[p]

    return candidate, read


def test_cascade_sends_the_best_cheap_candidates_to_the_learned_matcher(fake_learned):
    query, candidates = _scene()
    candidate, read = _recording(candidates)
    inliers = cascade.verify_candidates(query, candidate, len(candidates), _config())
    # cheap counts [0, 8, 20, 0, 40, 15]: the two best with >= 12 are positions 4 and 2,
    # verified in global order (2, then 4); the others get 0.
    assert inliers.tolist() == [0, 0, 1002, 0, 1004, 0]
    assert read == [0, 1, 2, 3, 4, 5]
    assert [id(c) for c, _ in fake_learned] == [id(candidates[2]), id(candidates[4])]
    assert all(settings.matcher == "lightglue" for _, settings in fake_learned)


def test_cascade_width_is_capped_by_the_candidates(fake_learned):
    query, candidates = _scene()
    inliers = cascade.verify_candidates(query, candidates.__getitem__, 3, _config(CASCADE_CANDIDATES=30))
    # only positions 0-2 exist: cheap counts [0, 8, 20] -> 2 (evidence), then 0 (global order)
    assert inliers.tolist() == [1000, 0, 1002]


def test_without_cascade_the_learned_matcher_sees_the_global_top(fake_learned):
    query, candidates = _scene()
    candidate, read = _recording(candidates)
    inliers = cascade.verify_candidates(query, candidate, len(candidates), _config(CASCADE_CANDIDATES=0))
    assert inliers.tolist() == [1000, 1001, 0, 0, 0, 0]
    assert read == [0, 1]
    assert [id(c) for c, _ in fake_learned] == [id(candidates[0]), id(candidates[1])]


def test_cascade_is_ignored_with_nearest_neighbour_matching(fake_learned):
    query, candidates = _scene()
    config = _config(MATCHER="nn", MATCHER_FEATURES="", NUM_TO_RERANK=3)
    inliers = cascade.verify_candidates(query, candidates.__getitem__, len(candidates), config)
    assert inliers.tolist() == [0, 8, 20, 0, 0, 0]
    assert fake_learned == []
    assert not cascade.cascade_active(config)


def test_num_candidates():
    assert cascade.num_candidates(_config(NUM_TO_RERANK=5, CASCADE_CANDIDATES=30), top_k=3) == 30
    assert cascade.num_candidates(_config(NUM_TO_RERANK=5, CASCADE_CANDIDATES=0), top_k=3) == 5
    assert cascade.num_candidates(_config(NUM_TO_RERANK=5, CASCADE_CANDIDATES=4), top_k=7) == 7
    nn = _config(MATCHER="nn", MATCHER_FEATURES="", NUM_TO_RERANK=5, CASCADE_CANDIDATES=30)
    assert cascade.num_candidates(nn, top_k=3) == 5


def test_config_rejects_negative_cascade_values():
    with pytest.raises(ValueError, match="CASCADE_CANDIDATES"):
        Config(CASCADE_CANDIDATES=-1)
    with pytest.raises(ValueError, match="CASCADE_MIN_INLIERS"):
        Config(CASCADE_MIN_INLIERS=-1)


@pytest.mark.parametrize("name", ["aliked-lightglue", "disk-lightglue", "xfeat-lighterglue"])
def test_learned_matcher_presets_give_the_cheap_stage_nearest_neighbour_filters(name):
    config = load_config(name)
    assert config.MUTUAL_NEAREST_NEIGHBOR and config.RATIO_TEST < 1


def test_the_cascade_is_on_where_it_was_measured_to_help():
    assert load_config("aliked-lightglue").CASCADE_CANDIDATES == 30
    def active(name: str) -> bool:
        return cascade.cascade_active(VerificationSettings.from_config(load_config(name)))

    assert active("aliked-lightglue") and active("disk-lightglue")
    assert not active("xfeat-lighterglue") and not active("aliked")
