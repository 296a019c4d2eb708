"""delf_retrieval: landmark recognition and retrieval with DELF/DELG features.

Stages (each a plain function over arrays or the feature store)::

    images -> extract (model adapters) -> feature store -> search (cosine top-k)
           -> verify (matching + RANSAC) -> rerank (score, aggregate, non-landmark)
           -> submission / metrics / viz

Importing the package does not import TensorFlow; model adapters load it when used.
"""

__version__ = "0.1.0"
