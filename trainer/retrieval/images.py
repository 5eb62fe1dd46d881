"""The image files of a retrieval run: listed, checked and identified before any work.

A database is a folder: every image file under it (sub-folders too), named by its path relative
to the folder with '/' separators, in sorted order. Each file is read once here: its sha256 (the
feature cache's key for it, so a renamed file is reused and an edited one is not) and its size
from the header. A file that is not a readable image (unknown header, truncated JPEG, too small)
is set aside with the reason, never a crash of the run; the caller records it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cv2
import numpy as np

from datagen.format.imageio import IMAGE_SUFFIXES, JPEG_START, check_jpeg_complete, header_size

MIN_SIDE = 32
"""Images with a shorter side are set aside (the backbone needs a few cells)."""
MAX_PIXELS = 100_000_000
"""Images declaring more pixels are set aside before they are decoded."""


@dataclass(frozen=True)
class ImageRecord:
    """One image file: ``name`` relative to its folder ('/'-separated), ``path`` on disk, ``sha256``
    of its bytes, ``size`` (width, height) from its header."""

    name: str
    path: Path
    sha256: str
    size: tuple[int, int]


def safe_relative(name: str, what: str = "image") -> str:
    """``name`` if it is a relative path that stays inside its folder; ValueError otherwise."""
    text = str(name).replace("\\", "/")
    parts = PurePosixPath(text).parts
    if not text or text.startswith("/") or ":" in (parts[0] if parts else "") or ".." in parts:
        raise ValueError(f"{what} name {name!r} must be a relative path inside its folder")
    return text


def plain_name_problem(name, kind: str = "file name") -> str | None:
    """Why ``name`` is not a plain file (or folder) name: no folder part, so it cannot leave its
    folder; None when it is one. ``kind`` names what it should be in the message."""
    if not isinstance(name, str) or not name:
        return f"{name!r} is not a non-empty string"
    if "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
        return f"{name!r} is not a plain {kind} (no path separators, '.', '..' or NUL)"
    return None


def relative_path_problem(name) -> str | None:
    """Why ``name`` is not a safe relative path ('000/000000_pitch1_yaw1.jpg'), or None."""
    if not isinstance(name, str) or not name:
        return f"{name!r} is not a non-empty string"
    if "\\" in name or "\0" in name:
        return f"{name!r} holds a backslash or NUL"
    if name.startswith("/"):
        return f"{name!r} is an absolute path"
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return f"{name!r} has an empty, '.' or '..' component"
    return None


def list_images(folder) -> list[str]:
    """Sorted relative names of the image files under ``folder`` (suffixes of
    :data:`datagen.format.imageio.IMAGE_SUFFIXES`, any case; hidden files skipped)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder of images")
    names = [path.relative_to(root).as_posix() for path in root.rglob("*")
             if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
             and not any(part.startswith(".") for part in path.relative_to(root).parts)]
    return sorted(names)


def inspect_image(folder, name: str) -> ImageRecord:
    """Read ``folder/name`` once: its sha256 and header size. ValueError (naming the file) when it
    is not an image this project reads, or is truncated or too small."""
    path = Path(folder) / safe_relative(name)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ValueError(f"{path}: cannot be read ({error.strerror or error})") from error
    if data.startswith(JPEG_START) and not check_jpeg_complete(data):
        raise ValueError(f"{path}: truncated JPEG (no end-of-image marker)")
    size = header_size(data)
    if size is None:  # a format whose header is not read here (BMP, TIFF, WebP): decode it
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
        if decoded is None:
            raise ValueError(f"{path}: not an image this project reads (cannot decode it)")
        size = (decoded.shape[1], decoded.shape[0])
    if size[0] * size[1] > MAX_PIXELS:
        raise ValueError(f"{path}: image declares {size[0]}x{size[1]}, too large (> {MAX_PIXELS} pixels)")
    if min(size) < MIN_SIDE:
        raise ValueError(f"{path}: image is {size[0]}x{size[1]}, too small (shorter side < {MIN_SIDE})")
    return ImageRecord(name=name, path=path, sha256=hashlib.sha256(data).hexdigest(), size=tuple(size))


def inspect_images(folder, names) -> tuple[list[ImageRecord], dict[str, str]]:
    """(readable records in the order of ``names``, {name: reason} of the files set aside)."""
    records, broken = [], {}
    for name in names:
        try:
            records.append(inspect_image(folder, name))
        except ValueError as error:
            broken[name] = str(error)
    return records, broken
