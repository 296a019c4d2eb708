"""The one interface every feature extractor implements."""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from delf_retrieval.features.containers import ImageFeatures

# Kaggle 2020 host baseline (DELG): scales, attention threshold, feature cap.
BASELINE_SCALES = (0.7071, 1.0, 1.4142)
BASELINE_SCORE_THRESHOLD = 175.0
BASELINE_MAX_FEATURE_NUM = 1000


@dataclass(frozen=True)
class ExtractorParams:
    """Extraction parameters; defaults are the Kaggle 2020 host baseline's (DELG).

    Attributes
    ----------
    image_scales : tuple of float
        Scales at which local features are extracted (1.0 = original size).
    global_scales : tuple of float
        Scales whose global descriptors are L2-normalised, summed and L2-normalised.
    score_threshold : float
        Minimum attention score of a local feature (DELG ``input_abs_thres``,
        DELF ``score_threshold``).
    max_feature_num : int
        Maximum number of local features per image.
    max_image_size : int or None
        If set, images whose longer side exceeds this many pixels are downscaled
        before extraction; keypoints are still reported in original pixels.
    exif_transpose : bool
        Rotate/flip decoded photos by their EXIF orientation before extraction (default
        True: what a viewer shows). The reference pipelines (tensorflow/models DELG
        extraction, the Kaggle 2020 host baseline) do not; their presets in
        :mod:`delf_retrieval.models.presets` set False. Left out of :meth:`to_dict` when
        True, so fingerprints of stores written before this field existed still match.
    """

    image_scales: tuple[float, ...] = BASELINE_SCALES
    global_scales: tuple[float, ...] = BASELINE_SCALES
    score_threshold: float = BASELINE_SCORE_THRESHOLD
    max_feature_num: int = BASELINE_MAX_FEATURE_NUM
    max_image_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    exif_transpose: bool = True

    def __post_init__(self) -> None:
        # NaN passes no comparison and would give 0 features per image without a word.
        if not self.image_scales or not all(math.isfinite(s) and s > 0 for s in self.image_scales):
            raise ValueError(f"image_scales must be positive and finite, got {self.image_scales}")
        if not self.global_scales or not all(math.isfinite(s) and s > 0 for s in self.global_scales):
            raise ValueError(f"global_scales must be positive and finite, got {self.global_scales}")
        if not math.isfinite(self.score_threshold):
            raise ValueError(f"score_threshold must be finite, got {self.score_threshold}")
        if self.max_feature_num < 0:
            raise ValueError(f"max_feature_num must be >= 0, got {self.max_feature_num}")
        if self.max_image_size is not None and self.max_image_size < 16:
            raise ValueError(f"max_image_size must be >= 16 pixels, got {self.max_image_size}")

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["image_scales"] = list(self.image_scales)
        values["global_scales"] = list(self.global_scales)
        if self.exif_transpose:
            del values["exif_transpose"]
        return values


class Extractor(ABC):
    """Turns one RGB uint8 image ``[H, W, 3]`` into :class:`ImageFeatures`.

    Subclasses set ``family`` (e.g. ``"delg-tf2"``), ``has_local``, ``has_global``
    (a native global descriptor), ``local_dim`` and ``global_dim`` (0 when absent).
    ``batch_size`` > 1 asks the extraction runner to hand :meth:`extract_many` that many
    images at once (models that batch their calls, e.g. Keras models).
    """

    family: str = ""
    batch_size: int = 1
    has_local: bool = False
    has_global: bool = False
    local_dim: int = 0
    global_dim: int = 0

    def __init__(self, params: ExtractorParams, model_id: str) -> None:
        self.params = params
        self.model_id = model_id

    @abstractmethod
    def extract(self, image: np.ndarray) -> ImageFeatures:
        """Features of one image (RGB uint8 ``[H, W, 3]``)."""

    def extract_many(self, images: Iterable[np.ndarray]) -> list[ImageFeatures]:
        """Features of several images, in order (subclasses may batch)."""
        return [self.extract(image) for image in images]

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the features this extractor makes (stored with them)."""
        return {
            "family": self.family,
            "model_id": self.model_id,
            "params": self.params.to_dict(),
            "local_dim": self.local_dim,
            "global_dim": self.global_dim,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r}, model_id={self.model_id!r})"


def hash_model_dir(path: str | Path) -> str:
    """Short content hash of a SavedModel directory (graph + variable index), for fingerprints."""
    path = Path(path)
    digest = hashlib.sha256()
    for name in ("saved_model.pb", "variables/variables.index", "tfhub_module.pb"):
        file = path / name
        if file.is_file():
            digest.update(name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
