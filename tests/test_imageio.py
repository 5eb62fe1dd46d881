"""datagen.format.imageio on a real COCO image (from the embedded sample) and corrupted copies of them."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from synthetic import SAMPLE_IMAGES

from datagen.format.imageio import BadInput, check_jpeg_complete, load_rgb

JPEG = SAMPLE_IMAGES / "000000000009.jpg"  # 400 x 300


@pytest.fixture
def jpeg(tmp_path) -> Path:
    return Path(shutil.copy(JPEG, tmp_path / "image.jpg"))


@pytest.fixture
def rgb() -> np.ndarray:
    """The test image as (300, 400, 3) uint8 RGB, decoded by Pillow."""
    return np.asarray(Image.open(JPEG).convert("RGB"))


def write_png(path: Path, array: np.ndarray) -> Path:
    """Write an OpenCV-ordered (BGR / BGRA / gray) array as PNG."""
    assert cv2.imwrite(str(path), array)
    return path


def reason_of(path, **options) -> str:
    with pytest.raises(BadInput) as info:
        load_rgb(path, **options)
    assert info.value.path == str(path)
    assert str(info.value) == f"{path}: {info.value.reason}"
    return info.value.reason


def test_jpeg_loads_as_rgb(jpeg, rgb):
    image = load_rgb(jpeg)
    assert image.shape == (300, 400, 3) and image.dtype == np.uint8
    # Same pixels as Pillow's decoder, in RGB (not BGR) order.
    assert np.abs(image.astype(int) - rgb).mean() < 2


def test_missing_file(tmp_path):
    assert reason_of(tmp_path / "nope.jpg") == "file not found"


def test_directory_is_bad_input(tmp_path):
    assert "directory" in reason_of(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert reason_of(path) == "empty file"


def test_undecodable_file(tmp_path):
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    assert "cannot decode" in reason_of(path)


@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated_jpeg(jpeg, keep):
    data = jpeg.read_bytes()
    jpeg.write_bytes(data[: int(len(data) * keep)])
    assert "truncated JPEG" in reason_of(jpeg)


def test_truncated_jpeg_padded_with_zeros(jpeg):
    data = jpeg.read_bytes()
    jpeg.write_bytes(data[: len(data) // 2] + b"\x00" * 4096)
    assert "truncated JPEG" in reason_of(jpeg)


def test_complete_jpeg_with_trailing_padding_loads(jpeg):
    jpeg.write_bytes(jpeg.read_bytes() + b"\x00\x00\r\n")
    assert load_rgb(jpeg).shape == (300, 400, 3)


def test_check_jpeg_complete():
    data = JPEG.read_bytes()
    assert check_jpeg_complete(data)
    assert check_jpeg_complete(data + b"\x00 \n")
    assert not check_jpeg_complete(data[:-2])
    assert not check_jpeg_complete(data[:1000] + b"\x00" * 10)


def test_truncated_png(tmp_path, rgb):
    path = write_png(tmp_path / "image.png", rgb)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "truncated PNG" in reason_of(path)


def test_grayscale_becomes_rgb(tmp_path, rgb):
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    image = load_rgb(write_png(tmp_path / "gray.png", gray))
    assert image.shape == (300, 400, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image[:, :, channel], gray)


def test_rgba_drops_alpha(tmp_path, rgb):
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[:, 200:] = 255
    bgra = np.dstack([cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), alpha])
    image = load_rgb(write_png(tmp_path / "rgba.png", bgra))
    # Colour is kept as stored, even where alpha is 0 (no compositing over black or white).
    np.testing.assert_array_equal(image, rgb)


def test_gray_alpha_drops_alpha(tmp_path, rgb):
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    path = tmp_path / "la.png"
    Image.fromarray(np.dstack([gray, np.full_like(gray, 7)]), mode="LA").save(path)
    image = load_rgb(path)
    np.testing.assert_array_equal(image, np.dstack([gray] * 3))


def test_16bit_png_is_rounded_not_clipped(tmp_path):
    values = np.array([0, 1000, 257 * 100 + 128, 257 * 100 + 129, 40000, 65535], np.uint16)
    red = np.tile(values, (32, 6))  # 32 x 36
    bgr = np.dstack([np.zeros_like(red), np.full_like(red, 65535), red])
    image = load_rgb(write_png(tmp_path / "deep.png", bgr))
    expected = np.round(values / 257).astype(np.uint8)
    assert expected.tolist() == [0, 4, 100, 101, 156, 255]
    np.testing.assert_array_equal(image[0, :6, 0], expected)
    assert (image[:, :, 1] == 255).all() and (image[:, :, 2] == 0).all()


def test_cmyk_jpeg_colours(tmp_path, rgb):
    path = tmp_path / "cmyk.jpg"
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buffer, "JPEG", quality=95)
    path.write_bytes(buffer.getvalue())
    assert Image.open(path).mode == "CMYK"
    image = load_rgb(path)
    assert image.shape == rgb.shape
    error = np.abs(image.astype(int) - rgb.astype(int))
    assert error.mean() < 4
    # Each channel comes back as itself (no swapped or inverted channels).
    assert np.abs(image.mean(axis=(0, 1)) - rgb.mean(axis=(0, 1))).max() < 3


def test_tiny_image(tmp_path, rgb):
    path = write_png(tmp_path / "tiny.png", rgb[:20, :40])
    reason = reason_of(path)
    assert "40x20" in reason and "too small" in reason
    assert load_rgb(path, min_side=16).shape == (20, 40, 3)


def test_huge_image(jpeg):
    reason = reason_of(jpeg, max_pixels=400 * 300 - 1)
    assert "400x300" in reason and "too large" in reason
    assert load_rgb(jpeg, max_pixels=400 * 300).shape == (300, 400, 3)


def test_expected_size(jpeg):
    assert load_rgb(jpeg, expected_size=(400, 300)).shape == (300, 400, 3)
    assert reason_of(jpeg, expected_size=(300, 400)) == "image is 400x300, annotation says 300x400"


def test_jpeg_decodes_straight_to_the_rgb_of_opencvs_bgr_decode(jpeg):
    """JPEGs are decoded to RGB by libjpeg itself; the pixels are those of the BGR decode."""
    bgr = cv2.imread(str(jpeg), cv2.IMREAD_COLOR_BGR | cv2.IMREAD_IGNORE_ORIENTATION)
    np.testing.assert_array_equal(load_rgb(jpeg), bgr[:, :, ::-1])


def test_grayscale_jpeg_becomes_rgb(tmp_path, rgb):
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    path = tmp_path / "gray.jpg"
    assert cv2.imwrite(str(path), gray)
    decoded_gray = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert decoded_gray.ndim == 2
    image = load_rgb(path)
    assert image.shape == (300, 400, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image[:, :, channel], decoded_gray)


def test_header_size_reads_jpeg_and_png_headers_without_decoding(jpeg, tmp_path, rgb):
    from datagen.format.imageio import header_size

    assert header_size(jpeg.read_bytes()) == (400, 300)
    png = write_png(tmp_path / "image.png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)[:37, :51])
    assert header_size(png.read_bytes()) == (51, 37)
    assert header_size(b"GIF89a....") is None and header_size(jpeg.read_bytes()[:4]) is None


def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    import struct
    import zlib

    ok, png = cv2.imencode(".png", np.zeros((8, 8), np.uint8))
    data = bytearray(png.tobytes())
    data[16:24] = struct.pack(">II", 50_000, 50_000)  # 2.5 G pixels declared in 70 bytes
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path = tmp_path / "bomb.png"
    path.write_bytes(bytes(data))
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded before its size was checked"))
    assert "50000x50000, too large" in reason_of(path)
