"""Global-only recognition and retrieval with an ImageNet EfficientNet-Lite (extra [cnn]).

Usage::

    python benchmarks/cnn_global_only.py DATA_DIR [--model efficientnet-lite0]
        [--scales 0.7071,1,1.4142] [--no-flip] [--image-size 512] [--gem-p 3]
        [--batch-size N] [--threads N]

DATA_DIR has the Kaggle GLDv2 layout: ``train.csv`` (``id,landmark_id``) with photos at
``train/a/b/c/<id>.jpg`` (a, b, c = the first three characters of the id), queries from
``sample_submission.csv`` under ``test/``, ``solution.csv`` (recognition truth), and for
retrieval ``index.csv`` with photos under ``index/`` and ``retrieval_solution.csv``.

Recognition: each query takes the landmark of its nearest train photo by cosine, with
that cosine as confidence -> global-only GAP. Retrieval: index photos ranked by cosine,
top 100 -> mAP@100. Also prints the extraction time in seconds per photo.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

# Everything used from delf_retrieval, in one place (the package layout is being
# restructured: these are the paths as of this writing).
from delf_retrieval.features.images import kaggle_image_path, load_image
from delf_retrieval.kaggle.metrics import evaluate_recognition, evaluate_retrieval
from delf_retrieval.models.cnn_global import CNN_MODEL_NAMES, installed_versions, load_cnn_extractor


def read_column(path: Path, column: str) -> list[str]:
    """One column of a CSV file, as text, in file order."""
    with open(path, newline="") as handle:
        return [row[column] for row in csv.DictReader(handle)]


def describe(extractor, folder: Path, ids: list[str], chunk: int = 16) -> tuple[np.ndarray, float]:
    """Descriptors ``[N, 1280]`` of the photos ``ids`` under ``folder``, and seconds spent."""
    vectors = []
    seconds = 0.0
    for start in range(0, len(ids), chunk):
        images = [load_image(kaggle_image_path(folder, image_id)) for image_id in ids[start : start + chunk]]
        began = time.perf_counter()
        vectors += [f.global_descriptor for f in extractor.extract_many(images)]
        seconds += time.perf_counter() - began
    return np.stack(vectors).astype(np.float32), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--model", default="efficientnet-lite0", choices=CNN_MODEL_NAMES)
    parser.add_argument("--scales", default=None, help="comma-separated, e.g. 1 or 0.7071,1,1.4142 (default: the extractor's)")
    parser.add_argument("--no-flip", action="store_true", help="no mirrored-image averaging")
    parser.add_argument("--image-size", type=int, default=None, help="longer side in pixels at scale 1")
    parser.add_argument("--gem-p", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (a shared machine: 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    options: dict = {}
    if args.scales:
        options["scales"] = tuple(float(s) for s in args.scales.split(","))
    if args.no_flip:
        options["flip"] = False
    if args.image_size:
        options["image_size"] = args.image_size
    if args.gem_p:
        options["gem_p"] = args.gem_p
    if args.batch_size:
        options["batch_size"] = args.batch_size
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    extractor = load_cnn_extractor(args.model, **options)
    data = args.data_dir

    train_ids = read_column(data / "train.csv", "id")
    train_labels = read_column(data / "train.csv", "landmark_id")
    query_ids = read_column(data / "sample_submission.csv", "id")
    train, train_s = describe(extractor, data / "train", train_ids)
    queries, query_s = describe(extractor, data / "test", query_ids)
    count, seconds = len(train_ids) + len(query_ids), train_s + query_s

    similarity = queries @ train.T
    best = similarity.argmax(axis=1)
    recognition = {q: (train_labels[b], float(similarity[i, b])) for i, (q, b) in enumerate(zip(query_ids, best, strict=True))}
    gap = evaluate_recognition(recognition, data / "solution.csv")

    results = {"data": str(data), "model": args.model, "options": extractor.options(), "gap": gap}
    if (data / "index.csv").is_file() and (data / "retrieval_solution.csv").is_file():
        index_ids = read_column(data / "index.csv", "id")
        if index_ids == train_ids and all(
            kaggle_image_path(data / "index", i).read_bytes() == kaggle_image_path(data / "train", i).read_bytes()
            for i in index_ids
        ):
            index = train  # the same photos: not extracted twice
        else:
            index, index_s = describe(extractor, data / "index", index_ids)
            count, seconds = count + len(index_ids), seconds + index_s
        ranked = np.argsort(-(queries @ index.T), axis=1, kind="stable")[:, :100]
        retrieval = {q: [index_ids[j] for j in row] for q, row in zip(query_ids, ranked, strict=True)}
        results["map@100"] = evaluate_retrieval(retrieval, data / "retrieval_solution.csv", k=100)
    results["seconds_per_image"] = seconds / count
    results["images"] = count
    results["device"] = extractor.device
    results["versions"] = installed_versions()

    print(f"{data.name}  {extractor!r}")
    print(f"  GAP (global only): {' '.join(f'{k} {v:.4f}' for k, v in gap.items())}")
    if "map@100" in results:
        print(f"  mAP@100:           {' '.join(f'{k} {v:.4f}' for k, v in results['map@100'].items())}")
    print(f"  seconds/image:     {results['seconds_per_image']:.3f} ({count} images, {extractor.device})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
