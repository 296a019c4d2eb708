"""One entry point that turns a model name, folder or TF-Hub handle into an extractor.

The format of a SavedModel folder is read from its ``saved_model.pb`` (signatures,
graph node names, whether it has a TF2 object graph) and ``tfhub_module.pb``, without
running the model.
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import Extractor, ExtractorParams

SIFT_NAMES = ("opencv-sift", "sift", "opencv")
SUPPORTED = (
    "'opencv-sift' (aliases 'sift', 'opencv'); a SavedModel folder of DELG in TF2 format "
    "(serving_default with input_image, input_scales, input_global_scales_ind, ...), "
    "DELG in TF1 format (Kaggle delg-saved-models: input_image:0, input_scales:0, "
    "global_descriptors:0, ...) or the DELF v1 TF-Hub module (signature 'default' with "
    "image, score_threshold, image_scales, max_feature_num); or a TF-Hub handle such as "
    "'google/delf/1' already in TFHUB_CACHE_DIR"
)

_DELF_INPUTS = {"image", "score_threshold", "image_scales", "max_feature_num"}
_DELG_TF2_INPUTS = {"input_image", "input_scales", "input_global_scales_ind"}
_DELG_TF1_NODES = {"input_image", "input_scales", "global_descriptors"}


def list_models() -> list[str]:
    """Names :func:`load_extractor` accepts besides folders (aliases not listed).

    ``google/delf/1`` needs the module in the TF-Hub cache (see ``TFHUB_CACHE_DIR``).
    """
    return ["google/delf/1", "opencv-sift"]


def detect_format(folder: str | os.PathLike) -> str:
    """Family of the SavedModel in ``folder``: ``"delg-tf2"``, ``"delg-tf1"`` or ``"delf-hub"``.

    Raises
    ------
    ValueError
        When ``folder`` is not a folder, has no ``saved_model.pb``, or holds a model
        none of the adapters understands.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; expected a SavedModel folder")
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
        for name, signature in signatures.items():
            found.append(f"{name}({', '.join(sorted(signature.inputs))})")
    kind = "TF-Hub module" if is_hub_module else "SavedModel"
    raise ValueError(
        f"{folder}: unrecognised {kind} (signatures: {', '.join(found) or 'none'}). "
        f"Supported: {SUPPORTED}"
    )


def _extractor_class(family: str) -> type[Extractor]:
    if family == "delg-tf2":
        from .delg import DelgTF2Extractor

        return DelgTF2Extractor
    if family == "delg-tf1":
        from .delg import DelgTF1Extractor

        return DelgTF1Extractor
    from .delf_hub import DelfHubExtractor

    return DelfHubExtractor


def load_extractor(spec: str | os.PathLike, params: ExtractorParams | None = None) -> Extractor:
    """Build the extractor named by ``spec``.

    Parameters
    ----------
    spec : ``"opencv-sift"`` (or ``"sift"``, ``"opencv"``); a SavedModel folder (DELG TF2,
        DELG TF1 or DELF TF-Hub, detected from its files); or a TF-Hub handle
        (``"google/delf/1"``, ``"https://tfhub.dev/google/delf/1"``) found in the TF-Hub
        cache, never downloaded.
    params : extraction parameters; each family's defaults when None.

    Raises
    ------
    ValueError
        For a name, path or model that is not supported.
    HubModuleNotCachedError
        (a ``FileNotFoundError``) for a handle that is not in the TF-Hub cache.
    """
    if isinstance(spec, str) and spec.strip().lower() in SIFT_NAMES:
        from .opencv_sift import OpenCVSiftExtractor

        return OpenCVSiftExtractor(params)
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"expected a model name or path, got {type(spec).__name__}")
    if not os.fspath(spec).strip():
        raise ValueError(f"empty model name. Supported: {SUPPORTED}")
    path = Path(spec).expanduser()
    if path.exists():
        folder = path
    else:
        from .delf_hub import is_hub_handle, resolve_hub_handle

        if not is_hub_handle(spec):
            raise ValueError(
                f"{os.fspath(spec)!r} is not a file, folder or known name. Supported: {SUPPORTED}"
            )
        folder = resolve_hub_handle(spec)
    family = detect_format(folder)
    return _extractor_class(family)(folder, params)
