"""Decoding of images as they come, Kaggle layout helpers and tar shards."""

import io
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from delf_retrieval.features.images import (
    ImageDecodeError,
    decode_image,
    decode_image_scaled,
    downscale_to_max_size,
    kaggle_image_path,
    list_images,
    load_image,
)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gradient_rgb(height=24, width=32) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 7 % 256, y * 9 % 256, (x + y) * 3 % 256], axis=2).astype(np.uint8)


def test_rgb_png_round_trip_exact():
    pixels = gradient_rgb()
    decoded = decode_image(encode(Image.fromarray(pixels), "PNG"))
    assert decoded.dtype == np.uint8 and decoded.shape == (24, 32, 3)
    np.testing.assert_array_equal(decoded, pixels)


def test_grayscale_becomes_three_equal_channels():
    gray = gradient_rgb()[:, :, 0]
    decoded = decode_image(encode(Image.fromarray(gray, mode="L"), "PNG"))
    assert decoded.shape == (24, 32, 3)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[:, :, channel], gray)


def test_rgba_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red
    rgba[:2, :, 3] = 255  # top half opaque, bottom half transparent
    decoded = decode_image(encode(Image.fromarray(rgba, mode="RGBA"), "PNG"))
    np.testing.assert_array_equal(decoded[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(decoded[3, 0], [255, 255, 255])


def test_palette_gif():
    image = Image.fromarray(gradient_rgb()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    decoded = decode_image(encode(image, "GIF"))
    np.testing.assert_array_equal(decoded, np.asarray(image.convert("RGB")))


def test_cmyk_jpeg_is_rgb():
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red in CMYK
    decoded = decode_image(encode(cmyk, "JPEG", quality=95))
    assert decoded.shape == (8, 16, 3)
    red, green, blue = decoded[4, 8].astype(int)
    assert red > 200 and green < 60 and blue < 60


def test_sixteen_bit_png_scaled_to_eight_bit():
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    decoded = decode_image(encode(Image.fromarray(values), "PNG"))
    np.testing.assert_array_equal(decoded[0, :, 0], [0, 128, 255])


def test_exif_orientation_is_applied():
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, :10] = 255  # left half white
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image(encode(image, "JPEG", quality=95, exif=exif.tobytes()))
    assert decoded.shape == (20, 10, 3)
    assert decoded[:10].mean() > 200 and decoded[10:].mean() < 50  # white half now on top


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"this is a text file, not a photo", "not an image"),
        (encode(Image.fromarray(gradient_rgb(64, 64)), "JPEG")[:300], "corrupt or truncated"),
        (encode(Image.fromarray(gradient_rgb(64, 64)), "PNG")[:-40], "corrupt or truncated"),
    ],
)
def test_bad_bytes_raise_with_reason(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data)


def test_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError, match="missing file"):
        load_image(tmp_path / "nope.jpg")


def test_downscale_factor_maps_back_to_original():
    image = np.zeros((300, 1200, 3), np.uint8)
    small, factor = downscale_to_max_size(image, 400)
    assert small.shape == (100, 400, 3)
    assert factor == pytest.approx(3.0)
    same, one = downscale_to_max_size(image, None)
    assert same is image and one == 1.0


def test_kaggle_path_layout(tmp_path):
    assert kaggle_image_path(tmp_path, "abcdef0123") == tmp_path / "a" / "b" / "c" / "abcdef0123.jpg"
    with pytest.raises(ValueError):
        kaggle_image_path(tmp_path, "ab")


def test_list_images_from_kaggle_csv_keeps_missing_ids(tmp_path):
    jpeg = encode(Image.fromarray(gradient_rgb()), "JPEG")
    for image_id in ("0aa1", "1bb2"):
        path = kaggle_image_path(tmp_path / "train", image_id)
        path.parent.mkdir(parents=True)
        path.write_bytes(jpeg)
    pd.DataFrame({"id": ["1bb2", "0aa1", "2cc3"], "landmark_id": [1, 2, 3]}).to_csv(
        tmp_path / "train.csv", index=False
    )
    sources = list_images(tmp_path / "train.csv")
    assert [s.id for s in sources] == ["1bb2", "0aa1", "2cc3"]
    assert sources[0].read_bytes() == jpeg
    with pytest.raises(ImageDecodeError, match="missing file"):
        sources[2].read_bytes()


def test_list_images_folder_and_duplicates(tmp_path):
    png = encode(Image.fromarray(gradient_rgb()), "PNG")
    (tmp_path / "x" / "y").mkdir(parents=True)
    (tmp_path / "x" / "one.png").write_bytes(png)
    (tmp_path / "x" / "y" / "two.PNG").write_bytes(png)
    (tmp_path / "x" / "notes.txt").write_text("skip me")
    assert sorted(s.id for s in list_images(tmp_path / "x")) == ["one", "two"]
    (tmp_path / "x" / "y" / "one.jpg").write_bytes(png)
    with pytest.raises(ValueError, match="duplicate image ids"):
        list_images(tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "missing")


def test_tar_shard_read_in_place(tmp_path):
    pixels = gradient_rgb()
    payloads = {f"a/b/c/abc{i}.jpg": encode(Image.fromarray(np.roll(pixels, i, 0)), "PNG") for i in range(3)}
    shard = tmp_path / "images_000.tar"
    with tarfile.open(shard, "w") as archive:
        for name, payload in payloads.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
        readme = b"not an image"
        info = tarfile.TarInfo("README.txt")
        info.size = len(readme)
        archive.addfile(info, io.BytesIO(readme))
    sources = list_images(str(tmp_path / "images_*.tar"))
    assert [s.id for s in sources] == ["abc0", "abc1", "abc2"]
    for index, source in enumerate(sources):
        np.testing.assert_array_equal(decode_image(source.read_bytes()), np.roll(pixels, index, 0))
    gz = tmp_path / "shard.tar"
    with tarfile.open(gz, "w:gz") as archive:
        archive.add(shard, arcname="inner.tar")
    with pytest.raises(ValueError, match="not an uncompressed tar"):
        list_images(gz)


def test_folder_listing_keeps_broken_links_and_non_files(tmp_path):
    """They used to vanish from a run without a trace; now each is listed and its read
    fails with the reason (a FIFO is refused, not read: reading one blocks forever)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "good.png").write_bytes(encode(Image.fromarray(gradient_rgb()), "PNG"))
    os.symlink(tmp_path / "deleted.jpg", folder / "gone.jpg")
    (folder / "album.jpg").mkdir()
    os.mkfifo(folder / "pipe.jpg")
    sources = {source.id: source for source in list_images(folder)}
    assert sorted(sources) == ["album", "gone", "good", "pipe"]
    assert decode_image(sources["good"].read_bytes()).shape == (24, 32, 3)
    with pytest.raises(ImageDecodeError, match="broken link: .*gone.jpg -> .*deleted.jpg"):
        sources["gone"].read_bytes()
    with pytest.raises(ImageDecodeError, match="not a file \\(a directory\\)"):
        sources["album"].read_bytes()
    with pytest.raises(ImageDecodeError, match="not a regular file"):
        sources["pipe"].read_bytes()


def test_large_jpeg_decodes_at_reduced_size_with_the_right_factor():
    y, x = np.mgrid[0:1200, 0:1600]
    pixels = np.stack([x * 255 // 1600, y * 255 // 1200, (x + y) % 256], axis=2).astype(np.uint8)
    data = encode(Image.fromarray(pixels), "JPEG", quality=95)
    small, factor = decode_image_scaled(data, 200)  # 1/8 decode is 200 x 150 already
    assert small.shape == (150, 200, 3) and factor == 8.0
    reference, reference_factor = downscale_to_max_size(decode_image(data), 200)
    assert reference.shape == small.shape and reference_factor == 8.0
    # The scaled IDCT averages like an area resize: the pictures agree closely.
    assert np.abs(small.astype(int) - reference.astype(int)).mean() < 3.0
    # Not a multiple of the DCT scale: 1/4 decode (400 x 300), then an area resize.
    medium, medium_factor = decode_image_scaled(data, 250)
    assert medium.shape == (188, 250, 3) and medium_factor == pytest.approx(1600 / 250)
    # Small enough already: decoded as it is.
    whole, one = decode_image_scaled(data, 2000)
    assert whole.shape == (1200, 1600, 3) and one == 1.0


@pytest.mark.slow
def test_large_jpeg_decoding_memory_follows_the_requested_size(tmp_path):
    """A 24 MP JPEG capped at 1024 px must never exist at full size (it costs ~170 MB:
    Pillow's RGBX buffer plus the RGB array); measured as the process's peak RSS."""
    pixels = np.empty((4000, 6000, 3), np.uint8)
    pixels[:, :, 0] = np.arange(6000, dtype=np.uint8)  # wraps: a sawtooth every 256 px
    pixels[:, :, 1] = np.arange(4000, dtype=np.uint8)[:, None]
    pixels[:, :, 2] = 128
    path = tmp_path / "big.jpg"
    path.write_bytes(encode(Image.fromarray(pixels), "JPEG", quality=80))
    del pixels
    script = textwrap.dedent(
        """
        import sys
        from delf_retrieval.features.images import decode_image, decode_image_scaled
        def peak_mb():  # this process image's high-water RSS (ru_maxrss survives exec)
            line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
            return int(line.split()[1]) / 1024
        data = open(sys.argv[1], "rb").read()
        before = peak_mb()
        image, factor = decode_image_scaled(data, 1024)
        reduced = peak_mb() - before
        full = decode_image(data)
        print(image.shape[1], factor, reduced, peak_mb() - before, full.shape[1])
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=env, check=True)
    width, factor, reduced_mb, full_mb, full_width = out.stdout.split()
    assert int(width) == 1024 and float(factor) == pytest.approx(6000 / 1024)
    assert int(full_width) == 6000
    assert float(full_mb) > 150, out.stdout  # the measurement sees a full decode...
    assert float(reduced_mb) < 40, out.stdout  # ...and the reduced one stays small
