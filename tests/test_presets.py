"""Extraction presets of the reference pipelines, their selection, and EXIF transposition."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from delf_retrieval.cli.main import build_extractor, make_parser
from delf_retrieval.config import PRESETS, Config, load_config
from delf_retrieval.features.images import ImageSource, decode_image
from delf_retrieval.models import ExtractorParams
from delf_retrieval.models.extract import iter_decoded
from delf_retrieval.models.presets import EXTRACTION_PRESETS, extraction_params


def test_official_delg_presets_are_the_pbtxt_values():
    # research/delf/delf/python/delg/r50delg_gldv2clean_config.pbtxt, r101...
    scales = (0.25, 0.35355338, 0.5, 0.70710677, 1.0, 1.4142135, 2.0)
    for name, threshold in (("delg-r50-gldv2clean", 454.6), ("delg-r101-gldv2clean", 357.48)):
        params = extraction_params(name)
        assert params.image_scales == scales
        assert params.global_scales == tuple(scales[i] for i in (3, 4, 5))
        assert params.score_threshold == threshold
        assert params.max_feature_num == 1000
        assert params.max_image_size == 1024
        assert params.exif_transpose is False
    kaggle = extraction_params("kaggle2020")  # the host baseline's DELG_IMAGE_SCALES_TENSOR
    assert kaggle.image_scales == kaggle.global_scales == (0.70710677, 1.0, 1.4142135)
    assert (kaggle.score_threshold, kaggle.max_feature_num, kaggle.max_image_size) == (
        175.0,
        1000,
        None,
    )
    assert all(not p.exif_transpose for p in EXTRACTION_PRESETS.values())
    with pytest.raises(ValueError, match="delg-r50-gldv2clean"):
        extraction_params("r50")


def test_config_presets_name_their_extraction():
    assert load_config("delg-r50-gldv2clean").EXTRACTION_PRESET == "delg-r50-gldv2clean"
    assert load_config("delg-r101-gldv2clean").EXTRACTION_PRESET == "delg-r101-gldv2clean"
    assert load_config("kaggle2020").EXTRACTION_PRESET == ""
    assert "delf-matchfeatures" in PRESETS
    with pytest.raises(ValueError, match="EXTRACTION_PRESET"):
        Config(EXTRACTION_PRESET="nope")


def _args(*extra: str):
    return make_parser().parse_args(["extract", "--images", "x", "--out", "y", *extra])


def _run_args(*extra: str):
    return make_parser().parse_args(["recognize", "data", *extra])


def test_cli_selects_the_extraction_preset():
    by_flag = build_extractor(_args("--extraction-preset", "delg-r101-gldv2clean"))
    assert by_flag.params == extraction_params("delg-r101-gldv2clean")
    by_config = build_extractor(_run_args("--config", "delg-r50-gldv2clean"))
    assert by_config.params == extraction_params("delg-r50-gldv2clean")
    # explicit flags override the preset
    tuned = build_extractor(
        _args("--extraction-preset", "kaggle2020", "--scales", "1.0", "--exif-transpose")
    )
    assert tuned.params.image_scales == (1.0,)
    assert tuned.params.score_threshold == 175.0 and tuned.params.exif_transpose is True
    plain = build_extractor(_args())
    assert plain.params.exif_transpose is True  # the library's default


def test_fingerprint_keeps_old_stores_and_marks_no_exif():
    assert "exif_transpose" not in ExtractorParams().to_dict()
    assert ExtractorParams(exif_transpose=False).to_dict()["exif_transpose"] is False


def _jpeg_with_orientation(orientation: int) -> bytes:
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :10] = 255  # a white band on the left
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    return buffer.getvalue()


def test_exif_transposition_is_a_parameter(tmp_path):
    data = _jpeg_with_orientation(6)  # "rotate 90 CW to display"
    assert decode_image(data).shape == (40, 20, 3)
    assert decode_image(data, exif_transpose=False).shape == (20, 40, 3)
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    source = [ImageSource(id="a", path=str(path))]
    (kept,) = iter_decoded(source, exif_transpose=False)
    (turned,) = iter_decoded(source)
    assert kept.image.shape == (20, 40, 3) and turned.image.shape == (40, 20, 3)
