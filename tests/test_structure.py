"""The shared pieces of the house: layering, the atomic writer, the pixel mapping, the
index interface every search backend implements, and the single train-set search."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import delf_retrieval
from delf_retrieval.config import Config
from delf_retrieval.core.atomic import atomic_write, atomic_write_bytes
from delf_retrieval.distributed.sharded import index_file
from delf_retrieval.features.containers import ImageFeatures, l2_normalize, to_original_pixels
from delf_retrieval.features.store import FeatureStore, StoreMismatchError, same_fingerprint
from delf_retrieval.search.index import CosineIndex

REPO = Path(__file__).resolve().parents[1]


def global_store(path: Path, vectors: np.ndarray, ids: list[str]) -> FeatureStore:
    """A global-only float32 store holding ``vectors`` [N, D] under ``ids``."""
    fingerprint = {"family": "fixture", "model_id": "m", "params": {}, "local_dim": 0, "global_dim": vectors.shape[1]}
    store = FeatureStore(path, fingerprint)
    store.write_chunk(ids, [ImageFeatures(local=None, global_descriptor=v) for v in vectors])
    return store


def brute_topk(queries: np.ndarray, database: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k best database vectors per query; ties: smaller row first."""
    sims = queries.astype(np.float64) @ database.astype(np.float64).T
    return np.stack([np.lexsort((np.arange(row.size), -row))[:k] for row in sims])


# --------------------------------------------------------------------------- layering
def test_the_store_sits_below_the_models():
    code = "import sys, delf_retrieval.features.store; print(any(m.startswith('delf_retrieval.models') for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_the_store_compares_plain_fingerprints(tmp_path):
    made = {"family": "f", "model_id": "m", "params": {"scales": (1.0, 2.0)}, "local_dim": 0, "global_dim": 2}
    FeatureStore(tmp_path / "s", made)
    # The same fingerprint as JSON text with another key order and a list for the tuple.
    text = '{"global_dim": 2, "local_dim": 0, "model_id": "m", "params": {"scales": [1.0, 2.0]}, "family": "f"}'
    assert FeatureStore(tmp_path / "s", text).fingerprint == json.loads(text)
    assert same_fingerprint(made, text)
    assert not same_fingerprint(made, {**made, "model_id": "other"})
    with pytest.raises(StoreMismatchError, match="model_id"):
        FeatureStore(tmp_path / "s", json.dumps({**made, "model_id": "other"}))


# --------------------------------------------------------------------------- atomic writes
def test_a_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old")

    def half_then_fail(handle):
        handle.write(b"new, half written")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]
    assert atomic_write(target, lambda handle: np.save(handle, np.arange(3))) == target
    np.testing.assert_array_equal(np.load(target), [0, 1, 2])


# --------------------------------------------------------------------------- pixel mapping
def test_to_original_pixels_maps_pixel_centres():
    # Resized pixel p covers original pixels [p * f, (p + 1) * f); in pixel-centre
    # coordinates (pixel i spans [i - 0.5, i + 0.5)) its centre is the midpoint of that
    # span shifted by half a pixel.
    factor = 2.5
    points = np.array([[0.0, 0.0], [3.0, 7.0], [10.25, 1.5]], np.float32)
    spans = np.stack([points * factor, (points + 1.0) * factor])
    expected = spans.mean(axis=0) - 0.5
    np.testing.assert_allclose(to_original_pixels(points, factor), expected, rtol=0, atol=1e-5)
    assert to_original_pixels(points, factor).dtype == np.float32
    # A factor of 1.0 keeps the points unless asked to apply the formula anyway.
    odd = np.array([[63.7, 0.3]], np.float32)
    np.testing.assert_array_equal(to_original_pixels(odd, 1.0), odd)
    np.testing.assert_array_equal(to_original_pixels(odd, 1.0, always=True), (odd + 0.5) * 1.0 - 0.5)


# --------------------------------------------------------------------------- index interface
def test_every_backend_answers_search_queries_k_the_same(tmp_path):
    rng = np.random.default_rng(7)
    database = l2_normalize(rng.normal(size=(90, 8)))
    database[40] = database[3]  # an exact tie: the smaller row comes first
    queries = np.concatenate([l2_normalize(rng.normal(size=(5, 8))), database[3:4]])
    store = global_store(tmp_path / "db", database, [f"id{i:03d}" for i in range(90)])
    expected = brute_topk(queries, database, 6)
    indexes = {
        "exact": delf_retrieval.exact_index(store, 16),
        "local runner": delf_retrieval.LocalRunner().index(store, 16),
        "faiss runner": delf_retrieval.LocalRunner("faiss").index(store, 16),
    }
    for name, index in indexes.items():
        sims, ids = index.search(queries, 6)
        assert len(index) == 90, name
        np.testing.assert_array_equal(ids, expected, err_msg=name)
        assert sims.dtype == np.float32 and ids.dtype == np.int64
        np.testing.assert_allclose(sims, np.take_along_axis(queries @ database.T, ids, axis=1), atol=1e-6)
    assert ids[-1, :2].tolist() == [3, 40]
    assert isinstance(indexes["exact"], CosineIndex)
    # The Ray backend opens the store's file itself on every node: the store names it.
    path, shape, dtype = index_file(store)
    assert (shape, dtype) == ((90, 8), "float32")
    np.testing.assert_array_equal(np.load(path), store.global_descriptors())
    with pytest.raises(ValueError, match="backend"):
        delf_retrieval.LocalRunner("annoy")


# --------------------------------------------------------------------------- one train search
def test_retrieval_labels_come_from_one_search_of_the_train_set(tmp_path):
    rng = np.random.default_rng(3)
    centres = l2_normalize(rng.normal(size=(4, 16)))
    landmark_of = {}

    def around(count: int, prefix: str) -> tuple[np.ndarray, list[str]]:
        which = rng.integers(0, 4, count)
        vectors = l2_normalize(centres[which] + 0.6 * rng.normal(size=(count, 16)))
        ids = [f"{prefix}{i:02d}" for i in range(count)]
        landmark_of.update({i: str(w) for i, w in zip(ids, which, strict=True)})
        return vectors, ids

    train_vectors, train_ids = around(30, "t")
    index_vectors, index_ids = around(12, "x")
    query_vectors, query_ids = around(7, "q")
    train = global_store(tmp_path / "train", train_vectors, train_ids)
    index = global_store(tmp_path / "index", index_vectors, index_ids)
    queries = global_store(tmp_path / "queries", query_vectors, query_ids)
    labels = {i: landmark_of[i] for i in train_ids}
    config = Config(TOP_K=3)
    searched = []

    def counting_factory(store, block_size):
        searched.append(store.path.name)
        return delf_retrieval.exact_index(store, block_size)

    query_labels, index_labels = delf_retrieval.predicted_landmarks(
        queries, index, train, labels, config, index_factory=counting_factory
    )
    assert searched == ["train"]

    def votes(vectors: np.ndarray) -> list[str]:
        # Global-only vote: summed cosine of each landmark among the TOP_K neighbours,
        # the landmark seen first winning ties.
        answer = []
        for vector, rows in zip(vectors, brute_topk(vectors, train_vectors, 3), strict=True):
            sums: dict[str, float] = {}
            for row in rows:
                label = labels[train_ids[row]]
                sums[label] = sums.get(label, 0.0) + float(vector @ train_vectors[row])
            answer.append(max(sums, key=lambda label: (sums[label], -list(sums).index(label))))
        return answer

    assert index_labels == votes(index_vectors)
    assert query_labels == votes(query_vectors)
    result = delf_retrieval.retrieve_stores(
        queries, index, config, train=train, labels=labels, progress=False, index_factory=counting_factory
    )
    assert searched == ["train", "index", "train"]
    assert sorted(result.rankings) == query_ids
