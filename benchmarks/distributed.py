"""Throughput of the Ray paths against the local ones, on one machine.

    python benchmarks/distributed.py ../shared/data/gldv2-mini-dev/train [--count 128]

Extraction: images/s of :func:`delf_retrieval.models.extract.extract_to_store` (local) and of a
:class:`delf_retrieval.distributed.RayExtractorPool` with 1 and 2 actors on a local Ray,
for the weights-free OpenCV extractor and the fixture DELG model
(:func:`delf_retrieval.models.fakes.build_delg_tf2`). The folder's photos are repeated under
new ids to reach ``--count``. Actor start-up (process + model load) is timed apart;
images/s counts from the first batch sent to the last chunk written. Every Ray store is
checked against the local one (same ids and descriptors).

Search: queries/s of :func:`delf_retrieval.search.index.cosine_topk` on a synthetic float32
``.npy`` index (memory-mapped, page cache warm) against :class:`ShardedIndex` with 1, 2
and 4 shards, with the default BLAS threads per shard (this process's count: results
bit-identical to the local search) and with ``cores // shards`` threads (no
over-subscription). The "identical" column compares ids and similarities bit for bit.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from delf_retrieval.distributed import RayExtractorPool, ShardedIndex, ray_session
from delf_retrieval.distributed.sharded import _default_blas_threads
from delf_retrieval.features.images import ImageSource, list_images
from delf_retrieval.features.store import FeatureStore
from delf_retrieval.models.extract import extract_to_store
from delf_retrieval.models.loader import load_extractor
from delf_retrieval.search.index import cosine_topk


def repeated(sources: list[ImageSource], count: int) -> list[ImageSource]:
    """``count`` sources cycling through ``sources``, each under its own id."""
    return [
        ImageSource(
            f"{sources[i % len(sources)].id}-{i // len(sources)}", sources[i % len(sources)].path
        )
        for i in range(count)
    ]


def same_store(a: FeatureStore, b: FeatureStore) -> bool:
    if a.ids != b.ids:
        return False
    if a.local_dim and not np.array_equal(
        a._array("local_descriptors"), b._array("local_descriptors")
    ):
        return False
    return not a.global_dim or np.array_equal(a.global_descriptors(), b.global_descriptors())


def bench_extraction(
    name: str, spec: str, sources: list[ImageSource], work: Path, batch_size: int
) -> list[list[str]]:
    extractor = load_extractor(spec)
    rows = []
    local = FeatureStore(work / f"{name}-local", extractor.fingerprint(), dtype="float16")
    extractor.extract(np.zeros((64, 64, 3), np.uint8))  # warm-up (graph tracing)
    summary = extract_to_store(extractor, sources, local, batch_size=batch_size, progress=False)
    local_rate = summary.images_per_second
    rows.append([name, "local extract_to_store", "-", f"{local_rate:.2f}", "1.00", "-"])
    for workers in (1, 2):
        with RayExtractorPool(spec, extractor.params, num_workers=workers) as pool:
            started = time.perf_counter()
            pool.start()
            startup = time.perf_counter() - started
            store = FeatureStore(
                work / f"{name}-ray{workers}", extractor.fingerprint(), dtype="float16"
            )
            summary = pool.extract_to_store(
                extractor, sources, store, batch_size=batch_size, progress=False
            )
        rate = summary.images_per_second
        rows.append(
            [
                name,
                f"Ray, {workers} actor{'s' if workers > 1 else ''}",
                f"{startup:.1f}",
                f"{rate:.2f}",
                f"{rate / local_rate:.2f}",
                "yes" if same_store(local, store) else "NO",
            ]
        )
        print(f"  {rows[-1]}", flush=True)
    return rows


def make_index(path: Path, rows: int, dim: int, seed: int = 0) -> None:
    """A random float32 index of unit rows, written in blocks (never all in memory)."""
    rng = np.random.default_rng(seed)
    index = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    for start in range(0, rows, 20000):
        block = rng.standard_normal((min(20000, rows - start), dim)).astype(np.float32)
        index[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    index.flush()


def bench_search(args: argparse.Namespace, work: Path) -> list[list[str]]:
    path = work / "index.npy"
    make_index(path, args.index_rows, args.dim)
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((args.queries, args.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index = np.load(path, mmap_mode="r")
    np.asarray(index).sum()  # warm the page cache so that every run reads from memory
    started = time.perf_counter()
    ref_sims, ref_ids = cosine_topk(queries, index, args.k)
    local_rate = args.queries / (time.perf_counter() - started)
    rows = [["local cosine_topk", "-", "-", "-", f"{local_rate:.1f}", "1.00", "-"]]
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    default = _default_blas_threads()
    for shards in (1, 2, 4):
        for threads in sorted({default, max(1, cores // shards)}, reverse=True):
            started = time.perf_counter()
            with ShardedIndex(path, shards, blas_threads=threads) as sharded:
                startup = time.perf_counter() - started
                started = time.perf_counter()
                sims, ids = sharded.search(queries, args.k)
                rate = args.queries / (time.perf_counter() - started)
                used = sharded.blas_threads
            same = np.array_equal(ids, ref_ids) and np.array_equal(sims, ref_sims)
            row = [
                f"ShardedIndex, {shards} shard{'s' if shards > 1 else ''}",
                str(used) + (" (default)" if threads == default else ""),
                f"{startup:.1f}",
                str(shards),
                f"{rate:.1f}",
                f"{rate / local_rate:.2f}",
                "yes" if same else "NO",
            ]
            rows.append(row)
            print(f"  {row}", flush=True)
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *map(line, rows)])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("images", nargs="+", help="folder(s) or Kaggle CSV(s) of photos")
    parser.add_argument("--count", type=int, default=128, help="images for OpenCV (default 128)")
    parser.add_argument(
        "--delg-images", type=int, default=48, help="fixture DELG images (default 48)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument("--index-rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--skip", nargs="*", default=[], choices=["opencv", "delg", "search"])
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the Ray workers inherit it
    photos = list_images(args.images if len(args.images) > 1 else args.images[0])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{len(photos)} photos, {cores} cores, Python {sys.version.split()[0]}", flush=True)
    extraction_rows: list[list[str]] = []
    search_rows: list[list[str]] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp,
        ray_session("local", num_cpus=cores),
    ):
        work = Path(tmp)
        if "opencv" not in args.skip:
            extraction_rows += bench_extraction(
                "opencv-sift", "opencv-sift", repeated(photos, args.count), work, args.batch_size
            )
        if "delg" not in args.skip:
            try:
                from delf_retrieval.models.fakes import build_delg_tf2
            except ImportError as error:
                print(f"fixture DELG model unavailable: {error}")
            else:
                model = build_delg_tf2(work / "delg-tf2")
                extraction_rows += bench_extraction(
                    "DELG fixture (TF2)",
                    str(model),
                    repeated(photos, args.delg_images),
                    work,
                    args.batch_size,
                )
        if "search" not in args.skip:
            search_rows = bench_search(args, work)
    if extraction_rows:
        print(f"\nExtraction ({', '.join(map(str, args.images))}; photos repeated under new ids)")
        print(
            table(
                ["model", "runner", "start-up s", "images/s", "vs local", "same store"],
                extraction_rows,
            )
        )
    if search_rows:
        print(
            f"\nSearch: {args.index_rows} x {args.dim} float32 memmap, {args.queries} queries, k={args.k}"
        )
        header = [
            "search",
            "BLAS threads/shard",
            "start-up s",
            "actors",
            "queries/s",
            "vs local",
            "identical",
        ]
        print(table(header, search_rows))


if __name__ == "__main__":
    main()
