"""Recognise one photo with a saved index: ``Recognizer.load(INDEX).predict(photo)``.

A photo goes through the code a query of the batch run goes through: the same decoding
and extraction (:func:`delf_retrieval.models.extract.decode_for_model` and
:func:`~delf_retrieval.models.extract.extract_decoded`: size cap, size rule, keypoints in
original pixels, the finite check), its features rounded to the index's dtype as the
store holds them, VLAD and whitening with the index's codebook and fit, and then the one
recognition engine (:func:`delf_retrieval.scoring.engine.recognize_queries`: search with
alpha-QE/DBA, verification, votes, non-landmark penalty, ``VERIFIED_FIRST``, classifier
modes). So a photo gets exactly the landmark and confidence ``recognize`` gives it
(``tests/test_one_engine.py``); only ``FREQUENT_LANDMARK_PENALTY``, a statistic over a
whole query set, is not applied to photos recognised one by one. With
``CONFIDENCE="probability"`` the confidence is the probability that the answer is right,
from the index's confidence model (``derived/confidence.json``, fitted when the index was
built; fitted again in memory when the config given at load changes the answers).

The index is opened memory-mapped and only read, so one :class:`Recognizer` can serve
concurrent threads.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from delf_retrieval.config import Config, load_config
from delf_retrieval.features.containers import ImageFeatures
from delf_retrieval.features.images import (
    ImageDecodeError,
    ImageRejectedError,
    ImageSource,
    decode_image,
    kaggle_image_path,
    original_size,
)
from delf_retrieval.features.store import FeatureStore, StoreMismatchError, as_stored
from delf_retrieval.matching.cascade import cascade_active
from delf_retrieval.models import loader
from delf_retrieval.models.base import Extractor
from delf_retrieval.models.extract import decode_for_model, extract_decoded
from delf_retrieval.scoring.calibration import ConfidenceModel
from delf_retrieval.scoring.classifier import (
    Classifier,
    image_class_probabilities,
    read_class_mapping,
)
from delf_retrieval.scoring.engine import (
    RecognitionIndex,
    RecognitionResult,
    RecognitionSettings,
    recognize_queries,
)
from delf_retrieval.scoring.leave_one_out import (
    ConfidenceSettings,
    NotEnoughAnswers,
    fit_confidence,
    fit_record,
)
from delf_retrieval.scoring.rerank import rerank
from delf_retrieval.search import vlad
from delf_retrieval.search.stores import SearchView
from delf_retrieval.search.vlad import searchable
from delf_retrieval.search.whitening import Whitening, ensure_whitening, whiten_stores
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
    return vlad.vlad(features.local.descriptors, derived[step["codebook"]])


QUERY_STEPS: dict[str, QueryStep] = {"vlad": _vlad_step}


class ServingStore(FeatureStore):
    """A feature store opened for serving: pinned to the generation it was opened at
    (:meth:`FeatureStore.pin`), so a rebuild of the index folder while it is served never
    mixes old labels and vectors with new features; it checks once that it is consolidated.

    :meth:`FeatureStore.is_consolidated` lists the chunk files on every read (a store may
    grow while it is read); after the first positive check the answer is kept. Reading one
    image's local features then costs no directory listing (about 5x faster here, more for
    stores of many chunks).
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
    confidence : what a submission would write: the probability that the answer is right
        when there is one (``CONFIDENCE="probability"``), else the engine's score.
    is_landmark : ``confidence >= threshold`` (``Config.LANDMARK_THRESHOLD``).
    threshold : that threshold.
    score : the engine's score of the answer (the confidence under ``CONFIDENCE="score"``).
    probability : the probability that the answer is right (None: no confidence model,
        or its features do not exist here, e.g. ``verify=False`` with a model fitted on
        inliers).
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
    score: float = 0.0
    probability: float | None = None
    features: ImageFeatures | None = field(default=None, repr=False, compare=False)

    def verdict(self) -> str:
        """``"landmark, 87%"`` / ``"not a landmark, 12%"`` (the probability), or with the
        score when there is no probability (``"landmark, score 4.565"``)."""
        verdict = "landmark" if self.is_landmark else "not a landmark"
        if self.probability is not None:
            return f"{verdict}, {percent(self.probability)}"
        return f"{verdict}, score {self.score:.3f}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (no features)."""
        return {
            "landmark_id": self.landmark_id,
            "name": self.name,
            "confidence": self.confidence,
            "is_landmark": self.is_landmark,
            "threshold": self.threshold,
            "score": self.score,
            "probability": self.probability,
            "verdict": self.verdict(),
            "neighbours": [vars(n).copy() for n in self.neighbours],
            "timings": dict(self.timings),
            "image_size": list(self.image_size),
        }


class Recognizer:
    """A loaded recognition index: model, train features, labels, derived data, config.

    Build one with :meth:`load`; then :meth:`predict` / :meth:`predict_many`. ``config`` is
    the user's :class:`~delf_retrieval.config.Config`, ``settings`` the engine's
    :class:`~delf_retrieval.scoring.engine.RecognitionSettings` read from it.
    """

    def __init__(
        self,
        path: Path,
        manifest: IndexManifest,
        extractor: Extractor,
        train: FeatureStore,
        config: Config,
        settings: RecognitionSettings,
        index: RecognitionIndex,
        names: dict[str, str],
        derived: dict[str, np.ndarray],
        images: pd.DataFrame,
        *,
        whitening: Whitening | None = None,
        classifiers: Sequence[Classifier] = (),
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.extractor = extractor
        self.train = train
        self.config = config
        self.settings = settings
        self.index = index
        self.labels = index.labels
        self.names = names
        self.derived = derived
        self.images = images
        self.whitening = whitening
        self.classifiers = list(classifiers)
        self.ids = train.ids
        self.nonlandmark = index.nonlandmark
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
        index_dir : folder written by :func:`delf_retrieval.tasks.build_index.build_index`.
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
            train = ServingStore(path / "train", extractor.fingerprint(), dtype=manifest.dtype).pin()
        except StoreMismatchError as error:
            raise IndexFormatError(f"the model {manifest.model!r} is not the one that built {path}: {error}") from None
        base = Config(**manifest.config) if config is None else load_config(config)
        config = base.replace(**overrides) if overrides else base
        derived = _derived_arrays(path, manifest)
        label_frame = pd.read_csv(path / "labels.csv", dtype=str, keep_default_na=False)
        train = train.subset(label_frame["id"].tolist())  # the photos the index lists, not all its store holds
        _check_index_rows(path, manifest, train, label_frame, derived)
        by_id = dict(zip(label_frame["id"].tolist(), label_frame["landmark_id"].tolist(), strict=True))
        labels = [by_id.get(image_id) or None for image_id in train.ids]
        landmark_frame = pd.read_csv(path / "landmarks.csv", dtype=str, keep_default_na=False)
        names = {
            k: v for k, v in zip(landmark_frame["landmark_id"].tolist(), landmark_frame["name"].tolist(), strict=True) if v
        }
        images = pd.read_csv(path / "images.csv", dtype=str, keep_default_na=False).set_index("id")
        stores: dict[str, Any] = {"train": train}
        # The distractor set, for the penalty and (then, as when the index was built) to fit
        # the confidence model; with the penalty off the model is fitted without it, as a
        # batch run with use_nonlandmark=False fits it.
        if manifest.counts.get("nonlandmark") and config.NONLANDMARK_PENALTY > 0:
            stores["nonlandmark"] = FeatureStore(path / "nonlandmark").pin()
        stores = {split: searchable(store) for split, store in stores.items()}  # VLAD of local-only models
        # The searched space, made as the batch run makes it (cached in the index's stores).
        whitening = None
        if config.WHITENING_DIM:
            whitening = ensure_whitening(stores["train"], config.WHITENING_DIM, log=_quiet)
            searched = whiten_stores(stores, whitening)
        else:
            searched = dict(stores)
            if manifest.search_vectors:  # the same values as float32: no conversion per search
                searched["train"] = SearchView(train, derived[manifest.search_vectors])
        database_nonlandmark = None
        if "nonlandmark" in searched and manifest.train_nonlandmark:
            entry = manifest.derived[manifest.train_nonlandmark]
            space = whitening.digest() if whitening is not None else "raw"
            if entry.get("top_k") == config.NONLANDMARK_TOP_K and entry.get("space", "raw") == space:
                database_nonlandmark = derived[manifest.train_nonlandmark]
        settings = RecognitionSettings.from_config(config)
        index = RecognitionIndex(
            searched["train"],
            labels,
            settings,
            nonlandmark=searched["nonlandmark"].global_descriptors() if "nonlandmark" in searched else None,
            database_nonlandmark=database_nonlandmark,
        )
        if config.CONFIDENCE == "probability":
            fit = ConfidenceSettings.from_config(config)
            index.confidence = _confidence_model(path, manifest, index, settings, fit, searched.get("nonlandmark"))
        classifiers = _load_classifiers(path, manifest, extractor) if config.CLASSIFIER_MODE != "off" else []
        recognizer = cls(
            path, manifest, extractor, train, config, settings, index, names, derived, images,
            whitening=whitening, classifiers=classifiers,
        )
        if train.local_dim and recognizer.ids:  # map the local arrays now, not in the first request
            train.local_features(recognizer.ids[0])
        recognizer.load_seconds = time.perf_counter() - started
        return recognizer

    # ------------------------------------------------------------------ prediction
    def predict(self, image: ImageInput, *, verify: bool = True) -> Prediction:
        """Landmark of one photo: an RGB uint8 array ``[H, W, 3]``, a file path or encoded bytes.

        Raises :class:`.images.ImageDecodeError` for input that is not a usable image.
        """
        return self.predict_many([image], verify=verify)[0]

    def predict_many(self, images: Iterable[ImageInput], *, verify: bool = True, progress: bool = False) -> list[Prediction]:
        """:meth:`predict` of several photos: one engine call for all of them."""
        photos = []
        for number, image in enumerate(images):
            started = time.perf_counter()
            data = photo_input(image)
            decode_seconds = time.perf_counter() - started
            features, shape, seconds = self.features_of(data, name=_photo_name(image, number))
            probabilities = None
            if self.config.CLASSIFIER_MODE != "off":
                probabilities = image_class_probabilities(self.classifiers, data, _photo_name(image, number))
            timings = {"decode": decode_seconds, "extract": seconds}
            photos.append((shape, features, probabilities, timings))
        if not photos:
            return []
        vectors = np.stack([self.search_vector(features) for _, features, _, _ in photos])
        result = recognize_queries(
            [str(i) for i in range(len(photos))],
            vectors,
            lambda row: photos[row][1].local,
            self.index,
            self.settings,
            verify=verify,
            class_probabilities=None if photos[0][2] is None else [p[2] for p in photos],
            whole_query_set=False,
            progress=progress,
        )
        per_photo = {step: result.seconds.get(step, 0.0) / len(photos) for step in ("search", "verify")}
        predictions = []
        for i, (shape, features, _, timings) in enumerate(photos):
            label, confidence = result.predictions[str(i)]
            probability = result.probabilities.get(str(i))
            timings.update(per_photo)
            timings["total"] = sum(timings.values())
            predictions.append(
                Prediction(
                    landmark_id=label,
                    name=self.names.get(label) if label is not None else None,
                    confidence=float(confidence),
                    is_landmark=label is not None and confidence >= self.config.LANDMARK_THRESHOLD,
                    threshold=self.config.LANDMARK_THRESHOLD,
                    neighbours=self._neighbours(result, str(i)),
                    timings=timings,
                    image_size=(int(shape[1]), int(shape[0])),
                    score=float(result.scores.get(str(i), confidence)),
                    probability=probability,
                    features=features,
                )
            )
        return predictions

    def features(self, image: np.ndarray | bytes) -> tuple[ImageFeatures, float]:
        """Features of a photo as the index stores them, and the extraction seconds."""
        features, _, seconds = self.features_of(photo_input(image))
        return features, seconds

    def features_of(self, data: bytes | np.ndarray, name: str = "photo") -> tuple[ImageFeatures, tuple[int, int], float]:
        """Features of one photo (encoded bytes or RGB uint8 array) as the index's store
        would hold them, the decoded photo's ``(height, width)`` in original pixels, and
        the seconds taken.

        The batch extraction's own steps (:func:`~delf_retrieval.models.extract.decode_for_model`,
        :func:`~delf_retrieval.models.extract.extract_decoded`), then the store's rounding
        (:func:`~delf_retrieval.features.store.as_stored`). Raises
        :class:`~delf_retrieval.features.images.ImageDecodeError` with the reason when
        the photo cannot be used.
        """
        started = time.perf_counter()
        params = self.extractor.params
        decoded = decode_for_model(data, ImageSource(id=name, path=name), params.max_image_size, params.exif_transpose)
        if decoded.error is not None:
            raise (ImageRejectedError if decoded.rejected else ImageDecodeError)(decoded.error)
        if isinstance(data, np.ndarray):
            shape = data.shape[:2]
        else:
            height, width = decoded.image.shape[:2]
            shape = original_size(data, params.exif_transpose) or (round(height * decoded.factor), round(width * decoded.factor))
        features, problem = extract_decoded(self.extractor, decoded)
        if features is None:
            raise ImageDecodeError(problem)
        stored = as_stored(features, self.manifest.dtype)
        return stored, shape, time.perf_counter() - started

    def search_vector(self, features: ImageFeatures) -> np.ndarray:
        """The vector compared with the train vectors: the index's query steps (VLAD), in
        the index dtype, then whitened when the config whitens (as the batch run does)."""
        vector = features.global_descriptor
        for step in self.manifest.query_steps:
            vector = QUERY_STEPS[step["step"]](vector, features, step, self.derived)
        if vector is None:
            raise IndexFormatError(f"{self.path}: the model gives no global descriptor and the index names no query step")
        vector = np.asarray(vector, np.float32).astype(self.manifest.dtype)
        if self.whitening is not None:
            vector = self.whitening.apply(vector[None]).astype(self.manifest.dtype)[0]
        return vector

    def _neighbours(self, result: RecognitionResult, query: str) -> list[Neighbour]:
        rows, cosine = result.rows[query], np.asarray(result.similarities[query], np.float64)
        inliers = result.inliers.get(query)
        penalty = None if self.index.database_nonlandmark is None else self.index.database_nonlandmark[rows]
        order, scores = rerank(cosine, inliers, self.settings.scoring, penalty)
        shown = np.zeros(len(rows), bool)  # candidates whose inlier count is reported
        if inliers is not None:
            verification = self.settings.verification
            shown[: min(verification.num_to_rerank, len(rows))] = True
            if cascade_active(verification):  # the cheap matcher chose them: report the matched
                shown = np.asarray(inliers) > 0
        neighbours = []
        for position, score in zip(order, scores, strict=True):
            label = self.labels[rows[position]]
            neighbours.append(
                Neighbour(
                    image_id=self.ids[rows[position]],
                    landmark_id=label,
                    name=self.names.get(label) if label else None,
                    cosine=float(cosine[position]),
                    inliers=int(inliers[position]) if shown[position] else None,
                    score=float(score),
                )
            )
        return neighbours

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
            "confidence": "probability" if self.index.confidence is not None else "score",
        }

    def __repr__(self) -> str:
        return f"Recognizer({str(self.path)!r}, {len(self.ids)} train photos, model={self.manifest.model!r})"


def photo_input(image: ImageInput) -> bytes | np.ndarray:
    """Encoded bytes (read from a path) or an RGB uint8 array ``[H, W, 3]`` (grey
    ``[H, W]`` repeated), ready for :func:`~delf_retrieval.models.extract.decode_for_model`;
    :class:`ImageDecodeError` for anything else."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return ImageSource(id=Path(image).stem, path=str(image)).read_bytes()
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise ImageDecodeError(f"expected an RGB uint8 [H, W, 3] array, got {image.dtype} {image.shape}")
        return np.ascontiguousarray(image)
    raise ImageDecodeError(f"expected an image array, a path or bytes, got {type(image).__name__}")


def as_rgb(image: ImageInput, *, exif_transpose: bool = True) -> np.ndarray:
    """Decode any accepted photo input to RGB uint8 ``[H, W, 3]`` at full size, for drawing
    (ImageDecodeError if unreadable); arrays are taken as they are."""
    data = photo_input(image)
    return data if isinstance(data, np.ndarray) else decode_image(data, exif_transpose=exif_transpose)


def _derived_arrays(path: Path, manifest: IndexManifest) -> dict[str, np.ndarray]:
    """The manifest's derived arrays, memory-mapped, each checked against the shape and
    dtype the manifest records (:class:`IndexFormatError` naming the file otherwise)."""
    arrays = {}
    for name, entry in manifest.derived.items():
        file = path / entry["file"]
        try:
            array = np.load(file, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise IndexFormatError(f"{file}: cannot be read ({error}); rebuild the index") from None
        shape, dtype = entry.get("shape"), entry.get("dtype")
        if (shape is not None and list(array.shape) != list(shape)) or (dtype is not None and str(array.dtype) != dtype):
            raise IndexFormatError(
                f"{file}: {array.dtype} {list(array.shape)} where the manifest says {dtype} {shape}: "
                "the index is damaged; rebuild it"
            )
        arrays[name] = array
    return arrays


def _check_index_rows(
    path: Path, manifest: IndexManifest, train: Any, labels: pd.DataFrame, derived: dict[str, np.ndarray]
) -> None:
    """The index's parts describe the same photos: every train photo of the store has its
    row in ``labels.csv`` and the manifest's count, and the per-photo derived arrays have
    one row per train photo (IndexFormatError naming the file otherwise)."""
    count = len(train.ids)
    if len(labels) != count or manifest.counts.get("train", count) != count:
        raise IndexFormatError(
            f"{path / 'labels.csv'} lists {len(labels)} photos, the train store holds {count} of them and "
            f"{path / 'index.json'} says {manifest.counts.get('train')}: the index is damaged; rebuild it"
        )
    for name in (manifest.search_vectors, manifest.train_nonlandmark):
        if name and derived[name].shape[0] != count:
            raise IndexFormatError(
                f"{path / manifest.derived[name]['file']} has {derived[name].shape[0]} rows for {count} train "
                "photos: the index is damaged; rebuild it"
            )


def percent(probability: float) -> str:
    """A probability as a person reads it: ``"87%"``; ``"<1%"`` and ``">99%"`` at the ends."""
    if probability < 0.005:
        return "<1%"
    if probability > 0.995:
        return ">99%"
    return f"{probability * 100:.0f}%"


def _confidence_model(
    path: Path,
    manifest: IndexManifest,
    index: RecognitionIndex,
    settings: RecognitionSettings,
    fit: ConfidenceSettings,
    distractors: Any | None,
) -> ConfidenceModel | None:
    """The index's confidence model when it was fitted for these answers (its record
    equals :func:`.leave_one_out.fit_record` of this config), else one fitted now in
    memory (the index is only read); None when there is nothing to fit on."""
    distractors = distractors if distractors is not None and len(distractors.ids) else None
    if manifest.confidence:
        try:
            saved = ConfidenceModel.from_dict(json.loads((path / manifest.confidence).read_text()))
        except (OSError, ValueError, KeyError) as error:
            raise IndexFormatError(f"{path}: the confidence model {manifest.confidence} is damaged ({error}); rebuild the index") from None
        record = fit_record(index, fit, distractors)
        if all(saved.fitted_on.get(key) == value for key, value in record.items()):
            return saved
    try:
        return fit_confidence(index, settings, fit, distractors)
    except NotEnoughAnswers:
        return None


def _photo_name(image: ImageInput, number: int) -> str:
    return str(image) if isinstance(image, (str, os.PathLike)) else f"photo {number + 1}"


def _quiet(message: str) -> None:
    """A log that drops messages (loading an index says nothing)."""


def _load_classifiers(path: Path, manifest: IndexManifest, extractor: Extractor) -> list[Classifier]:
    """The index's classifiers (``manifest.classifiers``): the model's own softmax head
    (``model`` empty) or another model, each with its class mapping CSV in the index."""
    if not manifest.classifiers:
        raise IndexFormatError(
            f"{path} holds no classifier, so CLASSIFIER_MODE cannot be "
            f"{manifest.config.get('CLASSIFIER_MODE', 'off')!r} here; build the index with --classes or --classifier"
        )
    found = []
    for entry in manifest.classifiers:
        landmarks = read_class_mapping(path / entry["classes"])
        if entry.get("model"):
            found.append(Classifier(loader.load_extractor(entry["model"]), landmarks))
        else:
            found.append(Classifier(getattr(extractor, "global_extractor", extractor), landmarks))
    return found


def _load_model(model: str | os.PathLike | Extractor, manifest: IndexManifest) -> Extractor:
    if isinstance(model, Extractor):
        return model
    try:
        return loader.load_extractor(model, params_from_fingerprint(manifest.fingerprint))
    except (ValueError, FileNotFoundError) as error:
        raise IndexFormatError(
            f"cannot load the index's model {str(model)!r} ({error}); if it moved, pass model=/--model"
        ) from None


__all__ = ["QUERY_STEPS", "Neighbour", "Prediction", "Recognizer", "as_rgb", "percent", "photo_input"]
