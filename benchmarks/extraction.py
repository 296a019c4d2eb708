"""Extraction throughput: bare model calls versus the full pipeline, side by side.

    python benchmarks/extraction.py ../shared/data/gldv2-mini-dev/train [--repeat 2]

For each model (the weights-free OpenCV extractor and the fixture DELG SavedModels the
project builds itself), it measures in one run:

* bare: ``extractor.extract(image)`` on images already decoded in memory;
* pipeline: :func:`delf_retrieval.models.extract.extract_to_store` from files on disk into a
  fresh store (decoding in threads, downscaling, atomic chunk writes, consolidation).

The goal is pipeline >= 90% of bare throughput: decoding must hide behind the model.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from delf_retrieval.features.images import downscale_to_max_size, list_images, load_image
from delf_retrieval.features.store import FeatureStore
from delf_retrieval.models.base import Extractor
from delf_retrieval.models.extract import extract_to_store
from delf_retrieval.models.loader import load_extractor


def bare_images_per_second(extractor: Extractor, images: list, repeat: int) -> float:
    extractor.extract(images[0])  # warm-up (graph tracing, thread pools)
    rates = []
    for _ in range(repeat):
        started = time.perf_counter()
        for image in images:
            extractor.extract(image)
        rates.append(len(images) / (time.perf_counter() - started))
    return statistics.median(rates)


def pipeline_images_per_second(extractor: Extractor, sources: list, repeat: int, workdir: Path) -> tuple[float, float]:
    extractor.extract(load_image(sources[0].path))  # same warm-up as the bare run
    rates, bytes_per_image = [], 0.0
    for attempt in range(repeat):
        store = FeatureStore(workdir / f"{extractor.family}-{attempt}", extractor.fingerprint(), dtype="float16")
        summary = extract_to_store(extractor, sources, store, progress=False)
        rates.append(summary.extracted / summary.seconds)
        bytes_per_image = summary.bytes_per_image
    return statistics.median(rates), bytes_per_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", help="folder (or Kaggle CSV) of photos")
    parser.add_argument("--limit", type=int, default=200, help="images used (default 200)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions, median reported")
    parser.add_argument("--models", nargs="+", default=["opencv-sift", "delg-tf2", "delg-tf1", "delf-hub"])
    args = parser.parse_args()

    sources = list_images(args.images)[: args.limit]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        specs = {"opencv-sift": "opencv-sift"}
        if any(m != "opencv-sift" for m in args.models):
            from delf_retrieval.models import fakes as testing

            builders = {"delg-tf2": testing.build_delg_tf2, "delg-tf1": testing.build_delg_tf1, "delf-hub": testing.build_delf_hub}
            for name in args.models:
                if name in builders:
                    specs[name] = str(builders[name](tmp / "models" / name))
        print(f"{len(sources)} images from {args.images}, median of {args.repeat} runs, 2 decode threads\n")
        header = f"{'model':<14}{'bare img/s':>12}{'pipeline img/s':>16}{'pipeline/bare':>15}{'kB/image':>10}"
        print(header)
        print("-" * len(header))
        for name in args.models:
            extractor = load_extractor(specs[name])
            decoded = [downscale_to_max_size(load_image(s.path), extractor.params.max_image_size)[0] for s in sources]
            bare = bare_images_per_second(extractor, decoded, args.repeat)
            full, size = pipeline_images_per_second(extractor, sources, args.repeat, tmp / "stores")
            print(f"{name:<14}{bare:>12.2f}{full:>16.2f}{full / bare:>14.0%}{size / 1e3:>10.1f}")


if __name__ == "__main__":
    main()
