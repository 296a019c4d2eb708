"""Image input: robust decoding to RGB uint8, Kaggle layout helpers, tar shards.

Every decoder path ends in an RGB uint8 array ``[H, W, 3]`` with EXIF orientation applied.
Anything that cannot be decoded raises :class:`ImageDecodeError` whose message is the
reason recorded in a run's failure list.
"""

from __future__ import annotations

import io
import os
import re
import stat
import tarfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
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


# Input rules every path applies (batch extraction, predict, serve), so a photo gets the
# same answer, or the same refusal, everywhere.
# Smaller images hold no landmark and break models (OpenCV SIFT fails on 2 px, DELG's
# smallest scale rounds a few pixels to none): at least this many pixels per side after
# the size cap.
MIN_IMAGE_SIDE = 16
# Most pixels (width x height) one photo may have when decoded: its RGB array then takes
# at most 120 MB (and Pillow's copy as much again). A JPEG above it is decoded at 1/2, 1/4
# or 1/8 of its size (libjpeg's scaled IDCT) to fit; another format above it is refused
# from its header, before any pixel is decoded. A 13000 x 13000 PNG of 0.5 MB would
# otherwise cost 2.4 GB.
MAX_IMAGE_PIXELS = 40_000_000


class ImageDecodeError(ValueError):
    """An image that cannot be read; ``str(error)`` is the reason recorded for it."""


class ImageRejectedError(ImageDecodeError):
    """A readable image outside the input rules (too small, too many pixels); the web
    service answers it with 422."""


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
        """Raw encoded bytes; raises ImageDecodeError for a missing file, a broken link,
        a directory or another non-regular file (a FIFO would block forever)."""
        try:
            if self.offset < 0:
                _check_regular_file(Path(self.path))
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


def _check_regular_file(path: Path) -> None:
    """Raise ImageDecodeError unless ``path`` is (a link to) a regular file."""
    if path.is_symlink() and not path.exists():
        raise ImageDecodeError(f"broken link: {path} -> {os.readlink(path)}")
    mode = path.stat().st_mode  # FileNotFoundError: handled by the caller
    if stat.S_ISDIR(mode):
        raise ImageDecodeError(f"not a file (a directory): {path}")
    if not stat.S_ISREG(mode):
        raise ImageDecodeError(f"not a regular file: {path}")


def decode_image(data: bytes, *, exif_transpose: bool = True) -> np.ndarray:
    """Decode encoded image bytes to RGB uint8 ``[H, W, 3]``.

    Handles grayscale, palette, RGBA/LA (composited on white), CMYK, 16-bit and float
    images, and EXIF orientation (applied when ``exif_transpose``; the reference DELG
    pipelines and the Kaggle baseline do not apply it). Raises ImageDecodeError for
    empty, truncated, corrupt or non-image data.
    """
    return decode_image_scaled(data, None, exif_transpose=exif_transpose)[0]


def decode_image_scaled(
    data: bytes, max_size: int | None, *, exif_transpose: bool = True
) -> tuple[np.ndarray, float]:
    """Decode to RGB uint8 ``[H, W, 3]`` with the longer side at most ``max_size`` pixels.

    A JPEG larger than needed is decoded at 1/2, 1/4 or 1/8 of its size by libjpeg's
    scaled IDCT (Pillow draft mode), so memory follows the requested size instead of the
    photo's (a 108 MP photo capped at 1024 px never exists at full size); the rest is
    shrunk with :func:`downscale_to_max_size`. Whatever ``max_size``, no photo is decoded
    with more than :data:`MAX_IMAGE_PIXELS` pixels: a JPEG is decoded reduced to fit, any
    other format above it raises :class:`ImageRejectedError` before decoding.
    ``exif_transpose`` as for :func:`decode_image`.

    Returns
    -------
    image : uint8 [H, W, 3]
    factor : float
        Original (EXIF-rotated when ``exif_transpose``) size / returned size along x (>= 1): a keypoint ``(x, y)``
        of the returned image lies at ``(p + 0.5) * factor - 0.5`` in original pixels.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    draft_scale = 1.0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format == "JPEG":
                draft_scale = _draft(image, max_size)
            check_pixel_budget(image)  # from the header: nothing decoded yet
            image.load()
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
    except ImageDecodeError:
        raise  # the input rules' own message
    except UnidentifiedImageError as error:
        raise ImageDecodeError("not an image (unrecognised format)") from error
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"image too large: {error}") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageDecodeError(f"corrupt or truncated image: {error}") from error
    small, factor = downscale_to_max_size(_to_rgb_uint8(image), max_size)
    return small, factor * draft_scale


def oriented_size(image: Image.Image, exif_transpose: bool = True) -> tuple[int, int]:
    """``(width, height)`` of an opened image as decoded: swapped for the EXIF orientations
    that turn it by 90 degrees when ``exif_transpose`` (read from the header only)."""
    width, height = image.size
    if exif_transpose and image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
        width, height = height, width
    return width, height


def original_size(data: bytes, exif_transpose: bool = True) -> tuple[int, int] | None:
    """``(height, width)`` in pixels of encoded image ``data`` as decoded at full size, read
    from the header without decoding the pixels; None when the header cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = oriented_size(image, exif_transpose)
    except Exception:  # the decoder reports unreadable data with its own reason
        return None
    return height, width


def _draft(image: Image.Image, max_size: int | None) -> float:
    """Ask libjpeg for a reduced decode (1/2, 1/4, 1/8) as small as ``max_size`` and
    :data:`MAX_IMAGE_PIXELS` allow; returns the original width / the drafted width."""
    width, height = image.size
    wanted = None
    if max_size is not None and max(width, height) > 2 * max_size:
        longest = max(width, height)
        wanted = (max(1, width * max_size // longest), max(1, height * max_size // longest))
    if width * height > MAX_IMAGE_PIXELS:
        for scale in (2, 4, 8):
            if -(-width // scale) * -(-height // scale) <= MAX_IMAGE_PIXELS:
                break
        fit = (max(1, width // scale), max(1, height // scale))  # the draft picks a scale of at least this
        wanted = fit if wanted is None or fit[0] < wanted[0] else wanted
    if wanted is None:
        return 1.0
    drafted = image.draft(image.mode, wanted)
    return 1.0 if drafted is None else width / drafted[1][2]


def check_pixel_budget(image: Image.Image) -> None:
    """Raise :class:`ImageRejectedError` when an opened (not yet loaded) image has more than
    :data:`MAX_IMAGE_PIXELS` pixels: Pillow reads the size from the header."""
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageRejectedError(
            f"image too large: {width}x{height} px = {width * height / 1e6:.0f} MP, more than the "
            f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP one photo may have (JPEGs are decoded reduced to fit, other formats are refused)"
        )


def check_min_side(image: np.ndarray, max_size: int | None = None, factor: float = 1.0) -> None:
    """Raise :class:`ImageRejectedError` when ``image`` (after the size cap ``max_size``,
    which shrank it by ``factor``) has a side under :data:`MIN_IMAGE_SIDE` pixels."""
    if min(image.shape[:2]) < MIN_IMAGE_SIDE:
        height, width = image.shape[:2]
        shrunk = f" after shrinking to --max-image-size {max_size}" if factor > 1 else ""
        raise ImageRejectedError(
            f"image too small: {width}x{height} px{shrunk} (at least {MIN_IMAGE_SIDE} px per side)"
        )


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


# Characters that would take an id's file out of its folder (a path separator, or the
# NUL that ends a path in the C library).
_ID_PATH_CHARACTERS = ("/", "\\", "\x00")
# GLDv2 landmark ids are non-negative integers (ASCII digits).
_LANDMARK_ID = re.compile(r"[0-9]+")


def check_image_id(image_id: str, where: str = "") -> str:
    """Return ``image_id`` if it names a file inside its folder, else raise ValueError naming it.

    An id becomes the file name ``<id>.jpg`` (and, in the Kaggle layout, its first three
    characters the folders above it), so it may not be empty or hold a path separator
    (``/``, ``\\``) or NUL: ``..//x`` or ``abc/../../x`` would read or write outside the
    data or index folder.
    """
    if not isinstance(image_id, str) or not image_id or any(c in image_id for c in _ID_PATH_CHARACTERS):
        place = f" in {where}" if where else ""
        raise ValueError(
            f"image id {image_id!r}{place} is not allowed: ids may not be empty or contain '/', '\\' "
            "or NUL (the file would lie outside its folder)"
        )
    return image_id


def kaggle_image_path(root: str | os.PathLike, image_id: str, extension: str = ".jpg") -> Path:
    """Kaggle GLDv2 layout: ``<root>/<id[0]>/<id[1]>/<id[2]>/<id>.jpg`` (always inside ``root``:
    ids that could leave it are refused, see :func:`check_image_id`)."""
    check_image_id(image_id)
    if len(image_id) < 3:
        raise ValueError(f"Kaggle image ids have at least 3 characters, got {image_id!r}")
    return Path(root) / image_id[0] / image_id[1] / image_id[2] / f"{image_id}{extension}"


def read_text_csv(csv_path: str | os.PathLike):
    """A CSV with every cell as text (empty cells ""); ValueError naming the file when it
    is empty, not text or not CSV (pandas' own messages name no file)."""

    try:
        return pd.read_csv(csv_path, dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{csv_path} is empty (not even a header line)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise ValueError(f"{csv_path} is not a readable CSV file: {' '.join(str(error).split())}") from None


def read_ids_csv(csv_path: str | os.PathLike) -> list[str]:
    """The ``id`` column of a Kaggle CSV (train.csv, index.csv, sample_submission.csv...)."""
    frame = read_text_csv(csv_path)
    if "id" not in frame.columns:
        raise ValueError(f"{csv_path} has no 'id' column (columns: {list(frame.columns)})")
    return frame["id"].tolist()


def read_labels_csv(csv_path: str | os.PathLike) -> dict[str, str]:
    """``id -> landmark_id`` (both strings) from a Kaggle ``train.csv``.

    Raises ValueError (naming the file and the row) for a missing column, a landmark id
    that is not an integer (GLDv2's are; a space would also break the submission) or an
    id listed twice with different landmarks.
    """
    frame = read_text_csv(csv_path)
    missing = {"id", "landmark_id"} - set(frame.columns)
    if missing:
        raise ValueError(f"{csv_path} lacks column(s) {sorted(missing)} (columns: {list(frame.columns)})")
    labels: dict[str, str] = {}
    for image_id, label in zip(frame["id"], frame["landmark_id"], strict=True):
        if not _LANDMARK_ID.fullmatch(label):
            raise ValueError(
                f"{csv_path}: landmark_id {label!r} of image {image_id!r} is not an integer "
                "(GLDv2 landmark ids are non-negative integers)"
            )
        if labels.setdefault(image_id, label) != label:
            raise ValueError(
                f"{csv_path}: image id {image_id!r} is listed twice with different landmarks "
                f"({labels[image_id]} and {label}); keep one row per image"
            )
    return labels


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
    ids = read_ids_csv(csv_path)
    for image_id in ids:  # every id before any path: nothing is read outside image_root
        check_image_id(image_id, str(csv_path))
    return [ImageSource(id=image_id, path=str(kaggle_image_path(image_root, image_id))) for image_id in ids]


def sources_from_folder(folder: str | os.PathLike) -> list[ImageSource]:
    """Every image name below ``folder`` (recursively), id = file stem, sorted by path.

    Names with an image extension that are not readable files (broken links, folders
    named ``*.jpg``, FIFOs) are listed too, so that a run records them as failures with
    the reason instead of leaving them out silently.
    """
    folder = Path(folder)
    paths = sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS)
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
