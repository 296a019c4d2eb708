"""The per-step settings: frozen, built from every preset with the right values, and their
defaults are the default ``Config``'s (``kaggle2020``)."""

from __future__ import annotations

import dataclasses

import pytest

from delf_retrieval import config as config_module
from delf_retrieval.config import PRESETS, Config
from delf_retrieval.matching import ransac
from delf_retrieval.matching.cascade import VerificationSettings
from delf_retrieval.matching.ransac import RansacSettings
from delf_retrieval.matching.verify import MatchingSettings
from delf_retrieval.scoring.engine import RecognitionSettings
from delf_retrieval.scoring.leave_one_out import NOT_IN_RECORD, ConfidenceSettings
from delf_retrieval.scoring.rerank import ScoringSettings
from delf_retrieval.search.stores import SearchSettings

# settings class -> {field: the Config field it is read from}; nested settings are checked on their own
FIELDS = {
    RansacSettings: {
        "method": "RANSAC_METHOD",
        "max_reprojection_error": "MAX_REPROJECTION_ERROR",
        "max_iterations": "MAX_RANSAC_ITERATIONS",
        "confidence": "HOMOGRAPHY_CONFIDENCE",
        "seed": "RANSAC_SEED",
    },
    MatchingSettings: {
        "matcher": "MATCHER",
        "matcher_features": "MATCHER_FEATURES",
        "match_confidence": "MATCH_CONFIDENCE",
        "max_distance": "MAX_DESCRIPTOR_DISTANCE",
        "mutual": "MUTUAL_NEAREST_NEIGHBOR",
        "ratio": "RATIO_TEST",
        "min_matches": "MIN_MATCHES",
        "dtype": "MATCH_DTYPE",
        "device": "MATCH_DEVICE",
        "workers": "WORKERS",
    },
    VerificationSettings: {
        "num_to_rerank": "NUM_TO_RERANK",
        "cascade_candidates": "CASCADE_CANDIDATES",
        "cascade_min_inliers": "CASCADE_MIN_INLIERS",
    },
    ScoringSettings: {
        "top_k": "TOP_K",
        "max_inlier_score": "MAX_INLIER_SCORE",
        "min_inliers": "MIN_INLIERS",
        "nonlandmark_penalty": "NONLANDMARK_PENALTY",
        "nonlandmark_rule": "NONLANDMARK_RULE",
        "verified_first": "VERIFIED_FIRST",
    },
    SearchSettings: {
        "block_size": "SEARCH_BLOCK_SIZE",
        "qe_top_k": "QE_TOP_K",
        "qe_alpha": "QE_ALPHA",
        "dba_top_k": "DBA_TOP_K",
        "dba_alpha": "DBA_ALPHA",
    },
    RecognitionSettings: {
        "nonlandmark_top_k": "NONLANDMARK_TOP_K",
        "frequent_landmark_penalty": "FREQUENT_LANDMARK_PENALTY",
        "frequent_landmark_min_count": "FREQUENT_LANDMARK_MIN_COUNT",
        "classifier_mode": "CLASSIFIER_MODE",
        "fusion_cosine_power": "FUSION_COSINE_POWER",
        "fusion_prob_power": "FUSION_PROB_POWER",
        "confidence": "CONFIDENCE",
    },
}
# fields holding another step's settings: (class, field) -> the nested class
NESTED = {
    (MatchingSettings, "ransac"): RansacSettings,
    (VerificationSettings, "matching"): MatchingSettings,
    (RecognitionSettings, "search"): SearchSettings,
    (RecognitionSettings, "verification"): VerificationSettings,
    (RecognitionSettings, "scoring"): ScoringSettings,
}


def _check(settings: object, config: Config) -> None:
    kind = type(settings)
    names = {field.name for field in dataclasses.fields(kind)}
    nested = {name for (owner, name) in NESTED if owner is kind}
    assert names == set(FIELDS[kind]) | nested, kind.__name__  # every field is mapped
    for name, config_name in FIELDS[kind].items():
        assert getattr(settings, name) == getattr(config, config_name), (kind.__name__, name)
    for name in nested:
        inner = getattr(settings, name)
        assert type(inner) is NESTED[(kind, name)]
        _check(inner, config)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_settings_are_built_from_every_preset(preset):
    config = PRESETS[preset]
    for kind in FIELDS:
        _check(kind.from_config(config), config)
    fit = ConfidenceSettings.from_config(config)
    assert (fit.model, fit.samples) == (config.CONFIDENCE_MODEL, config.CONFIDENCE_SAMPLES)


@pytest.mark.parametrize("kind", list(FIELDS))
def test_defaults_are_the_default_config(kind):
    assert kind() == kind.from_config(Config())


@pytest.mark.parametrize("kind", [*FIELDS, ConfidenceSettings])
def test_settings_are_frozen_and_hashable(kind):
    settings = kind.from_config(PRESETS["opencv-sift"])
    field = dataclasses.fields(kind)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(settings, field, getattr(settings, field))
    assert hash(settings) == hash(kind.from_config(PRESETS["opencv-sift"]))


def test_confidence_key_covers_the_fields_that_change_answers():
    """The record key of a fitted confidence model changes with a field that changes answers
    (also one no step reads, as WHITENING_DIM) and not with one listed in NOT_IN_RECORD."""
    base = ConfidenceSettings.from_config(Config())
    assert ConfidenceSettings.from_config(Config(WHITENING_DIM=8)).answers_key != base.answers_key
    assert ConfidenceSettings.from_config(Config(MIN_INLIERS=3)).answers_key != base.answers_key
    assert "WORKERS" in NOT_IN_RECORD
    assert ConfidenceSettings.from_config(Config(WORKERS=3)).answers_key == base.answers_key


def test_the_cascade_stage_and_the_search_width():
    learned = RecognitionSettings.from_config(PRESETS["aliked-lightglue"])
    cheap = learned.verification.matching.nearest_neighbours()
    assert (cheap.matcher, cheap.matcher_features) == ("nn", "")
    assert dataclasses.replace(cheap, matcher="lightglue", matcher_features="aliked") == learned.verification.matching
    assert learned.num_candidates == PRESETS["aliked-lightglue"].CASCADE_CANDIDATES
    sift = PRESETS["opencv-sift"]
    assert RecognitionSettings.from_config(sift).num_candidates == max(sift.NUM_TO_RERANK, sift.TOP_K)


def test_ransac_accepts_the_methods_the_config_accepts():
    assert ransac.RANSAC_METHODS == config_module.RANSAC_METHODS
