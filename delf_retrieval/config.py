"""One configuration dataclass with the parameter names Kaggle users know, and presets.

The names follow the Kaggle 2020 host baseline (``NUM_TO_RERANK``, ``TOP_K``, ...).
``kaggle2020`` reproduces that baseline; ``opencv-sift`` suits the weights-free RootSIFT
extractor, whose descriptors need mutual nearest neighbours and a ratio test instead of
the baseline's plain distance bound; ``delf-matchfeatures`` is the reference re-ranking
of tensorflow/models (image_reranking.py ``MatchFeatures``); ``delg-r50-gldv2clean`` and
``delg-r101-gldv2clean`` load the model with the official DELG extraction configs
(field ``EXTRACTION_PRESET``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Config:
    """Parameters of search, verification and re-ranking.

    Attributes
    ----------
    NUM_TO_RERANK : int
        Candidates (by global cosine similarity) that are geometrically verified.
    TOP_K : int
        Best re-ranked candidates whose scores are summed per landmark.
    MAX_INLIER_SCORE : int
        Inlier counts are clipped here before scaling to [0, 1].
    MAX_REPROJECTION_ERROR : float
        RANSAC inlier threshold, pixels.
    MAX_RANSAC_ITERATIONS : int
        RANSAC iteration cap.
    HOMOGRAPHY_CONFIDENCE : float
        RANSAC confidence in (0, 1); 1.0 is allowed with ``RANSAC_METHOD="skimage-affine"``
        (scikit-image's default ``stop_probability``, which the reference re-ranking uses).
    MAX_DESCRIPTOR_DISTANCE : float
        Putative matches need an L2 descriptor distance below this (baseline: KD-tree
        ``distance_upper_bound``). ``inf`` disables the bound.
    MUTUAL_NEAREST_NEIGHBOR : bool
        Keep a match only if each descriptor is the other's nearest neighbour.
    RATIO_TEST : float
        Lowe's ratio (nearest / second nearest distance) below which a match is kept;
        1.0 disables it.
    RANSAC_METHOD : str
        ``"magsac"`` (OpenCV USAC MAGSAC++, default), ``"opencv-ransac"``,
        ``"degensac"`` (pydegensac, baseline parity, optional extra) or
        ``"skimage-affine"`` (scikit-image ``ransac`` with an affine model, exactly as
        tensorflow/models ``detect_to_retrieve/image_reranking.py MatchFeatures`` and the
        TF-Hub DELF tutorial; preset ``delf-matchfeatures``).
    RANSAC_SEED : int
        Seed for RANSAC, so inlier counts are reproducible.
    MIN_INLIERS : int
        Candidates with fewer inliers get no inlier score (0 keeps the baseline).
    MIN_MATCHES : int
        Pairs with this many putative matches or fewer count 0 inliers (baseline: 4;
        reference ``MatchFeatures``: 3).
    WORKERS : int
        Threads for verifying one query's candidates (0 = all cores).
    SEARCH_BLOCK_SIZE : int
        Index rows per block in exact search (bounds memory).
    NONLANDMARK_PENALTY : float
        Weight of the non-landmark penalty (0 disables it); needs a non-landmark set.
    NONLANDMARK_TOP_K : int
        Neighbours in the non-landmark set averaged for that penalty.
    RETRIEVAL_TOP : int
        Index ids written per query in retrieval submissions.
    RETRIEVAL_NUM_TO_RERANK : int
        Retrieval candidates verified and re-ordered (of ``RETRIEVAL_TOP``).
    RETRIEVAL_LABEL_BOOST : float
        Added to the score of a re-ordered retrieval candidate whose predicted landmark
        equals the query's predicted landmark (0 disables it).
    FREQUENT_LANDMARK_PENALTY : float
        Weight ``w`` of the frequent-landmark penalty: a prediction whose landmark is
        predicted for ``n`` queries loses ``w * max(0, ln(n / FREQUENT_LANDMARK_MIN_COUNT))``
        of confidence (0 disables it).
    FREQUENT_LANDMARK_MIN_COUNT : int
        Number of queries a landmark may be predicted for without penalty.
    LANDMARK_THRESHOLD : float
        ``predict`` (one photo, :mod:`delf_retrieval.recognizer`) calls a photo a landmark
        when its confidence is at least this; below it the answer is "not a landmark"
        (the best guess is still reported). Submissions are not affected.
    EXTRACTION_PRESET : str
        Name of the extraction settings (scales, thresholds, size cap, EXIF) to load the
        model with, from :data:`delf_retrieval.models.presets.EXTRACTION_PRESETS`
        (``delg-r50-gldv2clean``, ...); ``""`` keeps the model family's defaults. The CLI
        (``--config``) and the notebooks apply it; ``pipeline`` functions take the
        extraction settings through their ``params`` argument.
    """

    NUM_TO_RERANK: int = 3
    TOP_K: int = 3
    MAX_INLIER_SCORE: int = 20
    MAX_REPROJECTION_ERROR: float = 4.0
    MAX_RANSAC_ITERATIONS: int = 1000
    HOMOGRAPHY_CONFIDENCE: float = 0.99
    MAX_DESCRIPTOR_DISTANCE: float = 0.9
    MUTUAL_NEAREST_NEIGHBOR: bool = False
    RATIO_TEST: float = 1.0
    RANSAC_METHOD: str = "magsac"
    RANSAC_SEED: int = 0
    MIN_INLIERS: int = 0
    MIN_MATCHES: int = 4
    WORKERS: int = 0
    SEARCH_BLOCK_SIZE: int = 65536
    NONLANDMARK_PENALTY: float = 0.0
    NONLANDMARK_TOP_K: int = 5
    RETRIEVAL_TOP: int = 100
    RETRIEVAL_NUM_TO_RERANK: int = 20
    RETRIEVAL_LABEL_BOOST: float = 0.5
    FREQUENT_LANDMARK_PENALTY: float = 0.0
    FREQUENT_LANDMARK_MIN_COUNT: int = 1
    LANDMARK_THRESHOLD: float = 0.0
    EXTRACTION_PRESET: str = ""

    def __post_init__(self) -> None:
        checks = {
            "NUM_TO_RERANK": self.NUM_TO_RERANK >= 0,
            "TOP_K": self.TOP_K >= 1,
            "MAX_INLIER_SCORE": self.MAX_INLIER_SCORE >= 1,
            "MAX_REPROJECTION_ERROR": self.MAX_REPROJECTION_ERROR > 0,
            "MAX_RANSAC_ITERATIONS": self.MAX_RANSAC_ITERATIONS >= 1,
            "HOMOGRAPHY_CONFIDENCE": 0 < self.HOMOGRAPHY_CONFIDENCE < 1
            or (self.HOMOGRAPHY_CONFIDENCE == 1 and self.RANSAC_METHOD == "skimage-affine"),
            "MAX_DESCRIPTOR_DISTANCE": self.MAX_DESCRIPTOR_DISTANCE > 0,
            "RATIO_TEST": 0 < self.RATIO_TEST <= 1,
            "RANSAC_METHOD": self.RANSAC_METHOD in RANSAC_METHODS,
            "MIN_INLIERS": self.MIN_INLIERS >= 0,
            "MIN_MATCHES": self.MIN_MATCHES >= 0,
            "WORKERS": self.WORKERS >= 0,
            "SEARCH_BLOCK_SIZE": self.SEARCH_BLOCK_SIZE >= 1,
            "NONLANDMARK_PENALTY": self.NONLANDMARK_PENALTY >= 0,
            "NONLANDMARK_TOP_K": self.NONLANDMARK_TOP_K >= 1,
            "RETRIEVAL_TOP": self.RETRIEVAL_TOP >= 1,
            "RETRIEVAL_NUM_TO_RERANK": self.RETRIEVAL_NUM_TO_RERANK >= 0,
            "RETRIEVAL_LABEL_BOOST": self.RETRIEVAL_LABEL_BOOST >= 0,
            "FREQUENT_LANDMARK_PENALTY": self.FREQUENT_LANDMARK_PENALTY >= 0,
            "FREQUENT_LANDMARK_MIN_COUNT": self.FREQUENT_LANDMARK_MIN_COUNT >= 1,
            "LANDMARK_THRESHOLD": math.isfinite(self.LANDMARK_THRESHOLD),
        }
        if self.EXTRACTION_PRESET:
            from .models.presets import EXTRACTION_PRESETS

            checks["EXTRACTION_PRESET"] = self.EXTRACTION_PRESET in EXTRACTION_PRESETS
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(f"invalid config value(s): {values}")

    def replace(self, **changes: Any) -> Config:
        """Return a copy with some fields changed (unknown names raise ``TypeError``)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown config field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line per field, for run logs."""
        return "\n".join(f"  {k} = {v!r}" for k, v in self.to_dict().items())


RANSAC_METHODS = ("magsac", "opencv-ransac", "degensac", "skimage-affine")

PRESETS: dict[str, Config] = {
    # The Kaggle 2020 host baseline, parameter for parameter.
    "kaggle2020": Config(),
    # The baseline plus the 2020 winners' non-landmark penalty and an inlier gate.
    "kaggle2020-nonlandmark": Config(NONLANDMARK_PENALTY=1.0, MIN_INLIERS=8),
    # The reference re-ranking, tensorflow/models research/delf/delf/python/detect_to_retrieve/
    # image_reranking.py MatchFeatures with its defaults: KD-tree nearest neighbour under
    # distance 0.9 (descriptor_matching_threshold), skimage.measure.ransac with an affine
    # model from index to query, min_samples 3, residual threshold 10 px, 1000 trials,
    # scikit-image's default stop_probability 1.0, and 0 inliers for <= 3 putative matches.
    "delf-matchfeatures": Config(
        RANSAC_METHOD="skimage-affine",
        MAX_DESCRIPTOR_DISTANCE=0.9,
        MAX_REPROJECTION_ERROR=10.0,
        MAX_RANSAC_ITERATIONS=1000,
        HOMOGRAPHY_CONFIDENCE=1.0,
        MIN_MATCHES=3,
    ),
    # The official DELG extraction configs (tensorflow/models research/delf/delf/python/delg/
    # r50delg_gldv2clean_config.pbtxt, r101delg_gldv2clean_config.pbtxt) with the baseline's
    # search and re-ranking; see delf_retrieval.models.presets.
    "delg-r50-gldv2clean": Config(EXTRACTION_PRESET="delg-r50-gldv2clean"),
    "delg-r101-gldv2clean": Config(EXTRACTION_PRESET="delg-r101-gldv2clean"),
    # RootSIFT from the weights-free extractor: mutual NN + ratio test, looser RANSAC.
    "opencv-sift": Config(
        NUM_TO_RERANK=10,
        TOP_K=3,
        MAX_INLIER_SCORE=40,
        MAX_REPROJECTION_ERROR=16.0,
        MAX_RANSAC_ITERATIONS=2000,
        HOMOGRAPHY_CONFIDENCE=0.999,
        MAX_DESCRIPTOR_DISTANCE=float("inf"),
        MUTUAL_NEAREST_NEIGHBOR=True,
        RATIO_TEST=0.8,
        MIN_INLIERS=8,
        # The inlier term of one candidate with MIN_INLIERS inliers (8 / 40): with the
        # non-landmark penalty on (an index with a distractor set), a photo counts as a
        # landmark when its score beats its likeness to the distractors by that much.
        LANDMARK_THRESHOLD=0.2,
    ),
}


def load_config(source: str | Path | Config | None = None, **overrides: Any) -> Config:
    """Build a Config from a preset name, a YAML/JSON file, or an existing Config.

    A file holds a mapping of field names to values and may name a ``preset`` to start
    from; ``overrides`` are applied last. ``None`` means the ``kaggle2020`` preset.
    """
    if source is None:
        config = PRESETS["kaggle2020"]
    elif isinstance(source, Config):
        config = source
    elif str(source) in PRESETS:
        config = PRESETS[str(source)]
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(
                f"config {str(source)!r} is neither a preset ({', '.join(PRESETS)}) nor a file"
            )
        text = path.read_text()
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a mapping of field names to values")
        base = values.pop("preset", "kaggle2020")
        config = load_config(base).replace(**values)
    return config.replace(**overrides) if overrides else config
