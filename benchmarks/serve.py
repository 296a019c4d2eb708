"""Serving one photo at a time: latency, throughput, memory and index load time.

Builds a recognition index of at least ``--rows`` train images with the weights-free
``opencv-sift`` model (NUM_TO_RERANK 10): the real train photos of a Kaggle-layout
dataset plus synthetic rows that make the search as large as a real index of that size.
Each synthetic row gets ``--synthetic-features`` local descriptors drawn from the real
photos' descriptors with noise (so its VLAD vector is plausible and it can be among a
query's candidates; its verification is then cheaper than a real photo's) and a label
from a pool of fake landmarks (5 photos each). Then it starts ``delf-retrieval serve``
on a loopback port and sends the dataset's query photos over HTTP with 1 and with 4
concurrent clients.

Printed side by side:

* bare extraction (``extractor.extract`` on the decoded photo: the floor per photo);
* ``Recognizer.predict`` in process (no HTTP), wall clock, and its CPU time per photo with
  every library on one thread (what one idle core would take, even on a busy machine);
* the server with 1 client and with 4 clients (latency p50/p95 per photo, photos/s);
* the server's memory (RSS after start and its peak during the runs) and the index load
  time (``Recognizer.load`` in a fresh process), scaled to 100,000 images.

Usage::

    python benchmarks/serve.py ../shared/data/gldv2-mini-dev            # 10,000 rows
    python benchmarks/serve.py ../shared/data/gldv2-mini-dev --rows 100000
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

try:
    from delf_retrieval.features.store import FeatureStore
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from delf_retrieval.features.store import FeatureStore

from delf_retrieval.features.containers import ImageFeatures, LocalFeatures
from delf_retrieval.features.images import kaggle_image_path, list_images, load_image
from delf_retrieval.models import load_extractor
from delf_retrieval.models.extract import extract_to_store
from delf_retrieval.service.recognizer import Recognizer
from delf_retrieval.tasks.build_index import build_index


def synthetic_features(pool: np.ndarray, count: int, rng: np.random.Generator) -> ImageFeatures:
    """``count`` descriptors drawn from ``pool`` [M, 128] with noise, random keypoints in 1024 x 768."""
    picked = pool[rng.integers(0, len(pool), count)] + rng.normal(0, 0.05, (count, pool.shape[1])).astype(np.float32)
    picked = np.abs(picked)
    picked /= np.linalg.norm(picked, axis=1, keepdims=True)
    keypoints = rng.uniform((0, 0), (1024, 768), (count, 2)).astype(np.float32)
    local = LocalFeatures(keypoints, picked.astype(np.float32), np.ones(count, np.float32), np.full(count, 4.0, np.float32))
    return ImageFeatures(local=local, global_descriptor=None)


def build_big_index(data: Path, work: Path, rows: int, features: int, seed: int = 0) -> Path:
    """A data folder with ``rows`` train ids (real + synthetic) and its index, in ``work``."""
    augmented, index = work / "data", work / "index"
    augmented.mkdir(parents=True, exist_ok=True)
    for name in ("train", "test", "nonlandmark"):
        if (data / name).is_dir() and not (augmented / name).exists():
            (augmented / name).symlink_to((data / name).resolve())
    for name in ("labels.csv", "nonlandmark.csv", "sample_submission.csv", "solution.csv"):
        if (data / name).is_file():
            shutil.copy(data / name, augmented / name)
    real = pd.read_csv(data / "train.csv", dtype=str)
    extra = max(0, rows - len(real))
    synthetic = pd.DataFrame(
        {"id": [f"synth{i:08d}" for i in range(extra)], "landmark_id": [f"9{i // 5:07d}" for i in range(extra)]}
    )
    pd.concat([real, synthetic]).to_csv(augmented / "train.csv", index=False)

    extractor = load_extractor("opencv-sift")
    store = FeatureStore(index / "train", extractor.fingerprint(), dtype="float16")
    extract_to_store(extractor, list_images(data / "train.csv"), store, progress=True, description="extract real")
    have = store.chunk_ids()[0]
    todo = [i for i in synthetic["id"] if i not in have]
    if todo:
        rng = np.random.default_rng(seed)
        pool = np.asarray(store.local_descriptor_sample(200_000, seed=seed), np.float32)
        for start in range(0, len(todo), 500):
            batch = todo[start : start + 500]
            store.write_chunk(batch, [synthetic_features(pool, features, rng) for _ in batch])
        store.finalize()
    build_index(augmented, extractor, index, progress=True)
    return index


# --------------------------------------------------------------------------- measuring
def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def load_seconds(index: Path, repeats: int = 3) -> float:
    """Median ``Recognizer.load`` time in a fresh process (page cache warm)."""
    code = (
        "import time, sys; from delf_retrieval.service.recognizer import Recognizer; "
        "t = time.perf_counter(); r = Recognizer.load(sys.argv[1]); print(time.perf_counter() - t)"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    times = [
        float(subprocess.run([sys.executable, "-c", code, str(index)], capture_output=True, text=True, check=True, env=env).stdout.split()[-1])
        for _ in range(repeats)
    ]
    return float(np.median(times))


class Server:
    """``delf-retrieval serve`` in a subprocess on a free loopback port, with its peak RSS sampled."""

    def __init__(self, index: Path, concurrency: int, threads: int) -> None:
        import psutil

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        command = [sys.executable, "-m", "delf_retrieval.cli.main", "serve", str(index), "--port", str(self.port)]
        command += ["--concurrency", str(concurrency), "--threads-per-request", str(threads)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait()
        self.handle = psutil.Process(self.process.pid)
        self.rss_after_start = self.handle.memory_info().rss
        self.peak_rss = self.rss_after_start
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _wait(self) -> None:
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("server did not start")

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak_rss = max(self.peak_rss, self.handle.memory_info().rss)
            except Exception:
                return

    def close(self) -> None:
        self._stop.set()
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def http_run(url: str, photos: list[bytes], clients: int) -> tuple[list[float], float]:
    """Send every photo once, ``clients`` at a time; per-request seconds and total wall seconds."""
    import httpx

    def send(data: bytes) -> float:
        started = time.perf_counter()
        response = httpx.post(f"{url}/predict", files={"file": ("q.jpg", data, "image/jpeg")}, timeout=120)
        response.raise_for_status()
        return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        latencies = list(pool.map(send, photos))
    return latencies, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="Kaggle-layout dataset (train.csv + train/, test/ queries)")
    parser.add_argument("--rows", type=int, default=10_000, help="train images in the index (real + synthetic)")
    parser.add_argument("--synthetic-features", type=int, default=200, help="local descriptors per synthetic row")
    parser.add_argument("--work", type=Path, default=None, help="keep the index here (default: a temporary folder)")
    parser.add_argument("--passes", type=int, default=1, help="times each query photo is sent per run")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="serve-bench-"))
    started = time.perf_counter()
    index = build_big_index(args.data, work, args.rows, args.synthetic_features)
    print(f"index of {len(FeatureStore(index / 'train').ids)} train images built in {time.perf_counter() - started:.0f} s: {index}")
    queries = [kaggle_image_path(args.data / "test", q) for q in pd.read_csv(args.data / "sample_submission.csv", dtype=str)["id"]]
    photos = [p.read_bytes() for p in queries] * args.passes
    cores = len(os.sched_getaffinity(0))
    print(f"{len(photos)} query photos, {cores} cores, load average {os.getloadavg()[0]:.1f} (machine shared with other work)")

    load = load_seconds(index)
    recognizer = Recognizer.load(index)
    images = [load_image(p) for p in queries]
    extract = []
    for image in images:
        t = time.perf_counter()
        recognizer.features(image)
        extract.append(time.perf_counter() - t)
    in_process, steps, cpu = [], [], []
    for data in photos:
        t = time.perf_counter()
        steps.append(recognizer.predict(data).timings)
        in_process.append(time.perf_counter() - t)
    # CPU seconds per photo with every library on one thread: what one idle core would take,
    # whatever else the machine runs (wall-clock latency on a shared machine is not).
    from delf_retrieval.core.threads import limit_threads

    limit_threads(1)
    single = Recognizer.load(index, WORKERS=1)
    for data in photos:
        t = time.process_time()
        single.predict(data)
        cpu.append(time.process_time() - t)

    rows = [
        ("bare extraction (floor per photo)", extract, sum(extract), "-"),
        ("Recognizer.predict in process", in_process, sum(in_process), "-"),
        ("Recognizer.predict in process, 1 thread: CPU time (idle-core latency)", cpu, sum(cpu), "-"),
    ]
    memory = []
    for clients, concurrency, threads in ((1, 2, 1), (1, 1, 2), (4, 2, 1)):
        server = Server(index, concurrency, threads)
        try:
            http_run(server.url, photos[:3], 1)  # warm-up
            latencies, wall = http_run(server.url, photos, clients)
        finally:
            server.close()
        name = f"HTTP, {clients} client(s), --concurrency {concurrency} --threads-per-request {threads}"
        rows.append((name, latencies, wall, f"{server.rss_after_start / 2**20:.0f} / {server.peak_rss / 2**20:.0f}"))
        memory.append(server.peak_rss)

    size = len(recognizer.ids)
    synthetic = sum(image_id.startswith("synth") for image_id in recognizer.ids)
    print(f"\nindex: {size} train images ({size - synthetic} real photos, {synthetic} synthetic rows); NUM_TO_RERANK {recognizer.config.NUM_TO_RERANK}")
    print(f"index load (Recognizer.load, fresh process, median of 3): {load:.3f} s = {load * 100_000 / size:.2f} s per 100,000 images (goal <= 2 s)")
    print("\n| what | p50 ms | p95 ms | photos/s | server RSS MiB (start / peak) |")
    print("|---|---|---|---|---|")
    for name, values, wall, rss in rows:
        print(f"| {name} | {percentile(values, 50) * 1000:.0f} | {percentile(values, 95) * 1000:.0f} | {len(values) / wall:.2f} | {rss} |")
    medians = {step: np.median([t[step] for t in steps]) * 1000 for step in steps[0]}
    print("\nin process, median ms per step: " + ", ".join(f"{k} {v:.0f}" for k, v in medians.items()))
    print("goal: p50 <= 300 ms per photo on 2 cores")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
