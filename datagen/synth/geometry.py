"""Where a segment goes: the shape and placement of its warp in the target, its outline, and the
resampling of its pixels through the warp (the warp itself, :class:`~datagen.format.warps.SegmentWarp`,
is part of the stored format).

Coordinates follow :mod:`datagen.format.warps`: continuous pixels (pixel column j spans [j, j + 1]);
cv2.remap indexes pixel centres at integers, hence the 0.5 shifts in :func:`remap_maps`.
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy import sparse

from datagen.format.warps import SegmentWarp, ThinPlateSpline, apply_affine


def rotation_aspect_matrix(angle_deg: float, aspect_x: float, aspect_y: float) -> np.ndarray:
    """(3, 3) matrix: scale the axes by (aspect_x, aspect_y), then rotate by angle (counter-clockwise
    as seen on screen, i.e. with y pointing down)."""
    theta = np.deg2rad(angle_deg)
    cos, sin = np.cos(theta), np.sin(theta)
    rotate = np.array([[cos, sin, 0.0], [-sin, cos, 0.0], [0.0, 0.0, 1.0]])
    return rotate @ np.diag([aspect_x, aspect_y, 1.0])


def place_in_region(
    shape_matrix: np.ndarray,
    boundary_src: np.ndarray,
    tps: ThinPlateSpline | None,
    src_size: tuple,
    region: tuple,
    ratio: float,
    position: tuple,
) -> tuple[SegmentWarp, np.ndarray]:
    """Scale and translate a shaped segment so that its box fills ``ratio`` of ``region``.

    ``shape_matrix`` (3, 3) is the aspect/rotation part; ``boundary_src`` (N, 2) continuous source
    pixels, the centres of the pixels on the segment's outline (:func:`mask_boundary`); ``region``
    (x0, y0, x1, y1) target pixels; ``position`` two numbers in [0, 1) choosing where the box goes
    inside the region (fully inside). Returns the warp and the outline mapped into the target:
    the corners of those pixels, (4 N, 2) continuous pixels (:meth:`SegmentWarp.squares_to_tgt`).
    """
    shaped = SegmentWarp(shape_matrix, src_size, tps).squares_to_tgt(boundary_src)
    low, high = shaped.min(0), shaped.max(0)
    extent = np.maximum(high - low, 1e-6)
    x0, y0, x1, y1 = region
    scale = ratio * min((x1 - x0) / extent[0], (y1 - y0) / extent[1])
    box = extent * scale
    free = np.maximum(np.array([x1 - x0, y1 - y0]) - box, 0.0)
    offset = np.floor(np.array([x0, y0]) + np.asarray(position) * np.floor(free))
    translate = np.array([[scale, 0, offset[0] - scale * low[0]], [0, scale, offset[1] - scale * low[1]], [0, 0, 1]])
    return SegmentWarp(translate @ shape_matrix, src_size, tps), apply_affine(translate, shaped)


def warp_roi(layers: list, warp: SegmentWarp, roi: tuple, lattice_step: float = 4.0) -> list:
    """Source ``layers`` [(image (H, W[, C]), cv2 border mode), ...] resampled bilinearly over the
    target rectangle ``roi`` (x0, y0, x1, y1) through ``warp.tgt_to_src``; one output per layer."""
    resample = roi_resampler(warp, roi, lattice_step)
    return [resample(image, border) for image, border in layers]


def roi_resampler(warp: SegmentWarp, roi: tuple, lattice_step: float = 4.0):
    """A function ``resample(image (H, W[, C]), cv2 border mode)`` that resamples a source image
    bilinearly over the target rectangle ``roi`` (x0, y0, x1, y1) through ``warp.tgt_to_src``.

    Without a TPS this is cv2.warpAffine; with one, cv2.remap on the maps of :func:`remap_maps`,
    computed once here for all the images resampled.
    """
    x0, y0, x1, y1 = roi
    size = (x1 - x0, y1 - y0)
    if warp.tps is None:
        # pixel index (i, j) of the ROI is continuous (x0 + j + 0.5, y0 + i + 0.5) in the target
        to_target = np.array([[1.0, 0, x0 + 0.5], [0, 1.0, y0 + 0.5], [0, 0, 1]])
        to_index = np.array([[1.0, 0, -0.5], [0, 1.0, -0.5], [0, 0, 1]])
        matrix = (to_index @ warp.inverse_affine() @ to_target)[:2]
        return lambda image, border: cv2.warpAffine(image, matrix, size, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                                    borderMode=border, borderValue=0)
    map_x, map_y = remap_maps(warp, roi, lattice_step)
    return lambda image, border: cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=border, borderValue=0)


def remap_maps(warp: SegmentWarp, roi: tuple, lattice_step: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """cv2.remap maps (map_x, map_y), each (y1 - y0, x1 - x0) float32: the source pixel index
    (continuous pixel - 0.5) that each pixel of the target rectangle ``roi`` comes from.

    ``warp.tgt_to_src`` is evaluated exactly on a lattice of target points and interpolated in
    between with Catmull-Rom cubics, one axis after the other. The spline's second derivatives are
    only log-singular, so the error falls like the square of the step in source pixels: below 0.1
    source pixel at ``lattice_step`` = 4 source pixels for the paper's splines. On a shrunken
    segment (largest scale s < 1) that error moves the content by s times as much in the target,
    so the step grows by 1 / sqrt(s) for the same 0.1 pixel in the target: 2 to 3 times fewer
    lattice points there (tested: within 0.1 source or 0.1 target pixel, whichever is larger).
    In target pixels the step is that many source pixels times the affine part's smallest
    singular value, and at least one. A step of 8 target pixels with bilinear interpolation
    instead is off by up to 9 source pixels on a shrunken segment.
    """
    x0, y0, x1, y1 = roi
    largest_scale, smallest_scale = np.linalg.svd(warp.affine[:2, :2], compute_uv=False)
    step = max(1.0, lattice_step * smallest_scale * max(1.0, largest_scale ** -0.5))
    weights_x, nodes_x = catmull_rom_matrix(x1 - x0, step)
    weights_y, nodes_y = catmull_rom_matrix(y1 - y0, step)
    lattice = warp.tgt_to_src(np.stack(np.meshgrid(x0 + 0.5 + nodes_x, y0 + 0.5 + nodes_y), axis=-1)) - 0.5
    lattice = lattice.astype(np.float32)
    # sparse products (scipy's own loops, not BLAS): the same rounding with any thread count
    return tuple(weights_y @ (weights_x @ lattice[..., axis].T).T for axis in (0, 1))


def catmull_rom_matrix(count: int, step: float) -> tuple[sparse.csr_array, np.ndarray]:
    """Interpolation of ``count`` samples spaced one apart from nodes spaced ``step`` apart.

    Returns ``weights``, a (count, n) float32 sparse matrix with four non-zeros a row, and the
    ``nodes`` (n,) float64 positions: sample 0 is at 0 and so is node 1 (node 0 is one step
    before it, and two nodes follow the last sample). ``weights @ f(nodes)`` is the Catmull-Rom
    cubic through the f(nodes) at the samples: exact for polynomials of degree 2, with an error
    O(step^3) for smooth f.
    """
    n = int(np.floor((count - 1) / step)) + 4
    nodes = step * (np.arange(n) - 1.0)
    position = np.arange(count) / step + 1.0
    cell = np.floor(position).astype(np.int32)
    t = position - cell
    t2, t3 = t * t, t * t * t
    weights = np.stack([-t3 + 2 * t2 - t, 3 * t3 - 5 * t2 + 2, -3 * t3 + 4 * t2 + t, t3 - t2], axis=1) / 2
    columns = cell[:, None] + np.arange(-1, 3, dtype=np.int32)
    rows = np.arange(0, 4 * count + 1, 4, dtype=np.int32)
    return sparse.csr_array((weights.astype(np.float32).ravel(), columns.ravel(), rows), shape=(count, n)), nodes


def mask_boundary(mask: np.ndarray, spacing: float = 8.0) -> np.ndarray:
    """(N, 2) continuous pixel coordinates around a binary mask's outline, for boxes of its warp:
    the centres of outline pixels, each standing for its whole pixel (the warp maps its four
    corners, :meth:`SegmentWarp.squares_to_tgt`) so that the warped box contains the whole mask.

    The outline is simplified to a polygon within half a pixel, then resampled every
    ``spacing`` pixels: a spline bends long straight edges (an object cut by the image border
    bulges out), so their end points alone would miss the warped extent.
    """
    contours, _ = cv2.findContours(np.asarray(mask, np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return np.zeros((0, 2))
    starts, stops = [], []
    for contour in contours:
        polygon = cv2.approxPolyDP(contour, 0.5, True).reshape(-1, 2).astype(np.float64)
        starts.append(polygon)
        stops.append(np.concatenate((polygon[1:], polygon[:1])))  # np.roll(polygon, -1, axis=0)
    starts, stops = np.concatenate(starts), np.concatenate(stops)
    steps = np.maximum(1, np.ceil(np.abs(stops - starts).max(1) / spacing)).astype(int)
    edge = np.repeat(np.arange(len(steps)), steps)
    fraction = (np.arange(len(edge)) - np.repeat(np.cumsum(steps) - steps, steps)) / steps[edge]
    return starts[edge] + (stops - starts)[edge] * fraction[:, None] + 0.5
