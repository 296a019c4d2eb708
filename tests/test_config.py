"""Config dataclass, presets and files."""

import json

import pytest

from delf_retrieval.config import PRESETS, Config, load_config


def test_default_is_the_kaggle_2020_host_baseline():
    config = load_config()
    assert config == PRESETS["kaggle2020"]
    assert (config.NUM_TO_RERANK, config.TOP_K, config.MAX_INLIER_SCORE) == (3, 3, 20)
    assert (config.MAX_REPROJECTION_ERROR, config.MAX_RANSAC_ITERATIONS, config.HOMOGRAPHY_CONFIDENCE) == (4.0, 1000, 0.99)
    assert config.MAX_DESCRIPTOR_DISTANCE == 0.9 and not config.MUTUAL_NEAREST_NEIGHBOR


def test_sift_preset_uses_mutual_nn_and_ratio_test():
    config = load_config("opencv-sift")
    assert config.MUTUAL_NEAREST_NEIGHBOR and config.RATIO_TEST == 0.8
    assert config.MAX_DESCRIPTOR_DISTANCE == float("inf")


def test_yaml_and_json_files_start_from_a_preset(tmp_path):
    (tmp_path / "c.yaml").write_text("preset: opencv-sift\nNUM_TO_RERANK: 7\nRANSAC_METHOD: degensac\n")
    config = load_config(tmp_path / "c.yaml")
    assert config.NUM_TO_RERANK == 7 and config.RANSAC_METHOD == "degensac" and config.RATIO_TEST == 0.8
    (tmp_path / "c.json").write_text(json.dumps({"TOP_K": 5}))
    assert load_config(tmp_path / "c.json", MAX_INLIER_SCORE=50) == Config(TOP_K=5, MAX_INLIER_SCORE=50)


def test_bad_values_and_names_are_reported():
    with pytest.raises(ValueError, match="HOMOGRAPHY_CONFIDENCE=1.5"):
        Config(HOMOGRAPHY_CONFIDENCE=1.5)
    with pytest.raises(ValueError, match="RANSAC_METHOD='lo-ransac'"):
        load_config(RANSAC_METHOD="lo-ransac")
    with pytest.raises(TypeError, match="NUM_TO_RERNK"):
        load_config("kaggle2020", NUM_TO_RERNK=3)
    with pytest.raises(ValueError, match="neither a preset"):
        load_config("no-such-preset")


def test_describe_lists_every_field():
    text = Config().describe()
    assert "NUM_TO_RERANK = 3" in text and "RANSAC_METHOD = 'magsac'" in text
    assert len(text.splitlines()) == len(Config().to_dict())
