"""Weights-free extractor: OpenCV SIFT keypoints with RootSIFT descriptors.

It needs no model file, so every command works on a machine without DELF/DELG weights.
It has no native global descriptor: a VLAD aggregator fitted on the database
(:mod:`delf_retrieval.search.vlad`) supplies one.
"""

from __future__ import annotations

import cv2
import numpy as np

from delf_retrieval.features.containers import ImageFeatures, LocalFeatures, to_original_pixels
from delf_retrieval.features.images import downscale_to_max_size
from delf_retrieval.models.base import Extractor, ExtractorParams

DEFAULT_MAX_FEATURES = 2000
DEFAULT_MAX_IMAGE_SIZE = 1024


def default_sift_params() -> ExtractorParams:
    """RootSIFT defaults: up to 2000 keypoints on images capped at 1024 px.

    SIFT searches scales itself, so ``image_scales`` is (1.0,); ``score_threshold`` is
    the minimum detector response (0 keeps OpenCV's own contrast threshold only).
    """
    return ExtractorParams(
        image_scales=(1.0,),
        global_scales=(1.0,),
        score_threshold=0.0,
        max_feature_num=DEFAULT_MAX_FEATURES,
        max_image_size=DEFAULT_MAX_IMAGE_SIZE,
    )


def root_sift(descriptors: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise, square root.

    Parameters
    ----------
    descriptors : [N, 128] non-negative SIFT descriptors.

    Returns
    -------
    float32 [N, 128], each row of unit L2 norm (all-zero rows stay zero).
    """
    descriptors = np.asarray(descriptors, dtype=np.float32)
    l1 = np.abs(descriptors).sum(axis=1, keepdims=True)
    return np.sqrt(descriptors / np.maximum(l1, eps))


class OpenCVSiftExtractor(Extractor):
    """SIFT keypoints + RootSIFT descriptors (local only, 128-d).

    ``scores`` are SIFT responses; ``scales`` are keypoint diameters in pixels of the
    image the detector ran on (after the ``max_image_size`` cap), like DELG's scales they
    describe the detection, not the original image.
    """

    family = "opencv-sift"
    has_local = True
    has_global = False
    local_dim = 128
    global_dim = 0

    def __init__(self, params: ExtractorParams | None = None) -> None:
        super().__init__(params or default_sift_params(), model_id=f"opencv-{cv2.__version__}")

    def extract(self, image: np.ndarray) -> ImageFeatures:
        """Local features of an RGB uint8 image ``[H, W, 3]``."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
        small, factor = downscale_to_max_size(image, self.params.max_image_size)
        gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
        sift = cv2.SIFT_create()
        # Detect everything, keep the strongest, describe only those: describing is most
        # of SIFT's cost. The cap does not depend on OpenCV's internal retention order.
        detected = [kp for kp in sift.detect(gray, None) if kp.response >= self.params.score_threshold]
        detected.sort(key=lambda kp: (-kp.response, kp.pt[1], kp.pt[0], -kp.size))
        keypoints, descriptors = sift.compute(gray, detected[: self.params.max_feature_num])
        if descriptors is None or not keypoints:
            return ImageFeatures(local=LocalFeatures.empty(self.local_dim), global_descriptor=None)
        local = LocalFeatures(
            keypoints=to_original_pixels(np.array([kp.pt for kp in keypoints], np.float32), factor, always=True),
            descriptors=root_sift(descriptors),
            scores=np.array([kp.response for kp in keypoints], np.float32),
            scales=np.array([kp.size for kp in keypoints], np.float32),
        )
        return ImageFeatures(local=local, global_descriptor=None)
