"""Pictures of a query's best matches: one row per match, the query and the candidate under heat
maps of the masks the network predicts for that pair, the query's region outlined, and a label
with the rank, the score and the candidate's name."""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from datagen.format.draw import GAP, fit_width
from datagen.format.imageio import load_rgb

from ..visual import heat_map
from .engine import PairScorer, database_view

TILE_WIDTH = 320
"""Width of each image in a picture, pixels."""
REGION_COLOUR = (64, 220, 64)


def _label(image: np.ndarray, text: str) -> np.ndarray:
    """``image`` with ``text`` in a dark box at its top-left corner."""
    out = image.copy()
    scale = 0.45
    (width, height), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    cv2.rectangle(out, (0, 0), (min(width + 8, out.shape[1]), height + base + 6), (0, 0, 0), -1)
    cv2.putText(out, text, (4, height + 3), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def _outline_region(image: np.ndarray, region: torch.Tensor) -> np.ndarray:
    """The cells of the (h, w) region mask outlined on ``image``."""
    mask = cv2.resize((region.numpy() > 0.5).astype(np.uint8), (image.shape[1], image.shape[0]),
                      interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = image.copy()
    cv2.drawContours(out, contours, -1, REGION_COLOUR, 2, cv2.LINE_AA)
    return out


def match_rows(query_view: np.ndarray, region: torch.Tensor, query_outs: torch.Tensor, cand_views: Sequence,
               cand_outs: torch.Tensor, labels: Sequence[str]) -> np.ndarray:
    """(H, W, 3) uint8 RGB: a row per match (query | candidate), stacked with white gaps."""
    rows = []
    for cand_view, query_out, cand_out, label in zip(cand_views, query_outs, cand_outs, labels):
        left = fit_width(_outline_region(heat_map(query_view, query_out[2].numpy()), region), TILE_WIDTH)
        right = fit_width(heat_map(cand_view, cand_out[2].numpy()), TILE_WIDTH)
        height = max(left.shape[0], right.shape[0])
        row = np.full((height, 2 * TILE_WIDTH + GAP, 3), 255, np.uint8)
        row[: left.shape[0], :TILE_WIDTH] = left
        row[: right.shape[0], TILE_WIDTH + GAP:] = _label(right, label)
        rows.append(row)
    gap = np.full((GAP, 2 * TILE_WIDTH + GAP, 3), 255, np.uint8)
    stacked = [part for row in rows for part in (row, gap)][:-1]
    return np.concatenate(stacked) if stacked else np.full((GAP, 2 * TILE_WIDTH + GAP, 3), 255, np.uint8)


def picture_name(index: int, query_name: str) -> str:
    """'00012-name.jpg' with anything but letters, digits, '.', '-' and '_' replaced by '_'."""
    return f"{index:05d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', query_name)[:80]}.jpg"


def write_query_picture(path: Path, scorer: PairScorer, query_feat: torch.Tensor, query_view: np.ndarray,
                        region: torch.Tensor, best: Sequence[tuple[str, float]], cache, row_of: dict,
                        records: Sequence, resolution) -> None:
    """Draw the ``best`` (candidate name, score) matches of one query into ``path`` (JPEG)."""
    rows = [row_of[name] for name, _ in best]
    if rows:
        query_outs, cand_outs = scorer.outputs(query_feat, cache.get(rows))
        query_outs, cand_outs = query_outs.cpu(), cand_outs.cpu()
    else:
        query_outs = cand_outs = torch.zeros(0, 3, 1, 1)
    views = [database_view(load_rgb(records[row].path), resolution) for row in rows]
    labels = [f"{rank}. {score:.2f}  {name}" for rank, (name, score) in enumerate(best, start=1)]
    picture = match_rows(query_view, region.cpu(), query_outs, views, cand_outs, labels)
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise OSError(f"{path}: cannot encode the picture")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.tobytes())
