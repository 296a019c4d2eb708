"""Time per image and per pair: RootSIFT vs the learned extractors and matchers, side by side.

All models run in one process, one after another, on the same few real photos (a
Kaggle-layout folder's train images), with the same torch/OpenCV thread count, so the
numbers are comparable with each other even on a shared machine (say how loaded it was).
Per image: ``extractor.extract`` on decoded images (decoding not timed). Per pair: the
verification of ``count_inliers_many`` with each model's presets (NN + RANSAC, and the
learned matcher + RANSAC), over every pair of the photos.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/learned.py ../shared/data/gldv2-mini-dev --images 4
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from pathlib import Path

try:
    import delf_retrieval  # noqa: F401
except ImportError:  # run from a checkout without installing
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from delf_retrieval.config import load_config
from delf_retrieval.features.images import kaggle_image_path, load_image, read_labels_csv
from delf_retrieval.matching.verify import MatchingSettings, count_inliers_many
from delf_retrieval.models.loader import load_extractor

MODELS = {
    "opencv-sift": ("opencv-sift",),
    "xfeat": ("xfeat", "xfeat-lighterglue"),
    "aliked": ("aliked", "aliked-lightglue"),
    "disk": ("disk", "disk-lightglue"),
    # CNN global descriptors (extra [cnn]): extraction only, no pairs.
    "efficientnet-lite0": (),
    "efficientnet-lite2": (),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    try:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        threads = torch.get_num_threads()
    except ImportError:
        threads = None
    ids = sorted(read_labels_csv(args.data / "train.csv"))[: args.images]
    images = [load_image(kaggle_image_path(args.data / "train", image_id)) for image_id in ids]
    sizes = ", ".join(f"{im.shape[1]}x{im.shape[0]}" for im in images)
    print(f"{len(images)} photos ({sizes}); torch threads {threads}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'model':12s} {'s/image':>8s} {'keypoints':>9s}   {'preset':18s} {'s/pair':>7s} {'inliers (median)':>16s}")
    pairs = list(itertools.combinations(range(len(images)), 2))
    for name in args.models:
        extractor = load_extractor(name)
        extractor.extract(images[0])  # warm-up (lazy initialisation)
        started = time.perf_counter()
        features = [extractor.extract(image).local for image in images]
        per_image = (time.perf_counter() - started) / len(images)
        if not MODELS[name]:  # a global descriptor only
            print(f"{name:12s} {per_image:8.3f} {'-':>9s}", flush=True)
            continue
        keypoints = sum(len(f) for f in features) / len(features)
        for preset in MODELS[name]:
            config = MatchingSettings.from_config(load_config(preset))
            count_inliers_many(features[1], [features[0]], config)  # warm-up (matcher load; not a timed pair)
            started = time.perf_counter()
            counts = [int(count_inliers_many(features[a], [features[b]], config)[0]) for a, b in pairs]
            per_pair = (time.perf_counter() - started) / len(pairs)
            median = sorted(counts)[len(counts) // 2]
            print(f"{name:12s} {per_image:8.3f} {keypoints:9.0f}   {preset:18s} {per_pair:7.3f} {median:16d}", flush=True)


if __name__ == "__main__":
    main()
