"""Image input: robust decoding to RGB uint8, Kaggle layout helpers, tar shards.

Every decoder path ends in an RGB uint8 array ``[H, W, 3]`` with EXIF orientation applied.
Anything that cannot be decoded raises :class:`ImageDecodeError` whose message is the
reason recorded in a run's failure list.
"""

from __future__ import annotations

import io
import os
import tarfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm")

# Kaggle CSVs and the image folders they describe.
CSV_IMAGE_FOLDERS = {
    "train.csv": "train",
    "index.csv": "index",
    "test.csv": "test",
    "sample_submission.csv": "test",
    "nonlandmark.csv": "nonlandmark",
}

# A truncated JPEG must fail loudly, not decode half grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(ValueError):
    """An image that cannot be read; ``str(error)`` is the reason recorded for it."""


@dataclass(frozen=True)
class ImageSource:
    """Where one image's bytes live.

    Attributes
    ----------
    id : str
        Image id (file stem in Kaggle layouts).
    path : str
        File path, or the tar shard holding the image.
    offset, size : int
        Byte range inside the tar shard (``offset = -1`` for a plain file).
    """

    id: str
    path: str
    offset: int = -1
    size: int = -1

    def read_bytes(self) -> bytes:
        """Raw encoded bytes; raises ImageDecodeError if the file is missing."""
        try:
            if self.offset < 0:
                return Path(self.path).read_bytes()
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                return handle.read(self.size)
        except FileNotFoundError as error:
            raise ImageDecodeError(f"missing file: {self.path}") from error
        except IsADirectoryError as error:
            raise ImageDecodeError(f"not a file: {self.path}") from error
        except OSError as error:
            raise ImageDecodeError(f"unreadable file: {error}") from error


def decode_image(data: bytes, *, exif_transpose: bool = True) -> np.ndarray:
    """Decode encoded image bytes to RGB uint8 ``[H, W, 3]``.

    Handles grayscale, palette, RGBA/LA (composited on white), CMYK, 16-bit and float
    images, and EXIF orientation (applied when ``exif_transpose``; the reference DELG
    pipelines and the Kaggle baseline do not apply it). Raises ImageDecodeError for
    empty, truncated, corrupt or non-image data.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
    except UnidentifiedImageError as error:
        raise ImageDecodeError("not an image (unrecognised format)") from error
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"image too large: {error}") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageDecodeError(f"corrupt or truncated image: {error}") from error
    return _to_rgb_uint8(image)


def _to_rgb_uint8(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        if mode == "F":
            top = max(float(values.max(initial=0)), 1e-12)
        gray = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageDecodeError(f"image has no pixels (shape {rgb.shape})")
    return np.ascontiguousarray(rgb)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read and decode one image file to RGB uint8 ``[H, W, 3]``."""
    return decode_image(ImageSource(id=Path(path).stem, path=str(path)).read_bytes())


def downscale_to_max_size(image: np.ndarray, max_size: int | None) -> tuple[np.ndarray, float]:
    """Shrink ``image`` so its longer side is at most ``max_size`` pixels.

    Returns ``(image, factor)`` where ``factor`` = original size / new size (>= 1): a
    keypoint ``(x, y)`` found on the returned image is at ``(x, y) * factor`` in the
    original. The input is returned unchanged (factor 1.0) when already small enough.
    """
    height, width = image.shape[:2]
    longest = max(height, width)
    if max_size is None or longest <= max_size:
        return image, 1.0
    factor = longest / float(max_size)
    new_size = (max(1, round(width / factor)), max(1, round(height / factor)))
    resized = cv2.resize(image, new_size, interpolation=cv2.INTER_AREA)
    # Report the factor actually applied on each axis (they differ by rounding only).
    return resized, width / float(new_size[0])


def kaggle_image_path(root: str | os.PathLike, image_id: str, extension: str = ".jpg") -> Path:
    """Kaggle GLDv2 layout: ``<root>/<id[0]>/<id[1]>/<id[2]>/<id>.jpg``."""
    if len(image_id) < 3:
        raise ValueError(f"Kaggle image ids have at least 3 characters, got {image_id!r}")
    return Path(root) / image_id[0] / image_id[1] / image_id[2] / f"{image_id}{extension}"


def read_ids_csv(csv_path: str | os.PathLike) -> list[str]:
    """The ``id`` column of a Kaggle CSV (train.csv, index.csv, sample_submission.csv...)."""
    import pandas as pd

    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    if "id" not in frame.columns:
        raise ValueError(f"{csv_path} has no 'id' column (columns: {list(frame.columns)})")
    return frame["id"].tolist()


def read_labels_csv(csv_path: str | os.PathLike) -> dict[str, str]:
    """``id -> landmark_id`` (both strings) from a Kaggle ``train.csv``."""
    import pandas as pd

    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    missing = {"id", "landmark_id"} - set(frame.columns)
    if missing:
        raise ValueError(f"{csv_path} lacks column(s) {sorted(missing)}")
    return dict(zip(frame["id"], frame["landmark_id"], strict=True))


def sources_from_csv(
    csv_path: str | os.PathLike, image_root: str | os.PathLike | None = None
) -> list[ImageSource]:
    """One source per id of a Kaggle CSV, in the CSV's order.

    ``image_root`` defaults to the folder the competition puts beside the CSV
    (``train.csv`` -> ``train/``, ``index.csv`` -> ``index/``,
    ``sample_submission.csv`` -> ``test/``). Ids whose file is missing are kept: their
    failure is recorded when they are read.
    """
    csv_path = Path(csv_path)
    if image_root is None:
        folder = CSV_IMAGE_FOLDERS.get(csv_path.name, csv_path.stem)
        image_root = csv_path.parent / folder
    return [
        ImageSource(id=image_id, path=str(kaggle_image_path(image_root, image_id)))
        for image_id in read_ids_csv(csv_path)
    ]


def sources_from_folder(folder: str | os.PathLike) -> list[ImageSource]:
    """Every image file below ``folder`` (recursively), id = file stem, sorted by path."""
    folder = Path(folder)
    paths = sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
    )
    return _unique([ImageSource(id=path.stem, path=str(path)) for path in paths], str(folder))


def sources_from_tar(tar_path: str | os.PathLike) -> list[ImageSource]:
    """Images inside an uncompressed tar shard (GLDv2 ``images_000.tar``), read in place.

    Only the tar index is scanned; each image is later read by seeking to its bytes, so
    nothing is unpacked. Compressed tars cannot be seeked and are rejected.
    """
    tar_path = str(tar_path)
    try:
        with tarfile.open(tar_path, mode="r:") as archive:
            members = [m for m in archive.getmembers() if m.isfile()]
    except tarfile.ReadError as error:
        raise ValueError(
            f"{tar_path} is not an uncompressed tar (compressed shards must be unpacked): {error}"
        ) from error
    sources = [
        ImageSource(id=Path(m.name).stem, path=tar_path, offset=m.offset_data, size=m.size)
        for m in members
        if Path(m.name).suffix.lower() in IMAGE_EXTENSIONS
    ]
    return sorted(sources, key=lambda s: s.id)


def list_images(
    spec: str | os.PathLike | Sequence[str | os.PathLike],
    image_root: str | os.PathLike | None = None,
) -> list[ImageSource]:
    """Image sources from a folder, a Kaggle CSV, tar shard(s), or a list of those.

    Parameters
    ----------
    spec : path or list of paths
        A folder (walked recursively), a ``.csv`` with an ``id`` column (Kaggle layout),
        a ``.tar`` shard, or a glob such as ``"shards/images_*.tar"``.
    image_root : path, optional
        For a CSV: the folder holding ``a/b/c/<id>.jpg`` (default: the competition's
        folder beside the CSV).
    """
    if isinstance(spec, (list, tuple)):
        sources: list[ImageSource] = []
        for item in spec:
            sources.extend(list_images(item, image_root))
        return _unique(sources, ", ".join(map(str, spec)))
    text = str(spec)
    if any(char in text for char in "*?["):
        matches = sorted(Path().glob(text)) if not os.path.isabs(text) else _abs_glob(text)
        if not matches:
            raise FileNotFoundError(f"no file matches {text!r}")
        return list_images([str(m) for m in matches], image_root)
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"image input {text!r} does not exist")
    if path.is_dir():
        return sources_from_folder(path)
    if path.suffix.lower() == ".csv":
        return sources_from_csv(path, image_root)
    if path.suffix.lower() == ".tar":
        return sources_from_tar(path)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return [ImageSource(id=path.stem, path=str(path))]
    raise ValueError(f"cannot list images from {text!r}: expected a folder, a .csv or a .tar")


def _abs_glob(pattern: str) -> list[Path]:
    anchor = Path(pattern).anchor
    return sorted(Path(anchor).glob(str(Path(pattern).relative_to(anchor))))


def _unique(sources: Iterable[ImageSource], where: str) -> list[ImageSource]:
    sources = list(sources)
    seen: dict[str, ImageSource] = {}
    duplicates = []
    for source in sources:
        if source.id in seen:
            duplicates.append(source.id)
        seen[source.id] = source
    if duplicates:
        shown = ", ".join(sorted(set(duplicates))[:5])
        raise ValueError(f"duplicate image ids in {where}: {shown} ({len(duplicates)} in all)")
    return sources
