"""Named extraction settings (:class:`ExtractorParams`) of the reference pipelines.

Each preset names its source. None of the reference pipelines rotates photos by their
EXIF orientation (they decode with ``PIL.Image.open(...).convert('RGB')`` or
``tf.io.decode_jpeg``), so every preset here sets ``exif_transpose=False``; the
library's own default (``ExtractorParams()``) keeps transposing, which matches what a
viewer shows and helps phone photos, at the cost of features that differ from the
reference's on rotated files.

* ``kaggle2020``: the Kaggle 2020 host baseline (DELG ``delg-saved-models``): scales
  ``[0.70710677, 1.0, 1.4142135]`` for local and global features, attention threshold
  175, at most 1000 features, no size cap.
* ``delg-r50-gldv2clean`` / ``delg-r101-gldv2clean``: tensorflow/models
  ``research/delf/delf/python/delg/r50delg_gldv2clean_config.pbtxt`` and
  ``r101delg_gldv2clean_config.pbtxt``: 7 scales 0.25 ... 2.0, global descriptor from
  scale indices 3, 4, 5 (0.70710677, 1.0, 1.4142135), score threshold 454.6 (R50) /
  357.48 (R101), at most 1000 features, longer side capped at 1024 px, no PCA.
* ``delf-hub-tutorial``: the TF-Hub DELF v1 tutorial's module call (7 scales, threshold
  100, at most 1000 features).
"""

from __future__ import annotations

from delf_retrieval.models.base import ExtractorParams

KAGGLE2020_SCALES = (0.70710677, 1.0, 1.4142135)
# r50delg_gldv2clean_config.pbtxt / r101delg_gldv2clean_config.pbtxt: image_scales.
OFFICIAL_DELG_SCALES = (0.25, 0.35355338, 0.5, 0.70710677, 1.0, 1.4142135, 2.0)
# ... delf_global_config { image_scales_ind: 3 image_scales_ind: 4 image_scales_ind: 5 }
OFFICIAL_DELG_GLOBAL_INDICES = (3, 4, 5)
_OFFICIAL_GLOBAL = tuple(OFFICIAL_DELG_SCALES[i] for i in OFFICIAL_DELG_GLOBAL_INDICES)

EXTRACTION_PRESETS: dict[str, ExtractorParams] = {
    "kaggle2020": ExtractorParams(
        image_scales=KAGGLE2020_SCALES,
        global_scales=KAGGLE2020_SCALES,
        score_threshold=175.0,
        max_feature_num=1000,
        max_image_size=None,
        exif_transpose=False,
    ),
    "delg-r50-gldv2clean": ExtractorParams(
        image_scales=OFFICIAL_DELG_SCALES,
        global_scales=_OFFICIAL_GLOBAL,
        score_threshold=454.6,
        max_feature_num=1000,
        max_image_size=1024,
        exif_transpose=False,
    ),
    "delg-r101-gldv2clean": ExtractorParams(
        image_scales=OFFICIAL_DELG_SCALES,
        global_scales=_OFFICIAL_GLOBAL,
        score_threshold=357.48,
        max_feature_num=1000,
        max_image_size=1024,
        exif_transpose=False,
    ),
    "delf-hub-tutorial": ExtractorParams(
        image_scales=(0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0),
        global_scales=(0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0),
        score_threshold=100.0,
        max_feature_num=1000,
        max_image_size=None,
        exif_transpose=False,
    ),
}


def extraction_params(name: str) -> ExtractorParams:
    """The :class:`ExtractorParams` of preset ``name`` (see the module docstring).

    Raises
    ------
    ValueError
        For an unknown name; the message lists the known ones.
    """
    try:
        return EXTRACTION_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown extraction preset {name!r}; choose one of {', '.join(EXTRACTION_PRESETS)}"
        ) from None
