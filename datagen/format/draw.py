"""Drawing a pair a person can look at: source and target side by side, the shared region's
outline (or fill) per object, and lines between corresponding points; and contact sheets of pairs.
All images here are RGB; cv2 colours are therefore given as (r, g, b).
"""
from __future__ import annotations

import cv2
import numpy as np

from datagen.format.schema import PairSample

GAP = 8
"""Pixels between source and target in a rendered pair."""


GAP_COLOUR = (255, 255, 255)


PAIR_WIDTH = 480
"""Width of one pair on a contact sheet."""


SHEET_MARGIN = 8


MASK_ALPHA = 0.45


# Mask colours for object ids 1, 2, ... (RGB); ids beyond the list wrap around.
MASK_COLOURS = ((255, 64, 64), (64, 160, 255), (64, 220, 64), (255, 200, 0), (200, 64, 255),
                (0, 220, 220))


def _line_colours(n: int) -> list[tuple[int, int, int]]:
    """n saturated RGB colours with hues spread around the circle."""
    if n == 0:
        return []
    hues = (np.arange(n) * 180 // n).astype(np.uint8)
    hsv = np.stack([hues, np.full(n, 255, np.uint8), np.full(n, 255, np.uint8)], axis=-1)
    rgb = cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0]
    return [tuple(int(c) for c in colour) for colour in rgb]


def overlay_mask(image: np.ndarray, mask: np.ndarray, alpha: float = MASK_ALPHA, fill: bool = False) -> np.ndarray:
    """(H, W, 3) uint8 RGB image with each object id of the (H, W) uint8 mask outlined and, with
    ``fill``, tinted (``alpha`` of the object's colour). Outlines alone leave the object's pixels
    as they are, so a person can judge the paste; they are drawn thicker to stay visible."""
    out = image.copy()
    thickness = 1 if fill else max(2, round(image.shape[0] / 240))
    for object_id in [int(i) for i in np.unique(mask) if i > 0]:
        colour = np.array(MASK_COLOURS[(object_id - 1) % len(MASK_COLOURS)], np.float32)
        inside = mask == object_id
        if fill:
            out[inside] = np.clip((1 - alpha) * out[inside] + alpha * colour, 0, 255).astype(np.uint8)
        contours, _ = cv2.findContours(inside.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), thickness, cv2.LINE_AA)
    return out


def _label_text(sample: PairSample) -> str:
    categories = [str(obj.get("category", "?")) for obj in sample.meta.get("objects", [])
                  if isinstance(obj, dict)]
    return f"{sample.key}  {', '.join(categories)}" if categories else sample.key


def _draw_label(canvas: np.ndarray, text: str) -> None:
    """Write ``text`` in a small dark box at the canvas's bottom-left corner, in place."""
    scale = max(0.35, canvas.shape[0] / 900)
    thickness = 1
    (width, height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    bottom = canvas.shape[0] - 3
    cv2.rectangle(canvas, (0, bottom - height - baseline - 3), (width + 6, canvas.shape[0] - 1),
                  (0, 0, 0), -1)
    cv2.putText(canvas, text, (3, bottom - baseline), cv2.FONT_HERSHEY_SIMPLEX, scale,
                (255, 255, 255), thickness, cv2.LINE_AA)


def correspondence_points(sample: PairSample, n_lines: int = 24, seed: int = 0) -> list[tuple]:
    """[((xs, ys), (xt, yt)), ...] pixel end points in the source and target images.

    Source points are centres of grid cells with ``src_grid_mask > 0.5``, chosen without
    replacement by ``numpy.random.default_rng(seed)``; target points are ``src_to_tgt`` scaled
    by the target's width and height. Cells whose target is not finite are skipped.
    """
    grid_h, grid_w = sample.src_grid_mask.shape
    src_h, src_w = sample.src_image.shape[:2]
    tgt_h, tgt_w = sample.tgt_image.shape[:2]
    flow = sample.src_to_tgt
    valid = (sample.src_grid_mask > 0.5) & np.isfinite(flow).all(axis=-1)
    cells = np.flatnonzero(valid)
    if n_lines <= 0 or cells.size == 0:
        return []
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(cells, size=min(n_lines, cells.size), replace=False))
    points = []
    for cell in chosen:
        i, j = divmod(int(cell), grid_w)
        source = ((j + 0.5) * src_w / grid_w, (i + 0.5) * src_h / grid_h)
        target = (float(flow[i, j, 0]) * tgt_w, float(flow[i, j, 1]) * tgt_h)
        points.append((source, target))
    return points


def _side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """(H, W_left + GAP + W_right, 3): two images on a gap-coloured canvas, top-aligned."""
    canvas = np.empty((max(left.shape[0], right.shape[0]), left.shape[1] + GAP + right.shape[1], 3), np.uint8)
    canvas[:] = GAP_COLOUR
    canvas[: left.shape[0], : left.shape[1]] = left
    canvas[: right.shape[0], left.shape[1] + GAP:] = right
    return canvas


def render_pair(sample: PairSample, n_lines: int = 24, seed: int = 0, fill: bool = False) -> np.ndarray:
    """(H, W_src + GAP + W_tgt, 3) uint8 RGB: source | target with masks and correspondence lines.

    H is the taller image's height (the other is padded at the bottom). Each object id gets an
    outline and, with ``fill``, a tinted overlay; ``n_lines`` lines in distinct colours join
    source cells to where ``src_to_tgt`` sends them, with small circles at both ends; key and
    categories are written at the bottom-left. A stylised pair gets a second row below, GAP
    pixels apart: the stylised source | stylised target, as stored.
    """
    src = overlay_mask(sample.src_image, sample.src_mask, fill=fill)
    tgt = overlay_mask(sample.tgt_image, sample.tgt_mask, fill=fill)
    canvas = _side_by_side(src, tgt)
    offset = src.shape[1] + GAP
    radius = max(2, round(canvas.shape[0] / 160))
    points = correspondence_points(sample, n_lines, seed)
    for ((xs, ys), (xt, yt)), colour in zip(points, _line_colours(len(points))):
        start = (int(round(xs)), int(round(ys)))
        end = (int(round(xt + offset)), int(round(yt)))
        cv2.line(canvas, start, end, colour, 1, cv2.LINE_AA)
        cv2.circle(canvas, start, radius, colour, -1, cv2.LINE_AA)
        cv2.circle(canvas, end, radius, colour, -1, cv2.LINE_AA)
    _draw_label(canvas, _label_text(sample))
    if sample.src_style_image is None or sample.tgt_style_image is None:
        return canvas
    styled = _side_by_side(sample.src_style_image, sample.tgt_style_image)
    gap = np.empty((GAP, canvas.shape[1], 3), np.uint8)
    gap[:] = GAP_COLOUR
    return np.concatenate([canvas, gap, styled], axis=0)


def fit_width(image: np.ndarray, width: int) -> np.ndarray:
    if image.shape[1] == width:
        return image
    height = max(1, round(image.shape[0] * width / image.shape[1]))
    interpolation = cv2.INTER_AREA if width < image.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


def render_contact_sheet(samples: list[PairSample], columns: int = 2, n_lines: int = 24,
                         seed: int = 0, pair_width: int = PAIR_WIDTH, fill: bool = False) -> np.ndarray:
    """(H, W, 3) uint8 RGB grid of rendered pairs, each scaled to ``pair_width`` pixels wide.

    Pair ``i`` is drawn with ``seed + i``. Raises ValueError for no samples or columns < 1.
    """
    if not samples:
        raise ValueError("render_contact_sheet: no samples to render")
    if columns < 1:
        raise ValueError(f"render_contact_sheet: columns must be >= 1, got {columns}")
    tiles = [fit_width(render_pair(s, n_lines, seed + i, fill), pair_width) for i, s in enumerate(samples)]
    return tile_sheet(tiles, columns, pair_width)


def tile_sheet(tiles: list[np.ndarray], columns: int, tile_width: int, margin: int = SHEET_MARGIN) -> np.ndarray:
    """(H, W, 3) uint8 RGB: ``tiles`` ((h, tile_width, 3) uint8 each, any heights) in rows of
    ``columns`` (fewer if there are fewer tiles), ``margin`` pixels of white around each."""
    columns = min(columns, len(tiles))
    rows = [tiles[r: r + columns] for r in range(0, len(tiles), columns)]
    row_heights = [max(t.shape[0] for t in row) for row in rows]
    width = columns * tile_width + (columns + 1) * margin
    height = sum(row_heights) + (len(rows) + 1) * margin
    sheet = np.empty((height, width, 3), np.uint8)
    sheet[:] = GAP_COLOUR
    top = margin
    for row, row_height in zip(rows, row_heights):
        for c, tile in enumerate(row):
            left = margin + c * (tile_width + margin)
            sheet[top: top + tile.shape[0], left: left + tile.shape[1]] = tile
        top += row_height + margin
    return sheet
