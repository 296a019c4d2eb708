"""Feature extractors: one adapter per model family behind :class:`Extractor`.

``load_extractor("opencv-sift")``, ``load_extractor("/path/to/delg_savedmodel")`` or
``load_extractor("google/delf/1")`` (from the TF-Hub cache). Importing this package does
not import TensorFlow; the adapters do when a model is loaded.
"""

from delf_retrieval.models.base import Extractor, ExtractorParams
from delf_retrieval.models.loader import default_model, list_models, load_extractor

__all__ = ["Extractor", "ExtractorParams", "default_model", "list_models", "load_extractor"]
