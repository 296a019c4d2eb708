"""Global stage x verifier: GAP, mAP@100 and seconds per query of each pipeline, side by side.

Every pipeline runs in this one process, one after another, on the same dev sets, so the
times compare with each other (state the CPU and the load). For each set and pipeline:
``recognize`` (GAP against ``solution.csv``, All) and ``retrieve`` (mAP@100 against
``retrieval_solution.csv``, All) through the library, features cached per set in
``--work-dir`` (a pipeline that shares a model with an earlier one reuses its stores).
Seconds per query: the model's extraction time per image (measured when the stores are
first extracted, so run with an empty work dir) plus the recognition engine's search and
verification time per query.

Usage::

    python benchmarks/two_stage.py ../shared/data/gldv2-mini-dev ../shared/data/paris-dev \\
        --work-dir /tmp/two_stage --pipelines vlad-sift lite0 lite0+sift
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

try:
    import delf_retrieval  # noqa: F401
except ImportError:  # run from a checkout without installing
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import delf_retrieval
from delf_retrieval.config import load_config, parse_override
from delf_retrieval.kaggle.metrics import evaluate_recognition, evaluate_retrieval

# name -> (model spec, config preset, config overrides)
PIPELINES = {
    "vlad-sift": ("opencv-sift", "opencv-sift", {}),
    "lite0": ("efficientnet-lite0", "cnn-global", {}),
    "lite2": ("efficientnet-lite2", "cnn-global", {}),
    "lite0-top3": ("efficientnet-lite0", "kaggle2020", {}),
    "lite2-top3": ("efficientnet-lite2", "kaggle2020", {}),
    "lite0+sift": ("efficientnet-lite0+opencv-sift", "cnn-sift", {}),
    "lite2+sift": ("efficientnet-lite2+opencv-sift", "cnn-sift", {}),
    "lite0+sift-top3": ("efficientnet-lite0+opencv-sift", "opencv-sift", {}),
    "lite2+sift-top3": ("efficientnet-lite2+opencv-sift", "opencv-sift", {}),
    "lite2+sift-r5": ("efficientnet-lite2+opencv-sift", "cnn-sift", {"NUM_TO_RERANK": 5}),
    "lite2+sift-r3": ("efficientnet-lite2+opencv-sift", "cnn-sift", {"NUM_TO_RERANK": 3}),
    "lite2+xfeat": ("efficientnet-lite2+xfeat", "cnn-xfeat", {}),
    "xfeat-lg": ("xfeat", "xfeat-lighterglue", {}),
    "aliked-lg": ("aliked", "aliked-lightglue", {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, nargs="+", help="Kaggle-layout dev sets")
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--pipelines", nargs="+", default=["vlad-sift", "lite0", "lite2", "lite0+sift", "lite2+sift"])
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="config override for every pipeline")
    parser.add_argument("--no-retrieval", action="store_true")
    args = parser.parse_args()
    extra = dict(parse_override(item) for item in args.set)
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print(f"{'set':16s} {'pipeline':16s} {'GAP':>6s} {'mAP@100':>8s} {'extract s/img':>13s} {'engine s/q':>10s} {'s/query':>8s}")
    for data in args.data:
        per_image_of: dict[str, float] = {}  # model spec -> extraction seconds per image
        for name in args.pipelines:
            spec, preset, overrides = PIPELINES[name]
            config = load_config(preset, **overrides, **extra)
            work = args.work_dir / data.name
            use_nonlandmark = config.NONLANDMARK_PENALTY > 0 and (data / "nonlandmark.csv").is_file()
            run = delf_retrieval.recognize(
                data, spec, config, output=None, work_dir=work, use_nonlandmark=use_nonlandmark,
                progress=False, log=lambda _: None,
            )
            gap = evaluate_recognition(run.submission, data / "solution.csv")["All"]
            extracted = [s for s in run.extraction.values() if s.extracted]
            if extracted:
                per_image_of[spec] = sum(s.seconds for s in extracted) / sum(s.extracted for s in extracted)
            per_image = per_image_of.get(spec, float("nan"))
            queries = len(run.submission)
            engine = (run.result.seconds.get("search", 0.0) + run.result.seconds.get("verify", 0.0)) / queries
            mean_ap = float("nan")
            if not args.no_retrieval and (data / "retrieval_solution.csv").is_file():
                retrieved = delf_retrieval.retrieve(
                    data, spec, config, output=None, work_dir=work, progress=False, log=lambda _: None
                )
                mean_ap = evaluate_retrieval(retrieved.submission, data / "retrieval_solution.csv")["All"]
            print(
                f"{data.name:16s} {name:16s} {gap:6.3f} {mean_ap:8.3f} {per_image:13.2f} {engine:10.3f} "
                f"{per_image + engine:8.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
