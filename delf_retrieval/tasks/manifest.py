"""The manifest (index.json) of a recognition index folder: what it holds and how to read it."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from delf_retrieval.models.base import ExtractorParams

INDEX_FORMAT = 1


MANIFEST = "index.json"


class IndexFormatError(ValueError):
    """Not a (complete) recognition index, or one this version cannot read."""


@dataclass
class IndexManifest:
    """Contents of ``index.json`` (see the module docstring for the layout).

    Attributes
    ----------
    model : str
        Model spec as given to :func:`.models.load_extractor` (folders made absolute).
    fingerprint : dict
        ``Extractor.fingerprint()`` of the model that made the features.
    config : dict
        :class:`.config.Config` fields used by ``predict``.
    dtype : str
        Descriptor dtype of the stores (``float16`` or ``float32``).
    counts : dict
        ``train``, ``landmarks``, ``nonlandmark``, ``failed`` image counts.
    derived : dict
        name -> ``{"file": relative path, "kind": str, ...}``.
    query_steps : list of dict
        Steps from extractor output to search vector, in order (``{"step": name, ...}``).
    search_vectors : str or None
        Derived array searched instead of the train store's global descriptors.
    train_nonlandmark : str or None
        Derived array ``[N]`` float32: each train photo's non-landmark similarity.
    thumbnail_size : int
        Longer side of the thumbnails in pixels (0: none written).
    confidence : str or None
        Relative path of the confidence model (JSON,
        :meth:`delf_retrieval.scoring.calibration.ConfidenceModel.to_json`) fitted by
        leave-one-out on the index's train photos and distractors when the config's
        ``CONFIDENCE`` is ``"probability"``; its ``fitted_on`` record says for which config.
    classifiers : list of dict
        Softmax classifiers for ``CLASSIFIER_MODE``: ``{"model": spec, "classes": relative
        CSV path}``; an empty ``model`` is the index's own (global) model.
    """

    model: str
    fingerprint: dict[str, Any]
    config: dict[str, Any]
    dtype: str
    counts: dict[str, int]
    derived: dict[str, dict[str, Any]] = field(default_factory=dict)
    query_steps: list[dict[str, Any]] = field(default_factory=list)
    search_vectors: str | None = None
    train_nonlandmark: str | None = None
    thumbnail_size: int = 0
    confidence: str | None = None
    classifiers: list[dict[str, str]] = field(default_factory=list)
    source: str = ""
    created: str = ""
    format: int = INDEX_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)


def read_manifest(index_dir: str | Path) -> IndexManifest:
    """Read and check ``INDEX/index.json``; raises :class:`IndexFormatError` with the reason."""
    path = Path(index_dir) / MANIFEST
    if not Path(index_dir).is_dir():
        raise IndexFormatError(f"{index_dir} is not a folder; build an index with `delf-retrieval index`")
    if not path.is_file():
        raise IndexFormatError(
            f"{index_dir} is not a complete recognition index (no {MANIFEST}); "
            "build it with `delf-retrieval index DATA_DIR --out INDEX_DIR` (rerun to resume)"
        )
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise IndexFormatError(f"{path} is damaged (not JSON: {error}); rebuild the index") from None
    if not isinstance(values, dict):
        raise IndexFormatError(f"{path} is damaged (a JSON {type(values).__name__}, not an object); rebuild the index")
    required = [f.name for f in fields(IndexManifest) if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in values]
    if missing:
        raise IndexFormatError(f"{path} is damaged (no {', '.join(missing)}); rebuild the index")
    if values.get("format") != INDEX_FORMAT:
        raise IndexFormatError(f"{path}: index format {values.get('format')!r}, this version reads {INDEX_FORMAT}")
    known = set(IndexManifest.__dataclass_fields__)
    return IndexManifest(**{key: value for key, value in values.items() if key in known})


def params_from_fingerprint(fingerprint: dict[str, Any]) -> ExtractorParams:
    """The :class:`ExtractorParams` recorded in a fingerprint (lists back to tuples)."""
    values = dict(fingerprint["params"])
    values["image_scales"] = tuple(values["image_scales"])
    values["global_scales"] = tuple(values["global_scales"])
    return ExtractorParams(**values)
