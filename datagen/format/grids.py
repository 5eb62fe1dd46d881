"""The grid fields of a pair from its stored warps: correspondences in both directions and
cycle-consistent soft masks on an h x w grid (paper section 3.1). The builder computes them once;
``datagen verify`` and the trainer recompute them from a sample's JSON at any grid size.
"""
from __future__ import annotations

import functools

import cv2
import numpy as np

from datagen.format.schema import PairSample
from datagen.format.warps import SegmentWarp, cycle_consistent_masks, grid_centres


def grids_from_warps(warps: list, src_mask: np.ndarray, grid_shape: tuple, tgt_size: tuple) -> dict:
    """Correspondence fields and cycle-consistent grid masks of a pair.

    ``warps``: one SegmentWarp per object (object k has id k + 1 in ``src_mask``, a (H, W) uint8
    id map of the source). Returns float32 arrays: ``src_to_tgt`` (h, w, 2), ``tgt_to_src``
    (h, w, 2), ``src_grid_mask`` (h, w), ``tgt_grid_mask`` (h, w); flows are normalised to the
    other image, and a cell takes the flow of the object that covers most of it. Also
    ``round_trip_cells``: the largest |tgt_to_src(src_to_tgt(p)) - p| over source cell centres,
    in cells (non-zero only through the TPS's numerical inverse, which measures it).
    """
    src_size = (src_mask.shape[1], src_mask.shape[0])
    grid_shape, tgt_size = tuple(int(n) for n in grid_shape), tuple(int(n) for n in tgt_size)
    cell = np.asarray(src_size, float) / np.asarray(grid_shape[::-1], float)
    # warp_grid's cell centres in pixels, of each image (cached): the same values
    centres, tgt_centres = cell_centres(grid_shape, src_size), cell_centres(grid_shape, tgt_size)
    src_to_tgt = tgt_to_src = None
    src_masks, tgt_masks, round_trip = [], [], 0.0
    for k, warp in enumerate(warps):
        landed, round_trip_px = warp.src_to_tgt_checked(centres)
        forward = landed / np.asarray(tgt_size, float)
        backward = warp.tgt_to_src(tgt_centres) / np.asarray(src_size, float)
        if warp.tps is not None:  # an affine warp is inverted exactly: no round-trip error
            round_trip = max(round_trip, float((np.abs(round_trip_px) / cell).max()))
        coverage = cell_coverage(src_mask == k + 1, grid_shape)
        src_grid, tgt_grid = cycle_consistent_masks(coverage, forward, backward)
        if k == 0:
            src_to_tgt, tgt_to_src = forward, backward
        else:
            src_to_tgt = np.where((src_grid > np.maximum.reduce(src_masks))[..., None], forward, src_to_tgt)
            tgt_to_src = np.where((tgt_grid > np.maximum.reduce(tgt_masks))[..., None], backward, tgt_to_src)
        src_masks.append(src_grid)
        tgt_masks.append(tgt_grid)
    return {
        "src_to_tgt": src_to_tgt.astype(np.float32),
        "tgt_to_src": tgt_to_src.astype(np.float32),
        "src_grid_mask": np.clip(sum(src_masks), 0, 1).astype(np.float32),
        "tgt_grid_mask": np.clip(sum(tgt_masks), 0, 1).astype(np.float32),
        "round_trip_cells": round_trip,
    }


def cell_coverage(inside: np.ndarray, grid_shape: tuple) -> np.ndarray:
    """(h, w) float32 fraction of each cell of an h x w grid that the (H, W) bool mask ``inside``
    covers: cv2.resize of its 0/1 float32 values with INTER_AREA. Where the cells are whole
    blocks of a power of two pixels (the builder's 16 x 16), the mask's pixels are counted in
    integers and divided by the block's area, which gives INTER_AREA's values exactly (every
    partial sum of 0/1 values over such a block is exact in float32), with no float32 copy of
    the whole mask."""
    rows, cols = grid_shape
    height, width = inside.shape
    if rows and cols and height % rows == 0 and width % cols == 0:
        block_y, block_x = height // rows, width // cols
        area = block_y * block_x
        if area & (area - 1) == 0 and area <= 1 << 15:  # a power of two; counts fit uint16
            counts = inside.view(np.uint8).reshape(rows, block_y, width).sum(axis=1, dtype=np.uint16)
            counts = counts.reshape(rows, cols, block_x).sum(axis=2, dtype=np.uint16)
            return counts.astype(np.float32) / np.float32(area)
    return cv2.resize(inside.astype(np.float32), (cols, rows), interpolation=cv2.INTER_AREA)


@functools.lru_cache(maxsize=32)
def cell_centres(grid_shape: tuple, size: tuple) -> np.ndarray:
    """(h, w, 2) continuous pixels of the cell centres of an h x w grid over an image of ``size``
    (W, H): :func:`~datagen.format.warps.grid_centres` times the size, as
    :func:`~datagen.format.warps.warp_grid` computes them (cached, read-only)."""
    centres = grid_centres(*grid_shape) * np.asarray(size, float)
    centres.flags.writeable = False
    return centres


def recompute_grids(sample: PairSample, grid_shape: tuple | None = None) -> dict:
    """Recompute a stored sample's grid fields from its JSON warps and its source mask, at the
    stored grid size or any other ``grid_shape`` (h, w). Used by ``datagen verify`` and by readers
    that need another stride."""
    warps = [SegmentWarp.from_json(obj["warp"]) for obj in sample.meta["objects"]]
    shape = grid_shape or sample.src_grid_mask.shape
    tgt_size = (sample.tgt_mask.shape[1], sample.tgt_mask.shape[0])
    return grids_from_warps(warps, sample.src_mask, tuple(shape), tgt_size)
