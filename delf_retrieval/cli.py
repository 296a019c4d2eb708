"""Command line: ``delf-retrieval extract | recognize | retrieve | evaluate | validate | demo``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="opencv-sift",
        help="model: 'opencv-sift' (no weights), a DELG/DELF SavedModel folder, or a TF-Hub "
        "handle cached in TFHUB_CACHE_DIR (default: opencv-sift)",
    )
    parser.add_argument("--max-image-size", type=int, default=None, help="cap the longer image side (pixels)")
    parser.add_argument("--max-features", type=int, default=None, help="max local features per image")
    parser.add_argument(
        "--scales", type=float, nargs="+", default=None, help="image scales for local features"
    )
    parser.add_argument("--score-threshold", type=float, default=None, help="min attention score")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float16", help="stored descriptors")
    parser.add_argument("--batch-size", type=int, default=64, help="images per atomic store chunk")
    parser.add_argument("--threads", type=int, default=2, help="image decoding threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_extractor(args: argparse.Namespace):
    """The extractor named by ``--model`` with the command line's parameter overrides."""
    from .models.loader import load_extractor

    extractor = load_extractor(args.model)
    changes = {}
    if args.max_image_size is not None:
        changes["max_image_size"] = args.max_image_size
    if args.max_features is not None:
        changes["max_feature_num"] = args.max_features
    if args.scales is not None:
        changes["image_scales"] = tuple(args.scales)
    if args.score_threshold is not None:
        changes["score_threshold"] = args.score_threshold
    if changes:
        extractor = load_extractor(args.model, dataclasses.replace(extractor.params, **changes))
    return extractor


def _cmd_extract(args: argparse.Namespace) -> int:
    from .extract import extract_to_store
    from .images import list_images
    from .store import FeatureStore

    sources = list_images(args.images if len(args.images) > 1 else args.images[0], args.image_root)
    if not sources:
        print(f"no images found in {' '.join(args.images)}", file=sys.stderr)
        return 2
    extractor = build_extractor(args)
    store = FeatureStore(args.out, extractor.fingerprint(), dtype=args.dtype)
    print(f"model: {extractor!r}\nstore: {store.path}")
    summary = extract_to_store(
        extractor,
        sources,
        store,
        batch_size=args.batch_size,
        decode_threads=args.threads,
        retry_failed=args.retry_failed,
        progress=not args.no_progress,
    )
    print(summary.report())
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="delf-retrieval",
        description="Landmark recognition and retrieval with DELF/DELG features and RANSAC re-ranking.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    extract = commands.add_parser("extract", help="extract features of an image set into a store")
    extract.add_argument(
        "--images",
        nargs="+",
        required=True,
        help="folder, Kaggle CSV (train.csv, index.csv, sample_submission.csv) or tar shard(s)",
    )
    extract.add_argument("--out", required=True, type=Path, help="feature store folder")
    extract.add_argument("--image-root", default=None, help="for a CSV: folder holding a/b/c/<id>.jpg")
    extract.add_argument("--retry-failed", action="store_true", help="retry images that failed before")
    _add_model_arguments(extract)
    extract.set_defaults(func=_cmd_extract)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
