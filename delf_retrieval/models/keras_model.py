"""Adapter for your own Keras/TensorFlow model: embedding or classifier as a global stage.

Accepted files: a Keras 3 ``.keras`` file, a legacy ``.h5`` file (both opened with
``keras.models.load_model``) or a TF2 SavedModel folder whose ``serving_default``
signature takes one image batch ``[B, H, W, 3]`` (what ``keras.Model.export`` writes;
Keras 3 cannot ``load_model`` such folders, so they are called through the signature).

The global descriptor is the output of a layer (``layer``; by default the input of the
final softmax classification layer, i.e. the pooled features, or the model output when
there is no softmax head). A 4-D map ``[B, h, w, C]`` is pooled (GeM, max or average).
Per image: resize (fixed size, or longest side capped keeping the aspect), preprocess
by name, run the model at every scale (and on the mirrored image with ``flip``),
L2-normalise each descriptor, sum, L2-normalise. Images are batched through the model.
TensorFlow places the model on a GPU when it sees one.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from delf_retrieval.features.containers import ImageFeatures, l2_normalize
from delf_retrieval.features.images import downscale_to_max_size
from delf_retrieval.models.base import Extractor, ExtractorParams, hash_model_dir

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")

# keras.applications.imagenet_utils._preprocess_numpy_input: "caffe" flips RGB to BGR and
# subtracts these per-channel means (in BGR order); "torch" scales to [0, 1] and
# standardises with the ImageNet mean/std (RGB order).
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
TORCH_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
TORCH_STD = np.array([0.229, 0.224, 0.225], np.float32)
PREPROCESSING = ("caffe", "torch", "tf", "0-1", "0-255")
POOLING = ("gem", "max", "avg")
RESIZE = ("fixed", "longest")
GEM_EPS = 1e-6


def preprocess(images: np.ndarray, mode: str) -> np.ndarray:
    """Pixel preprocessing by name.

    Parameters
    ----------
    images : uint8 or float [..., 3], RGB in 0-255.
    mode : ``"caffe"`` (Keras ResNet50/VGG16: RGB -> BGR, minus the ImageNet BGR mean),
        ``"torch"`` (/255, minus ImageNet mean, / ImageNet std), ``"tf"`` (to [-1, 1]:
        x / 127.5 - 1), ``"0-1"`` (x / 255) or ``"0-255"`` (unchanged values).

    Returns
    -------
    float32 array of the same shape (a new array).
    """
    x = np.asarray(images, dtype=np.float32)
    if mode == "caffe":
        return x[..., ::-1] - CAFFE_MEAN_BGR
    if mode == "torch":
        return (x / 255.0 - TORCH_MEAN) / TORCH_STD
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "0-1":
        return x / 255.0
    if mode == "0-255":
        return x.copy()
    raise ValueError(f"unknown preprocessing {mode!r}; choose one of {', '.join(PREPROCESSING)}")


def pool_map(maps: np.ndarray, pooling: str, p: float = 3.0) -> np.ndarray:
    """Pool feature maps over space.

    Parameters
    ----------
    maps : float [B, h, w, C] (channels last).
    pooling : ``"gem"`` (generalised mean, Radenovic et al. 2018, as cirtorch
        ``cirtorch/layers/functional.py`` ``gem``: mean of ``max(x, 1e-6) ** p``, then
        ``** (1 / p)``), ``"max"`` or ``"avg"``.
    p : GeM exponent (1 = average, large = max).

    Returns
    -------
    float32 [B, C].
    """
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 4:
        raise ValueError(f"expected feature maps [B, h, w, C], got shape {maps.shape}")
    if pooling == "max":
        return maps.max(axis=(1, 2))
    if pooling == "avg":
        return maps.mean(axis=(1, 2), dtype=np.float64).astype(np.float32)
    if pooling == "gem":
        powered = np.power(np.maximum(maps, GEM_EPS).astype(np.float64), p)
        return np.power(powered.mean(axis=(1, 2)), 1.0 / p).astype(np.float32)
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLING)}")


def resize_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an image to ``height x width`` (OpenCV area filter when shrinking, bilinear otherwise)."""
    if image.shape[0] == height and image.shape[1] == width:
        return image
    shrink = height <= image.shape[0] and width <= image.shape[1]
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


def target_size(shape: Sequence[int], options: KerasOptions, scale: float = 1.0) -> tuple[int, int]:
    """Model input ``(height, width)`` for an image of ``shape`` at one ``scale``.

    ``fixed``: ``image_size`` times ``scale`` whatever the image. ``longest``: the image's
    longer side is capped at ``image_size`` (never enlarged), keeping the aspect ratio,
    then multiplied by ``scale``.
    """
    height, width = int(shape[0]), int(shape[1])
    size_h, size_w = options.size_hw
    if options.resize == "fixed":
        return max(1, round(size_h * scale)), max(1, round(size_w * scale))
    factor = min(1.0, size_h / max(height, width)) * scale
    return max(1, round(height * factor)), max(1, round(width * factor))


@dataclass(frozen=True)
class KerasOptions:
    """How a Keras/TF model turns images into a global descriptor (all but ``batch_size``
    are in the store fingerprint).

    Attributes
    ----------
    layer : str or None
        Layer whose output is the descriptor (SavedModel: the signature output name).
        None: the input of the final softmax layer, else the model output.
    pooling : ``"gem"``, ``"max"`` or ``"avg"``, for a 4-D layer output.
    gem_p : GeM exponent.
    preprocess : ``"caffe"``, ``"torch"``, ``"tf"``, ``"0-1"`` or ``"0-255"`` (see :func:`preprocess`).
    image_size : int or (height, width) or None
        ``fixed``: the model input size; ``longest``: the cap of the longer side.
        None: the model's own fixed input size, else 224.
    resize : ``"fixed"`` or ``"longest"`` (keep the aspect ratio).
    scales : image scales whose descriptors are L2-normalised, summed and L2-normalised.
    flip : also run the horizontally mirrored image at every scale and add it in.
    batch_size : images per model call.
    head : SavedModel only: the signature output holding class probabilities (None: the
        only output, for classifiers).
    """

    layer: str | None = None
    pooling: str = "gem"
    gem_p: float = 3.0
    preprocess: str = "caffe"
    image_size: int | tuple[int, int] | None = None
    resize: str = "fixed"
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    batch_size: int = 32
    head: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.image_size, (list, tuple)):
            object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        checks = {
            "pooling": self.pooling in POOLING,
            "preprocess": self.preprocess in PREPROCESSING,
            "resize": self.resize in RESIZE,
            "gem_p": self.gem_p > 0,
            "scales": bool(self.scales) and all(s > 0 for s in self.scales),
            "batch_size": self.batch_size >= 1,
            "image_size": self.image_size is None
            or (isinstance(self.image_size, int) and self.image_size >= 8)
            or (isinstance(self.image_size, tuple) and len(self.image_size) == 2 and min(self.image_size) >= 8),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            hints = {
                "pooling": POOLING,
                "preprocess": PREPROCESSING,
                "resize": RESIZE,
            }
            raise ValueError(
                "invalid Keras model option(s): "
                + "; ".join(
                    f"{name}={getattr(self, name)!r}"
                    + (f" (choose one of {', '.join(hints[name])})" if name in hints else "")
                    for name in bad
                )
            )
        if self.resize == "longest" and isinstance(self.image_size, tuple) and self.image_size[0] != self.image_size[1]:
            raise ValueError("resize='longest' takes one image_size (the cap of the longer side)")

    @property
    def size_hw(self) -> tuple[int, int]:
        size = 224 if self.image_size is None else self.image_size
        return (size, size) if isinstance(size, int) else size

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["scales"] = list(self.scales)
        if isinstance(self.image_size, tuple):
            values["image_size"] = list(self.image_size)
        return values

    @classmethod
    def from_mapping(cls, options: dict[str, Any]) -> KerasOptions:
        """Options from keyword arguments; unknown names raise with the accepted ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown Keras model option(s) {unknown}; accepted: {sorted(known)}")
        return cls(**options)


def hash_file(path: Path) -> str:
    """Short SHA-256 of a file's bytes (model fingerprints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _close_names(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    if close:
        return f"; did you mean {', '.join(repr(c) for c in close)}?"
    shown = ", ".join(repr(n) for n in names[-12:])
    return f"; its layers end with {shown}"


class _KerasNetwork:
    """A ``.keras``/``.h5`` model cut to ``(descriptor, probabilities or None)`` outputs."""

    def __init__(self, path: Path, options: KerasOptions, custom_objects: dict[str, Any] | None) -> None:
        import keras
        import tensorflow as tf

        try:
            model = keras.models.load_model(path, compile=False, custom_objects=custom_objects)
        except Exception as error:  # keras raises many kinds for a bad file
            raise ValueError(
                f"{path} could not be opened as a Keras model ({type(error).__name__}: {error}). "
                "Expected a model saved with model.save('x.keras') or model.save('x.h5'); models "
                "with custom layers need load_extractor(..., custom_objects={...})"
            ) from error
        if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4 or model.inputs[0].shape[-1] != 3:
            shapes = [tuple(i.shape) for i in model.inputs]
            raise ValueError(f"{path}: expected one image input [batch, H, W, 3], the model has inputs {shapes}")
        head_layer, probabilities = _softmax_head(model)
        if options.layer is not None:
            names = [layer.name for layer in model.layers]
            if options.layer not in names:
                nested = [
                    layer.name
                    for layer in model.layers
                    if hasattr(layer, "layers") and options.layer in [inner.name for inner in layer.layers]
                ]
                if nested:
                    raise ValueError(
                        f"{path}: layer {options.layer!r} is inside the nested model {nested[0]!r}, whose "
                        "inner layers cannot be cut out; name a layer of the outer model (one of "
                        f"{', '.join(repr(n) for n in names[-8:])}) or build the model functionally "
                        "(x = base.output instead of base(inputs))"
                    )
                raise ValueError(f"{path}: no layer named {options.layer!r}{_close_names(options.layer, names)}")
            descriptor = model.get_layer(options.layer).output
            where = f"layer {options.layer!r}"
        elif head_layer is not None:
            descriptor = head_layer.input
            where = f"the input of the softmax layer {head_layer.name!r}"
        else:
            if len(model.outputs) != 1:
                raise ValueError(
                    f"{path}: the model has {len(model.outputs)} outputs and no softmax head; "
                    "name the descriptor layer (layer=... / --layer)"
                )
            descriptor = model.outputs[0]
            where = "the model output"
        if isinstance(descriptor, (list, tuple)):
            raise ValueError(f"{path}: {where} is several tensors; name one layer (layer=... / --layer)")
        rank = len(descriptor.shape)
        if rank not in (2, 4):
            raise ValueError(
                f"{path}: {where} has shape {tuple(descriptor.shape)} (rank {rank}); a global "
                "descriptor needs a 2-D [batch, D] or 4-D [batch, h, w, C] output. Name another "
                f"layer{_close_names('pool', [layer.name for layer in model.layers])}"
            )
        self.where = where
        self.descriptor_rank = rank
        self.dim = int(descriptor.shape[-1])
        self.num_classes = int(probabilities.shape[-1]) if probabilities is not None else 0
        outputs = [descriptor] + ([probabilities] if probabilities is not None else [])
        self.model = keras.Model(model.inputs, outputs)
        self.input_hw = tuple(model.inputs[0].shape[1:3])
        self.input_dtype = tf.as_dtype(model.inputs[0].dtype or "float32")
        spec = tf.TensorSpec([None, None, None, 3], self.input_dtype)
        self._call = tf.function(self._predict, input_signature=[spec], autograph=False)

    def _predict(self, batch: Any) -> Any:
        return self.model(batch, training=False)

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = self._call(batch)
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        descriptor = outputs[0].numpy()
        probabilities = outputs[1].numpy() if len(outputs) > 1 else None
        return descriptor, probabilities


def _softmax_head(model: Any) -> tuple[Any, Any]:
    """``(layer, probability tensor)`` of the model's final softmax classifier, or ``(None, None)``.

    The head is the output Dense layer with a softmax activation, or an output Softmax /
    Activation('softmax') layer right after a Dense layer.
    """
    import keras

    if len(model.outputs) != 1:
        return None, None
    output = model.outputs[0]
    for layer in reversed(model.layers):
        if layer.output is not output:
            continue
        activation = getattr(getattr(layer, "activation", None), "__name__", "")
        if isinstance(layer, keras.layers.Dense) and activation == "softmax":
            return layer, output
        is_softmax = isinstance(layer, keras.layers.Softmax) or (
            isinstance(layer, keras.layers.Activation) and activation == "softmax"
        )
        if is_softmax:
            previous = [other for other in model.layers if other.output is layer.input]
            if previous and isinstance(previous[0], keras.layers.Dense):
                return previous[0], output
        return None, None
    return None, None


class _SavedModelNetwork:
    """A SavedModel's ``serving_default`` signature with one image input."""

    def __init__(self, path: Path, options: KerasOptions) -> None:
        import tensorflow as tf

        loaded = tf.saved_model.load(str(path))
        signature = loaded.signatures.get("serving_default")
        if signature is None:
            raise ValueError(f"{path}: no 'serving_default' signature")
        self._loaded = loaded
        self._function = signature
        inputs = signature.structured_input_signature[1]
        if len(inputs) != 1:
            raise ValueError(f"{path}: 'serving_default' has inputs {sorted(inputs)}; expected one image batch")
        (self._input_name, input_spec), = inputs.items()
        if input_spec.shape.rank != 4 or input_spec.shape[-1] != 3:
            raise ValueError(f"{path}: input {self._input_name!r} has shape {input_spec.shape}; expected [B, H, W, 3]")
        outputs = dict(signature.structured_outputs)
        names = sorted(outputs)
        for option, name in (("layer", options.layer), ("head", options.head)):
            if name is not None and name not in outputs:
                raise ValueError(f"{path}: 'serving_default' has no output {name!r} ({option}){_close_names(name, names)}")
        if options.layer is not None:
            self._descriptor_name = options.layer
        else:
            usable = [n for n in names if n != options.head and outputs[n].shape.rank in (2, 4)]
            if len(usable) != 1:
                raise ValueError(
                    f"{path}: 'serving_default' outputs {names}; name the descriptor output "
                    "(layer=... / --layer)"
                    if usable
                    else f"{path}: no 2-D or 4-D output among {names} to use as a global descriptor"
                )
            self._descriptor_name = usable[0]
        rank = outputs[self._descriptor_name].shape.rank
        if rank not in (2, 4):
            raise ValueError(
                f"{path}: output {self._descriptor_name!r} has shape {outputs[self._descriptor_name].shape}; "
                "a global descriptor needs a 2-D or 4-D output"
            )
        self._head_name = options.head
        if self._head_name is None and len(names) == 1:
            self._head_name = names[0]  # a classifier exported with its probabilities only
        self.where = f"output {self._descriptor_name!r}"
        self.descriptor_rank = rank
        dim = outputs[self._descriptor_name].shape[-1]
        self.dim = int(dim) if dim is not None else 0
        head_dim = outputs[self._head_name].shape[-1] if self._head_name else None
        self.num_classes = int(head_dim) if head_dim is not None and outputs[self._head_name].shape.rank == 2 else 0
        if not self.num_classes:
            self._head_name = None
        self.input_hw = tuple(input_spec.shape[1:3])
        self.input_dtype = input_spec.dtype

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = self._function(**{self._input_name: batch})
        descriptor = outputs[self._descriptor_name].numpy()
        probabilities = outputs[self._head_name].numpy() if self._head_name else None
        return descriptor, probabilities


def is_keras_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a Keras model file by its suffix."""
    return Path(path).suffix.lower() in KERAS_SUFFIXES


class KerasExtractor(Extractor):
    """Global descriptors from your own Keras/TF model (no local features).

    Parameters
    ----------
    path : ``.keras`` / ``.h5`` file or SavedModel folder (see the module docstring).
    options : :class:`KerasOptions` (defaults when None).
    params : only ``max_image_size`` (images are first capped to it, which saves resizing
        work for huge photos) and ``exif_transpose`` are used; the rest is ``options``.
    custom_objects : passed to ``keras.models.load_model`` for models with custom layers.
    """

    family = "keras"
    has_local = False
    has_global = True
    local_dim = 0

    def __init__(
        self,
        path: str | os.PathLike,
        options: KerasOptions | None = None,
        params: ExtractorParams | None = None,
        custom_objects: dict[str, Any] | None = None,
    ) -> None:
        path = Path(path)
        options = options or KerasOptions()
        if path.is_dir():
            network: _KerasNetwork | _SavedModelNetwork = _SavedModelNetwork(path, options)
            model_id = hash_model_dir(path)
        elif path.is_file():
            if not is_keras_file(path):
                raise ValueError(f"{path}: not a Keras model file (expected {', '.join(KERAS_SUFFIXES)})")
            network = _KerasNetwork(path, options, custom_objects)
            model_id = hash_file(path)
        else:
            raise ValueError(f"{path}: no such file or folder")
        fixed_hw = network.input_hw
        if all(v is not None for v in fixed_hw):
            fixed = (int(fixed_hw[0]), int(fixed_hw[1]))
            if options.image_size is None:
                options = _replace(options, image_size=fixed if fixed[0] != fixed[1] else fixed[0])
            if options.resize != "fixed" or options.size_hw != fixed or options.scales != (1.0,):
                raise ValueError(
                    f"{path}: the model takes a fixed {fixed[0]}x{fixed[1]} input; use resize='fixed', "
                    f"image_size={fixed[0] if fixed[0] == fixed[1] else fixed} and scales=(1.0,)"
                )
        self.options = options
        self.path = path
        self.network = network
        self.global_dim = network.dim
        self.num_classes = network.num_classes
        self.batch_size = options.batch_size
        given = params or ExtractorParams()
        super().__init__(
            ExtractorParams(
                image_scales=(1.0,), global_scales=options.scales, score_threshold=0.0,
                max_feature_num=0, max_image_size=given.max_image_size, exif_transpose=given.exif_transpose,
            ),
            model_id,
        )

    def fingerprint(self) -> dict[str, Any]:
        """Model content hash, every option but ``batch_size`` (speed only), dimensions."""
        options = {k: v for k, v in self.options.to_dict().items() if k != "batch_size"}
        return {**super().fingerprint(), "options": options}

    def __repr__(self) -> str:
        return (
            f"KerasExtractor({str(self.path)!r}, descriptor={self.network.where}, dim={self.global_dim}, "
            f"{', '.join(f'{k}={v!r}' for k, v in self.options.to_dict().items() if k not in ('head',))})"
        )

    # ------------------------------------------------------------------ running
    def _check(self, image: np.ndarray) -> np.ndarray:
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            shape, dtype = getattr(image, "shape", None), getattr(image, "dtype", None)
            raise ValueError(f"expected an RGB uint8 [H, W, 3] image, got {dtype} {shape}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"image has no pixels (shape {image.shape})")
        return downscale_to_max_size(image, self.params.max_image_size)[0]

    def _views(self) -> list[tuple[float, bool]]:
        flips = (False, True) if self.options.flip else (False,)
        return [(scale, flip) for scale in self.options.scales for flip in flips]

    def model_inputs(self, image: np.ndarray, scale: float, flip: bool = False) -> np.ndarray:
        """The preprocessed model input of one image at one scale: float [h, w, 3]."""
        height, width = target_size(image.shape, self.options, scale)
        resized = resize_to(image, height, width)
        if flip:
            resized = resized[:, ::-1]
        return preprocess(resized, self.options.preprocess).astype(self.network.input_dtype.as_numpy_dtype)

    def prepare_image(self, image: np.ndarray) -> PreparedImage:
        """Resize and preprocess one image for every scale/flip (thread-safe, no TensorFlow).

        The extraction runner calls this in its decoding threads, so the model thread only
        stacks ready inputs; :meth:`extract_many` also accepts raw images.
        """
        image = self._check(image)
        return PreparedImage({view: self.model_inputs(image, *view) for view in self._views()})

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Descriptors ``[B, D]`` (pooled, not normalised) and probabilities ``[B, C]`` or None."""
        descriptor, probabilities = self.network(batch)
        if descriptor.ndim == 4:
            descriptor = pool_map(descriptor, self.options.pooling, self.options.gem_p)
        return descriptor.reshape(descriptor.shape[0], -1).astype(np.float32), probabilities

    def _forward(
        self, images: Sequence[np.ndarray | PreparedImage], want_probabilities: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Summed, normalised descriptors ``[N, D]`` and averaged probabilities ``[N, C]``."""
        prepared = [item if isinstance(item, PreparedImage) else self.prepare_image(item) for item in images]
        count = len(prepared)
        total = np.zeros((count, self.global_dim), np.float32)
        probabilities = np.zeros((count, self.num_classes), np.float64) if want_probabilities else None
        views = self._views()
        for view in views:
            # Same-size inputs share a model call; sizes differ only with resize="longest".
            groups: dict[tuple[int, ...], list[int]] = {}
            for index, item in enumerate(prepared):
                groups.setdefault(item.inputs[view].shape, []).append(index)
            for members in groups.values():
                for start in range(0, len(members), self.batch_size):
                    rows = members[start : start + self.batch_size]
                    descriptor, probs = self._run(np.stack([prepared[i].inputs[view] for i in rows]))
                    total[rows] += l2_normalize(descriptor, axis=1)
                    if probabilities is not None:
                        if probs is None:
                            raise ValueError(f"{self.path}: the model has no softmax head")
                        probabilities[rows] += probs
        if probabilities is not None:
            probabilities /= len(views)
        return l2_normalize(total, axis=1), probabilities

    def extract(self, image: np.ndarray) -> ImageFeatures:
        """Global descriptor of one RGB uint8 image ``[H, W, 3]`` (float32 [D], L2-normalised)."""
        return self.extract_many([image])[0]

    def extract_many(self, images: Sequence[np.ndarray | PreparedImage]) -> list[ImageFeatures]:
        """Global descriptors of several images (raw or :meth:`prepare_image`-d), batched."""
        if not images:
            return []
        vectors, _ = self._forward(images, want_probabilities=False)
        return [ImageFeatures(local=None, global_descriptor=vector) for vector in vectors]

    def class_probabilities(self, images: Sequence[np.ndarray | PreparedImage]) -> np.ndarray:
        """Softmax outputs ``[N, C]`` of the classifier head (averaged over scales/flips).

        Raises ValueError when the model has no softmax head.
        """
        if not self.num_classes:
            raise ValueError(
                f"{self.path}: the model has no softmax classification head "
                "(a final Dense layer with softmax; SavedModel: name the output with head=...)"
            )
        if not images:
            return np.zeros((0, self.num_classes), np.float32)
        _, probabilities = self._forward(images, want_probabilities=True)
        assert probabilities is not None
        return probabilities.astype(np.float32)


@dataclass(frozen=True)
class PreparedImage:
    """Model inputs of one image: ``inputs[(scale, flip)]`` = preprocessed float ``[h, w, 3]``."""

    inputs: dict[tuple[float, bool], np.ndarray]


def _replace(options: KerasOptions, **changes: Any) -> KerasOptions:
    return KerasOptions(**{**{f.name: getattr(options, f.name) for f in fields(options)}, **changes})
