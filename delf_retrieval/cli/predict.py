"""``delf-retrieval predict INDEX photo.jpg [...] [--json] [--show out.png]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from delf_retrieval.config import Config, parse_override
from delf_retrieval.features.images import ImageDecodeError, load_image
from delf_retrieval.matching.device import resolve_device
from delf_retrieval.service.plot import draw_prediction
from delf_retrieval.service.recognizer import Prediction, Recognizer


def check_match_device(config: Config) -> None:
    """ValueError (exit 2) now, before any extraction, when ``MATCH_DEVICE="gpu"`` and no GPU is there."""
    if config.MATCH_DEVICE == "gpu":
        try:
            resolve_device("gpu")
        except RuntimeError as error:
            raise ValueError(str(error)) from None


def format_prediction(photo: str, prediction: Prediction, neighbours: int = 3) -> str:
    """Two lines for one photo: the answer, then the best neighbours."""
    answer = f"{prediction.name} (landmark {prediction.landmark_id})" if prediction.name else f"landmark {prediction.landmark_id}"
    best = ", ".join(
        f"{n.image_id} {n.name or n.landmark_id} cos {n.cosine:.3f}" + ("" if n.inliers is None else f" inl {n.inliers}")
        for n in prediction.neighbours[:neighbours]
    )
    below = "" if prediction.is_landmark else f" (below {prediction.threshold:g})"
    return (
        f"{photo}: {answer}: {prediction.verdict()}{below}, {prediction.timings['total'] * 1000:.0f} ms\n"
        f"  neighbours: {best}"
    )


def _show_path(show: Path, photo: Path, many: bool) -> Path:
    return show.with_name(f"{show.stem}-{photo.stem}{show.suffix or '.png'}") if many else show


def run_predict(args: argparse.Namespace) -> int:
    """Predict every photo. One that cannot be read or breaks the input rules (under 16 px a
    side, a non-JPEG over 40 MP) is reported on stderr (and in ``--json``) and the others
    are still answered; the exit code is then 2 (0 when every photo was answered)."""

    overrides = dict(parse_override(item) for item in args.set or ())
    recognizer = Recognizer.load(args.index_dir, model=args.model, **overrides)
    check_match_device(recognizer.config)
    results: list[dict] = []
    failed = 0
    for photo in args.photos:
        try:
            # The path, not pixels: the photo is decoded reduced as batch extraction decodes it.
            prediction = recognizer.predict(photo, verify=not args.no_verify)
        except ImageDecodeError as error:  # unreadable, or outside the input rules (too small, too large)
            failed += 1
            print(f"{photo}: error: {error}", file=sys.stderr)
            results.append({"photo": str(photo), "error": str(error)})
            continue
        results.append({"photo": str(photo), **prediction.to_dict()})
        if not args.json:
            print(format_prediction(str(photo), prediction))
        if args.show is not None:
            target = _show_path(args.show, photo, len(args.photos) > 1)
            draw_prediction(recognizer, prediction, load_image(photo), target)
            if not args.json:
                print(f"  picture: {target}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 2 if failed else 0
