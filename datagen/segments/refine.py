"""From LOST's coarse patch mask to a pixel mask: upsampling, the bilateral solver
(:mod:`datagen.segments.bilateral`), and the post-processing around it.

The coarse mask, upsampled to the image, is the solver's target (confidence 1 everywhere). Its
output is thresholded at 0.5 and its holes filled; of the connected components, those that lie
mostly inside the coarse mask are kept, with the one overlapping it most (not "the second-largest
label", which picks the background when the object is larger than it). When the result agrees
badly with the coarse mask (IoU < 0.5), the coarse mask is kept instead and the
:class:`Refinement` says so.

The solver's output itself (``Refinement.solved``, before any threshold) is what TokenCut's
saliency protocol scores; :func:`encode_soft` keeps it in a bank as an 8-bit PNG that loses
nothing that protocol's thresholds can see.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from datagen.segments.bilateral import SolverConfig, bilateral_solve

MIN_IOU = 0.5
"""Below this IoU between the refined and the coarse mask, the coarse mask is kept."""

SOFT_LEVELS = 255
"""The soft output is stored as level ``ceil(255 * clip(s, 0, 1))``: ``level > k`` exactly when
``s > k / 255``, for every k in 0..254 (TokenCut's thresholds), up to float rounding."""


@dataclass(frozen=True)
class Refinement:
    """mask: (H, W) bool, the segment (the refined mask, or the coarse one on fallback).
    refined: (H, W) bool, the post-processed solver output. iou: IoU(refined, coarse) in [0, 1].
    fallback: True when ``iou < MIN_IOU`` and ``mask`` is the coarse mask. solved: (H, W)
    float32, the solver's output before any threshold (kept whether or not ``fallback``)."""

    mask: np.ndarray
    refined: np.ndarray
    iou: float
    fallback: bool
    solved: np.ndarray


def soft_levels(solved: np.ndarray) -> np.ndarray:
    """(H, W) solver output -> (H, W) uint8 levels ``ceil(255 * clip(s, 0, 1))`` (:data:`SOFT_LEVELS`).

    Ceil, not round: a threshold "s > k / 255" then reads "level > k" with nothing lost, which
    rounding would not give (s just above k / 255 would round down to k)."""
    scaled = np.clip(np.asarray(solved, np.float64), 0.0, 1.0) * SOFT_LEVELS
    return np.ceil(scaled).astype(np.uint8)


def encode_soft(solved: np.ndarray) -> bytes:
    """The solver's (H, W) output as the PNG of its :func:`soft_levels` (grey, 8 bits)."""
    ok, data = cv2.imencode(".png", soft_levels(solved))
    if not ok:
        raise ValueError(f"cannot encode a {np.shape(solved)} soft output as PNG")
    return data.tobytes()


def decode_soft(data: bytes) -> np.ndarray:
    """PNG of :func:`encode_soft` -> (H, W) uint8 levels (level / 255 is the stored value)."""
    levels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if levels is None or levels.ndim != 2 or levels.dtype != np.uint8:
        raise ValueError("not an 8-bit grey PNG of a soft output")
    return levels


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two same-shape bool masks; 1.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def upsample_patches(mask: np.ndarray, shape: tuple[int, int], patch: int = 16) -> np.ndarray:
    """(h, w) patch mask -> (H, W) bool pixel mask: each patch becomes ``patch`` x ``patch``
    pixels, then the padding beyond the image (right and bottom) is cut off."""
    height, width = shape
    big = np.repeat(np.repeat(np.asarray(mask, bool), patch, axis=0), patch, axis=1)
    if big.shape[0] < height or big.shape[1] < width:
        raise ValueError(f"a {mask.shape} patch mask does not cover a {height}x{width} image")
    return big[:height, :width]


def keep_overlapping(binary: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """The 4-connected components of ``binary`` that belong to the object of ``coarse`` (both
    (H, W) bool): the component with the largest overlap with ``coarse``, and any other at least
    half of whose pixels lie inside it. Empty when no component touches ``coarse``."""
    labels, count = ndimage.label(binary)
    if count == 0:
        return np.zeros_like(binary, bool)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    inside = np.bincount(labels.ravel(), weights=coarse.ravel().astype(np.float64), minlength=count + 1)
    sizes[0] = 1
    inside[0] = 0  # label 0 is what binary leaves out, never a component
    keep = inside * 2 >= sizes
    keep[int(np.argmax(inside))] = True
    keep &= inside > 0
    return keep[labels]


def postprocess(solved: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """Solver output (H, W) float -> (H, W) bool: ``> 0.5``, holes filled, :func:`keep_overlapping`."""
    return keep_overlapping(ndimage.binary_fill_holes(solved > 0.5), coarse)


def refine_mask(image: np.ndarray, coarse: np.ndarray, config: SolverConfig = SolverConfig(),
                solve=bilateral_solve) -> Refinement:
    """Refine ``coarse`` ((H, W) bool, at the image's resolution) on ``image`` ((H, W, 3) uint8
    RGB) with ``solve`` (the bilateral solver's signature), then :func:`postprocess`; falls back to
    ``coarse`` when the IoU is below :data:`MIN_IOU`. The solver's output is kept as ``solved``."""
    coarse = np.asarray(coarse, bool)
    solved = np.asarray(solve(image, coarse.astype(np.float32), None, config), np.float32)
    refined = postprocess(solved, coarse)
    iou = mask_iou(refined, coarse)
    fallback = iou < MIN_IOU
    return Refinement(mask=coarse if fallback else refined, refined=refined, iou=iou, fallback=fallback,
                      solved=solved)
