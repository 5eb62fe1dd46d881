"""Scores of a query against candidates from the network's outputs: pure torch functions.

Two scores, both batched over candidates (B pairs of one query with B candidates):

- ``eq3`` (default): the paper's Eq. 3 as written, :func:`trainer.score.pair_score`, with the
  query's predicted mask multiplied by its region mask (the box's cells; all ones for a whole
  image): sum over query cells p of M_q(p) * M_c(T(p)) * cos(f_q(p), f_c(T(p))), the candidate's
  mask and features read bilinearly at T(p).
- ``released``: what the authors' evaluation scripts compute (evalBrueghel.py, evalTokyo.py), to
  compare with their numbers: the query's region mask is first made consistent with the query's
  own prediction on itself (:func:`self_consistent_mask`); each query cell p is sent to the
  candidate cell nearest T(p) (x * (w - 1) rounded); its weight is M_q(p) * M_c(T(p)) (bilinear);
  a candidate cell reached by several query cells counts once, with the best weighted cosine
  (and never below 0). The sum over the reached cells is the score.

Region masks come from boxes by :func:`box_cell_mask`, as the authors' Brueghel protocol does.
Arrays: outputs (B, 3, h, w) float in (0, 1), channels x, y of the correspondence normalised to
[0, 1] of the other image, then the mask; features (B, C, h, w), unit L2 norm over C.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..score import pair_score, transport

SCORES = ("eq3", "released")
"""Names of the scores :func:`score_pairs` computes."""


def box_cell_mask(box, image_size: tuple[int, int], grid: tuple[int, int], dilate: int = 1) -> torch.Tensor:
    """(h, w) float32 0/1 mask of the grid cells a pixel box covers, grown by ``dilate`` cells.

    ``box`` [x1, y1, x2, y2] in pixels of an image of ``image_size`` (width, height) seen on a
    ``grid`` of (h, w) cells. The box's corners in cells are rounded, then moved out by
    ``dilate`` cells and clipped to the grid (the authors' ``get_qry_bb``: a box of 64 px on a
    16 px stride covers 4 cells, 6 with the dilation). A box smaller than a cell still covers
    the cell of its centre.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    width, height = image_size
    h, w = grid
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"box {list(box)} must have x2 > x1 and y2 > y1")
    cell_w, cell_h = width / w, height / h
    left = max(int(round(x1 / cell_w)) - dilate, 0)
    top = max(int(round(y1 / cell_h)) - dilate, 0)
    right = min(int(round(x2 / cell_w)) + dilate, w)
    bottom = min(int(round(y2 / cell_h)) + dilate, h)
    mask = torch.zeros(h, w)
    if right <= left or bottom <= top:  # a tiny box: the cell of its centre
        cx = min(max(int((x1 + x2) / 2 / cell_w), 0), w - 1)
        cy = min(max(int((y1 + y2) / 2 / cell_h), 0), h - 1)
        mask[cy, cx] = 1.0
        return mask
    mask[top:bottom, left:right] = 1.0
    return mask


def self_consistent_mask(region: torch.Tensor, self_out: torch.Tensor, self_out_other: torch.Tensor) -> torch.Tensor:
    """The authors' ``consistent_mask`` of a query: (h, w) region mask -> (h, w) float.

    ``self_out``, ``self_out_other``: the network's (3, h, w) outputs for the pair (query, query).
    The region times the predicted mask is carried to the other copy through its predicted
    correspondences, multiplied by that copy's mask, carried back, and multiplied by the start:
    cells whose content the network does not find again in the same image fade.
    """
    start = region * self_out[2]
    there = transport(start[None, None], self_out_other[None, :2])[0, 0] * self_out_other[2]
    back = transport(there[None, None], self_out[None, :2])[0, 0]
    return start * back


def eq3_scores(query_mask: torch.Tensor, query_out: torch.Tensor, cand_out: torch.Tensor,
               query_features: torch.Tensor, cand_features: torch.Tensor) -> torch.Tensor:
    """Eq. 3 of B pairs -> (B,): ``query_mask`` (h, w) region mask, ``query_out`` (B, 3, h, w),
    ``cand_out`` (B, 3, h', w'), features (B, C, h, w) and (B, C, h', w')."""
    source_mask = query_out[:, 2:3] * query_mask.to(query_out)[None, None]
    return pair_score(source_mask, cand_out[:, 2:3], query_out[:, :2], query_features, cand_features)


def released_scores(query_mask: torch.Tensor, query_out: torch.Tensor, cand_out: torch.Tensor,
                    query_features: torch.Tensor, cand_features: torch.Tensor) -> torch.Tensor:
    """The authors' evaluation score of B pairs -> (B,) (see the module docstring); same
    arguments as :func:`eq3_scores`, ``query_mask`` being the self-consistent region mask."""
    batch, channels, h_c, w_c = cand_features.shape
    weight = query_out[:, 2] * query_mask.to(query_out)[None] * transport(cand_out[:, 2:3], query_out[:, :2])[:, 0]
    col = torch.round(query_out[:, 0] * (w_c - 1)).long().clamp(0, w_c - 1)
    row = torch.round(query_out[:, 1] * (h_c - 1)).long().clamp(0, h_c - 1)
    cell = (row * w_c + col).flatten(1)  # (B, h * w) candidate cell of each query cell
    flat = F.normalize(cand_features, dim=1).flatten(2)  # (B, C, h' * w')
    reached = torch.gather(flat, 2, cell[:, None, :].expand(batch, channels, cell.shape[1]))
    cosine = (F.normalize(query_features, dim=1).flatten(2) * reached).sum(dim=1)
    best = torch.zeros(batch, h_c * w_c, dtype=cosine.dtype, device=cosine.device)
    best = best.scatter_reduce(1, cell, (cosine * weight.flatten(1)), reduce="amax", include_self=True)
    return best.sum(dim=1)


def score_pairs(name: str, query_mask: torch.Tensor, query_out: torch.Tensor, cand_out: torch.Tensor,
                query_features: torch.Tensor, cand_features: torch.Tensor) -> torch.Tensor:
    """The score ``name`` (one of :data:`SCORES`) of B pairs -> (B,) float."""
    if name == "eq3":
        return eq3_scores(query_mask, query_out, cand_out, query_features, cand_features)
    if name == "released":
        return released_scores(query_mask, query_out, cand_out, query_features, cand_features)
    raise ValueError(f"unknown score {name!r}; choose from {', '.join(SCORES)}")


def score_ceiling(query_mask: torch.Tensor) -> float:
    """The largest score a pair can reach: the sum of the query's region mask, in cells."""
    return float(query_mask.sum()) if query_mask.numel() else math.nan
