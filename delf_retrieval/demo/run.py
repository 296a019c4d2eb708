"""``delf-retrieval demo``: recognition on a dataset built from bundled photos, no download."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from delf_retrieval.config import load_config
from delf_retrieval.demo.data import build_demo_dataset
from delf_retrieval.features.images import kaggle_image_path, load_image
from delf_retrieval.kaggle.metrics import evaluate_recognition
from delf_retrieval.matching.verify import MatchingSettings, match_and_verify
from delf_retrieval.tasks.recognition import recognize
from delf_retrieval.tasks.run import RunOutput
from delf_retrieval.viz import plot_matches


def run_demo(out_dir: str | Path = "demo_output", *, seed: int = 0, progress: bool = True) -> dict[str, float]:
    """Build the demo dataset, run recognition three ways, print GAP, draw a match.

    Writes ``out_dir/data`` (Kaggle layout), ``out_dir/submission.csv`` (verified,
    with non-landmark handling) and ``out_dir/matches.png``. Returns GAP (all queries)
    per variant: global similarity only, with RANSAC re-ranking, with non-landmark
    handling too.
    """
    out_dir = Path(out_dir)
    data_dir = out_dir / "data"
    if not (data_dir / "solution.csv").is_file():
        dataset = build_demo_dataset(data_dir, seed=seed)
        print(
            f"demo dataset: {dataset.num_landmarks} landmarks, {dataset.num_train} train photos, "
            f"{dataset.num_queries} queries ({dataset.num_nonlandmark_queries} without a landmark) in {data_dir}"
        )
    solution = data_dir / "solution.csv"
    work_dir = out_dir / "work"
    base = load_config("opencv-sift")
    runs = {
        "global only": dict(verify=False, config=base, output=None),
        "+ RANSAC re-ranking": dict(verify=True, config=base, output=None),
        "+ non-landmark handling": dict(
            verify=True, config=base.replace(NONLANDMARK_PENALTY=1.0), output=out_dir / "submission.csv"
        ),
    }
    scores: dict[str, float] = {}
    last: RunOutput | None = None
    for name, options in runs.items():
        print(f"\n== {name} ==")
        last = recognize(
            data_dir,
            "opencv-sift",
            options["config"],
            output=options["output"],
            work_dir=work_dir,
            verify=options["verify"],
            use_nonlandmark=options["config"].NONLANDMARK_PENALTY > 0,
            progress=progress,
            log=_quiet if scores else print,
        )
        scores[name] = evaluate_recognition(last.submission, solution)["All"]
    assert last is not None
    print("\nGAP on the demo queries (all):")
    for name, value in scores.items():
        print(f"  {name:<26} {value:.4f}")
    print(f"submission: {out_dir / 'submission.csv'}")
    picture = _draw_best_match(last, data_dir, out_dir / "matches.png")
    if picture is not None:
        print(f"match picture: {picture}")
    return scores


def _quiet(message: str) -> None:
    for line in message.splitlines():
        if line.startswith(("time:", "wrote", "submission problem")):
            print(line)


def _draw_best_match(output: RunOutput, data_dir: Path, path: Path) -> Path | None:
    """Draw the inlier matches of the query with the most inliers and its best candidate."""

    result = output.result
    if not result.inliers:
        return None
    query_id = max(result.inliers, key=lambda i: int(np.max(result.inliers[i])))
    best = int(np.argmax(result.inliers[query_id]))
    train_id = result.neighbours[query_id][best]
    query = output.stores["test"].local_features(query_id)
    train = output.stores["train"].local_features(train_id)
    settings = MatchingSettings.from_config(load_config("opencv-sift"))
    matches, inliers = match_and_verify(query.keypoints, query.descriptors, train.keypoints, train.descriptors, settings)
    figure = plot_matches(
        load_image(kaggle_image_path(data_dir / "test", query_id)),
        query.keypoints,
        load_image(kaggle_image_path(data_dir / "train", train_id)),
        train.keypoints,
        matches,
        inliers,
        title=f"query {query_id} vs train {train_id}",
        path=path,
    )
    import matplotlib.pyplot as plt  # pyplot picks a drawing backend when imported: only when drawing

    plt.close(figure)
    return path
