"""Global re-ranking on any embedding: alpha query expansion (alpha-QE) and DBA.

Both replace a vector by a weighted sum of itself and its nearest database neighbours,
then L2-normalise:

* alpha-QE (Radenovic, Tolias, Chum, "Fine-tuning CNN Image Retrieval with No Human
  Annotation", TPAMI 2018, Sec. 5.1): ``q' = normalise(q + sum_i max(s_i, 0) ** alpha
  * x_i)`` over the query's ``k`` nearest database vectors ``x_i`` with cosines ``s_i``
  (the query itself enters with weight ``1 = 1 ** alpha``).
* DBA, database-side augmentation (Gordo et al., "End-to-end Learning of Deep Visual
  Representations for Image Retrieval", IJCV 2017; with alpha-QE weights as the 2019
  Google Landmark Retrieval winners used it): every database vector gets the same
  treatment over its ``k`` nearest *other* database vectors.

DBA runs first, and queries are expanded against the augmented database, which is also
the one searched. Both are exact (blockwise top-k of :func:`.search.cosine_topk`).
Negative cosines get weight 0 (a fractional power of a negative number is undefined).
"""

from __future__ import annotations

import numpy as np

from delf_retrieval.features.containers import l2_normalize
from delf_retrieval.search.index import cosine_topk

__all__ = ["alpha_query_expansion", "database_augmentation"]


def _weighted_sum(vectors: np.ndarray, database: np.ndarray, sims: np.ndarray, ids: np.ndarray, alpha: float) -> np.ndarray:
    weights = np.maximum(sims.astype(np.float64), 0.0) ** alpha  # [R, k]
    out = vectors.astype(np.float64).copy()
    for j in range(ids.shape[1]):
        out += weights[:, j : j + 1] * database[ids[:, j]].astype(np.float64)
    return l2_normalize(out)


def alpha_query_expansion(
    queries: np.ndarray, database: np.ndarray, top_k: int, alpha: float = 3.0, *, block_size: int = 65536
) -> np.ndarray:
    """Expanded queries: each plus its ``top_k`` nearest database vectors weighted by cosine**alpha.

    Parameters
    ----------
    queries : float array [Q, D]
        Query descriptors (L2-normalised here).
    database : float array [N, D]
        Database descriptors (L2-normalised here).
    top_k : int
        Neighbours added (0 returns the normalised queries).
    alpha : float
        Weight exponent (>= 0; 0 gives the plain average of the neighbours and the query).
    block_size : int
        Database rows per block of the exact search.

    Returns
    -------
    float32 [Q, D], L2-normalised rows.
    """
    _check(top_k, alpha)
    q = l2_normalize(np.asarray(queries, np.float32))
    db = l2_normalize(np.asarray(database, np.float32))
    if top_k == 0 or q.shape[0] == 0 or db.shape[0] == 0:
        return q
    sims, ids = cosine_topk(q, db, top_k, block_size=block_size)
    return _weighted_sum(q, db, sims, ids, alpha)


def database_augmentation(
    database: np.ndarray, top_k: int, alpha: float = 3.0, *, block_size: int = 65536
) -> np.ndarray:
    """Each database vector plus its ``top_k`` nearest *other* database vectors, weighted
    by cosine**alpha, L2-normalised: float32 [N, D] (arguments as
    :func:`alpha_query_expansion`)."""
    _check(top_k, alpha)
    db = l2_normalize(np.asarray(database, np.float32))
    count = db.shape[0]
    if top_k == 0 or count < 2:
        return db
    k = min(top_k, count - 1)
    sims, ids = cosine_topk(db, db, k + 1, block_size=block_size)
    # Drop each row itself; where duplicates tie with it, drop one column all the same.
    is_self = ids == np.arange(count)[:, None]
    no_self = ~is_self.any(axis=1)
    is_self[no_self, -1] = True
    keep = ~is_self
    sims = sims[keep].reshape(count, k)
    ids = ids[keep].reshape(count, k)
    return _weighted_sum(db, db, sims, ids, alpha)


def _check(top_k: int, alpha: float) -> None:
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
