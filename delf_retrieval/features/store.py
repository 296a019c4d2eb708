"""Resumable on-disk feature store: one directory per model and image set.

Layout::

    STORE/meta.json                    model fingerprint, dtype, format version
    STORE/chunks/chunk-<hash>.npz      one per written batch (atomic, never modified)
    STORE/CURRENT                      names the consolidated generation in use
    STORE/gen-<tag>/ids.json           ids, sorted (a JSON list: any characters;
                                       stores of older versions have ids.txt)
    STORE/gen-<tag>/global.npy         [N, Dg] float32/float16, memory-mappable
    STORE/gen-<tag>/local_*.npy        ragged local features, rows of image i are
                                       local_offsets[i]:local_offsets[i + 1]
    STORE/gen-<tag>/failures.json      {id: reason}
    STORE/derived/<name>.npy, .json    arrays aligned with ids (e.g. VLAD globals)

Writers only add chunk files, each written to a temporary name and renamed, so a killed
run leaves whole chunks or nothing; a rerun skips the ids already in chunks. A chunk's
name is a hash of its ids, so a retried batch (Ray) replaces its own file instead of
duplicating it. Reading consolidates the chunks into contiguous arrays (sorted by id, so
the result does not depend on how the work was batched or interrupted).

Several processes may share a store (see :mod:`delf_retrieval.core.locks`):

- ``STORE/.extract.lock``: one extraction at a time (:meth:`FeatureStore.writing`); a
  second one waits with a message (or, with ``wait=False``, refuses with one) and then
  skips what the first one did, so no work is done twice. Orphaned temporary chunk files
  of killed runs are removed when it is taken.
- ``STORE/.consolidate.lock``: one consolidation at a time.
- ``gen-<tag>/.readers``: a reader holds a shared lock on the generation it reads, and
  a consolidation deletes an old generation only when nobody holds it.

Consolidation checks the free disk space first, preallocates its files and writes them
with ``pwrite`` (not through a memory map, whose write to a full disk kills the process
with SIGBUS), and removes its partial output when anything fails. A chunk that cannot be
read (truncated: ``BadZipFile``) is moved aside as ``*.npz.corrupt`` and its images are
extracted again by the next run.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import uuid
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from delf_retrieval.core import locks
from delf_retrieval.core.atomic import atomic_write, atomic_write_bytes
from delf_retrieval.core.errors import DelfError
from delf_retrieval.features.containers import ImageFeatures, LocalFeatures

STORE_FORMAT = 1
DTYPES = ("float32", "float16")
_LOCAL_FIELDS = ("keypoints", "descriptors", "scores", "scales")


class StoreMismatchError(ValueError):
    """The store holds features of another model, parameters or dtype."""


class StoreCorruptError(ValueError):
    """A file of a feature store cannot be read or disagrees with the others (named in the message)."""


class DiskSpaceError(DelfError):
    """Not enough free disk space to consolidate a store (nothing was lost)."""


# Chunk files that cannot be read (truncated by a full disk or a copy, bit rot).
_DAMAGED = (zipfile.BadZipFile, EOFError, KeyError, ValueError, OSError)
# Free space kept in reserve beyond what consolidation writes, bytes.
_SPACE_MARGIN = 16 * 2**20


__all__ = [
    "DiskSpaceError",
    "FeatureStore",
    "StoreCorruptError",
    "StoreMismatchError",
    "StoreView",
    "atomic_write_bytes",
    "fingerprint_key",
    "ids_hash",
    "same_fingerprint",
]


def fingerprint_key(fingerprint: dict[str, Any] | str) -> str:
    """Stable text key of a fingerprint (sorted JSON); a string is taken as such a key."""
    if isinstance(fingerprint, str):
        return json.dumps(json.loads(fingerprint), sort_keys=True, default=str)
    return json.dumps(fingerprint, sort_keys=True, default=str)


def same_fingerprint(a: dict[str, Any] | str, b: dict[str, Any] | str) -> bool:
    """Whether two fingerprints name the same features (compared through JSON, where
    tuples and lists are the same)."""
    return json.loads(fingerprint_key(a)) == json.loads(fingerprint_key(b))


def ids_hash(ids: Sequence[str]) -> str:
    """Short stable hash of an id list (names chunks, ties derived arrays to their ids).

    Ids joined by newlines; a list holding an id with a newline is hashed as JSON behind
    a newline instead, so that ``["a\\nb"]`` and ``["a", "b"]`` differ.
    """
    if any("\n" in image_id for image_id in ids):
        text = "\n" + json.dumps(list(ids), ensure_ascii=False)
    else:
        text = "\n".join(ids)
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class FeatureStore:
    """Features of one model on one image set.

    Parameters
    ----------
    path : folder of the store (created if missing and ``fingerprint`` is given).
    fingerprint : what made the features: a JSON-able dict (``Extractor.fingerprint()``)
        or its JSON text. Opening an existing store with a different fingerprint raises
        :class:`StoreMismatchError`; ``None`` opens an existing store for reading
        whatever made it.
    dtype : ``"float32"`` or ``"float16"`` for descriptors (keypoints stay float32).
    wait : when another process extracts into the store, :meth:`writing` waits for it
        (saying so on stderr); False raises :class:`~delf_retrieval.core.locks.LockedError`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fingerprint: dict[str, Any] | str | None = None,
        *,
        dtype: str = "float32",
        wait: bool = True,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if isinstance(fingerprint, str):
            fingerprint = json.loads(fingerprint)
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if meta_path.is_file():
            self.meta = _read_json(meta_path)
            if fingerprint is not None:
                self._check_same(fingerprint, dtype)
        elif fingerprint is None:
            raise FileNotFoundError(f"no feature store at {self.path} (missing meta.json)")
        else:
            self.meta = {"format": STORE_FORMAT, "dtype": dtype, "fingerprint": fingerprint}
            (self.path / "chunks").mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(meta_path, json.dumps(self.meta, indent=2, default=str).encode())
        (self.path / "chunks").mkdir(parents=True, exist_ok=True)
        self.wait = wait
        self._generation: dict[str, Any] | None = None
        self._pinned = False
        self._arrays: dict[str, np.ndarray] = {}
        self._reader_lock: Any = None  # shared lock on the generation being read
        self._writer_lock: Any = None

    # ------------------------------------------------------------------ identity
    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.meta["fingerprint"]

    @property
    def dtype(self) -> str:
        return self.meta["dtype"]

    @property
    def local_dim(self) -> int:
        return int(self.fingerprint.get("local_dim", 0))

    @property
    def global_dim(self) -> int:
        return int(self.fingerprint.get("global_dim", 0))

    def _check_same(self, fingerprint: dict[str, Any], dtype: str) -> None:
        stored = json.loads(fingerprint_key(self.meta["fingerprint"]))
        given = json.loads(fingerprint_key(fingerprint))
        if stored != given or dtype != self.meta["dtype"]:
            differences = [
                f"{key}: store has {stored.get(key)!r}, requested {given.get(key)!r}"
                for key in sorted(set(stored) | set(given))
                if stored.get(key) != given.get(key)
            ]
            if dtype != self.meta["dtype"]:
                differences.append(f"dtype: store has {self.meta['dtype']!r}, requested {dtype!r}")
            raise StoreMismatchError(
                f"feature store {self.path} was made by another model or settings; "
                "use a new --out folder. Differences: " + "; ".join(differences)
            )

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def writing(self) -> Iterator[FeatureStore]:
        """Hold the store's extraction lock for a ``with`` block (re-entrant).

        Decide what is left to do inside the block: a run that waited for another one
        then sees its chunks. Temporary chunk files left by killed runs are removed.
        """
        if self._writer_lock is not None:
            yield self
            return
        self._writer_lock = locks.exclusive_lock(
            self.path / ".extract.lock", wait=self.wait, what=f"feature store {self.path}"
        )
        try:
            for orphan in (self.path / "chunks").glob(".chunk-*.tmp-*"):
                orphan.unlink(missing_ok=True)
            yield self
        finally:
            locks.release(self._writer_lock)
            self._writer_lock = None

    def chunk_paths(self) -> list[Path]:
        return sorted((self.path / "chunks").glob("chunk-*.npz"))

    def chunk_ids(self) -> tuple[set[str], set[str]]:
        """``(extracted, failed)`` ids over all chunks (failed: in no chunk as extracted).

        A chunk that cannot be read is moved aside (see :meth:`_set_aside`), so its ids
        count as not done and are extracted again.
        """
        extracted: set[str] = set()
        failed: set[str] = set()
        for chunk in self.chunk_paths():
            try:
                with np.load(chunk) as data:
                    chunk_extracted, chunk_failed = data["ids"].tolist(), data["failed_ids"].tolist()
            except _DAMAGED as error:
                self._set_aside(chunk, error)
                continue
            extracted.update(chunk_extracted)
            failed.update(chunk_failed)
        return extracted, failed - extracted

    def _set_aside(self, chunk: Path, error: BaseException) -> None:
        """Rename a damaged chunk to ``<name>.corrupt`` (kept for inspection, no longer read)."""
        with contextlib.suppress(FileNotFoundError):  # another process was first
            os.replace(chunk, chunk.with_name(chunk.name + ".corrupt"))
            warnings.warn(
                f"feature store {self.path}: chunk {chunk.name} is damaged ({type(error).__name__}: "
                f"{error}); moved to {chunk.name}.corrupt, its images will be extracted again",
                RuntimeWarning,
                stacklevel=3,
            )

    def completed_ids(self) -> set[str]:
        """Ids already in chunks, extracted or failed (a rerun skips them)."""
        extracted, failed = self.chunk_ids()
        return extracted | failed

    def failed_chunk_ids(self) -> set[str]:
        """Ids that failed in some chunk and succeeded in none."""
        return self.chunk_ids()[1]

    def write_chunk(
        self,
        ids: Sequence[str],
        features: Sequence[ImageFeatures],
        failures: Sequence[tuple[str, str]] = (),
    ) -> Path | None:
        """Atomically add one batch: features of ``ids`` and ``(id, reason)`` failures.

        Returns the chunk path, or None when there was nothing to write.
        """
        if len(ids) != len(features):
            raise ValueError(f"{len(ids)} ids but {len(features)} feature sets")
        if not ids and not failures:
            return None
        for image_id in [*ids, *(f[0] for f in failures)]:
            # NumPy string arrays drop trailing NULs; every other character round-trips.
            if not isinstance(image_id, str) or not image_id or "\x00" in image_id:
                raise ValueError(f"image ids must be non-empty strings without NUL characters, got {image_id!r}")
        arrays = self._pack(list(ids), list(features))
        arrays["failed_ids"] = np.array([f[0] for f in failures], dtype=str)
        arrays["failed_reasons"] = np.array([f[1] for f in failures], dtype=str)
        name = f"chunk-{ids_hash(list(ids) + ['#failed'] + [f[0] for f in failures])}.npz"
        path = self.path / "chunks" / name
        return atomic_write(path, lambda handle: np.savez(handle, **arrays))

    def _pack(self, ids: list[str], features: list[ImageFeatures]) -> dict[str, np.ndarray]:
        dtype = np.dtype(self.dtype)
        arrays: dict[str, np.ndarray] = {"ids": np.array(ids, dtype=str)}
        if self.global_dim:
            rows = []
            for image_id, feature in zip(ids, features, strict=True):
                vector = feature.global_descriptor
                if vector is None or vector.shape != (self.global_dim,):
                    shape = None if vector is None else vector.shape
                    raise ValueError(f"{image_id}: global descriptor {shape}, expected ({self.global_dim},)")
                rows.append(vector)
            arrays["global"] = np.array(rows, dtype=dtype).reshape(len(ids), self.global_dim)
        if self.local_dim:
            locals_ = [f.local if f.local is not None else LocalFeatures.empty(self.local_dim) for f in features]
            counts = [len(local) for local in locals_]
            arrays["offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            arrays["keypoints"] = _stack([x.keypoints for x in locals_], (0, 2), np.float32)
            arrays["descriptors"] = _stack([x.descriptors for x in locals_], (0, self.local_dim), dtype)
            arrays["scores"] = _stack([x.scores for x in locals_], (0,), np.float32)
            arrays["scales"] = _stack([x.scales for x in locals_], (0,), np.float32)
        return arrays

    # ------------------------------------------------------------------ consolidation
    def is_consolidated(self) -> bool:
        generation = self._read_current()
        return generation is not None and generation["chunks"] == [p.name for p in self.chunk_paths()]

    def _read_current(self) -> dict[str, Any] | None:
        current = self.path / "CURRENT"
        if not current.is_file():
            return None
        generation = _read_json(current)
        if not isinstance(generation, dict) or not isinstance(generation.get("name"), str):
            raise StoreCorruptError(f"{current} does not name a generation; delete it to consolidate the store again")
        if not (self.path / generation["name"]).is_dir():
            return None
        return generation

    def finalize(self) -> None:
        """Consolidate chunks into contiguous arrays if new chunks were written.

        Holds the consolidation lock (another process consolidating the same chunks is
        waited for, not repeated). Raises :class:`DiskSpaceError` before writing
        anything when the disk lacks room; on any failure the partial generation is
        removed and the chunks stay as they were.
        """
        if self.is_consolidated():
            return
        lock = locks.exclusive_lock(self.path / ".consolidate.lock", what=f"consolidation of {self.path}")
        try:
            if not self.is_consolidated():
                self._consolidate()
            # This object moves to the new generation (arrays it already handed out stay
            # readable: a memory map outlives its deleted file), so its old one may go.
            locks.release(self._reader_lock)
            self._reader_lock = None
            self._generation = None
            self._arrays = {}
            self._remove_unused_generations()
        finally:
            locks.release(lock)

    def _scan_chunks(self) -> tuple[list[Path], dict[str, tuple[int, int]], dict[str, int], dict[str, str]]:
        """Readable chunks, and for each id: (chunk index, row), local feature count,
        failure reason. A success beats a failure; the first chunk (by name) wins among
        duplicates, so the choice is deterministic."""
        chunks: list[Path] = []
        origin: dict[str, tuple[int, int]] = {}
        counts: dict[str, int] = {}
        failures: dict[str, str] = {}
        for chunk in self.chunk_paths():
            try:
                with np.load(chunk) as data:
                    chunk_ids = data["ids"].tolist()
                    offsets = data["offsets"] if self.local_dim else None
                    failed = list(zip(data["failed_ids"].tolist(), data["failed_reasons"].tolist(), strict=True))
            except _DAMAGED as error:
                self._set_aside(chunk, error)
                continue
            chunk_index = len(chunks)
            chunks.append(chunk)
            for row, image_id in enumerate(chunk_ids):
                if image_id not in origin:
                    origin[image_id] = (chunk_index, row)
                    if offsets is not None:
                        counts[image_id] = int(offsets[row + 1] - offsets[row])
            for image_id, reason in failed:
                failures.setdefault(image_id, reason)
        for image_id in origin:
            failures.pop(image_id, None)
        return chunks, origin, counts, failures

    def _consolidate(self) -> None:
        chunks, origin, counts, failures = self._scan_chunks()
        ids = sorted(origin)
        position = {image_id: index for index, image_id in enumerate(ids)}
        dtype = np.dtype(self.dtype)
        shapes: dict[str, tuple[tuple[int, ...], Any]] = {}
        local_offsets = np.zeros(1, np.int64)
        if self.global_dim:
            shapes["global"] = ((len(ids), self.global_dim), dtype)
        if self.local_dim:
            local_offsets = np.concatenate([[0], np.cumsum([counts[i] for i in ids])]).astype(np.int64)
            total = int(local_offsets[-1])
            shapes["keypoints"] = ((total, 2), np.float32)
            shapes["descriptors"] = ((total, self.local_dim), dtype)
            shapes["scores"] = ((total,), np.float32)
            shapes["scales"] = ((total,), np.float32)
        names = {"global": "global.npy", **{field: f"local_{field}.npy" for field in _LOCAL_FIELDS}}
        self._check_free_space(sum(_npy_nbytes(*shape) for shape in shapes.values()) + local_offsets.nbytes + 64 * len(ids))
        tag = f"gen-{uuid.uuid4().hex[:12]}"
        gen_dir = self.path / tag
        gen_dir.mkdir()
        outputs: dict[str, _NpyFile] = {}
        try:
            for key, (shape, array_dtype) in shapes.items():
                outputs[key] = _NpyFile(gen_dir / names[key], shape, array_dtype)
            if self.local_dim:
                np.save(gen_dir / "local_offsets.npy", local_offsets)
            self._copy_rows(chunks, origin, position, local_offsets, outputs)
            for output in outputs.values():
                output.close()
            (gen_dir / "ids.json").write_text(json.dumps(ids, ensure_ascii=False), encoding="utf-8")
            (gen_dir / "failures.json").write_text(json.dumps(failures, indent=1, sort_keys=True))
            (gen_dir / ".readers").touch()
            generation = {"name": tag, "chunks": [p.name for p in chunks], "count": len(ids)}
            atomic_write_bytes(self.path / "CURRENT", json.dumps(generation).encode())
        except BaseException as error:
            for output in outputs.values():
                output.close(sync=False)
            shutil.rmtree(gen_dir, ignore_errors=True)
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskSpaceError(
                    f"the disk of feature store {self.path} filled up while consolidating it; nothing "
                    "was lost: free some space (or move the store), then rerun the same command"
                ) from error
            raise

    def _copy_rows(
        self,
        chunks: list[Path],
        origin: dict[str, tuple[int, int]],
        position: dict[str, int],
        local_offsets: np.ndarray,
        outputs: dict[str, _NpyFile],
    ) -> None:
        """Write each id's rows from the chunk it comes from to its place in ``outputs``."""
        for chunk_index, chunk in enumerate(chunks):
            with np.load(chunk) as data:
                chunk_ids = data["ids"].tolist()
                wanted = [(row, position[i]) for row, i in enumerate(chunk_ids) if origin[i] == (chunk_index, row)]
                if not wanted:
                    continue
                if "global" in outputs:
                    rows = data["global"]
                    for row, target in wanted:
                        outputs["global"].write_rows(target, rows[row : row + 1])
                if self.local_dim:
                    offsets = data["offsets"]
                    chunk_local = {field: data[field] for field in _LOCAL_FIELDS}
                    for row, target in wanted:
                        start, stop = offsets[row], offsets[row + 1]
                        if stop > start:
                            for field in _LOCAL_FIELDS:
                                outputs[field].write_rows(int(local_offsets[target]), chunk_local[field][start:stop])

    def _check_free_space(self, needed: int) -> None:
        free = shutil.disk_usage(self.path).free
        if free < needed + _SPACE_MARGIN:
            raise DiskSpaceError(
                f"consolidating feature store {self.path} needs {_gigabytes(needed + _SPACE_MARGIN)} of free "
                f"disk space, only {_gigabytes(free)} is free there; nothing was lost: free some space "
                "(or move the store), then rerun the same command"
            )

    def _remove_unused_generations(self) -> None:
        """Delete generations other than CURRENT's that no reader holds (old ones, and
        partial ones of killed consolidations). Call with the consolidation lock held."""
        current = self._read_current()
        for old in self.path.glob("gen-*"):
            if current is not None and old.name == current["name"]:
                continue
            try:
                claim = locks.try_exclusive_lock(old / ".readers")
            except FileNotFoundError:
                continue  # deleted meanwhile
            if claim is None:
                continue  # a reader uses it: a later consolidation deletes it
            try:
                shutil.rmtree(old, ignore_errors=True)
            finally:
                locks.release(claim)

    # ------------------------------------------------------------------ reading
    def pin(self) -> FeatureStore:
        """Read the current generation from now until the store object is dropped, whatever
        later extractions or consolidations (another process rebuilding the same folder) do:
        a reader sees one consistent set of arrays. The generation's reader lock keeps it
        on disk meanwhile. Returns the store."""
        self._gen()
        self._pinned = True
        return self

    def _gen(self) -> dict[str, Any]:
        """The generation to read: the current one, after consolidating new chunks
        (also those written, or consolidated, by other processes); the pinned one after
        :meth:`pin`."""
        if self._generation is not None and self._pinned:
            return self._generation
        if self._generation is not None:
            current = self._read_current()
            if (
                current is not None
                and current["name"] == self._generation["name"]
                and current["chunks"] == [p.name for p in self.chunk_paths()]
            ):
                return self._generation
        for _attempt in range(100):
            self.finalize()
            generation = self._read_current()
            assert generation is not None
            gen_dir = self.path / generation["name"]
            try:
                lock = locks.shared_lock(gen_dir / ".readers")
            except FileNotFoundError:
                continue  # replaced and deleted between reading CURRENT and locking it
            ids = _read_ids(gen_dir)
            if ids is None:
                locks.release(lock)
                current = self._read_current()
                if current is not None and current["name"] == generation["name"]:
                    raise StoreCorruptError(
                        f"feature store {self.path}: {gen_dir} has no ids.json; delete {self.path / 'CURRENT'} "
                        "to consolidate the store again"
                    )
                continue  # deleted before the lock was granted
            break
        else:  # pragma: no cover - would need 100 consolidations racing this reader
            raise RuntimeError(f"feature store {self.path} kept changing while being opened")
        locks.release(self._reader_lock)
        self._reader_lock = lock
        generation["ids"] = ids
        generation["ids_array"] = np.array(ids, dtype=str)
        generation["dir"] = gen_dir
        self._generation = generation
        self._arrays = {}
        return self._generation

    def _array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            generation = self._gen()
            path = generation["dir"] / f"{name}.npy"
            array = _load_npy(path)
            expected = {"global": len(generation["ids"]), "local_offsets": len(generation["ids"]) + 1}.get(name)
            if name.startswith("local_") and name != "local_offsets":  # offsets of the same generation
                expected = int(_load_npy(generation["dir"] / "local_offsets.npy")[-1])
            if expected is not None and array.shape[0] != expected:
                raise StoreCorruptError(
                    f"{path} has {array.shape[0]} rows where {expected} are due "
                    f"({len(generation['ids'])} ids in {generation['dir'] / 'ids.json'}): the store is damaged"
                )
            self._arrays[name] = array
        return self._arrays[name]

    @property
    def ids(self) -> list[str]:
        """Ids with features, sorted."""
        return self._gen()["ids"]

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: object) -> bool:
        return self._row_or_none(str(image_id)) is not None

    def _row_or_none(self, image_id: str) -> int | None:
        ids = self._gen()["ids_array"]
        row = int(np.searchsorted(ids, image_id))
        return row if row < len(ids) and ids[row] == image_id else None

    def row(self, image_id: str) -> int:
        """Row of ``image_id`` in :meth:`global_descriptors` (KeyError if absent)."""
        row = self._row_or_none(image_id)
        if row is None:
            raise KeyError(f"{image_id!r} is not in feature store {self.path}")
        return row

    def failures(self) -> dict[str, str]:
        """``{id: reason}`` of images that could not be read or extracted."""
        return _read_json(self._gen()["dir"] / "failures.json")

    def global_descriptors(self) -> np.ndarray:
        """The model's global descriptors ``[N, D]`` (memory-mapped), rows in :attr:`ids` order.

        The store holds features only: a local-only model has none here, and its derived
        global descriptors (VLAD) belong to the search step
        (:func:`delf_retrieval.search.vlad.searchable`).
        """
        if not self.global_dim:
            raise ValueError(_LOCAL_ONLY.format(path=self.path))
        return self._array("global")

    def global_descriptors_file(self) -> Path:
        """The ``.npy`` file :meth:`global_descriptors` maps (what other processes open)."""
        if not self.global_dim:
            raise ValueError(_LOCAL_ONLY.format(path=self.path))
        return self._gen()["dir"] / "global.npy"

    def local_features(self, image_id: str) -> LocalFeatures:
        """Local features of one image, read without loading the others."""
        if not self.local_dim:
            raise ValueError(f"store {self.path} holds no local features (global-only model)")
        row = self.row(image_id)
        offsets = self._array("local_offsets")
        start, stop = int(offsets[row]), int(offsets[row + 1])
        parts = {
            field: np.asarray(self._array(f"local_{field}")[start:stop]) for field in _LOCAL_FIELDS
        }
        return LocalFeatures(**parts)

    def local_descriptor_sample(self, max_count: int, seed: int = 0) -> np.ndarray:
        """Up to ``max_count`` local descriptors drawn at random over the store, float32 [M, D]."""
        descriptors = self._array("local_descriptors")
        total = descriptors.shape[0]
        if total <= max_count:
            return np.asarray(descriptors, dtype=np.float32)
        rows = np.sort(np.random.default_rng(seed).choice(total, max_count, replace=False))
        return np.asarray(descriptors[rows], dtype=np.float32)

    # ------------------------------------------------------------------ derived arrays
    def write_derived(self, name: str, array: np.ndarray, info: dict[str, Any] | None = None) -> None:
        """Store an array aligned with :attr:`ids` (row i belongs to ids[i]), atomically."""
        self._write_derived_for(self.ids, name, array, info)

    def read_derived(self, name: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        """``(array, info)`` of a derived array, or None if absent or made for other ids."""
        return self._read_derived_for(self.ids, name)

    def _write_derived_for(
        self, ids: Sequence[str], name: str, array: np.ndarray, info: dict[str, Any] | None
    ) -> None:
        """Write derived array ``name`` whose rows belong to ``ids`` (recorded by their hash)."""
        if array.shape[0] != len(ids):
            raise ValueError(f"derived array has {array.shape[0]} rows, store has {len(ids)} ids")
        folder = self.path / "derived"
        folder.mkdir(exist_ok=True)
        atomic_write(folder / f"{name}.npy", lambda handle: np.save(handle, array))
        record = {"ids_hash": ids_hash(ids), **(info or {})}
        atomic_write_bytes(folder / f"{name}.json", json.dumps(record, default=str).encode())

    def _read_derived_for(self, ids: Sequence[str], name: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        """Derived array ``name`` when it was written for exactly ``ids`` (in that order), else None."""
        folder = self.path / "derived"
        info_path, array_path = folder / f"{name}.json", folder / f"{name}.npy"
        if not info_path.is_file() or not array_path.is_file():
            return None
        info = _read_json(info_path)
        if info.get("ids_hash") != ids_hash(ids):
            return None
        return _load_npy(array_path), info

    # ------------------------------------------------------------------ views
    def subset(self, ids: Iterable[str]) -> FeatureStore | StoreView:
        """The features of ``ids`` only: what a store holding exactly those ids would give.

        A store is a cache shared by every image set of its model and split (another
        dataset, an older version of the CSV): a run must search the ids its CSV lists,
        not every id the cache remembers. Ids without features (failed, not extracted)
        are left out, as a fresh store leaves them out. Returns the store itself when it
        holds no other id, else a :class:`StoreView`.
        """
        wanted = set(ids)
        if all(image_id in wanted for image_id in self.ids):
            return self
        return StoreView(self, wanted)

    # ------------------------------------------------------------------ size
    def nbytes(self) -> int:
        """Bytes on disk of the consolidated features (what a reader maps)."""
        return sum(p.stat().st_size for p in self._gen()["dir"].glob("*.npy"))

    def bytes_per_image(self) -> float:
        return self.nbytes() / max(len(self.ids), 1)

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, family={self.fingerprint.get('family')!r})"


def as_stored(features: ImageFeatures, dtype: str) -> ImageFeatures:
    """``features`` as a store of ``dtype`` holds them: descriptors and the global vector in
    ``dtype`` (``float16`` rounds), keypoints, scores and scales in float32 (the arrays
    :meth:`FeatureStore.write_chunk` writes). A photo recognised alone is rounded like
    this so that it is compared exactly as a stored query would be."""
    data_type = np.dtype(dtype)
    local = features.local
    if local is not None:
        local = LocalFeatures(
            keypoints=np.asarray(local.keypoints, np.float32),
            descriptors=np.asarray(local.descriptors, data_type),
            scores=np.asarray(local.scores, np.float32),
            scales=np.asarray(local.scales, np.float32),
        )
    vector = None if features.global_descriptor is None else np.asarray(features.global_descriptor, data_type)
    return ImageFeatures(local=local, global_descriptor=vector)


_LOCAL_ONLY = (
    "feature store {path} holds local features only (a local-only model): its global "
    "descriptors are derived by the search step, delf_retrieval.ensure_global_descriptors "
    "then delf_retrieval.search.vlad.searchable(store)"
)


def _stack(parts: list[np.ndarray], empty_shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    if not parts or sum(len(p) for p in parts) == 0:
        return np.zeros(empty_shape, dtype=dtype)
    return np.concatenate([np.asarray(p, dtype=dtype).reshape((-1,) + empty_shape[1:]) for p in parts])


def _read_json(path: Path) -> Any:
    """The JSON value in ``path``; :class:`StoreCorruptError` naming the file when it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StoreCorruptError(f"{path} is damaged (not JSON: {error})") from None


def _load_npy(path: Path) -> np.ndarray:
    """``np.load(path, mmap_mode="r")``; :class:`StoreCorruptError` naming the file when it is
    truncated or not an array file (NumPy's own message names none)."""
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, EOFError) as error:
        raise StoreCorruptError(f"{path} is damaged (truncated or not a .npy array: {error})") from None


def _read_ids(gen_dir: Path) -> list[str] | None:
    """Ids of a generation, or None when it is gone. ``ids.json`` round-trips any
    characters; ``ids.txt`` (one id per line) is what older versions wrote."""
    try:
        ids = _read_json(gen_dir / "ids.json")
    except FileNotFoundError:
        pass
    else:
        if not isinstance(ids, list) or not all(isinstance(image_id, str) for image_id in ids):
            raise StoreCorruptError(f"{gen_dir / 'ids.json'} is damaged (not a list of ids)")
        return ids
    try:
        text = (gen_dir / "ids.txt").read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return text.split("\n")[:-1]


def _npy_nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize + 128


def _gigabytes(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e8 else f"{count / 1e6:.1f} MB"


class _NpyFile:
    """A ``.npy`` file written by row ranges at their offsets (``os.pwrite``).

    The file is preallocated (``posix_fallocate``) where the file system can, so a full
    disk shows as ``OSError(ENOSPC)`` right away; elsewhere as the same error from
    ``pwrite``, never as the SIGBUS a write through a memory map would get.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: Any) -> None:
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
        with open(path, "wb") as handle:
            np.lib.format.write_array_header_1_0(handle, header)
            self.data_offset = handle.tell()
        self.fd = os.open(path, os.O_WRONLY)
        size = self.data_offset + int(np.prod(shape)) * self.dtype.itemsize
        try:
            os.posix_fallocate(self.fd, 0, size)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                os.close(self.fd)
                self.fd = -1
                raise
            os.ftruncate(self.fd, size)  # no fallocate here: a sparse file; pwrite reports ENOSPC
        except AttributeError:  # pragma: no cover - no posix_fallocate (macOS, Windows)
            os.ftruncate(self.fd, size)

    def write_rows(self, first_row: int, rows: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(rows, dtype=self.dtype)).cast("B")
        offset = self.data_offset + first_row * self.row_bytes
        while len(data):
            written = os.pwrite(self.fd, data, offset)
            data, offset = data[written:], offset + written

    def close(self, sync: bool = True) -> None:
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        try:
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)


class StoreView:
    """Some ids of a :class:`FeatureStore`, read as a store holding exactly those ids.

    Made by :meth:`FeatureStore.subset`. Rows follow the store's order (ids sorted), so a
    view gives what a fresh store of the same images gives, bit for bit: the same global
    rows, local features, descriptor sample (VLAD codebook) and derived arrays. Derived
    arrays are kept in the store's ``derived/`` folder, tied to the view's ids by their
    hash (another id set finds them stale and computes its own). Only reading: extraction
    writes into the store itself.
    """

    def __init__(self, store: FeatureStore, ids: Iterable[str]) -> None:
        self.store = store
        self._wanted = set(ids)
        self._generation_name: str | None = None
        self._ids: list[str] = []
        self._rows = np.zeros(0, np.int64)
        self._positions: dict[str, int] = {}
        self._globals: np.ndarray | None = None

    # ------------------------------------------------------------------ identity
    @property
    def path(self) -> Path:
        return self.store.path

    @property
    def meta(self) -> dict[str, Any]:
        return self.store.meta

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.store.fingerprint

    @property
    def dtype(self) -> str:
        return self.store.dtype

    @property
    def local_dim(self) -> int:
        return self.store.local_dim

    @property
    def global_dim(self) -> int:
        return self.store.global_dim

    # ------------------------------------------------------------------ rows
    def _sync(self) -> None:
        """Recompute the view's rows when the store moved to another generation."""
        generation = self.store._gen()
        if generation["name"] == self._generation_name:
            return
        rows = [row for row, image_id in enumerate(generation["ids"]) if image_id in self._wanted]
        ids = [generation["ids"][row] for row in rows]
        self._rows = np.array(rows, np.int64)
        self._ids = ids
        self._positions = {image_id: index for index, image_id in enumerate(ids)}
        self._globals = None
        self._generation_name = generation["name"]

    @property
    def ids(self) -> list[str]:
        """Ids of the view that have features, in the store's (sorted) order."""
        self._sync()
        return self._ids

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: object) -> bool:
        self._sync()
        return image_id in self._positions

    def row(self, image_id: str) -> int:
        """Row of ``image_id`` in :meth:`global_descriptors` (KeyError if not in the view)."""
        self._sync()
        if image_id not in self._positions:
            raise KeyError(f"{image_id!r} is not in this view of feature store {self.path}")
        return self._positions[image_id]

    def failures(self) -> dict[str, str]:
        """``{id: reason}`` of the view's images that could not be read or extracted."""
        return {key: reason for key, reason in self.store.failures().items() if key in self._wanted}

    # ------------------------------------------------------------------ features
    def global_descriptors(self) -> np.ndarray:
        """Global descriptors ``[N, D]`` of the view's ids, rows in :attr:`ids` order.

        Native descriptors are gathered from the store into memory once (N x D of the
        store dtype); local-only models have none (see :meth:`FeatureStore.global_descriptors`).
        """
        self._sync()
        if not self.global_dim:
            raise ValueError(_LOCAL_ONLY.format(path=self.path))
        if self._globals is None:
            self._globals = np.asarray(self.store.global_descriptors()[self._rows])
        return self._globals

    def global_descriptors_file(self) -> Path:
        """A ``.npy`` file holding exactly :meth:`global_descriptors` (what other processes open)."""
        if not self.global_dim:
            raise ValueError(_LOCAL_ONLY.format(path=self.path))
        if self.read_derived("view_global") is None:
            self.write_derived("view_global", self.global_descriptors())
        return self.path / "derived" / "view_global.npy"

    def local_features(self, image_id: str) -> LocalFeatures:
        """Local features of one image of the view."""
        self.row(image_id)  # KeyError for an id outside the view
        return self.store.local_features(image_id)

    def local_descriptor_sample(self, max_count: int, seed: int = 0) -> np.ndarray:
        """As :meth:`FeatureStore.local_descriptor_sample` of a store holding only the view's ids."""
        self._sync()
        offsets = np.asarray(self.store._array("local_offsets"))
        descriptors = self.store._array("local_descriptors")
        starts = offsets[self._rows]
        counts = offsets[self._rows + 1] - starts
        view_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        total = int(view_offsets[-1])
        if total <= max_count:
            parts = [descriptors[start : start + count] for start, count in zip(starts, counts, strict=True)]
            return np.asarray(_stack(parts, (0, descriptors.shape[1]), np.float32), dtype=np.float32)
        chosen = np.sort(np.random.default_rng(seed).choice(total, max_count, replace=False))
        item = np.searchsorted(view_offsets, chosen, side="right") - 1
        return np.asarray(descriptors[starts[item] + (chosen - view_offsets[item])], dtype=np.float32)

    # ------------------------------------------------------------------ derived arrays
    def write_derived(self, name: str, array: np.ndarray, info: dict[str, Any] | None = None) -> None:
        """Store an array aligned with the view's :attr:`ids`, atomically."""
        self.store._write_derived_for(self.ids, name, array, info)

    def read_derived(self, name: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        """``(array, info)`` of a derived array written for exactly the view's ids, else None."""
        return self.store._read_derived_for(self.ids, name)

    def __repr__(self) -> str:
        return f"StoreView({self.store!r}, {len(self._wanted)} ids)"
