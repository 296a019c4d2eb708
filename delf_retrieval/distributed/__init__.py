"""Scale out on Ray: distributed feature extraction and sharded exact search.

Optional: needs ``pip install delf_retrieval[ray]``. Importing this package does not
import Ray; every function imports it when called. One module per job:

:mod:`.cluster`
    Connecting (:func:`ray_session`), capacity checks and actor start-up.
:mod:`.extraction` (:class:`RayExtractorPool`, :func:`extract_to_store_ray`)
    Model-holding actors, one per GPU (or CPU slot), fed batches of images; the driver
    writes each finished batch as one store chunk, so a Ray run and a local run make
    the same store and resume each other.
:mod:`.sharded` (:class:`ShardedIndex`, :func:`sharded_cosine_topk`, :func:`shard_bounds`)
    Exact search split over actors that each memory-map a row range of the index file;
    same ``search(queries, k) -> (similarities, ids)`` as the local index.
:mod:`.runner` (:class:`RayRunner`)
    The :class:`~delf_retrieval.tasks.run.Runner` that :func:`delf_retrieval.recognize`
    and :func:`~delf_retrieval.retrieve` take (``--ray`` on the command line).
"""

from __future__ import annotations

from delf_retrieval.distributed.cluster import ray_session
from delf_retrieval.distributed.extraction import RayExtractorPool, extract_to_store_ray
from delf_retrieval.distributed.runner import RayRunner
from delf_retrieval.distributed.sharded import ShardedIndex, shard_bounds, sharded_cosine_topk

__all__ = [
    "RayExtractorPool",
    "RayRunner",
    "ShardedIndex",
    "extract_to_store_ray",
    "ray_session",
    "shard_bounds",
    "sharded_cosine_topk",
]
