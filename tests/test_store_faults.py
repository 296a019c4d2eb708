"""The feature store under faults: odd ids, concurrent processes, full disks, damaged chunks."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from delf_retrieval.cli.main import main
from delf_retrieval.core.locks import LockedError
from delf_retrieval.demo.data import bundled_photo, random_view
from delf_retrieval.features import store as store_module
from delf_retrieval.features.containers import ImageFeatures, LocalFeatures, l2_normalize
from delf_retrieval.features.images import list_images, load_image
from delf_retrieval.features.store import DiskSpaceError, FeatureStore, ids_hash
from delf_retrieval.models.extract import extract_to_store
from delf_retrieval.models.opencv_sift import OpenCVSiftExtractor

REPO = Path(__file__).resolve().parents[1]
# File names a folder run meets in the wild; each used to shift the ids read back.
ODD_NAMES = [
    "my photo",
    " leading space",
    "trailing space ",
    "a,b;c",
    'say "cheese"',
    "it's",
    "ünïcødé 日本 🏰",
    "tab\there",
    "new\nline",
    "#hash and %percent",
]


def fingerprint(local_dim=4, global_dim=3):
    return {"family": "fixture", "model_id": "m1", "params": {}, "local_dim": local_dim, "global_dim": global_dim}


def features(seed: int, count: int = 3) -> ImageFeatures:
    rng = np.random.default_rng(seed)
    local = LocalFeatures(
        keypoints=rng.uniform(0, 100, (count, 2)).astype(np.float32),
        descriptors=l2_normalize(rng.normal(size=(count, 4))),
        scores=rng.uniform(0, 1, count).astype(np.float32),
        scales=np.ones(count, np.float32),
    )
    return ImageFeatures(local=local, global_descriptor=l2_normalize(rng.normal(size=3)))


def write_photos(folder: Path, names: list[str], size: int = 240) -> dict[str, Path]:
    rng = np.random.default_rng(5)
    photos = [bundled_photo(name) for name in ("astronaut", "rocket", "coffee", "chelsea")]
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for index, name in enumerate(names):
        view = random_view(photos[index % len(photos)], rng, size=size)
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(view, cv2.COLOR_RGB2BGR))
        assert ok
        paths[name] = folder / f"{name}.jpg"
        paths[name].write_bytes(encoded.tobytes())
    return paths


# --------------------------------------------------------------------------- ids
def test_odd_ids_round_trip_end_to_end(tmp_path, capsys):
    """A folder run with spaces, commas, quotes, unicode, tabs and newlines in file names:
    every id reads back its own features (compared with extracting the file directly)."""
    paths = write_photos(tmp_path / "photos", ODD_NAMES)
    store_dir = tmp_path / "store"
    args = ["extract", "--images", str(tmp_path / "photos"), "--out", str(store_dir), "--dtype", "float32"]
    assert main(args + ["--no-progress"]) == 0
    assert f"{len(ODD_NAMES)} extracted" in capsys.readouterr().out
    store = FeatureStore(store_dir)
    assert store.ids == sorted(ODD_NAMES) and store.failures() == {}
    extractor = OpenCVSiftExtractor()
    for name, path in paths.items():
        expected = extractor.extract(load_image(path)).local
        got = store.local_features(name)
        assert len(expected) > 20
        np.testing.assert_array_equal(got.descriptors, expected.descriptors, err_msg=repr(name))
        np.testing.assert_array_equal(got.keypoints, expected.keypoints, err_msg=repr(name))
    # VLAD rows are aligned with these ids too (derived arrays are tied to ids_hash).
    assert len({ids_hash([name]) for name in ODD_NAMES}) == len(ODD_NAMES)


def test_ids_hash_and_refused_ids(tmp_path):
    assert ids_hash(["a\nb"]) != ids_hash(["a", "b"])
    assert ids_hash(["a", "b"]) == ids_hash(["a", "b"])
    store = FeatureStore(tmp_path / "s", fingerprint())
    with pytest.raises(ValueError, match="without NUL"):
        store.write_chunk(["bad\x00"], [features(1)])
    with pytest.raises(ValueError, match="non-empty"):
        store.write_chunk([""], [features(1)])


def test_stores_of_older_versions_read_their_ids_txt(tmp_path):
    store = FeatureStore(tmp_path / "s", fingerprint())
    store.write_chunk(["my photo", "b c", "d"], [features(1), features(2), features(3)])
    assert store.ids == ["b c", "d", "my photo"]
    generation = tmp_path / "s" / json.loads((tmp_path / "s" / "CURRENT").read_text())["name"]
    # What earlier versions wrote: one id per line, no ids.json.
    (generation / "ids.json").unlink()
    (generation / "ids.txt").write_text("b c\nd\nmy photo\n")
    old = FeatureStore(tmp_path / "s")
    assert old.ids == ["b c", "d", "my photo"]
    np.testing.assert_array_equal(old.local_features("my photo").descriptors, store.local_features("my photo").descriptors)


# --------------------------------------------------------------------------- locks
def test_second_writer_refuses_or_waits_with_a_message(tmp_path, capsys):
    first = FeatureStore(tmp_path / "s", fingerprint())
    with first.writing():
        with pytest.raises(LockedError, match=f"feature store {tmp_path / 's'} is in use by process {os.getpid()}"):
            with FeatureStore(tmp_path / "s", fingerprint(), wait=False).writing():
                pass
        entered = threading.Event()

        def second() -> None:
            with FeatureStore(tmp_path / "s", fingerprint()).writing():
                entered.set()

        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.5)
        assert not entered.is_set()  # waiting for the first writer
    thread.join(timeout=30)
    assert entered.is_set()
    assert f"waiting: feature store {tmp_path / 's'} is in use by process {os.getpid()}" in capsys.readouterr().err
    # The CLI refuses with one line and exit 2.
    with first.writing():
        photos = write_photos(tmp_path / "photos", ["x"])
        store = tmp_path / "cli"
        FeatureStore(store, OpenCVSiftExtractor().fingerprint(), dtype="float16")
        with FeatureStore(store).writing():
            code = main(["extract", "--images", str(photos["x"].parent), "--out", str(store), "--no-wait", "--no-progress"])
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: feature store") and "is in use by process" in err and "\n" not in err


RUN_EXTRACT = textwrap.dedent(
    """
    import sys
    from delf_retrieval.models.extract import extract_to_store
    from delf_retrieval.features.images import list_images
    from delf_retrieval.models.opencv_sift import OpenCVSiftExtractor
    from delf_retrieval.features.store import FeatureStore
    extractor = OpenCVSiftExtractor()
    store = FeatureStore(sys.argv[2], extractor.fingerprint())
    summary = extract_to_store(extractor, list_images(sys.argv[1]), store, batch_size=1, progress=False)
    print("EXTRACTED", summary.extracted)
    """
)


@pytest.mark.slow
def test_two_extractions_at_once_do_the_work_once(tmp_path):
    write_photos(tmp_path / "photos", [f"p{i:02d}" for i in range(10)], size=400)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", RUN_EXTRACT, str(tmp_path / "photos"), str(tmp_path / "store")]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    extracted = sorted(int(out.split("EXTRACTED")[1]) for out, _ in outputs)
    assert extracted == [0, 10]  # the second waited, then found everything done
    assert any("waiting: feature store" in err for _, err in outputs)
    store = FeatureStore(tmp_path / "store")
    assert len(store.ids) == 10
    counts: Counter = Counter()
    for chunk in store.chunk_paths():
        with np.load(chunk) as data:
            counts.update(data["ids"].tolist())
    assert set(counts.values()) == {1}


def test_a_generation_in_use_is_not_deleted(tmp_path):
    writer = FeatureStore(tmp_path / "s", fingerprint())
    writer.write_chunk(["a"], [features(1)])
    reader = FeatureStore(tmp_path / "s")
    vectors = reader.global_descriptors()  # reader holds generation 1
    (first,) = (tmp_path / "s").glob("gen-*")
    writer.write_chunk(["b"], [features(2)])
    assert writer.ids == ["a", "b"]  # writer consolidates generation 2
    assert first.is_dir()  # generation 1 is kept while the reader holds it
    assert (first / "ids.json").is_file() and vectors.shape == (1, 3)
    np.testing.assert_array_equal(vectors[0], features(1).global_descriptor)
    assert reader.ids == ["a", "b"]  # the reader moves on, releasing generation 1...
    writer.write_chunk(["c"], [features(3)])
    assert writer.ids == ["a", "b", "c"]
    assert not first.exists()  # ...and the next consolidation deletes it
    assert len(list((tmp_path / "s").glob("gen-*"))) == 2  # reader's and the newest


READ_LOOP = textwrap.dedent(
    """
    import sys, time
    from delf_retrieval.features.store import FeatureStore
    deadline = time.time() + float(sys.argv[2])
    reads = 0
    while time.time() < deadline:
        store = FeatureStore(sys.argv[1])
        for image_id in store.ids:
            store.local_features(image_id)
        store.global_descriptors().sum()
        reads += 1
    print("READS", reads)
    """
)


@pytest.mark.slow
def test_readers_and_a_writer_in_other_processes_never_collide(tmp_path):
    """Two processes used to delete each other's generation folder mid-read
    (No such file or directory: .../gen-.../ids.txt)."""
    store = FeatureStore(tmp_path / "s", fingerprint())
    store.write_chunk(["a"], [features(0)])
    store.finalize()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    readers = [
        subprocess.Popen([sys.executable, "-c", READ_LOOP, str(tmp_path / "s"), "6"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    time.sleep(1.0)  # let them start reading
    for index in range(1, 60):
        store.write_chunk([f"id{index:03d}"], [features(index)])
        store.finalize()
    outputs = [reader.communicate(timeout=120) for reader in readers]
    assert [reader.returncode for reader in readers] == [0, 0], outputs
    assert all(int(out.split("READS")[1]) > 0 for out, _ in outputs)
    assert len(FeatureStore(tmp_path / "s").ids) == 60


# --------------------------------------------------------------------------- disk
def test_consolidation_checks_free_space_first(tmp_path, monkeypatch, capsys):
    store = FeatureStore(tmp_path / "s", fingerprint())
    store.write_chunk(["a", "b"], [features(1), features(2)])
    real = shutil.disk_usage
    monkeypatch.setattr(store_module.shutil, "disk_usage", lambda path: real(path)._replace(free=1_000_000))
    with pytest.raises(DiskSpaceError, match=r"needs 16\.\d MB of free disk space, only 1\.0 MB is free .* nothing was lost"):
        store.finalize()
    assert list((tmp_path / "s").glob("gen-*")) == [] and not (tmp_path / "s" / "CURRENT").exists()
    assert len(store.chunk_paths()) == 1  # the work is kept
    monkeypatch.setattr(store_module.shutil, "disk_usage", real)
    assert store.ids == ["a", "b"]


def test_disk_full_while_writing_removes_the_partial_generation(tmp_path, monkeypatch):
    store = FeatureStore(tmp_path / "s", fingerprint())
    store.write_chunk(["a"], [features(1)])
    assert store.ids == ["a"]
    current = (tmp_path / "s" / "CURRENT").read_text()
    store.write_chunk(["b", "c"], [features(2), features(3)])
    calls = []

    def full_disk(fd, data, offset):
        calls.append(offset)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    real_pwrite = os.pwrite
    monkeypatch.setattr(store_module.os, "pwrite", full_disk)
    with pytest.raises(DiskSpaceError, match="filled up while consolidating it; nothing was lost"):
        store.finalize()
    assert (tmp_path / "s" / "CURRENT").read_text() == current  # the old generation is intact
    assert len(list((tmp_path / "s").glob("gen-*"))) == 1
    monkeypatch.setattr(store_module.os, "pwrite", real_pwrite)
    assert store.ids == ["a", "b", "c"]
    np.testing.assert_array_equal(store.local_features("c").descriptors, features(3).local.descriptors)


def test_orphans_of_killed_runs_are_cleaned(tmp_path):
    paths = write_photos(tmp_path / "photos", ["a", "b"])
    extractor = OpenCVSiftExtractor()
    store = FeatureStore(tmp_path / "s", extractor.fingerprint())
    orphan_chunk = tmp_path / "s" / "chunks" / ".chunk-0123.npz.tmp-dead"
    orphan_chunk.write_bytes(b"half a chunk")
    orphan_gen = tmp_path / "s" / "gen-killedhalf"
    orphan_gen.mkdir()
    (orphan_gen / "global.npy").write_bytes(b"partial")
    extract_to_store(extractor, list_images(paths["a"].parent), store, progress=False)
    assert not orphan_chunk.exists() and not orphan_gen.exists()
    assert [p.name for p in (tmp_path / "s").glob("gen-*")] == [json.loads((tmp_path / "s" / "CURRENT").read_text())["name"]]


def test_truncated_chunk_is_set_aside_and_redone(tmp_path):
    write_photos(tmp_path / "photos", [f"p{i}" for i in range(6)])
    extractor = OpenCVSiftExtractor()
    reference = FeatureStore(tmp_path / "ref", extractor.fingerprint())
    extract_to_store(extractor, list_images(tmp_path / "photos"), reference, batch_size=2, progress=False)
    store = FeatureStore(tmp_path / "s", extractor.fingerprint())
    extract_to_store(extractor, list_images(tmp_path / "photos"), store, batch_size=2, progress=False)
    damaged = store.chunk_paths()[1]
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])  # a copy cut short, a disk that filled up
    with np.load(store.chunk_paths()[0]) as first:
        assert first["ids"].size == 2
    with pytest.warns(RuntimeWarning, match="is damaged \\(BadZipFile"):
        summary = extract_to_store(extractor, list_images(tmp_path / "photos"), FeatureStore(tmp_path / "s", extractor.fingerprint()), batch_size=2, progress=False)
    assert (summary.extracted, summary.skipped) == (2, 4)
    assert damaged.with_name(damaged.name + ".corrupt").is_file()
    redone = FeatureStore(tmp_path / "s")
    assert redone.ids == reference.ids
    for image_id in reference.ids:
        np.testing.assert_array_equal(redone.local_features(image_id).descriptors, reference.local_features(image_id).descriptors)


FILL_TMPFS = textwrap.dedent(
    """
    import sys
    import numpy as np
    from delf_retrieval.features.containers import ImageFeatures, LocalFeatures
    from delf_retrieval.features.store import DiskSpaceError, FeatureStore
    fingerprint = {"family": "fixture", "model_id": "m", "params": {}, "local_dim": 128, "global_dim": 0}
    store = FeatureStore(sys.argv[1], fingerprint)
    rng = np.random.default_rng(0)
    for index in range(8):  # 8 chunks of 1 MB fit; their consolidated copy does not
        local = LocalFeatures(rng.random((2000, 2), np.float32), rng.random((2000, 128), np.float32),
                              np.ones(2000, np.float32), np.ones(2000, np.float32))
        store.write_chunk([f"id{index}"], [ImageFeatures(local, None)])
    try:
        store.finalize()
    except DiskSpaceError as error:
        print("CLEAN ERROR:", error)
    """
)


@pytest.mark.slow
def test_full_tmpfs_gives_a_clean_error_not_sigbus(tmp_path):
    """On a real full disk (a 12 MB tmpfs), consolidation used to die of SIGBUS (exit 135)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr!r}")
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        result = subprocess.run([sys.executable, "-c", FILL_TMPFS, str(disk / "s")], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (result.returncode, result.stderr)
        assert "CLEAN ERROR: consolidating feature store" in result.stdout
        assert list((disk / "s").glob("gen-*")) == []
        assert len(list((disk / "s" / "chunks").glob("chunk-*.npz"))) == 8
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_store_on_a_read_only_disk_can_be_read(tmp_path):
    """A store attached as a Kaggle dataset is read-only: readers must not need to write."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr!r}")
    try:
        store = FeatureStore(disk / "s", fingerprint())
        store.write_chunk(["a", "b c"], [features(1), features(2)])
        store.finalize()
        generation = disk / "s" / json.loads((disk / "s" / "CURRENT").read_text())["name"]
        (generation / ".readers").unlink()  # as in a store copied without its lock files
        del store
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        reader = FeatureStore(disk / "s")
        assert reader.ids == ["a", "b c"]
        np.testing.assert_array_equal(reader.local_features("b c").descriptors, features(2).local.descriptors)
        del reader  # closes its files on the disk
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)
