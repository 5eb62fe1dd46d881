"""``--style color``: the weight-free fallback of the AdaIN stylizer.

A global colour transfer (Reinhard et al. 2001) in CIE Lab: each Lab channel of the content
is normalised to zero mean and unit standard deviation and given the style image's mean and
standard deviation, then mixed with the content by ``alpha`` as AdaIN mixes features
(``alpha * transferred + (1 - alpha) * content``). Only colours change, not textures; it is
recorded as such in the manifest.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from datagen.style import (
    StyleError,
    check_inputs,
    iter_style_images,
    register_stylizer,
    resize,
    shorter_side_size,
    style_set_sha256,
)

STATS_SIDE = 512
"""Style images are reduced to this shorter side (area averaging) before their statistics
are measured; only larger images are reduced."""
EPS = 1e-6


def to_lab(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) float32 Lab (L in [0, 100], a and b about [-127, 127])."""
    return cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)


def from_lab(lab: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 Lab -> (H, W, 3) uint8 RGB (out-of-gamut colours clipped)."""
    rgb = cv2.cvtColor(np.ascontiguousarray(lab, dtype=np.float32), cv2.COLOR_Lab2RGB)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def lab_stats(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std), each (3,) float64, of an (H, W, 3) uint8 RGB image in Lab."""
    lab = to_lab(image).reshape(-1, 3).astype(np.float64)
    return lab.mean(axis=0), lab.std(axis=0)


def color_transfer(image: np.ndarray, style_mean: np.ndarray, style_std: np.ndarray,
                   alpha: float) -> np.ndarray:
    """(H, W, 3) uint8 RGB with its Lab mean/std moved to the style's, mixed by ``alpha``."""
    lab = to_lab(image).astype(np.float64)
    mean = lab.reshape(-1, 3).mean(axis=0)
    std = lab.reshape(-1, 3).std(axis=0)
    transferred = (lab - mean) / (std + EPS) * style_std + style_mean
    return from_lab(alpha * transferred + (1.0 - alpha) * lab)


@register_stylizer("color")
class ColorStylizer:
    """Lab mean/std colour transfer from the images of ``style_dir`` (no network, no weights).

    The statistics of each style image are computed once, when the stylizer is made; the
    pixels are not kept.
    """

    name = "color"

    def __init__(self, style_dir=None):
        if style_dir is None:
            raise StyleError("the colour stylizer needs a style folder (style_dir)")
        self.style_dir = Path(style_dir)
        self.style_paths: list[Path] = []
        means, stds = [], []
        for path, image in iter_style_images(style_dir):
            height, width = image.shape[:2]
            if min(height, width) > STATS_SIDE:
                image = resize(image, *shorter_side_size(height, width, STATS_SIDE))
            mean, std = lab_stats(image)
            self.style_paths.append(path)
            means.append(mean)
            stds.append(std)
        self.style_means = np.stack(means)
        """(n_styles, 3) float64 Lab means of the style images."""
        self.style_stds = np.stack(stds)
        """(n_styles, 3) float64 Lab standard deviations of the style images."""
        self._description: dict | None = None

    @property
    def n_styles(self) -> int:
        return len(self.style_paths)

    def stylize(self, images: list[np.ndarray], styles: list[int],
                alphas: list[float]) -> list[np.ndarray]:
        """Stylise (H, W, 3) uint8 RGB ``images[i]`` with the colours of style ``styles[i]`` at
        strength ``alphas[i]``; returns (H, W, 3) uint8 RGB images of the same sizes."""
        check_inputs(images, styles, alphas, self.n_styles)
        return [color_transfer(image, self.style_means[int(s)], self.style_stds[int(s)], float(a))
                for image, s, a in zip(images, styles, alphas)]

    def describe(self) -> dict:
        """Method (the colour fallback), style folder, number and hash of the style images."""
        if self._description is None:
            self._description = {
                "method": "color",
                "description": "weight-free colour fallback: Lab mean/std transfer from the "
                               "style image (Reinhard et al. 2001), no network",
                "weights": None,
                "style_dir": str(self.style_dir),
                "n_styles": self.n_styles,
                "styles_sha256": style_set_sha256(self.style_paths),
                "device": "cpu",
                "dtype": "float32",
            }
        return dict(self._description)
