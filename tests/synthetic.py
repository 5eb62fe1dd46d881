"""Small hand-built pairs for tests of the shard and preview code."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from datagen.format.schema import PairSample

SAMPLE = Path(__file__).resolve().parents[1] / "datagen" / "sample_data" / "coco"
"""The embedded sample: 60 real COCO images (longer side 400 px) with their instance polygons,
in COCO's layout. Tests need nothing outside the repository."""
SAMPLE_ANNOTATIONS = SAMPLE / "annotations" / "instances_train2017.json"
SAMPLE_IMAGES = SAMPLE / "train2017"

GREY = 128


def shifted_square_pair(key: str, shift: int = 8, size: int = 64, grid: int = 4, square=(16, 48),
                        seed: int | None = None, category: str = "dog") -> PairSample:
    """A size x size pair whose square object moves right by ``shift`` pixels, with grid x grid
    fields. Plain grey images when ``seed`` is None, else a coloured, noisy square."""
    low, high = square
    src = np.full((size, size, 3), GREY, np.uint8)
    if seed is not None:
        rng = np.random.default_rng(seed)
        src[low:high, low:high] = (200, 60, 40)
        src = np.clip(src.astype(int) + rng.integers(-5, 6, src.shape), 0, 255).astype(np.uint8)
    src_mask = np.zeros((size, size), np.uint8)
    src_mask[low:high, low:high] = 1
    grid_mask = np.zeros((grid, grid), np.float32)
    grid_mask[1:3, 1:3] = 1.0
    centres = (np.arange(grid) + 0.5) / grid
    xs, ys = np.meshgrid(centres, centres)
    return PairSample(
        key=key, src_image=src, tgt_image=np.roll(src, shift, axis=1), src_mask=src_mask,
        tgt_mask=np.roll(src_mask, shift, axis=1), src_grid_mask=grid_mask, tgt_grid_mask=grid_mask.copy(),
        src_to_tgt=np.stack([xs + shift / size, ys], axis=-1).astype(np.float32),
        tgt_to_src=np.stack([xs - shift / size, ys], axis=-1).astype(np.float32),
        meta={"objects": [{"category": category}], "source_image": {"id": 101}, "background_image": {"id": 202}})
