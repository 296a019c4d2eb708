"""Feature store: round trip, atomic chunks, consolidation, refusal to mix models."""

import json

import numpy as np
import pytest

from delf_retrieval.features.containers import ImageFeatures, LocalFeatures, l2_normalize
from delf_retrieval.features.store import FeatureStore, StoreMismatchError
from delf_retrieval.search.vlad import searchable


def fingerprint(family="fixture", local_dim=4, global_dim=3, **params):
    return {"family": family, "model_id": "m1", "params": params, "local_dim": local_dim, "global_dim": global_dim}


def features(seed: int, count: int, local_dim=4, global_dim=3) -> ImageFeatures:
    rng = np.random.default_rng(seed)
    local = LocalFeatures(
        keypoints=rng.uniform(0, 100, (count, 2)).astype(np.float32),
        descriptors=l2_normalize(rng.normal(size=(count, local_dim))),
        scores=rng.uniform(0, 1, count).astype(np.float32),
        scales=np.full(count, 1.0, np.float32),
    )
    return ImageFeatures(local=local, global_descriptor=l2_normalize(rng.normal(size=global_dim)))


def test_round_trip_sorted_ids_and_ragged_local(tmp_path):
    store = FeatureStore(tmp_path / "s", fingerprint())
    written = {"c": features(1, 5), "a": features(2, 0), "b": features(3, 2)}
    store.write_chunk(["c", "a"], [written["c"], written["a"]], failures=[("zz", "missing file: zz.jpg")])
    store.write_chunk(["b"], [written["b"]])
    reader = FeatureStore(tmp_path / "s")
    assert reader.ids == ["a", "b", "c"]
    assert "b" in reader and "zz" not in reader
    assert reader.failures() == {"zz": "missing file: zz.jpg"}
    globals_ = reader.global_descriptors()
    assert isinstance(globals_, np.memmap) and globals_.shape == (3, 3)
    for image_id, expected in written.items():
        np.testing.assert_array_equal(globals_[reader.row(image_id)], expected.global_descriptor)
        local = reader.local_features(image_id)
        for field in ("keypoints", "descriptors", "scores", "scales"):
            np.testing.assert_array_equal(getattr(local, field), getattr(expected.local, field))
    assert len(reader.local_features("a")) == 0
    with pytest.raises(KeyError, match="zz"):
        reader.row("zz")
    assert reader.completed_ids() == {"a", "b", "c", "zz"}


def test_float16_store_halves_descriptor_bytes(tmp_path):
    data = [features(i, 50) for i in range(4)]
    sizes = {}
    for dtype in ("float32", "float16"):
        store = FeatureStore(tmp_path / dtype, fingerprint(), dtype=dtype)
        store.write_chunk([f"id{i}" for i in range(4)], data)
        descriptors = store.local_features("id1").descriptors
        assert descriptors.dtype == np.dtype(dtype)
        np.testing.assert_allclose(descriptors, data[1].local.descriptors, atol=1e-3)
        sizes[dtype] = store.nbytes()
    # 4 images x 50 x 4 dims: descriptors 3200 -> 1600 bytes, globals 48 -> 24 bytes.
    assert sizes["float32"] - sizes["float16"] == 1600 + 24
    assert FeatureStore(tmp_path / "float16").bytes_per_image() == pytest.approx(sizes["float16"] / 4)


def test_refuses_other_model_or_params_or_dtype(tmp_path):
    FeatureStore(tmp_path / "s", fingerprint(max_image_size=1024))
    FeatureStore(tmp_path / "s", fingerprint(max_image_size=1024))  # same model: fine
    with pytest.raises(StoreMismatchError, match="params"):
        FeatureStore(tmp_path / "s", fingerprint(max_image_size=512))
    with pytest.raises(StoreMismatchError, match="family"):
        FeatureStore(tmp_path / "s", fingerprint(family="delg-tf2", max_image_size=1024))
    with pytest.raises(StoreMismatchError, match="dtype"):
        FeatureStore(tmp_path / "s", fingerprint(max_image_size=1024), dtype="float16")
    with pytest.raises(FileNotFoundError):
        FeatureStore(tmp_path / "other")


def test_rewritten_batch_replaces_its_chunk_and_duplicates_collapse(tmp_path):
    store = FeatureStore(tmp_path / "s", fingerprint())
    first = store.write_chunk(["a", "b"], [features(1, 3), features(2, 3)])
    again = store.write_chunk(["a", "b"], [features(1, 3), features(2, 3)])  # a retried task
    assert first == again and len(store.chunk_paths()) == 1
    store.write_chunk(["b", "c"], [features(2, 3), features(4, 3)])  # overlapping batch
    assert store.ids == ["a", "b", "c"]
    assert store.local_features("b").keypoints.shape == (3, 2)


def test_failure_then_success_counts_as_success(tmp_path):
    store = FeatureStore(tmp_path / "s", fingerprint())
    store.write_chunk([], [], failures=[("a", "corrupt")])
    assert store.failed_chunk_ids() == {"a"}
    store.write_chunk(["a"], [features(1, 2)])
    assert store.failures() == {} and store.ids == ["a"]
    assert store.failed_chunk_ids() == set()


def test_temporary_files_are_ignored_and_consolidation_tracks_new_chunks(tmp_path):
    store = FeatureStore(tmp_path / "s", fingerprint())
    store.write_chunk(["a"], [features(1, 2)])
    # A writer killed mid-write leaves only a hidden temporary file.
    (tmp_path / "s" / "chunks" / ".chunk-dead.npz.tmp-123").write_bytes(b"partial")
    assert store.ids == ["a"] and store.is_consolidated()
    store.write_chunk(["b"], [features(2, 2)])
    assert not store.is_consolidated()
    assert store.ids == ["a", "b"]
    current = json.loads((tmp_path / "s" / "CURRENT").read_text())
    assert len(list((tmp_path / "s").glob("gen-*"))) == 1 and current["count"] == 2


def test_global_only_and_local_only_stores(tmp_path):
    global_only = FeatureStore(tmp_path / "g", fingerprint(local_dim=0))
    global_only.write_chunk(["a"], [ImageFeatures(local=None, global_descriptor=np.ones(3, np.float32))])
    assert global_only.global_descriptors().shape == (1, 3)
    with pytest.raises(ValueError, match="no local features"):
        global_only.local_features("a")
    local_only = FeatureStore(tmp_path / "l", fingerprint(global_dim=0))
    local_only.write_chunk(["a", "b"], [ImageFeatures(features(1, 2).local, None)] * 2)
    with pytest.raises(ValueError, match="local features only"):
        local_only.global_descriptors()
    with pytest.raises(ValueError, match="no VLAD"):
        searchable(local_only)
    # Derived global descriptors belong to the search step, not to the store.
    local_only.write_derived("vlad", np.eye(2, dtype=np.float32), {"codebook": "x"})
    with pytest.raises(ValueError, match="local features only"):
        local_only.global_descriptors()
    view = searchable(local_only)
    np.testing.assert_array_equal(view.global_descriptors(), np.eye(2))
    assert view.global_descriptors_file() == local_only.path / "derived" / "vlad.npy"
    assert view.ids == local_only.ids and searchable(global_only) is global_only
    local_only.write_chunk(["c"], [ImageFeatures(features(1, 2).local, None)])
    assert local_only.read_derived("vlad") is None  # ids changed: stale derived arrays are not used


def test_wrong_global_width_is_rejected(tmp_path):
    store = FeatureStore(tmp_path / "s", fingerprint())
    with pytest.raises(ValueError, match="expected \\(3,\\)"):
        store.write_chunk(["a"], [ImageFeatures(features(1, 2).local, np.ones(5, np.float32))])


def test_store_of_images_without_any_local_feature(tmp_path):
    store = FeatureStore(tmp_path / "s", fingerprint())
    store.write_chunk(["a", "b"], [features(1, 0), features(2, 0)])
    assert store.ids == ["a", "b"]
    assert store.local_features("b").descriptors.shape == (0, 4)
