"""Robust image loading: every way an input image can be bad ends in one :class:`BadInput`.

Images are read as bytes and decoded with ``cv2.imdecode``. EXIF orientation is ignored:
COCO's ``width``/``height`` and polygons refer to the pixels as stored.
"""
from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np

JPEG_START = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
PNG_START = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND\xaeB`\x82"
_TRAILING_PADDING = b"\x00 \t\r\n"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
"""File suffixes (lower case) taken as images when a folder is read: style images, LOST's input
images, saliency ground truth."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""RGB mean and standard deviation of ImageNet in [0, 1]: the input normalisation
of DINO and of the MoCo-v2 ResNet-50."""


class BadInput(Exception):
    """An input image that cannot be used; ``str()`` is ``"{path}: {reason}"``."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) that PNG or JPEG ``data`` declares in its header, read without decoding
    (so a small file that declares a huge image is refused before it takes the memory); None for
    other formats or a header cut short."""
    if data.startswith(PNG_START):
        if len(data) < 24 or data[12:16] != b"IHDR":
            return None
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if not data.startswith(b"\xff\xd8"):
        return None
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            at += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame header
            if at + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[at + 5: at + 9])
            return width, height
        if marker == 0xDA:  # image data before any frame header
            return None
        at += 2 + struct.unpack(">H", data[at + 2: at + 4])[0]
    return None


def check_jpeg_complete(data: bytes) -> bool:
    """True if JPEG ``data`` ends with the EOI marker (FF D9), ignoring trailing zero/whitespace bytes."""
    return data.rstrip(_TRAILING_PADDING).endswith(JPEG_END)


def load_rgb(path, *, min_side: int = 32, max_pixels: int = 100_000_000,
             expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Load an image as (H, W, 3) uint8 RGB, or raise :class:`BadInput` saying why not.

    Grayscale becomes RGB, alpha is dropped, 16-bit is rounded to 8-bit, CMYK JPEG is
    converted by OpenCV. ``expected_size`` is (width, height), e.g. from the annotation.
    """
    data = read_input_bytes(path)
    _check_complete(path, data)
    declared = header_size(data)
    if declared is not None and declared[0] * declared[1] > max_pixels:
        raise BadInput(path, f"image is {declared[0]}x{declared[1]}, too large (> {max_pixels} pixels)")
    if data.startswith(JPEG_START):
        # 8-bit by construction: libjpeg-turbo writes RGB (from Y, YCbCr or CMYK) straight into
        # the output, which saves a BGR -> RGB pass over the image
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    else:
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
        image = None if decoded is None else _to_rgb8(path, decoded)
    if image is None:
        raise BadInput(path, "cannot decode image (corrupt or unsupported format)")
    _check_size(path, image, min_side, max_pixels, expected_size)
    return image


def read_input_bytes(path, what: str = "an image file") -> bytes:
    """The bytes of an input file; :class:`BadInput` naming it when it is missing, a directory,
    unreadable or empty (``what`` names the kind of file in those messages)."""
    try:
        if isinstance(path, Path):  # what read_bytes does, without parsing the path again
            with open(path, "rb") as handle:
                data = handle.read()
        else:
            data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BadInput(path, "file not found") from None
    except IsADirectoryError:
        raise BadInput(path, f"is a directory, not {what}") from None
    except OSError as error:
        raise BadInput(path, f"cannot read file: {error.strerror or error}") from None
    if not data:
        raise BadInput(path, "empty file")
    return data


def _check_complete(path, data: bytes) -> None:
    """Reject truncated JPEG and PNG files, which decoders may silently fill with grey."""
    if data.startswith(JPEG_START) and not check_jpeg_complete(data):
        raise BadInput(path, "truncated JPEG (no end-of-image marker)")
    if data.startswith(PNG_START) and not data.rstrip(_TRAILING_PADDING).endswith(PNG_END):
        raise BadInput(path, "truncated PNG (no IEND chunk)")


def _to_rgb8(path, image: np.ndarray) -> np.ndarray:
    """(H, W[, C]) uint8/uint16 as decoded by OpenCV (BGR order) -> (H, W, 3) uint8 RGB."""
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise BadInput(path, f"unsupported pixel type {image.dtype}")
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels in (1, 2):
        gray = image if image.ndim == 2 else image[:, :, 0]
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    if channels in (3, 4):
        return cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2RGB)
    raise BadInput(path, f"unsupported number of channels: {channels}")


def _check_size(path, image: np.ndarray, min_side: int, max_pixels: int,
                expected_size: tuple[int, int] | None) -> None:
    height, width = image.shape[:2]
    if min(height, width) < min_side:
        raise BadInput(path, f"image is {width}x{height}, too small (shorter side < {min_side})")
    if height * width > max_pixels:
        raise BadInput(path, f"image is {width}x{height}, too large (> {max_pixels} pixels)")
    if expected_size is not None and (width, height) != tuple(expected_size):
        expected_width, expected_height = expected_size
        raise BadInput(path, f"image is {width}x{height}, annotation says {expected_width}x{expected_height}")


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to size x size: bilinear, or area averaging when shrinking by 1.5x or more along an
    axis (bilinear aliases there; area costs more, so a mild shrink such as COCO's 640 -> 480
    stays bilinear)."""
    shrink = max(image.shape[0], image.shape[1]) >= 1.5 * size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
