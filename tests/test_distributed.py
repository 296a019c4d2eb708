"""Ray: distributed extraction and sharded search on a real two-node cluster (loopback).

The cluster (a head and a second node, one CPU each) starts once for the module. Results
are compared bit for bit with the local code paths (extract_to_store, cosine_topk).
"""

import contextlib
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import delf_retrieval
from delf_retrieval.cli.main import main
from delf_retrieval.config import load_config
from delf_retrieval.core.errors import WorkersLostError
from delf_retrieval.demo.data import build_demo_dataset, bundled_photo, random_view
from delf_retrieval.distributed import (
    RayExtractorPool,
    RayRunner,
    ShardedIndex,
    extract_to_store_ray,
    shard_bounds,
    sharded_cosine_topk,
)
from delf_retrieval.features.images import ImageSource, kaggle_image_path, list_images
from delf_retrieval.features.store import FeatureStore
from delf_retrieval.models.extract import extract_to_store
from delf_retrieval.models.loader import load_extractor
from delf_retrieval.search.index import cosine_topk
from delf_retrieval.search.vlad import searchable

REPO = Path(__file__).resolve().parents[1]
NODE_OBJECT_STORE = 100 * 2**20  # bytes; small so that a tiny /dev/shm is enough (else /tmp)
NUM_IMAGES = 30
NUM_BAD = 3  # an empty file, a text file, a missing file


# --------------------------------------------------------------------------- no Ray needed
@pytest.mark.slow
def test_importing_the_package_does_not_import_ray():
    code = "import sys, delf_retrieval.distributed, delf_retrieval.cli.main, delf_retrieval; print('ray' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_shard_bounds_start_on_block_boundaries():
    assert shard_bounds(10, 3, 2) == [(0, 2), (2, 6), (6, 10)]
    assert shard_bounds(10, 2, 3) == [(0, 6), (6, 10)]
    assert shard_bounds(10, 1, 3) == [(0, 10)]
    assert shard_bounds(5, 4, 4) == [(0, 4), (4, 5)]  # two blocks: two shards only
    assert shard_bounds(7, 3, 100) == [(0, 7)]
    assert shard_bounds(0, 3, 4) == []
    with pytest.raises(ValueError, match="num_shards"):
        shard_bounds(10, 0, 2)
    with pytest.raises(ValueError, match="block_size"):
        shard_bounds(10, 2, 0)


def test_sharded_index_needs_a_file_backed_2d_array(tmp_path):
    with pytest.raises(ValueError, match="in-memory array"):
        ShardedIndex(np.zeros((4, 2), np.float32), 2)
    with pytest.raises(FileNotFoundError):
        ShardedIndex(tmp_path / "missing.npy", 2)
    np.save(tmp_path / "flat.npy", np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="2-D"):
        ShardedIndex(tmp_path / "flat.npy", 2)
    np.save(tmp_path / "rows.npy", np.zeros((6, 2), np.float32))
    with pytest.raises(ValueError, match="not the whole file"):
        ShardedIndex(np.load(tmp_path / "rows.npy", mmap_mode="r")[1:4], 2)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster():
    """A head node and a second node on loopback, one CPU each; the driver connected."""
    ray = pytest.importorskip(
        "ray", reason="distributed runs need the optional extra delf_retrieval[ray]"
    )
    from ray.cluster_utils import Cluster

    settings = {
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        # Worker processes must import this checkout (the nodes inherit this environment).
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    started = None
    try:
        started = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 1,
                "object_store_memory": NODE_OBJECT_STORE,
                "include_dashboard": False,
            },
        )
        started.add_node(num_cpus=1, object_store_memory=NODE_OBJECT_STORE)
        ray.init(address=started.address, log_to_driver=False)
        yield started
    finally:
        ray.shutdown()
        if started is not None:
            started.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[ImageSource]:
    """NUM_IMAGES synthetic photos in the Kaggle layout plus NUM_BAD unreadable ones."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(7)
    photos = [bundled_photo(name) for name in ("astronaut", "rocket", "coffee", "chelsea")]
    for index in range(NUM_IMAGES):
        path = kaggle_image_path(folder, f"{index:03d}{rng.integers(1 << 24):06x}")
        path.parent.mkdir(parents=True, exist_ok=True)
        view = random_view(photos[index % len(photos)], rng, size=256)
        cv2.imwrite(str(path), cv2.cvtColor(view, cv2.COLOR_RGB2BGR))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not a photo")
    return list_images(folder) + [ImageSource("gone", str(folder / "gone.jpg"))]


def _local_store(folder: Path, sources: list[ImageSource], dtype: str) -> FeatureStore:
    extractor = load_extractor("opencv-sift")
    store = FeatureStore(folder, extractor.fingerprint(), dtype=dtype)
    extract_to_store(extractor, sources, store, batch_size=4, progress=False)
    return store


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> FeatureStore:
    """The local run every distributed run must reproduce (float32)."""
    return _local_store(tmp_path_factory.mktemp("reference") / "store", images, "float32")


def new_store(path: Path, dtype: str = "float32") -> FeatureStore:
    return FeatureStore(path, load_extractor("opencv-sift").fingerprint(), dtype=dtype)


def assert_same_store(expected: FeatureStore, actual: FeatureStore) -> None:
    assert actual.ids == expected.ids
    assert actual.failures() == expected.failures()
    for name in (
        "local_offsets",
        "local_keypoints",
        "local_descriptors",
        "local_scores",
        "local_scales",
    ):
        np.testing.assert_array_equal(actual._array(name), expected._array(name), err_msg=name)
        assert actual._array(name).dtype == expected._array(name).dtype


def ids_per_chunk(store: FeatureStore) -> Counter:
    counts: Counter = Counter()
    for chunk in store.chunk_paths():
        with np.load(chunk) as data:
            counts.update(data["ids"].tolist() + data["failed_ids"].tolist())
    return counts


# --------------------------------------------------------------------------- extraction
def test_ray_extraction_equals_the_local_run(cluster, images, reference, tmp_path):
    store = new_store(tmp_path / "ray")
    summary = extract_to_store_ray(
        "opencv-sift", None, images, store, num_workers=2, batch_size=4, progress=False
    )
    assert (summary.total, summary.extracted, summary.failed, summary.skipped) == (33, 30, 3, 0)
    assert [image_id for image_id, _ in summary.failures] == ["empty", "text", "gone"]
    assert summary.images_per_second > 0
    assert_same_store(reference, store)
    assert len(store.chunk_paths()) == 9  # ceil(33 / 4) batches, one chunk each
    again = extract_to_store_ray("opencv-sift", None, images, store, num_workers=2, progress=False)
    assert (again.extracted, again.skipped) == (0, 33)


def test_killed_worker_is_restarted_and_its_batches_rerun(cluster, images, reference, tmp_path):
    store = new_store(tmp_path / "ray")
    with RayExtractorPool("opencv-sift", num_workers=2, max_restarts=2, max_task_retries=2) as pool:
        before = pool.workers()
        assert len({worker["node"] for worker in before}) == 2  # one actor on each node
        victim = before[0]["pid"]
        killed_at = []

        def kill_once(done: int, total: int) -> None:
            if not killed_at:
                os.kill(victim, signal.SIGKILL)
                killed_at.append(done)

        summary = pool.extract_to_store(
            load_extractor("opencv-sift"),
            images,
            store,
            batch_size=2,
            progress=False,
            on_progress=kill_once,
        )
        after = pool.workers()
    assert killed_at and killed_at[0] < 33  # killed while batches were pending
    assert after[0]["alive"] and after[0]["pid"] != victim  # Ray restarted the actor
    assert (summary.extracted, summary.failed) == (30, 3)
    assert_same_store(reference, store)
    assert set(ids_per_chunk(store).values()) == {1} and len(ids_per_chunk(store)) == 33


def test_batches_of_a_dead_worker_move_to_the_others(cluster, images, reference, tmp_path):
    store = new_store(tmp_path / "ray")
    with RayExtractorPool("opencv-sift", num_workers=2, max_restarts=0, max_task_retries=0) as pool:
        victim = pool.workers()[0]["pid"]
        killed = []

        def kill_once(done: int, total: int) -> None:
            if not killed:
                os.kill(victim, signal.SIGKILL)
                killed.append(done)

        summary = pool.extract_to_store(
            None, images, store, batch_size=2, progress=False, on_progress=kill_once
        )
        alive = [worker["alive"] for worker in pool.workers()]
    assert alive == [False, True]
    assert (summary.extracted, summary.failed) == (30, 3)
    assert_same_store(reference, store)
    assert set(ids_per_chunk(store).values()) == {1}


def test_every_worker_dead_is_a_clear_error_and_a_rerun_resumes(cluster, images, reference, tmp_path):
    store = new_store(tmp_path / "ray")
    with RayExtractorPool("opencv-sift", num_workers=2, max_restarts=0, max_task_retries=0) as pool:
        victims = [worker["pid"] for worker in pool.workers()]

        def kill_all(done: int, total: int) -> None:
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

        with pytest.raises(WorkersLostError, match="every Ray extraction worker died .* rerun to resume"):
            pool.extract_to_store(None, images, store, batch_size=2, progress=False, on_progress=kill_all)
    done = len(FeatureStore(tmp_path / "ray").completed_ids())
    assert 0 < done < 33  # the finished batches are kept
    summary = extract_to_store_ray("opencv-sift", None, images, new_store(tmp_path / "ray"), num_workers=2, batch_size=2, progress=False)
    assert summary.skipped == done and summary.extracted + summary.failed + done == 33
    assert_same_store(reference, FeatureStore(tmp_path / "ray"))


def test_ray_run_completes_a_store_half_filled_locally(cluster, images, tmp_path):
    expected = _local_store(tmp_path / "local", images, "float16")
    store = new_store(tmp_path / "resumed", dtype="float16")
    extract_to_store(
        load_extractor("opencv-sift"), images[:16], store, batch_size=4, progress=False
    )
    summary = extract_to_store_ray(
        "opencv-sift", None, images, store, num_workers=2, batch_size=4, progress=False
    )
    assert (summary.skipped, summary.extracted, summary.failed) == (16, 14, 3)
    assert_same_store(expected, store)
    assert set(ids_per_chunk(store).values()) == {1}


def test_workers_must_match_the_store_model(cluster, images, tmp_path):
    extractor = load_extractor("opencv-sift")
    other = load_extractor(
        "opencv-sift",
        extractor.params.__class__(**{**extractor.params.to_dict(), "max_feature_num": 5}),
    )
    store = FeatureStore(tmp_path / "other", other.fingerprint())
    with pytest.raises(ValueError, match="did not make feature store"):
        extract_to_store_ray("opencv-sift", None, images, store, num_workers=1, progress=False)
    with pytest.raises(ValueError, match="do not fit"):
        extract_to_store_ray(
            "opencv-sift", None, images, new_store(tmp_path / "s"), num_workers=3, progress=False
        )


def test_cli_extract_with_ray(cluster, images, reference, tmp_path, capsys):
    folder = Path(images[0].path).parents[3]
    out = tmp_path / "cli"
    args = [
        "extract",
        "--images",
        str(folder),
        "--out",
        str(out),
        "--dtype",
        "float32",
        "--batch-size",
        "5",
    ]
    assert main(args + ["--ray", cluster.address, "--ray-workers", "2", "--no-progress"]) == 0
    assert "32 listed, 30 extracted, 0 already in store, 2 failed" in capsys.readouterr().out
    store = FeatureStore(out)
    assert store.ids == reference.ids
    for image_id in store.ids[::7]:
        np.testing.assert_array_equal(
            store.local_features(image_id).descriptors,
            reference.local_features(image_id).descriptors,
        )


# --------------------------------------------------------------------------- search
def test_sharded_search_hand_made_ties(cluster, tmp_path):
    rows = np.array(
        [[1, 0], [0, 1], [1, 0], [0.6, 0.8], [1, 0], [0, 1], [0.8, 0.6], [1, 0], [0, -1], [-1, 0]],
        np.float32,
    )
    np.save(tmp_path / "index.npy", rows)
    query = np.array([[1, 0]], np.float32)
    for shards in (1, 2, 3):
        sims, ids = sharded_cosine_topk(
            query, tmp_path / "index.npy", 6, num_shards=shards, block_size=3
        )
        assert ids.tolist() == [[0, 2, 4, 7, 6, 3]]  # equal similarities: smaller row first
        np.testing.assert_array_equal(sims, np.float32([[1, 1, 1, 1, 0.8, 0.6]]))


@pytest.fixture(scope="module")
def tied_index(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """3000 rows whose products are exact (halves), hence many exact ties; 40 queries."""
    rng = np.random.default_rng(3)
    rows = rng.integers(-2, 3, size=(3000, 48)).astype(np.float16) / 2
    rows[1500:1600] = rows[100]  # a run of duplicates across a shard boundary
    path = tmp_path_factory.mktemp("index") / "tied.npy"
    np.save(path, rows)
    queries = rng.integers(-2, 3, size=(40, 48)).astype(np.float32) / 2
    queries[0] = rows[100]
    return path, queries


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_sharded_index_equals_local_search_and_reuses_its_actors(cluster, tied_index, shards):
    path, queries = tied_index
    whole = np.load(path, mmap_mode="r")
    with ShardedIndex(path, shards, block_size=512, query_block_size=16) as index:
        assert (
            index.num_shards == shards and index.bounds[0][0] == 0 and index.bounds[-1][1] == 3000
        )
        pids = [worker["pid"] for worker in index.workers()]
        for k in (1, 37, 5000):
            sims, ids = index.search(queries, k)
            ref_sims, ref_ids = cosine_topk(queries, whole, k, block_size=512, query_block_size=16)
            np.testing.assert_array_equal(ids, ref_ids)
            np.testing.assert_array_equal(sims, ref_sims)
            assert sims.dtype == np.float32 and ids.dtype == np.int64
        assert ids[0, :101].tolist() == [100] + list(range(1500, 1600))  # the tie run, in row order
        empty_sims, empty_ids = index.search(np.zeros((0, 48), np.float32), 4)
        assert empty_sims.shape == empty_ids.shape == (0, 4)
        with pytest.raises(ValueError, match="dimension"):
            index.search(np.ones((1, 3), np.float32), 4)
        with pytest.raises(ValueError, match="k must be"):
            index.search(queries, 0)
        assert [worker["pid"] for worker in index.workers()] == pids  # same actors throughout


def test_shards_that_cannot_all_run_at_once_are_refused(cluster, tied_index):
    with pytest.raises(ValueError, match="do not fit the Ray cluster"):
        ShardedIndex(tied_index[0], 3, block_size=512, num_cpus_per_shard=1)


def test_sharded_search_is_bit_identical_on_random_floats(cluster, tmp_path):
    # Large enough for multi-threaded BLAS: the shards must sum like the local product.
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((5000, 128)).astype(np.float32)
    np.save(tmp_path / "random.npy", rows)
    queries = rng.standard_normal((300, 128)).astype(np.float32)
    sims, ids = sharded_cosine_topk(
        queries, tmp_path / "random.npy", 25, num_shards=2, block_size=1024
    )
    ref_sims, ref_ids = cosine_topk(queries, rows, 25, block_size=1024)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(sims, ref_sims)


def test_sharded_search_reads_a_feature_store(cluster, reference):
    rng = np.random.default_rng(11)
    vlad = rng.standard_normal((len(reference.ids), 16)).astype(np.float32)
    reference.write_derived("vlad", vlad)
    queries = vlad[:5] + np.float32(0.01)
    with ShardedIndex(searchable(reference), 2, block_size=8) as index:  # the VLAD view of a local-only store
        assert index.path.endswith("vlad.npy") and len(index) == NUM_IMAGES
        sims, ids = index.search(queries, 3)
    ref_sims, ref_ids = cosine_topk(queries, vlad, 3, block_size=8)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(sims, ref_sims)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def kaggle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kaggle")
    build_demo_dataset(
        root,
        seed=1,
        landmarks=("astronaut", "rocket", "coffee"),
        nonlandmark_queries=("grass",),
        nonlandmark_set=("gravel",),
        image_size=256,
    )
    return root


def test_recognize_cli_with_ray_and_shards_matches_the_local_run(cluster, kaggle, tmp_path, capsys):
    common = [
        "recognize",
        str(kaggle),
        "--no-progress",
        "--no-verify",
        "--set",
        "SEARCH_BLOCK_SIZE=4",
    ]
    local_args = ["-o", str(tmp_path / "local.csv"), "--work-dir", str(tmp_path / "w1")]
    assert main(common + local_args) == 0
    ray_args = [
        "-o",
        str(tmp_path / "ray.csv"),
        "--work-dir",
        str(tmp_path / "w2"),
        "--ray",
        cluster.address,
    ]
    assert main(common + ray_args + ["--ray-workers", "2", "--shards", "2"]) == 0
    local = pd.read_csv(tmp_path / "local.csv", dtype=str, keep_default_na=False)
    distributed = pd.read_csv(tmp_path / "ray.csv", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(local, distributed)
    assert (local.landmarks != "").sum() >= 4
    assert main(common + ["--shards", "2"]) == 2
    assert "--shards needs --ray" in capsys.readouterr().err


def test_recognize_with_ray_runs_the_two_stage_cnn_model(cluster, kaggle, tmp_path):
    """The [cnn] default's kind of model (CNN global + RootSIFT) on Ray workers: same answers
    as the local run. Torch's convolutions sum in an order that depends on its thread count
    (a Ray worker with one CPU runs one thread), so descriptors may differ in their last
    float bits: landmarks must be equal, confidences equal to 1e-5."""
    pytest.importorskip("torch", reason="the [cnn] extra is not installed: pip install 'delf_retrieval[cnn]'")
    pytest.importorskip("timm", reason="the [cnn] extra is not installed: pip install 'delf_retrieval[cnn]'")
    model = "efficientnet-lite0+opencv-sift"
    common = ["recognize", str(kaggle), "--model", model, "--no-progress", "--set", "SEARCH_BLOCK_SIZE=4"]
    assert main([*common, "-o", str(tmp_path / "local.csv"), "--work-dir", str(tmp_path / "w1")]) == 0
    ray_args = ["-o", str(tmp_path / "ray.csv"), "--work-dir", str(tmp_path / "w2"), "--ray", cluster.address]
    assert main([*common, *ray_args, "--ray-workers", "2", "--shards", "2"]) == 0
    local = pd.read_csv(tmp_path / "local.csv", dtype=str, keep_default_na=False)
    distributed = pd.read_csv(tmp_path / "ray.csv", dtype=str, keep_default_na=False)
    assert local["id"].tolist() == distributed["id"].tolist()
    pairs = [(a.split(), b.split()) for a, b in zip(local["landmarks"], distributed["landmarks"], strict=True)]
    assert [a[:1] for a, _ in pairs] == [b[:1] for _, b in pairs]
    for a, b in pairs:
        if a:
            assert float(a[1]) == pytest.approx(float(b[1]), abs=1e-5)
    truth = pd.read_csv(kaggle / "solution.csv", dtype=str, keep_default_na=False).set_index("id")["landmarks"]
    right = sum(a[:1] == [truth[i]] for i, (a, _) in zip(local["id"], pairs, strict=True) if truth[i])
    assert right >= 4


def test_retrieve_with_a_ray_runner_shards_every_search(cluster, kaggle, tmp_path):
    config = load_config("opencv-sift").replace(SEARCH_BLOCK_SIZE=4)
    kwargs = dict(output=None, verify=False, progress=False, log=lambda _: None)
    local = delf_retrieval.retrieve(kaggle, "opencv-sift", config, work_dir=tmp_path / "w1", **kwargs)
    with RayRunner("opencv-sift", None, num_workers=2, num_shards=2) as runner:
        distributed = delf_retrieval.retrieve(
            kaggle,
            "opencv-sift",
            config,
            work_dir=tmp_path / "w2",
            runner=runner,
            **kwargs,
        )
        # test queries in the index VLAD, then one search of the train VLAD for the
        # landmarks of index images and queries together
        assert runner.sharded_searches == 2
        assert [index.num_shards for index in runner._indexes.values()] == [2]
    assert distributed.result.rankings == local.result.rankings
    assert distributed.result.global_rankings == local.result.global_rankings
    pd.testing.assert_frame_equal(distributed.submission, local.submission)
