"""Train-time augmentation of a pair: a thin-plate spline (TPS) on the whole target image.

The authors' training loader warps the target of a pair by a random TPS with probability 0.5
each time the pair is loaded (a new deformation each epoch), on top of the deformations fixed
when the pair was made; :func:`trainer.data.to_example` calls these functions to do the same.

The warp is defined by its *backward* map T (:class:`datagen.format.warps.ThinPlateSpline`):
the warped target shows at point q what the original target shows at T(q), both in normalised
image coordinates ([0, 1]^2, x then y). T is closed-form; its inverse is numerical (Newton).
Every field of the pair follows from T:

- target image: pixel q of the new image = original image at T(q) (bilinear, edges replicated);
- target grid mask: new mask(q) = old mask(T(q)), 0 where T(q) leaves the image (content the
  original did not have);
- target -> source correspondences: new tgt_to_src(q) = old tgt_to_src(T(q));
- source -> target correspondences: new src_to_tgt(p) = T^-1(old src_to_tgt(p)), where the
  content of source cell p now is in the warped target;
- source grid mask: unchanged, except that a cell whose new correspondence leaves the image
  (or whose inverse does not converge) gets 0: that content is not visible in the warped target.

Values "at T(q)" on a grid are read by bilinear interpolation between cell centres, with the
edge cells' values held beyond the outer centres (:func:`sample_cells`). The pair's masks are
already cycle-consistent (:func:`datagen.format.warps.cycle_consistent_masks`): T is a
bijection, so a cell that agreed both ways still does; the builder's rule is not applied again
(applied to its own output it would erode the soft edge of every mask once more). A warped
target cell is exactly 1 (one of the loss's mask cells) only where T(q) lies among fully
covered cells: a thin object keeps fewer such cells, as in the authors' loader, which warps
the grid mask bilinearly too.

The functions are pure (numpy arrays in and out, the inputs never modified), apart from the
draws :func:`random_target_tps` takes from the generator it is given.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import cv2
import numpy as np

from datagen.format.warps import ThinPlateSpline, grid_centres, inside_unit

INVERSE_TOLERANCE = 1e-4
"""Largest |T(T^-1(x)) - x| (normalised, per coordinate) for the inverse at a source cell's
correspondence to count: 0.05 px at 480 px. Newton stops at 1e-5; a cell above this did not
converge and its source mask becomes 0."""
MAP_NODES = 120
"""The spline is evaluated at about this many pixel centres along each side of the warped image
(every ``side // MAP_NODES``-th, and the last) and interpolated bilinearly between them. T is
smooth at the scale of its control grid, so this stays within 4e-4 of the image of evaluating
every pixel (0.2 px at 480 px; tested) for a thirtieth of the time there (about 5 ms against
170 ms on one core); images of up to 2 x MAP_NODES - 1 pixels are evaluated at every pixel."""


def random_target_tps(rng: random.Random, grid_sizes: tuple, jitter: float, tries: int = 10) -> ThinPlateSpline | None:
    """A random backward spline as the authors draw it at train time.

    A g x g control grid over [0, 1]^2 (g drawn from ``grid_sizes``) whose points move by
    U[-jitter/g, jitter/g] of the image in x and in y, then are clamped to [0, 1] (as the authors
    clamp theirs to the image; border points then only slide along or into the image, so the
    warped image has no empty margin). The authors' ``(rand - 0.5) / g`` on a [-1, 1] grid is
    ``jitter`` 0.25 here. A draw that folds the image (a Jacobian determinant <= 0 somewhere) is
    redrawn, up to ``tries`` times; None if every draw folds (never seen at jitter 0.25).

    All draws come from ``rng`` (the stream's seeded generator), so the same seed gives the same
    spline."""
    grid = rng.choice(tuple(grid_sizes))
    axis = np.linspace(0.0, 1.0, grid)
    controls = np.stack(np.meshgrid(axis, axis), axis=-1).reshape(-1, 2)
    amplitude = jitter / grid
    for _ in range(tries):
        moves = np.array([rng.uniform(-amplitude, amplitude) for _ in range(controls.size)]).reshape(controls.shape)
        tps = ThinPlateSpline(controls, np.clip(controls + moves, 0.0, 1.0))
        if tps.min_jacobian_determinant() > 0:
            return tps
    return None


def _lattice(size: int, step: int) -> np.ndarray:
    """Pixel indices 0, step, 2 step, ... and always size - 1: the nodes where T is evaluated."""
    nodes = np.arange(0, size, step)
    return nodes if nodes[-1] == size - 1 else np.append(nodes, size - 1)


def pixel_map(tps: ThinPlateSpline, width: int, height: int, step: int | None = None) -> np.ndarray:
    """(height, width, 2) float32: T at the centre of every pixel of a width x height image,
    normalised (x, y). Exact at every ``step``-th pixel centre and the last, bilinear between
    them; ``step`` None: ``max(side // MAP_NODES, 1)`` along each side (1: exact everywhere)."""
    xs = _lattice(width, step or max(width // MAP_NODES, 1))
    ys = _lattice(height, step or max(height // MAP_NODES, 1))
    nodes = np.stack(np.meshgrid((xs + 0.5) / width, (ys + 0.5) / height), axis=-1)
    values = tps(nodes).astype(np.float32)  # (len(ys), len(xs), 2)

    def weights(nodes_1d: np.ndarray, size: int):
        index = np.arange(size)
        low = np.minimum(np.searchsorted(nodes_1d, index, side="right") - 1, max(len(nodes_1d) - 2, 0))
        high = np.minimum(low + 1, len(nodes_1d) - 1)
        span = np.maximum(nodes_1d[high] - nodes_1d[low], 1)
        return low, high, ((index - nodes_1d[low]) / span).astype(np.float32)

    x0, x1, tx = weights(xs, width)
    y0, y1, ty = weights(ys, height)
    left = values[:, x0]
    rows = left + tx[None, :, None] * (values[:, x1] - left)  # (len(ys), width, 2)
    top = rows[y0]
    full = rows[y1]  # a new array (fancy indexing): filled in place below
    full -= top
    full *= ty[:, None, None]
    full += top
    return full


def warp_image(image: np.ndarray, tps: ThinPlateSpline, step: int | None = None) -> np.ndarray:
    """(H, W, C) or (H, W) image -> the same shape and dtype: pixel q shows the input at T(q)
    (bilinear; beyond the input's edge, its edge pixels). ``step``: that of :func:`pixel_map`."""
    height, width = image.shape[:2]
    coords = pixel_map(tps, width, height, step)
    map_x = coords[..., 0] * width - 0.5  # cv2.remap indexes pixel centres at integers
    map_y = coords[..., 1] * height - 0.5
    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def sample_cells(values: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Bilinear values of an (h, w) or (h, w, C) grid at (..., 2) normalised (x, y) points.

    Cell centres are at ((j + 0.5) / w, (i + 0.5) / h); beyond the outer centres the edge cells'
    values are held. Computed in float64 as two linear interpolations (a + t (b - a)), so a
    point among cells of equal value gets exactly that value: a mask's fully covered cells stay
    exactly 1 (the loss picks the cells equal to the mask's maximum). Returns (..., ) or (..., C)
    float64."""
    grid = np.asarray(values, np.float64)
    scalar = grid.ndim == 2
    if scalar:
        grid = grid[..., None]
    h, w = grid.shape[:2]
    x = np.clip(coords[..., 0] * w - 0.5, 0, w - 1)
    y = np.clip(coords[..., 1] * h - 0.5, 0, h - 1)
    j0 = np.minimum(np.floor(x).astype(np.intp), max(w - 2, 0))
    i0 = np.minimum(np.floor(y).astype(np.intp), max(h - 2, 0))
    j1, i1 = np.minimum(j0 + 1, w - 1), np.minimum(i0 + 1, h - 1)
    tx, ty = (x - j0)[..., None], (y - i0)[..., None]
    top = grid[i0, j0] + tx * (grid[i0, j1] - grid[i0, j0])
    bottom = grid[i1, j0] + tx * (grid[i1, j1] - grid[i1, j0])
    out = top + ty * (bottom - top)
    return out[..., 0] if scalar else out


@dataclass
class WarpedFields:
    """The grid fields of a pair after its target is warped (float32; see the module docstring).

    ``src_mask`` (hs, ws), ``tgt_mask`` (ht, wt) in [0, 1]; ``src_to_tgt`` (hs, ws, 2) normalised
    (x, y) in the warped target; ``tgt_to_src`` (ht, wt, 2) normalised (x, y) in the source."""

    src_mask: np.ndarray
    tgt_mask: np.ndarray
    src_to_tgt: np.ndarray
    tgt_to_src: np.ndarray


def warp_target_fields(tps: ThinPlateSpline, src_mask: np.ndarray, tgt_mask: np.ndarray,
                       src_to_tgt: np.ndarray, tgt_to_src: np.ndarray) -> WarpedFields:
    """The grid fields of a pair whose target image is warped by the backward spline ``tps``.

    ``src_mask`` (hs, ws) and ``tgt_mask`` (ht, wt) soft grid masks in [0, 1]; ``src_to_tgt``
    (hs, ws, 2) and ``tgt_to_src`` (ht, wt, 2) normalised (x, y) in the other image. The rules
    are those of the module docstring; a source cell's correspondence whose inverse does not
    converge (or is not finite) keeps its old value, with its mask set to 0."""
    landed = tps(grid_centres(*tgt_mask.shape))  # T(q) at the target's cell centres
    new_tgt_mask = sample_cells(tgt_mask, landed) * inside_unit(landed)
    new_tgt_to_src = sample_cells(tgt_to_src, landed)

    unwarped, residual = tps.inverse_with_residual(np.asarray(src_to_tgt, np.float64))
    converged = np.all(np.isfinite(unwarped), axis=-1) & np.all(np.abs(residual) <= INVERSE_TOLERANCE, axis=-1)
    new_src_to_tgt = np.where(converged[..., None], unwarped, src_to_tgt)
    new_src_mask = src_mask * (converged & (inside_unit(new_src_to_tgt) > 0))
    return WarpedFields(src_mask=new_src_mask.astype(np.float32), tgt_mask=new_tgt_mask.astype(np.float32),
                        src_to_tgt=new_src_to_tgt.astype(np.float32), tgt_to_src=new_tgt_to_src.astype(np.float32))
