"""Picture of one prediction: the photo, its best neighbours, and the inlier lines to the best match."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from delf_retrieval.features.containers import to_original_pixels
from delf_retrieval.matching.verify import match_and_verify
from delf_retrieval.service.recognizer import Prediction, Recognizer
from delf_retrieval.viz import figure_to_rgb, plot_matches, plot_neighbours


def draw_prediction(
    recognizer: Recognizer,
    prediction: Prediction,
    image: np.ndarray,
    path: str | os.PathLike | None = None,
    *,
    neighbours: int = 5,
) -> np.ndarray:
    """Two bands stacked: the query and its ``neighbours`` best candidates
    (:func:`.viz.plot_neighbours`, green frames for the predicted landmark), and the
    matches to the neighbour with the most inliers (:func:`.viz.plot_matches`; inliers
    green) when the prediction was verified.

    Parameters
    ----------
    image : uint8 [H, W, 3], the photo that was predicted (keypoints are in its pixels).
    path : where to write the PNG (optional).

    Returns
    -------
    uint8 [H', W', 3] the picture.
    """
    shown = prediction.neighbours[:neighbours]
    photos = [recognizer.train_photo(n.image_id) for n in shown]
    titles = [
        f"{n.name or n.landmark_id or n.image_id}\ncos {n.cosine:.2f}"
        + ("" if n.inliers is None else f" inl {n.inliers}")
        for n in shown
    ]
    query_title = f"query: {prediction.name or prediction.landmark_id}\n{prediction.verdict()}"
    import matplotlib.pyplot as plt  # pyplot picks a drawing backend when imported: only when drawing

    figure = plot_neighbours(
        image,
        [None if p is None else p[0] for p in photos],
        titles,
        query_title=query_title,
        correct=[n.landmark_id == prediction.landmark_id for n in shown],
        panel_size=2.6,
    )
    bands = [figure_to_rgb(figure)]
    plt.close(figure)
    verified = [(i, n) for i, n in enumerate(shown) if n.inliers]
    local = None if prediction.features is None else prediction.features.local
    if verified and local is not None and recognizer.train.local_dim:
        best, neighbour = max(verified, key=lambda item: item[1].inliers)
        photo = photos[best]
        if photo is not None:
            train = recognizer.train.local_features(neighbour.image_id)
            matches, inliers = match_and_verify(
                local.keypoints,
                local.descriptors,
                train.keypoints,
                train.descriptors,
                recognizer.settings.verification.matching,
            )
            picture, factor = photo
            figure = plot_matches(
                image,
                local.keypoints,
                picture,
                to_original_pixels(train.keypoints, factor, always=True),  # original -> picture pixels
                matches,
                inliers,
                title=f"query vs {neighbour.image_id} ({neighbour.name or neighbour.landmark_id})",
                width=bands[0].shape[1] / 100,
            )
            bands.append(figure_to_rgb(figure))
            plt.close(figure)
    picture = _stack(bands)
    if path is not None:

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(path)
    return picture


def _stack(bands: list[np.ndarray]) -> np.ndarray:
    """Bands one below the other, padded with white to the widest."""
    width = max(band.shape[1] for band in bands)
    padded = [np.pad(b, ((0, 0), (0, width - b.shape[1]), (0, 0)), constant_values=255) for b in bands]
    return np.concatenate(padded, axis=0)
