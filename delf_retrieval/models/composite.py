"""Composition: global descriptors from one model, local features from another.

E.g. your Keras embedding for search and DELG or the weights-free RootSIFT for RANSAC
re-ranking. The fingerprint holds both models' fingerprints, so a store made by one pair
refuses features of another.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from delf_retrieval.features.containers import ImageFeatures
from delf_retrieval.models.base import Extractor, ExtractorParams


def _combined_cap(first: int | None, second: int | None) -> int | None:
    """The larger of two image-size caps (None = no cap wins)."""
    if first is None or second is None:
        return None
    return max(first, second)


class CompositeExtractor(Extractor):
    """``global_extractor``'s global descriptor + ``local_extractor``'s local features.

    Each part applies its own image-size cap and scales; the decoder only caps images to
    the larger of the two caps (keypoints stay in original pixels) and rotates them by
    their EXIF orientation as the local model's parameters say.
    """

    family = "composite"

    def __init__(self, global_extractor: Extractor, local_extractor: Extractor) -> None:
        if not global_extractor.has_global:
            raise ValueError(f"global model {global_extractor!r} has no global descriptor")
        if not local_extractor.has_local:
            raise ValueError(f"local model {local_extractor!r} has no local features")
        self.global_extractor = global_extractor
        self.local_extractor = local_extractor
        self.has_global = True
        self.has_local = True
        self.global_dim = global_extractor.global_dim
        self.local_dim = local_extractor.local_dim
        self.batch_size = max(getattr(global_extractor, "batch_size", 1), getattr(local_extractor, "batch_size", 1))
        cap = _combined_cap(global_extractor.params.max_image_size, local_extractor.params.max_image_size)
        params = ExtractorParams(
            image_scales=local_extractor.params.image_scales,
            global_scales=global_extractor.params.global_scales,
            score_threshold=local_extractor.params.score_threshold,
            max_feature_num=local_extractor.params.max_feature_num,
            max_image_size=cap,
            exif_transpose=local_extractor.params.exif_transpose,  # keypoints live in these pixels
        )
        super().__init__(params, f"{global_extractor.model_id}+{local_extractor.model_id}")
        self.family = f"{global_extractor.family}+{local_extractor.family}"

    def fingerprint(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "global_model": self.global_extractor.fingerprint(),
            "local_model": self.local_extractor.fingerprint(),
            "local_dim": self.local_dim,
            "global_dim": self.global_dim,
        }

    def extract(self, image: np.ndarray) -> ImageFeatures:
        """Global descriptor of the global model and local features of the local model."""
        return self.extract_many([image])[0]

    def extract_many(self, images: Sequence[np.ndarray]) -> list[ImageFeatures]:
        """Both models over the same images, each batching as it can."""
        images = list(images)
        globals_ = self.global_extractor.extract_many(images)
        locals_ = self.local_extractor.extract_many(images)
        return [
            ImageFeatures(local=local.local, global_descriptor=glob.global_descriptor)
            for glob, local in zip(globals_, locals_, strict=True)
        ]

    def __repr__(self) -> str:
        return f"CompositeExtractor(global={self.global_extractor!r}, local={self.local_extractor!r})"
