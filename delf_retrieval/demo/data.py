"""A small labelled dataset in the Kaggle layout, made from photos that ship with scikit-image.

Each "landmark" is one bundled photo seen through several synthetic viewpoints (random
homography, rotation, scale, crop), lighting changes (gain, gamma, colour cast) and JPEG
compression. Unrelated bundled photos, seen the same way, are the non-landmark queries
and the non-landmark distractor set. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from delf_retrieval.features.images import kaggle_image_path, load_image

# Bundled scikit-image photos (no pooch download) used as landmarks / non-landmarks.
LANDMARK_PHOTOS = (
    "astronaut",
    "rocket",
    "chelsea",
    "coffee",
    "motorcycle_left",
    "camera",
    "coins",
    "hubble_deep_field",
)
NONLANDMARK_QUERY_PHOTOS = ("grass", "gravel", "brick", "moon", "text", "page")
NONLANDMARK_SET_PHOTOS = ("grass", "gravel", "brick", "moon", "text", "page", "cell", "clock_motion")


def bundled_photo(name: str) -> np.ndarray:
    """A photo bundled inside the scikit-image wheel as RGB uint8 ``[H, W, 3]``.

    ``name`` is a file stem in ``skimage/data`` (e.g. ``"astronaut"``); the file is read
    directly, so nothing is ever fetched from the network.
    """
    import skimage.data  # scikit-image's photo loader takes about a second to import: only for the demo

    folder = Path(skimage.data.__file__).parent
    matches = sorted(folder.glob(f"{name}.*"))
    if not matches:
        raise FileNotFoundError(f"scikit-image bundles no photo named {name!r} in {folder}")
    return load_image(matches[0])


def random_view(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int = 480,
    max_rotation: float = 30.0,
    perspective: float = 0.18,
    zoom: tuple[float, float] = (0.45, 0.9),
) -> np.ndarray:
    """One synthetic photo of ``image``: viewpoint, crop, lighting and colour changes.

    Returns RGB uint8 with longer side ``size`` pixels.
    """
    height, width = image.shape[:2]
    scale = size / max(height, width)
    out_w, out_h = round(width * scale), round(height * scale)
    corners = np.float32([[0, 0], [width, 0], [width, height], [0, height]])
    # Zoom into a random window, rotate it, and jitter its corners (perspective).
    zoom_factor = rng.uniform(*zoom)
    win_w, win_h = width * zoom_factor, height * zoom_factor
    left = rng.uniform(0, width - win_w)
    top = rng.uniform(0, height - win_h)
    centre = np.array([left + win_w / 2, top + win_h / 2])
    angle = np.deg2rad(rng.uniform(-max_rotation, max_rotation))
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    window = (corners / [width, height] - 0.5) * [win_w, win_h]
    window = window @ rotation.T + centre
    window += rng.uniform(-perspective, perspective, size=(4, 2)) * [win_w, win_h]
    target = np.float32([[0, 0], [out_w, 0], [out_w, out_h], [0, out_h]])
    homography = cv2.getPerspectiveTransform(window.astype(np.float32), target)
    view = cv2.warpPerspective(image, homography, (out_w, out_h), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)
    # Lighting: gain, gamma and a colour cast, then mild noise.
    view = view.astype(np.float32) / 255.0
    view = view ** rng.uniform(0.7, 1.4) * rng.uniform(0.75, 1.2) * rng.uniform(0.9, 1.1, size=3)
    view += rng.normal(0, 0.01, size=view.shape)
    return (np.clip(view, 0, 1) * 255 + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class DemoDataset:
    """Paths of a generated dataset (Kaggle layout)."""

    root: Path
    num_landmarks: int
    num_train: int
    num_queries: int
    num_nonlandmark_queries: int


def _hex_id(rng: np.random.Generator) -> str:
    return "".join(f"{value:02x}" for value in rng.integers(0, 256, size=8))


def _write_jpeg(path: Path, image: np.ndarray, quality: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    path.write_bytes(encoded.tobytes())


def build_demo_dataset(
    root: str | Path,
    *,
    seed: int = 0,
    train_views: int = 3,
    query_views: int = 2,
    landmarks: tuple[str, ...] = LANDMARK_PHOTOS,
    nonlandmark_queries: tuple[str, ...] = NONLANDMARK_QUERY_PHOTOS,
    nonlandmark_set: tuple[str, ...] = NONLANDMARK_SET_PHOTOS,
    image_size: int = 480,
) -> DemoDataset:
    """Write a recognition + retrieval dataset in the Kaggle GLDv2 layout under ``root``.

    Files: ``train.csv`` (id, landmark_id), ``train/a/b/c/<id>.jpg``, ``index.csv`` and
    ``index/`` (the same photos, for retrieval), ``sample_submission.csv`` and ``test/``
    (landmark and non-landmark queries), ``solution.csv`` (id, landmarks, Usage),
    ``retrieval_solution.csv`` (id, images, Usage), ``nonlandmark.csv`` and
    ``nonlandmark/`` (distractor set, disjoint from the queries' views).
    Deterministic for a given ``seed``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    train_rows, query_rows, retrieval_rows, nonlandmark_ids = [], [], [], []
    for landmark_index, name in enumerate(landmarks):
        photo = bundled_photo(name)
        landmark_id = str(1000 + landmark_index)
        train_ids = []
        for _ in range(train_views):
            image_id = _hex_id(rng)
            view = random_view(photo, rng, size=image_size)
            quality = int(rng.integers(70, 95))
            _write_jpeg(kaggle_image_path(root / "train", image_id), view, quality)
            _write_jpeg(kaggle_image_path(root / "index", image_id), view, quality)
            train_rows.append((image_id, landmark_id))
            train_ids.append(image_id)
        for _ in range(query_views):
            image_id = _hex_id(rng)
            _write_jpeg(kaggle_image_path(root / "test", image_id), random_view(photo, rng, size=image_size), 85)
            query_rows.append((image_id, landmark_id))
            retrieval_rows.append((image_id, " ".join(train_ids)))
    for name in nonlandmark_queries:
        image_id = _hex_id(rng)
        _write_jpeg(kaggle_image_path(root / "test", image_id), random_view(bundled_photo(name), rng, size=image_size), 85)
        query_rows.append((image_id, ""))
    for name in nonlandmark_set:
        image_id = _hex_id(rng)
        view = random_view(bundled_photo(name), rng, size=image_size)
        _write_jpeg(kaggle_image_path(root / "nonlandmark", image_id), view, 85)
        nonlandmark_ids.append(image_id)

    order = rng.permutation(len(query_rows))
    query_rows = [query_rows[i] for i in order]
    usage = ["Public" if i % 3 == 0 else "Private" for i in range(len(query_rows))]
    pd.DataFrame(train_rows, columns=["id", "landmark_id"]).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"id": [r[0] for r in train_rows]}).to_csv(root / "index.csv", index=False)
    pd.DataFrame({"id": [r[0] for r in query_rows], "landmarks": ""}).to_csv(
        root / "sample_submission.csv", index=False
    )
    pd.DataFrame(
        {"id": [r[0] for r in query_rows], "landmarks": [r[1] for r in query_rows], "Usage": usage}
    ).to_csv(root / "solution.csv", index=False)
    retrieval_usage = {query_id: u for (query_id, _), u in zip(query_rows, usage, strict=True)}
    pd.DataFrame(
        {
            "id": [r[0] for r in retrieval_rows],
            "images": [r[1] for r in retrieval_rows],
            "Usage": [retrieval_usage[r[0]] for r in retrieval_rows],
        }
    ).to_csv(root / "retrieval_solution.csv", index=False)
    pd.DataFrame({"id": nonlandmark_ids}).to_csv(root / "nonlandmark.csv", index=False)
    pd.DataFrame(
        {"landmark_id": [str(1000 + i) for i in range(len(landmarks))], "name": list(landmarks)}
    ).to_csv(root / "labels.csv", index=False)
    num_nonlandmark = len(nonlandmark_queries)
    return DemoDataset(
        root=root,
        num_landmarks=len(landmarks),
        num_train=len(train_rows),
        num_queries=len(query_rows),
        num_nonlandmark_queries=num_nonlandmark,
    )
