"""Style transfer of the built images (paper section 3.1: "we stylise images with AdaIN").

A :class:`Stylizer` turns a list of (H, W, 3) uint8 RGB images into stylised images of the
same sizes, each with its own style image (an index into the stylizer's style folder) and
its own strength ``alpha``. Batching, device and precision live inside the stylizer.

Stylizers are looked up by name in :data:`STYLIZERS` and built with :func:`make_stylizer`:

- ``"adain"`` (:class:`datagen.style.adain.AdainStylizer`): Huang & Belongie 2017 with the
  weights of the PyTorch port (``vgg_normalised.pth``, ``decoder.pth``);
- ``"color"`` (:class:`datagen.style.color.ColorStylizer`): a weight-free Lab mean/std
  colour transfer, the fallback when the AdaIN weights are not available.

``"none"`` is not a stylizer: callers skip the style step. Importing this package does not
import torch; the stylizer modules are imported when first asked for.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from datagen.format.hashing import sha256_file
from datagen.format.imageio import IMAGE_SUFFIXES, BadInput, load_rgb
from datagen.format.registry import Registry

STYLE_IMAGE_SUFFIXES = IMAGE_SUFFIXES
"""Files of a style folder with these suffixes (any case) are style images."""

NO_STYLE = "none"


class StyleError(ValueError):
    """A style folder or style option that cannot be used; the message names it."""


@runtime_checkable
class Stylizer(Protocol):
    """Stylises images with style images of a folder."""

    name: str
    """Registry name ("adain", "color")."""
    n_styles: int
    """Number of style images; valid style indices are 0 .. n_styles - 1."""

    def stylize(self, images: list[np.ndarray], styles: list[int],
                alphas: list[float]) -> list[np.ndarray]:
        """Stylise ``images[i]`` ((H, W, 3) uint8 RGB) with style image ``styles[i]`` at
        strength ``alphas[i]`` in [0, 1) (0 = the content only); returns (H, W, 3) uint8 RGB
        images of the same sizes, in the same order."""
        ...

    def describe(self) -> dict:
        """JSON-able description for the manifest: method, weights files and their sha256,
        style folder and number of style images, device, dtype."""
        ...


STYLIZERS: Registry[type] = Registry("style method", reserved={NO_STYLE: "it means no style step"}, lazy={
    "adain": "datagen.style.adain:AdainStylizer",
    "color": "datagen.style.color:ColorStylizer",
})
"""Stylizer classes by name. The modules are imported on first use (so that ``import
datagen.style`` stays free of torch); ``"none"`` is reserved."""


def register_stylizer(name: str):
    """Class decorator: register a stylizer class under ``name`` in :data:`STYLIZERS`."""
    return STYLIZERS.register(name)


def stylizer_names() -> tuple[str, ...]:
    """Registered stylizer names, sorted (without "none")."""
    return STYLIZERS.names()


def stylizer_class(name: str):
    """The class registered under ``name``; ValueError listing the names if there is none."""
    if name == NO_STYLE:
        raise ValueError(f"style {NO_STYLE!r} has no stylizer: callers skip the style step")
    return STYLIZERS.get(name)


def make_stylizer(name: str, **options) -> Stylizer:
    """Build the stylizer registered as ``name`` with its keyword ``options``
    (e.g. ``make_stylizer("adain", style_dir="styles/", device="cuda")``)."""
    return stylizer_class(name)(**options)


def style_image_files(style_dir) -> list[Path]:
    """Sorted image files (by name) directly inside ``style_dir``.

    Raises :class:`StyleError` naming the folder when it does not exist, is not a folder,
    or holds no image file.
    """
    folder = Path(style_dir)
    if not folder.exists():
        raise StyleError(f"style folder {folder} does not exist")
    if not folder.is_dir():
        raise StyleError(f"style folder {folder} is not a folder")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in STYLE_IMAGE_SUFFIXES)
    if not files:
        raise StyleError(f"style folder {folder} holds no image file "
                         f"({', '.join(STYLE_IMAGE_SUFFIXES)})")
    return files


def iter_style_images(style_dir, *, min_side: int = 32):
    """Yield (path, (H, W, 3) uint8 RGB) for each readable image of :func:`style_image_files`,
    one at a time (so that a large folder is never held in memory).

    Unreadable images are skipped; once the folder is exhausted a single warning lists them,
    and :class:`StyleError` is raised if none could be read.
    """
    files = style_image_files(style_dir)
    skipped = []
    for path in files:
        try:
            image = load_rgb(path, min_side=min_side)
        except BadInput as error:
            skipped.append(f"{path.name} ({error.reason})")
            continue
        yield path, image
    if skipped:
        if len(skipped) == len(files):
            raise StyleError(f"style folder {style_dir}: no readable image; skipped "
                             f"{len(skipped)}: {'; '.join(skipped)}")
        warnings.warn(f"style folder {style_dir}: skipped {len(skipped)} unreadable image(s): "
                      f"{'; '.join(skipped)}", stacklevel=2)


def load_style_images(style_dir) -> list[tuple[Path, np.ndarray]]:
    """All readable style images of ``style_dir`` as (path, (H, W, 3) uint8 RGB), sorted by
    name; unreadable ones are skipped with one warning listing them. A missing or empty
    folder (or one with no readable image) raises :class:`StyleError` naming it."""
    return list(iter_style_images(style_dir))


def style_set_sha256(paths) -> str:
    """sha256 of a list of style images: of the lines "{file name} {sha256 of its bytes}",
    in order. Identifies the style set (names and contents) for the manifest."""
    lines = "".join(f"{Path(p).name} {sha256_file(p)}\n" for p in paths)
    return hashlib.sha256(lines.encode()).hexdigest()


MAX_ASPECT = 4
"""Resized images have a longer side of at most MAX_ASPECT x the target shorter side (a very
elongated style image is shrunk further rather than blown up)."""


def shorter_side_size(height: int, width: int, side: int | None) -> tuple[int, int]:
    """(height, width) of an image resized so that its shorter side is ``side`` (its longer
    side at most ``MAX_ASPECT * side``), keeping the aspect ratio; ``side`` 0 or None keeps
    the size (the port's ``--content_size 0``)."""
    if not side:
        return height, width
    scale = min(side / min(height, width), MAX_ASPECT * side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an (H, W, C) image (uint8 or float32) with area averaging when shrinking and
    bilinear interpolation when enlarging."""
    if image.shape[:2] == (height, width):
        return image
    shrink = height * width < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height),
                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def check_inputs(images, styles, alphas, n_styles: int) -> None:
    """Validate the arguments of :meth:`Stylizer.stylize`; ValueError saying which is wrong."""
    if not len(images) == len(styles) == len(alphas):
        raise ValueError(f"stylize: got {len(images)} images, {len(styles)} styles and "
                         f"{len(alphas)} alphas; they must have the same length")
    for i, (image, style, alpha) in enumerate(zip(images, styles, alphas)):
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                and image.shape[2] == 3):
            shape = getattr(image, "shape", None)
            dtype = getattr(image, "dtype", type(image).__name__)
            raise ValueError(f"stylize: image {i} must be (H, W, 3) uint8, got {shape} {dtype}")
        if int(style) != style or not 0 <= int(style) < n_styles:
            raise ValueError(f"stylize: style index {style!r} of image {i} is out of range "
                             f"[0, {n_styles})")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"stylize: alpha {alpha!r} of image {i} is not in [0, 1]")


__all__ = [
    "NO_STYLE", "STYLE_IMAGE_SUFFIXES", "STYLIZERS", "StyleError", "Stylizer", "check_inputs",
    "resize", "shorter_side_size", "style_set_sha256",
    "iter_style_images", "load_style_images", "make_stylizer", "register_stylizer",
    "style_image_files", "stylizer_class", "stylizer_names",
]
