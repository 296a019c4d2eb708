"""Decoding of images as they come, Kaggle layout helpers and tar shards."""

import io
import tarfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from delf_retrieval.images import (
    ImageDecodeError,
    decode_image,
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
