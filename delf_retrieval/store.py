"""Resumable on-disk feature store: one directory per model and image set.

Layout::

    STORE/meta.json                    model fingerprint, dtype, format version
    STORE/chunks/chunk-<hash>.npz      one per written batch (atomic, never modified)
    STORE/CURRENT                      names the consolidated generation in use
    STORE/gen-<tag>/ids.txt            ids, sorted
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
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write, atomic_write_bytes
from .features import ImageFeatures, LocalFeatures

STORE_FORMAT = 1
DTYPES = ("float32", "float16")
_LOCAL_FIELDS = ("keypoints", "descriptors", "scores", "scales")


class StoreMismatchError(ValueError):
    """The store holds features of another model, parameters or dtype."""


__all__ = [
    "FeatureStore",
    "StoreMismatchError",
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
    """Short stable hash of an id list (names chunks, ties derived arrays to their ids)."""
    return hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]


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
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fingerprint: dict[str, Any] | str | None = None,
        *,
        dtype: str = "float32",
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if isinstance(fingerprint, str):
            fingerprint = json.loads(fingerprint)
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if meta_path.is_file():
            self.meta = json.loads(meta_path.read_text())
            if fingerprint is not None:
                self._check_same(fingerprint, dtype)
        elif fingerprint is None:
            raise FileNotFoundError(f"no feature store at {self.path} (missing meta.json)")
        else:
            self.meta = {"format": STORE_FORMAT, "dtype": dtype, "fingerprint": fingerprint}
            (self.path / "chunks").mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(meta_path, json.dumps(self.meta, indent=2, default=str).encode())
        (self.path / "chunks").mkdir(parents=True, exist_ok=True)
        self._generation: dict[str, Any] | None = None
        self._arrays: dict[str, np.ndarray] = {}

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
    def chunk_paths(self) -> list[Path]:
        return sorted((self.path / "chunks").glob("chunk-*.npz"))

    def chunk_ids(self) -> tuple[set[str], set[str]]:
        """``(extracted, failed)`` ids over all chunks (failed: in no chunk as extracted)."""
        extracted: set[str] = set()
        failed: set[str] = set()
        for chunk in self.chunk_paths():
            with np.load(chunk) as data:
                extracted.update(data["ids"].tolist())
                failed.update(data["failed_ids"].tolist())
        return extracted, failed - extracted

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
        generation = json.loads(current.read_text())
        if not (self.path / generation["name"]).is_dir():
            return None
        return generation

    def finalize(self) -> None:
        """Consolidate chunks into contiguous arrays if new chunks were written."""
        if self.is_consolidated():
            return
        chunks = self.chunk_paths()
        # Which chunk and row each id comes from; a success beats a failure, and the
        # first chunk (by name) wins among duplicates so the choice is deterministic.
        origin: dict[str, tuple[int, int]] = {}
        failures: dict[str, str] = {}
        counts: dict[str, int] = {}
        for chunk_index, chunk in enumerate(chunks):
            with np.load(chunk) as data:
                chunk_ids = data["ids"].tolist()
                offsets = data["offsets"] if self.local_dim else None
                for row, image_id in enumerate(chunk_ids):
                    if image_id not in origin:
                        origin[image_id] = (chunk_index, row)
                        if offsets is not None:
                            counts[image_id] = int(offsets[row + 1] - offsets[row])
                for image_id, reason in zip(data["failed_ids"].tolist(), data["failed_reasons"].tolist(), strict=True):
                    failures.setdefault(image_id, reason)
        for image_id in origin:
            failures.pop(image_id, None)
        ids = sorted(origin)
        position = {image_id: index for index, image_id in enumerate(ids)}
        tag = f"gen-{uuid.uuid4().hex[:12]}"
        gen_dir = self.path / tag
        gen_dir.mkdir()
        dtype = np.dtype(self.dtype)
        outputs: dict[str, np.ndarray | None] = {}
        if self.global_dim:
            outputs["global"] = _open_output(gen_dir / "global.npy", (len(ids), self.global_dim), dtype)
        if self.local_dim:
            local_offsets = np.concatenate([[0], np.cumsum([counts[i] for i in ids])]).astype(np.int64)
            np.save(gen_dir / "local_offsets.npy", local_offsets)
            total = int(local_offsets[-1])
            outputs["keypoints"] = _open_output(gen_dir / "local_keypoints.npy", (total, 2), np.float32)
            outputs["descriptors"] = _open_output(gen_dir / "local_descriptors.npy", (total, self.local_dim), dtype)
            outputs["scores"] = _open_output(gen_dir / "local_scores.npy", (total,), np.float32)
            outputs["scales"] = _open_output(gen_dir / "local_scales.npy", (total,), np.float32)
        for chunk_index, chunk in enumerate(chunks):
            with np.load(chunk) as data:
                chunk_ids = data["ids"].tolist()
                wanted = [(row, position[i]) for row, i in enumerate(chunk_ids) if origin[i] == (chunk_index, row)]
                if not wanted:
                    continue
                if self.global_dim and outputs["global"] is not None:
                    rows, targets = zip(*wanted, strict=True)
                    outputs["global"][list(targets)] = data["global"][list(rows)]
                if self.local_dim:
                    offsets = data["offsets"]
                    chunk_local = {field: data[field] for field in _LOCAL_FIELDS}
                    for row, target in wanted:
                        start, stop = offsets[row], offsets[row + 1]
                        out_start, out_stop = local_offsets[target], local_offsets[target + 1]
                        for field in _LOCAL_FIELDS:
                            output = outputs[field]
                            if output is not None and stop > start:
                                output[out_start:out_stop] = chunk_local[field][start:stop]
        for output in outputs.values():
            if isinstance(output, np.memmap):
                output.flush()
        (gen_dir / "ids.txt").write_text("".join(f"{i}\n" for i in ids))
        (gen_dir / "failures.json").write_text(json.dumps(failures, indent=1, sort_keys=True))
        generation = {"name": tag, "chunks": [p.name for p in chunks], "count": len(ids)}
        atomic_write_bytes(self.path / "CURRENT", json.dumps(generation).encode())
        for old in self.path.glob("gen-*"):
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
        self._generation = None
        self._arrays = {}

    # ------------------------------------------------------------------ reading
    def _gen(self) -> dict[str, Any]:
        if self._generation is None or not self.is_consolidated():
            self.finalize()
            generation = self._read_current()
            assert generation is not None
            gen_dir = self.path / generation["name"]
            ids = (gen_dir / "ids.txt").read_text().split()
            generation["ids"] = ids
            generation["ids_array"] = np.array(ids, dtype=str)
            generation["dir"] = gen_dir
            self._generation = generation
            self._arrays = {}
        return self._generation

    def _array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            path = self._gen()["dir"] / f"{name}.npy"
            self._arrays[name] = np.load(path, mmap_mode="r")
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
        return json.loads((self._gen()["dir"] / "failures.json").read_text())

    def global_descriptors(self) -> np.ndarray:
        """Global descriptors ``[N, D]`` (memory-mapped), rows in :attr:`ids` order.

        For local-only models this is the VLAD array written by
        :func:`delf_retrieval.aggregation` helpers (see :meth:`write_derived`).
        """
        if self.global_dim:
            return self._array("global")
        derived = self.read_derived("vlad")
        if derived is None:
            raise ValueError(
                f"store {self.path} has no global descriptors (local-only model) and no VLAD "
                "aggregation yet; compute one with delf_retrieval.pipeline.ensure_global_descriptors"
            )
        return derived[0]

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
        if array.shape[0] != len(self.ids):
            raise ValueError(f"derived array has {array.shape[0]} rows, store has {len(self.ids)} ids")
        folder = self.path / "derived"
        folder.mkdir(exist_ok=True)
        atomic_write(folder / f"{name}.npy", lambda handle: np.save(handle, array))
        record = {"ids_hash": ids_hash(self.ids), **(info or {})}
        atomic_write_bytes(folder / f"{name}.json", json.dumps(record, default=str).encode())

    def read_derived(self, name: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        """``(array, info)`` of a derived array, or None if absent or made for other ids."""
        folder = self.path / "derived"
        info_path, array_path = folder / f"{name}.json", folder / f"{name}.npy"
        if not info_path.is_file() or not array_path.is_file():
            return None
        info = json.loads(info_path.read_text())
        if info.get("ids_hash") != ids_hash(self.ids):
            return None
        return np.load(array_path, mmap_mode="r"), info

    # ------------------------------------------------------------------ size
    def nbytes(self) -> int:
        """Bytes on disk of the consolidated features (what a reader maps)."""
        return sum(p.stat().st_size for p in self._gen()["dir"].glob("*.npy"))

    def bytes_per_image(self) -> float:
        return self.nbytes() / max(len(self.ids), 1)

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, family={self.fingerprint.get('family')!r})"


def _stack(parts: list[np.ndarray], empty_shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    if not parts or sum(len(p) for p in parts) == 0:
        return np.zeros(empty_shape, dtype=dtype)
    return np.concatenate([np.asarray(p, dtype=dtype).reshape((-1,) + empty_shape[1:]) for p in parts])


def _open_output(path: Path, shape: tuple[int, ...], dtype: Any) -> np.ndarray | None:
    """A writable .npy memmap, or None (an empty array already saved) for zero-size shapes."""
    if int(np.prod(shape)) == 0:
        np.save(path, np.zeros(shape, dtype=dtype))
        return None
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
