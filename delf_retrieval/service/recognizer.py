"""Recognise one photo with a saved index: ``Recognizer.load(INDEX).predict(photo)``.

A photo goes through the same steps as a query of the batch pipeline
(:func:`.pipeline.recognize_stores`), with the same functions: decode and cap its size
(:mod:`.images`), extract (the index's model), round the features to the index's dtype
as a feature store would, VLAD and other query steps from the index's derived data,
exact cosine top-k (:func:`.search.cosine_topk`), RANSAC on the ``NUM_TO_RERANK`` best
(:func:`.verify.count_inliers_many`), then score, vote and penalise
(:func:`.rerank.recognize_one`). So a photo gets the answer ``recognize`` gives it
(tested); only ``FREQUENT_LANDMARK_PENALTY``, a statistic over a whole query set, is
not applied to single photos.

The index is opened memory-mapped and only read, so one :class:`Recognizer` can serve
concurrent threads.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from delf_retrieval.config import Config, load_config
from delf_retrieval.features.containers import ImageFeatures, LocalFeatures, rescale_features
from delf_retrieval.features.images import (
    ImageDecodeError,
    ImageSource,
    check_min_side,
    decode_image,
    decode_image_scaled,
    downscale_to_max_size,
    kaggle_image_path,
)
from delf_retrieval.features.store import FeatureStore, StoreMismatchError
from delf_retrieval.matching.cascade import cascade_active
from delf_retrieval.matching.cascade import num_candidates as cascade_width
from delf_retrieval.models.base import Extractor
from delf_retrieval.models.loader import load_extractor
from delf_retrieval.scoring.candidates import recognize_candidates
from delf_retrieval.scoring.rerank import nonlandmark_similarity, rerank
from delf_retrieval.search import vlad as aggregation
from delf_retrieval.search.index import cosine_topk
from delf_retrieval.tasks.manifest import (
    IndexFormatError,
    IndexManifest,
    params_from_fingerprint,
    read_manifest,
)

ImageInput = np.ndarray | str | os.PathLike | bytes | bytearray | memoryview

# Query steps named in an index's manifest (``query_steps``), applied in order to turn
# one photo's (stored-dtype) features into its search vector. Each takes the vector so
# far (None before the first step for local-only models), the features, the step's
# manifest entry and the index's derived arrays by name.
QueryStep = Callable[[np.ndarray | None, ImageFeatures, Mapping[str, Any], Mapping[str, np.ndarray]], np.ndarray]


def _vlad_step(vector, features, step, derived):
    """VLAD of the local descriptors with the index's codebook (as ensure_global_descriptors)."""
    return aggregation.vlad(features.local.descriptors, derived[step["codebook"]])


QUERY_STEPS: dict[str, QueryStep] = {"vlad": _vlad_step}


class ServingStore(FeatureStore):
    """A feature store opened for serving: it checks once that it is consolidated.

    :meth:`FeatureStore.is_consolidated` lists the chunk files on every read (a store may
    grow while it is read); an index is not written while it is served, so after the
    first positive check the answer is kept. Reading one image's local features then
    costs no directory listing (about 5x faster here, more for stores of many chunks).
    """

    _consolidated = False

    def is_consolidated(self) -> bool:
        if not self._consolidated:
            self._consolidated = super().is_consolidated()
        return self._consolidated


@dataclass(frozen=True)
class Neighbour:
    """One train photo among a query's candidates.

    Attributes
    ----------
    image_id, landmark_id, name : train photo id, its landmark and the landmark's name.
    cosine : global cosine similarity to the query.
    inliers : RANSAC inliers with the query (None: not verified).
    score : candidate score (inlier term + cosine - non-landmark penalty), see
        :func:`.rerank.candidate_scores`.
    """

    image_id: str
    landmark_id: str | None
    name: str | None
    cosine: float
    inliers: int | None
    score: float


@dataclass
class Prediction:
    """The answer for one photo.

    Attributes
    ----------
    landmark_id, name : best landmark (None when no candidate has a label).
    confidence : its summed score (what a submission would write).
    is_landmark : ``confidence >= threshold`` (``Config.LANDMARK_THRESHOLD``).
    threshold : that threshold.
    neighbours : candidates in re-ranked order (best score first).
    timings : seconds per step (``decode``, ``extract``, ``search``, ``verify``, ``total``).
    image_size : ``(width, height)`` of the decoded photo, pixels.
    """

    landmark_id: str | None
    name: str | None
    confidence: float
    is_landmark: bool
    threshold: float
    neighbours: list[Neighbour]
    timings: dict[str, float]
    image_size: tuple[int, int]
    features: ImageFeatures | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (no features)."""
        return {
            "landmark_id": self.landmark_id,
            "name": self.name,
            "confidence": self.confidence,
            "is_landmark": self.is_landmark,
            "threshold": self.threshold,
            "neighbours": [vars(n).copy() for n in self.neighbours],
            "timings": dict(self.timings),
            "image_size": list(self.image_size),
        }


class Recognizer:
    """A loaded recognition index: model, train features, labels, derived data, config.

    Build one with :meth:`load`; then :meth:`predict` / :meth:`predict_many`.
    """

    def __init__(
        self,
        path: Path,
        manifest: IndexManifest,
        extractor: Extractor,
        train: FeatureStore,
        config: Config,
        labels: list[str | None],
        names: dict[str, str],
        derived: dict[str, np.ndarray],
        nonlandmark: np.ndarray | None,
        train_nonlandmark: np.ndarray | None,
        images: pd.DataFrame,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.extractor = extractor
        self.train = train
        self.config = config
        self.labels = labels
        self.names = names
        self.derived = derived
        self.nonlandmark = nonlandmark
        self.train_nonlandmark = train_nonlandmark
        self.images = images
        self.ids = train.ids
        self.vectors = derived[manifest.search_vectors] if manifest.search_vectors else train.global_descriptors()
        self.load_seconds = 0.0

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        index_dir: str | os.PathLike,
        *,
        model: str | os.PathLike | Extractor | None = None,
        config: Config | str | os.PathLike | None = None,
        **overrides: Any,
    ) -> Recognizer:
        """Open an index folder (memory-mapped).

        Parameters
        ----------
        index_dir : folder written by :func:`.index_dir.build_index`.
        model : the model, when it moved since the index was built (default: the
            index's spec). It must make the same features (checked).
        config : replaces the index's config (preset, file or Config).
        overrides : config fields to change, e.g. ``LANDMARK_THRESHOLD=1.5``.
        """
        started = time.perf_counter()
        path = Path(index_dir)
        manifest = read_manifest(path)
        unknown = [step["step"] for step in manifest.query_steps if step["step"] not in QUERY_STEPS]
        if unknown:
            raise IndexFormatError(f"{path}: query step(s) {unknown} unknown to this version (known: {sorted(QUERY_STEPS)})")
        extractor = _load_model(model if model is not None else manifest.model, manifest)
        try:
            train = ServingStore(path / "train", extractor.fingerprint(), dtype=manifest.dtype)
        except StoreMismatchError as error:
            raise IndexFormatError(f"the model {manifest.model!r} is not the one that built {path}: {error}") from None
        base = Config(**manifest.config) if config is None else load_config(config)
        config = base.replace(**overrides) if overrides else base
        derived = {name: np.load(path / entry["file"], mmap_mode="r") for name, entry in manifest.derived.items()}
        label_frame = pd.read_csv(path / "labels.csv", dtype=str, keep_default_na=False)
        train = train.subset(label_frame["id"].tolist())  # the photos the index lists, not all its store holds
        by_id = dict(zip(label_frame["id"].tolist(), label_frame["landmark_id"].tolist(), strict=True))
        labels = [by_id.get(image_id) or None for image_id in train.ids]
        landmark_frame = pd.read_csv(path / "landmarks.csv", dtype=str, keep_default_na=False)
        names = {
            k: v for k, v in zip(landmark_frame["landmark_id"].tolist(), landmark_frame["name"].tolist(), strict=True) if v
        }
        images = pd.read_csv(path / "images.csv", dtype=str, keep_default_na=False).set_index("id")
        nonlandmark = train_nl = None
        if manifest.train_nonlandmark and config.NONLANDMARK_PENALTY > 0:
            nonlandmark = np.asarray(FeatureStore(path / "nonlandmark").global_descriptors(), np.float32)
            train_nl = np.asarray(derived[manifest.train_nonlandmark], np.float32)
            built_top_k = manifest.derived[manifest.train_nonlandmark].get("top_k")
            if built_top_k != config.NONLANDMARK_TOP_K:  # built for another k: recompute
                train_nl = nonlandmark_similarity(train.global_descriptors(), nonlandmark, config.NONLANDMARK_TOP_K)
        recognizer = cls(path, manifest, extractor, train, config, labels, names, derived, nonlandmark, train_nl, images)
        if train.local_dim and recognizer.ids:  # map the local arrays now, not in the first request
            train.local_features(recognizer.ids[0])
        recognizer.load_seconds = time.perf_counter() - started
        return recognizer

    # ------------------------------------------------------------------ prediction
    def predict(self, image: ImageInput, *, verify: bool = True) -> Prediction:
        """Landmark of one photo: an RGB uint8 array ``[H, W, 3]``, a file path or encoded bytes.

        Raises :class:`.images.ImageDecodeError` for input that is not a readable image.
        """
        return self.predict_many([image], verify=verify)[0]

    def predict_many(self, images: Iterable[ImageInput], *, verify: bool = True, progress: bool = False) -> list[Prediction]:
        """:meth:`predict` of several photos; one search for all of them."""
        decoded = []
        for image in images:
            started = time.perf_counter()
            # Decoded reduced to the model's size cap as batch extraction decodes (bounded memory).
            params = self.extractor.params
            pixels, factor = decode_photo(image, params.max_image_size, exif_transpose=params.exif_transpose)
            decode_seconds = time.perf_counter() - started
            features, seconds = self.features(pixels, factor)
            shape = (round(pixels.shape[0] * factor), round(pixels.shape[1] * factor))  # original pixels
            decoded.append((shape, features, {"decode": decode_seconds, "extract": seconds}))
        if not decoded:
            return []
        started = time.perf_counter()
        vectors = np.stack([self.search_vector(features) for _, features, _ in decoded])
        num_candidates = cascade_width(self.config)
        similarities, rows = cosine_topk(vectors, self.vectors, num_candidates, block_size=self.config.SEARCH_BLOCK_SIZE)
        query_nl = None
        if self.nonlandmark is not None:
            query_nl = nonlandmark_similarity(vectors, self.nonlandmark, self.config.NONLANDMARK_TOP_K)
        search_seconds = (time.perf_counter() - started) / len(decoded)
        predictions = []
        for i, (shape, features, timings) in enumerate(tqdm(decoded, desc="verify", unit="photo", disable=not progress)):
            started = time.perf_counter()
            label, confidence, inliers = recognize_candidates(
                features.local,
                rows[i],
                similarities[i],
                self.train,
                self.labels,
                self.config,
                candidate_nonlandmark=self.train_nonlandmark,
                query_nonlandmark=None if query_nl is None else float(query_nl[i]),
                verify=verify,
            )
            timings["search"] = search_seconds
            timings["verify"] = time.perf_counter() - started
            timings["total"] = sum(timings.values())
            predictions.append(
                Prediction(
                    landmark_id=label,
                    name=self.names.get(label) if label is not None else None,
                    confidence=float(confidence),
                    is_landmark=label is not None and confidence >= self.config.LANDMARK_THRESHOLD,
                    threshold=self.config.LANDMARK_THRESHOLD,
                    neighbours=self._neighbours(rows[i], similarities[i], inliers),
                    timings=timings,
                    image_size=(int(shape[1]), int(shape[0])),
                    features=features,
                )
            )
        return predictions

    def features(self, image: np.ndarray, factor: float = 1.0) -> tuple[ImageFeatures, float]:
        """Features of an RGB photo as the index stores them, and the extraction seconds.

        As :func:`.extract.extract_decoded`: cap the size, apply the input rules
        (:func:`.images.check_min_side`), extract, map keypoints back to original pixels
        (``factor``: original size / ``image``'s size, for a photo decoded reduced); then
        descriptors and global vector are rounded to the index dtype.
        """
        started = time.perf_counter()
        max_size = self.extractor.params.max_image_size
        small, shrink = downscale_to_max_size(image, max_size)
        check_min_side(small, max_size, shrink)
        features = rescale_features(self.extractor.extract(small), factor * shrink)
        dtype = np.dtype(self.manifest.dtype)
        local = features.local
        if local is not None:
            local = LocalFeatures(
                keypoints=np.asarray(local.keypoints, np.float32),
                descriptors=np.asarray(local.descriptors, dtype),
                scores=np.asarray(local.scores, np.float32),
                scales=np.asarray(local.scales, np.float32),
            )
        vector = None if features.global_descriptor is None else np.asarray(features.global_descriptor, dtype)
        return ImageFeatures(local=local, global_descriptor=vector), time.perf_counter() - started

    def search_vector(self, features: ImageFeatures) -> np.ndarray:
        """The vector compared with the train vectors: the query steps, then the index dtype."""
        vector = features.global_descriptor
        for step in self.manifest.query_steps:
            vector = QUERY_STEPS[step["step"]](vector, features, step, self.derived)
        if vector is None:
            raise IndexFormatError(f"{self.path}: the model gives no global descriptor and the index names no query step")
        return np.asarray(vector, np.float32).astype(self.manifest.dtype)

    def _neighbours(self, rows: np.ndarray, cosine: np.ndarray, inliers: np.ndarray | None) -> list[Neighbour]:
        penalty = None if self.train_nonlandmark is None else self.train_nonlandmark[rows]
        order, scores = rerank(cosine.astype(np.float64), inliers, self.config, penalty)
        shown = np.zeros(len(rows), bool)  # candidates whose inlier count is reported
        if inliers is not None:
            shown[: min(self.config.NUM_TO_RERANK, len(rows))] = True
            if cascade_active(self.config):  # the cheap matcher chose them: report the matched
                shown = np.asarray(inliers) > 0
        result = []
        for position, score in zip(order, scores, strict=True):
            label = self.labels[rows[position]]
            result.append(
                Neighbour(
                    image_id=self.ids[rows[position]],
                    landmark_id=label,
                    name=self.names.get(label) if label else None,
                    cosine=float(cosine[position]),
                    inliers=int(inliers[position]) if shown[position] else None,
                    score=float(score),
                )
            )
        return result

    # ------------------------------------------------------------------ train photos
    def thumbnail_path(self, image_id: str) -> Path | None:
        """The index's thumbnail of a train photo, or None."""
        if image_id not in self.images.index or not self.manifest.thumbnail_size:
            return None
        folder = self.path / "thumbnails"
        path = kaggle_image_path(folder, image_id) if len(image_id) >= 3 else folder / f"{image_id}.jpg"
        return path if path.is_file() else None

    def train_photo(self, image_id: str) -> tuple[np.ndarray, float] | None:
        """A train photo for drawing and the factor from original pixels to its pixels.

        The source file when it still exists (factor 1), else the thumbnail; None if neither.
        """
        if image_id not in self.images.index:
            return None
        row = self.images.loc[image_id]
        source = Path(row["path"])
        if source.is_file():
            try:
                return as_rgb(source, exif_transpose=self.extractor.params.exif_transpose), 1.0
            except ImageDecodeError:
                pass
        thumbnail = self.thumbnail_path(image_id)
        if thumbnail is None or not row["width"]:
            return None
        picture = as_rgb(thumbnail)
        return picture, picture.shape[1] / float(row["width"])

    def info(self) -> dict[str, Any]:
        """What the index holds (for the health endpoint and logs)."""
        return {
            "index": str(self.path),
            "model": self.manifest.model,
            "family": self.extractor.family,
            "train_images": len(self.ids),
            "landmarks": self.manifest.counts.get("landmarks", 0),
            "nonlandmark_images": 0 if self.nonlandmark is None else int(self.nonlandmark.shape[0]),
            "load_seconds": round(self.load_seconds, 3),
            "landmark_threshold": self.config.LANDMARK_THRESHOLD,
        }

    def __repr__(self) -> str:
        return f"Recognizer({str(self.path)!r}, {len(self.ids)} train photos, model={self.manifest.model!r})"


def as_rgb(image: ImageInput, *, exif_transpose: bool = True) -> np.ndarray:
    """Decode any accepted photo input to RGB uint8 ``[H, W, 3]`` (ImageDecodeError if unreadable).

    ``exif_transpose`` applies the EXIF orientation of encoded input (the model's
    ``ExtractorParams.exif_transpose``, as the extraction runner decodes); arrays are
    taken as they are.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image), exif_transpose=exif_transpose)
    if isinstance(image, (str, os.PathLike)):
        source = ImageSource(id=Path(image).stem, path=str(image))
        return decode_image(source.read_bytes(), exif_transpose=exif_transpose)
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise ImageDecodeError(f"expected an RGB uint8 [H, W, 3] array, got {image.dtype} {image.shape}")
        return np.ascontiguousarray(image)
    raise ImageDecodeError(f"expected an image array, a path or bytes, got {type(image).__name__}")


def decode_photo(image: ImageInput, max_size: int | None, *, exif_transpose: bool = True) -> tuple[np.ndarray, float]:
    """A photo input as RGB uint8 and the factor original size / returned size.

    Encoded input (bytes, a path) is decoded as batch extraction decodes it
    (:func:`.images.decode_image_scaled`: reduced to ``max_size`` where the format allows,
    never more than :data:`.images.MAX_IMAGE_PIXELS` pixels); arrays are taken as they are.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image_scaled(bytes(image), max_size, exif_transpose=exif_transpose)
    if isinstance(image, (str, os.PathLike)):
        data = ImageSource(id=Path(image).stem, path=str(image)).read_bytes()
        return decode_image_scaled(data, max_size, exif_transpose=exif_transpose)
    return as_rgb(image, exif_transpose=exif_transpose), 1.0


def _load_model(model: str | os.PathLike | Extractor, manifest: IndexManifest) -> Extractor:
    if isinstance(model, Extractor):
        return model

    try:
        return load_extractor(model, params_from_fingerprint(manifest.fingerprint))
    except (ValueError, FileNotFoundError) as error:
        raise IndexFormatError(
            f"cannot load the index's model {str(model)!r} ({error}); if it moved, pass model=/--model"
        ) from None


__all__ = ["QUERY_STEPS", "Neighbour", "Prediction", "Recognizer", "as_rgb", "recognize_candidates"]
