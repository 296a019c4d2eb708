"""Adapter for the DELF v1 TF-Hub module (``google/delf/1``), loaded offline.

A handle such as ``google/delf/1`` or ``https://tfhub.dev/google/delf/1`` is looked up
in the TF-Hub cache and never downloaded. ``tensorflow_hub`` (0.16) caches a module
downloaded from URL ``u`` in ``<cache>/<sha1(u)>``, where ``<cache>`` is the
``TFHUB_CACHE_DIR`` environment variable or ``<system temp>/tfhub_modules``; the bare
form ``google/delf/1`` stands for ``https://tfhub.dev/google/delf/1``.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from delf_retrieval.features.containers import (
    ImageFeatures,
    LocalFeatures,
    l2_normalize,
    to_original_pixels,
)
from delf_retrieval.models.base import Extractor, ExtractorParams, hash_model_dir
from delf_retrieval.models.delg import prepare_image

DELF_LOCAL_DIM = 40
DELF_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
DELF_SCORE_THRESHOLD = 100.0
DELF_MAX_FEATURE_NUM = 1000
DELF_HANDLE = "https://tfhub.dev/google/delf/1"

_HUB_HOSTS = ("tfhub.dev/", "hub.tensorflow.google.cn/")
_BARE_HANDLE = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*/\d+$")
_DELF_INPUTS = {"image", "score_threshold", "image_scales", "max_feature_num"}
_DELF_OUTPUTS = {"locations", "descriptors"}


class HubModuleNotCachedError(FileNotFoundError):
    """A TF-Hub handle is not in the local cache (nothing is ever downloaded)."""


def default_delf_params() -> ExtractorParams:
    """The TF-Hub DELF tutorial's settings: 7 scales, threshold 100, at most 1000 features."""
    return ExtractorParams(
        image_scales=DELF_SCALES,
        global_scales=DELF_SCALES,
        score_threshold=DELF_SCORE_THRESHOLD,
        max_feature_num=DELF_MAX_FEATURE_NUM,
    )


def is_hub_handle(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` looks like a TF-Hub handle (URL or ``publisher/name/version``)."""
    text = os.fspath(spec)
    if text.startswith(("http://", "https://")):
        return True
    if text.startswith(_HUB_HOSTS):
        return True
    return bool(_BARE_HANDLE.match(text))


def hub_cache_dir() -> Path:
    """The folder ``tensorflow_hub`` caches downloaded modules in."""
    configured = os.environ.get("TFHUB_CACHE_DIR", "")
    return Path(configured) if configured else Path(tempfile.gettempdir()) / "tfhub_modules"


def _candidate_urls(handle: str) -> list[str]:
    """URLs whose cache folders may hold ``handle``, most specific first."""
    urls = []
    if handle.startswith(("http://", "https://")):
        urls.append(handle)
        stripped = handle.split("://", 1)[1]
    else:
        stripped = handle
    for host in _HUB_HOSTS:
        if stripped.startswith(host):
            stripped = stripped[len(host) :]
    urls.append("https://tfhub.dev/" + stripped.strip("/"))
    return list(dict.fromkeys(urls))


def hub_cache_folder(url: str) -> Path:
    """Where ``tensorflow_hub`` caches the module downloaded from ``url``."""
    return hub_cache_dir() / hashlib.sha1(url.encode("utf8")).hexdigest()


def resolve_hub_handle(spec: str | os.PathLike) -> Path:
    """Local folder of a module: ``spec`` itself if it is a folder, else its cache folder.

    Raises
    ------
    HubModuleNotCachedError
        When ``spec`` is a handle whose module is not in :func:`hub_cache_dir`; the
        message says how to fill the cache on a machine with internet access.
    ValueError
        When ``spec`` is neither a folder nor a handle.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    handle = os.fspath(spec)
    if not is_hub_handle(handle):
        raise ValueError(f"{handle!r} is neither a folder nor a TF-Hub handle")
    urls = _candidate_urls(handle)
    for url in urls:
        folder = hub_cache_folder(url)
        if (folder / "saved_model.pb").is_file():
            return folder
    url = urls[-1]
    raise HubModuleNotCachedError(
        f"{handle!r} is not a folder, and as a TF-Hub handle it is not in the local cache "
        f"{hub_cache_dir()} "
        f"(looked for {', '.join(str(hub_cache_folder(u)) for u in urls)}), and nothing is "
        "downloaded. On a machine with internet access run\n"
        f"    TFHUB_CACHE_DIR=/some/dir python -c \"import tensorflow_hub as hub; hub.load('{url}')\"\n"
        f"and copy /some/dir/{hashlib.sha1(url.encode('utf8')).hexdigest()} to "
        f"{hub_cache_folder(url)} (or set TFHUB_CACHE_DIR to /some/dir, or pass the "
        "module's folder instead of the handle)."
    )


def _load_module(folder: Path) -> Any:
    """``tensorflow_hub.load`` of a local folder (same call without the package)."""
    try:
        import tensorflow_hub as hub
    except ImportError:
        import tensorflow as tf

        tags = [] if (folder / "tfhub_module.pb").is_file() else None
        return tf.saved_model.load(str(folder), tags=tags)
    return hub.load(str(folder))


class DelfHubExtractor(Extractor):
    """DELF v1 (TF-Hub ``google/delf/1``): 40-d local features, no global descriptor.

    Parameters
    ----------
    path : module folder, or a handle (``google/delf/1``,
        ``https://tfhub.dev/google/delf/1``) found in the TF-Hub cache.
    params : extraction parameters; :func:`default_delf_params` when None.

    Notes
    -----
    The ``default`` signature returns only locations and descriptors, in the module's
    order (strongest attention first). ``scores`` and ``scales`` of the returned local
    features are therefore all zeros unless the module also outputs ``scores`` /
    ``scales``. ``global_scales`` is unused.
    """

    family = "delf-hub"
    has_local = True
    has_global = False
    local_dim = DELF_LOCAL_DIM
    global_dim = 0

    def __init__(self, path: str | os.PathLike, params: ExtractorParams | None = None) -> None:
        import tensorflow as tf

        folder = resolve_hub_handle(path)
        super().__init__(params or default_delf_params(), hash_model_dir(folder))
        self.path = folder
        self._tf = tf
        self._model = _load_module(folder)
        signature = self._model.signatures.get("default")
        if signature is None:
            raise ValueError(f"{folder}: no 'default' signature; not a DELF TF-Hub module")
        inputs = set(signature.structured_input_signature[1])
        outputs = signature.structured_outputs
        if not _DELF_INPUTS <= inputs or not _DELF_OUTPUTS <= set(outputs):
            raise ValueError(
                f"{folder}: 'default' has inputs {sorted(inputs)} and outputs {sorted(outputs)}; "
                f"DELF needs inputs {sorted(_DELF_INPUTS)} and outputs {sorted(_DELF_OUTPUTS)}"
            )
        self._function = signature
        dim = outputs["descriptors"].shape[-1]
        self.local_dim = int(dim) if dim is not None else DELF_LOCAL_DIM

    def extract(self, image: np.ndarray) -> ImageFeatures:
        """Local features of one RGB uint8 image ``[H, W, 3]`` (keypoints in its pixels)."""
        tf = self._tf
        params = self.params
        small, factor = prepare_image(image, params.max_image_size)
        if small.size == 0:
            return ImageFeatures(local=LocalFeatures.empty(self.local_dim), global_descriptor=None)
        outputs = self._function(
            image=tf.constant(small.astype(np.float32) / 255.0),
            score_threshold=tf.constant(params.score_threshold, tf.float32),
            image_scales=tf.constant(params.image_scales, tf.float32),
            max_feature_num=tf.constant(params.max_feature_num, tf.int32),
        )
        locations = outputs["locations"].numpy().reshape(-1, 2)
        count = locations.shape[0]
        zeros = np.zeros(count, np.float32)
        scores = outputs["scores"].numpy() if "scores" in outputs else zeros
        scales = outputs["scales"].numpy() if "scales" in outputs else zeros
        local = LocalFeatures(
            keypoints=to_original_pixels(locations[:, ::-1], factor),
            descriptors=l2_normalize(outputs["descriptors"].numpy().reshape(count, self.local_dim)),
            scores=np.asarray(scores, np.float32).reshape(count),
            scales=np.asarray(scales, np.float32).reshape(count),
        )
        return ImageFeatures(local=local, global_descriptor=None)
