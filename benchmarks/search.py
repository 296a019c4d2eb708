"""Exact top-k cosine search on a memory-mapped index, against the host baseline.

Builds a synthetic index (unit rows, float32 and a float16 copy) with planted neighbours
in a temporary directory, chunk by chunk, then prints in one table:

* ``delf_retrieval.search.index.cosine_topk`` on the float32 and the float16 memmap;
* the same with ``backend="faiss"`` (if faiss is installed), and with ``--faiss-flat``
  faiss's own ``IndexFlatIP`` holding the whole index in RAM;
* the Kaggle 2020 host baseline: per query ``scipy.spatial.distance.cdist(q[None], index,
  'cosine')`` over a float64 index plus ``argpartition`` (timed on a few queries);
* a bare BLAS matrix product of the same size (the compute bound).

Memory is the process's peak RSS during each method (Linux VmHWM, reset before each
method; mapped index pages count), and the peak of its anonymous part (sampled).

Usage::

    python benchmarks/search.py                      # 1,000,000 x 2048, 1000 queries, k=100
    python benchmarks/search.py --num-index 200000   # smaller
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.spatial.distance import cdist

try:
    from delf_retrieval.search.index import cosine_topk
except ImportError:  # run from a checkout without installing: python benchmarks/search.py
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from delf_retrieval.search.index import cosine_topk

GB = 1024**3


@dataclass
class Row:
    name: str
    queries_per_s: float
    peak_rss: float | None = None
    peak_anon: float | None = None
    recall: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


# --- memory -------------------------------------------------------------------------------


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@contextmanager
def memory_peak():
    """Yield a dict that gets ``rss`` (VmHWM) and ``anon`` (sampled RssAnon) peaks in bytes."""
    result: dict[str, float | None] = {"rss": None, "anon": None}
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset VmHWM to the current RSS
        can_reset = True
    except OSError:
        can_reset = False
    peak_anon = [_status_kb("RssAnon") or 0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak_anon[0] = max(peak_anon[0], _status_kb("RssAnon") or 0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        peak_anon[0] = max(peak_anon[0], _status_kb("RssAnon") or 0)
        hwm = _status_kb("VmHWM")
        result["rss"] = hwm * 1024 if (hwm is not None and can_reset) else None
        result["anon"] = peak_anon[0] * 1024 if peak_anon[0] else None


# --- data ---------------------------------------------------------------------------------


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    rows = rng.standard_normal((n, dim), dtype=np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def build_index(args: argparse.Namespace, directory: Path):
    """Write the float32 and float16 memmaps chunk by chunk; return queries and planted ids.

    Query ``q`` has ``args.planted`` planted rows with cosine similarities from 0.9 down
    to 0.3 (random unit rows in 2048-d stay below ~0.12).
    """
    rng = np.random.default_rng(args.seed)
    n, dim, q, p = args.num_index, args.dim, args.num_queries, args.planted
    queries = unit_rows(rng, q, dim)
    planted = rng.choice(n, size=(q, p), replace=False) if p else np.zeros((q, 0), np.int64)
    cosines = np.linspace(0.9, 0.3, p, dtype=np.float32)
    owner_query = np.full(n, -1, np.int64)
    owner_rank = np.zeros(n, np.int64)
    owner_query[planted.ravel()] = np.repeat(np.arange(q), p)
    owner_rank[planted.ravel()] = np.tile(np.arange(p), q)

    f32 = np.lib.format.open_memmap(directory / "index_f32.npy", "w+", np.float32, (n, dim))
    f16 = np.lib.format.open_memmap(directory / "index_f16.npy", "w+", np.float16, (n, dim))
    for start in range(0, n, args.chunk):
        stop = min(start + args.chunk, n)
        block = unit_rows(rng, stop - start, dim)
        rows = np.flatnonzero(owner_query[start:stop] >= 0)
        if rows.size:
            target = queries[owner_query[start + rows]]
            noise = block[rows] - (block[rows] * target).sum(1, keepdims=True) * target
            noise /= np.linalg.norm(noise, axis=1, keepdims=True)
            c = cosines[owner_rank[start + rows]][:, None]
            block[rows] = c * target + np.sqrt(1 - c**2) * noise
        f32[start:stop] = block
        f16[start:stop] = block
    f32.flush()
    f16.flush()
    del f32, f16
    return queries, planted


def recall(ids: np.ndarray, planted: np.ndarray) -> float:
    if planted.shape[1] == 0:
        return float("nan")
    hits = [np.isin(planted[i], ids[i]).mean() for i in range(len(planted))]
    return float(np.mean(hits))


# --- methods ------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run_ours(args, queries, planted, path: Path, name: str, backend: str = "numpy") -> Row:
    index = np.load(path, mmap_mode="r")
    with memory_peak() as peak:
        start = time.perf_counter()
        _, ids = cosine_topk(
            queries,
            index,
            args.k,
            block_size=args.block_size,
            query_block_size=args.query_block_size,
            backend=backend,
        )
        seconds = time.perf_counter() - start
    del index
    return Row(name, len(queries) / seconds, peak["rss"], peak["anon"], recall(ids, planted))


def run_matmul_bound(args, queries) -> Row:
    """The bare BLAS product of the same size: queries x every index block (in memory)."""
    rng = np.random.default_rng(1)
    block = unit_rows(rng, min(args.block_size, args.num_index), args.dim)
    qbs = min(args.query_block_size, len(queries))
    out = np.empty((qbs, block.shape[0]), np.float32)
    np.matmul(queries[:qbs], block.T, out=out)  # warm up BLAS threads
    with memory_peak() as peak:
        start = time.perf_counter()
        for first in range(0, args.num_index, block.shape[0]):
            rows = min(block.shape[0], args.num_index - first)
            for q0 in range(0, len(queries), qbs):
                q = queries[q0 : q0 + qbs]
                np.matmul(q, block[:rows].T, out=out[: len(q), :rows])
        seconds = time.perf_counter() - start
    gflops = 2.0 * len(queries) * args.num_index * args.dim / seconds / 1e9
    return Row(
        "bare matmul (bound)",
        len(queries) / seconds,
        peak["rss"],
        peak["anon"],
        note=f"{gflops:.0f} GFLOP/s",
    )


def run_baseline(args, queries, planted, path: Path) -> Row:
    """Kaggle 2020 host baseline: one cdist per query over a float64 index + argpartition.

    The float64 index (N * D * 8 bytes) would not fit next to the rest here, so it is
    converted chunk by chunk (untimed) and each query's cdist over every chunk is timed;
    the work per query is the same as one cdist over the whole index.
    """
    index = np.load(path, mmap_mode="r")
    sample = queries[: args.baseline_queries].astype(np.float64)
    distances = np.empty((len(sample), args.num_index), np.float64)
    seconds = 0.0
    for start in range(0, args.num_index, args.chunk):
        chunk = np.asarray(index[start : start + args.chunk], dtype=np.float64)
        for i, query in enumerate(sample):
            t0 = time.perf_counter()
            distances[i, start : start + len(chunk)] = cdist(query[None], chunk, "cosine")[0]
            seconds += time.perf_counter() - t0
    ids = []
    for row in distances:
        t0 = time.perf_counter()
        part = np.argpartition(row, args.k)[: args.k]
        ids.append(part[np.argsort(row[part])])
        seconds += time.perf_counter() - t0
    del index
    footprint = args.num_index * args.dim * 8
    return Row(
        "host baseline: cdist float64 per query",
        len(sample) / seconds,
        peak_rss=footprint,
        recall=recall(np.array(ids), planted[: len(sample)]),
        note=f"{len(sample)} queries, extrapolated; memory = its float64 index (computed)",
    )


def run_faiss_flat(args, queries, planted, path: Path) -> Row | None:
    """faiss.IndexFlatIP holding the whole index in memory (faiss's usual way)."""
    try:
        import faiss
    except ImportError:
        return None
    index = np.load(path, mmap_mode="r")
    with memory_peak() as peak:
        flat = faiss.IndexFlatIP(args.dim)
        for start in range(0, args.num_index, args.chunk):
            flat.add(np.ascontiguousarray(index[start : start + args.chunk]))
        start = time.perf_counter()
        _, ids = flat.search(queries, args.k)
        seconds = time.perf_counter() - start
        flat.reset()
    del index
    return Row(
        "faiss IndexFlatIP (in RAM)",
        len(queries) / seconds,
        peak["rss"],
        peak["anon"],
        recall(ids, planted),
        note="search only; add not timed",
    )


# --- main ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-index", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--num-queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--planted", type=int, default=10, help="planted neighbours per query")
    parser.add_argument("--baseline-queries", type=int, default=20)
    parser.add_argument("--block-size", type=int, default=65536)
    parser.add_argument("--query-block-size", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=65536, help="rows per generation chunk")
    parser.add_argument("--no-faiss", action="store_true")
    parser.add_argument(
        "--faiss-flat", action="store_true", help="also faiss.IndexFlatIP holding the index in RAM"
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where the memmaps go (temp dir)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(
        f"index {args.num_index:,} x {args.dim} (float32 {args.num_index * args.dim * 4 / GB:.2f} GiB), "
        f"{args.num_queries} queries, k={args.k}, {os.cpu_count()} cores"
    )
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        directory = Path(tmp)
        seconds, (queries, planted) = timed(lambda: build_index(args, directory))
        print(f"built memmaps in {seconds:.1f} s")
        path32, path16 = directory / "index_f32.npy", directory / "index_f16.npy"
        # The bound is measured first and last (other processes may share the cores);
        # the faster of the two is used.
        rows = [run_matmul_bound(args, queries)]
        rows.append(run_ours(args, queries, planted, path32, "ours: cosine_topk float32 memmap"))
        rows.append(run_ours(args, queries, planted, path16, "ours: cosine_topk float16 memmap"))
        if not args.no_faiss:
            try:
                rows.append(
                    run_ours(
                        args,
                        queries,
                        planted,
                        path32,
                        "ours: backend=faiss float32 memmap",
                        "faiss",
                    )
                )
            except ImportError as error:
                print(f"faiss backend skipped: {error}")
            if args.faiss_flat:
                flat = run_faiss_flat(args, queries, planted, path32)
                if flat is not None:
                    rows.append(flat)
        rows.append(run_baseline(args, queries, planted, path32))
        rows.insert(1, run_matmul_bound(args, queries))
        rows[1].name = "bare matmul (bound), again at the end"

    bound = max(rows[0].queries_per_s, rows[1].queries_per_s)
    baseline = rows[-1].queries_per_s
    index_bytes = {32: args.num_index * args.dim * 4, 16: args.num_index * args.dim * 2}

    def gib(value):
        return "-" if value is None else f"{value / GB:.2f}"

    header = f"{'method':40s} {'q/s':>9s} {'% bound':>8s} {'x base':>8s} {'peak RSS GiB':>13s} {'anon GiB':>9s} {'recall':>7s}  note"
    print()
    print(header)
    print("-" * len(header))
    for row in rows:
        rec = "-" if row.recall is None else f"{row.recall:.3f}"
        print(
            f"{row.name:40s} {row.queries_per_s:9.2f} {100 * row.queries_per_s / bound:7.0f}% "
            f"{row.queries_per_s / baseline:7.1f}x {gib(row.peak_rss):>13s} {gib(row.peak_anon):>9s} {rec:>7s}  {row.note}"
        )
    ours32, ours16 = rows[2], rows[3]
    print()
    print("goals (float32 memmap):")
    print(f"  >= 80% of the matmul bound: {100 * ours32.queries_per_s / bound:.0f}%")
    print(f"  >= 20x the baseline:        {ours32.queries_per_s / baseline:.1f}x")
    for row, bits in ((ours32, 32), (ours16, 16)):
        if row.peak_rss is not None:
            limit = index_bytes[bits] + GB
            verdict = "ok" if row.peak_rss <= limit else "OVER"
            print(
                f"  peak RSS <= index + 1 GiB (float{bits}): {row.peak_rss / GB:.2f} <= {limit / GB:.2f} GiB {verdict}"
            )


if __name__ == "__main__":
    main()
