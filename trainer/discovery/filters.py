"""Pairs left out of the clusters' graph, as the paper does on Brueghel: duplicates (two copies of
one picture match everywhere, and would make every cluster a cluster of copies) and pairs that
match on their borders (frames, margins, scan edges: similar borders are not a repeated detail).

Pure functions on the stored predictions (:class:`trainer.discovery.pairs.Predictions`):
``out_ij`` / ``out_ji`` (P, 3, h, w), mask in channel 2.
"""
from __future__ import annotations

import numpy as np


def duplicate_pairs(out_ij: np.ndarray, out_ji: np.ndarray, threshold: float = 0.9) -> np.ndarray:
    """(P,) bool: pairs whose mean predicted mask is at least ``threshold`` in both images (the
    network finds all of each image in the other)."""
    mean_ij = np.asarray(out_ij[:, 2], np.float32).reshape(len(out_ij), -1).mean(axis=1)
    mean_ji = np.asarray(out_ji[:, 2], np.float32).reshape(len(out_ji), -1).mean(axis=1)
    return (mean_ij >= threshold) & (mean_ji >= threshold)


def border_share(out: np.ndarray, mask_threshold: float, border: int = 1) -> np.ndarray:
    """(P,) float: of each prediction's cells whose mask passes ``mask_threshold``, the share lying
    within ``border`` cells of the image's edge (0 when none passes)."""
    h, w = out.shape[2:]
    ring = np.ones((h, w), bool)
    ring[border: h - border, border: w - border] = False
    confident = np.asarray(out[:, 2], np.float32) > mask_threshold
    counts = confident.reshape(len(out), -1).sum(axis=1)
    on_ring = (confident & ring).reshape(len(out), -1).sum(axis=1)
    return np.where(counts > 0, on_ring / np.maximum(counts, 1), 0.0)


def border_pairs(out_ij: np.ndarray, out_ji: np.ndarray, mask_threshold: float, share: float = 0.5,
                 border: int = 1) -> np.ndarray:
    """(P,) bool: pairs whose confident cells lie mostly (at least ``share``) on the ``border``-cell
    ring of both images."""
    return (border_share(out_ij, mask_threshold, border) >= share) & \
        (border_share(out_ji, mask_threshold, border) >= share)
