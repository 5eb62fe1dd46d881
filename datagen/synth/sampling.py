"""Seeded random choices for one attempted pair: which segments, which background, which warps.

Everything random about a pair is drawn here, from one ``numpy.random.Generator`` seeded by
``SeedSequence(root_seed, spawn_key=(shard, attempt))``, into a plain :class:`PairPlan`. The
builder (``pairs.py``) then only executes the plan, so a plan fully determines a sample.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from datagen.config import BuildConfig


def attempt_rng(root_seed: int, shard: int, attempt: int) -> np.random.Generator:
    """The generator of one attempt: independent streams per (shard, attempt)."""
    return np.random.default_rng(np.random.SeedSequence(root_seed, spawn_key=(shard, attempt)))


@dataclass(frozen=True)
class ObjectPlan:
    """Random warp parameters of one segment."""

    segment_row: int
    aspect_x: float
    aspect_y: float
    angle_deg: float
    ratio: float
    position: tuple
    tps_grid: int
    """0 when no thin-plate spline is applied."""
    tps_seed: int


@dataclass(frozen=True)
class PairPlan:
    """All choices of one attempted pair (source image, background, objects, regions)."""

    source_image: int
    background_image: int
    objects: tuple
    regions: tuple
    """One (x0, y0, x1, y1) target rectangle per object, in pixels."""
    border_crop: bool

    def to_json(self) -> dict:
        return asdict(self)


class Sampler:
    """Draws :class:`PairPlan` s from a segment bank. Built once per worker (indexes the bank)."""

    def __init__(self, bank, config: BuildConfig):
        self.bank = bank
        self.config = config
        categories = np.asarray(bank.category_ids)
        self.categories = np.unique(categories)
        if len(self.categories) == 0:
            raise ValueError("the segment bank has no segments: nothing to build pairs from")
        # rows of each category, ascending; grouped by one sort (a LOST bank has a category per segment)
        order = np.argsort(categories, kind="stable")
        starts = np.searchsorted(categories[order], self.categories)
        self.rows_by_category = {int(c): rows for c, rows in zip(self.categories, np.split(order, starts[1:]))}
        self.background_ids = np.asarray(bank.images.image_ids)
        self.two_category_images = np.array(
            [image for image in np.unique(bank.image_ids) if len(bank.categories_of_image(int(image))) >= 2],
            dtype=np.int64,
        )

    def plan(self, rng: np.random.Generator, objects: int) -> PairPlan:
        """Draw a plan for a pair with ``objects`` (1 or 2) segments."""
        if objects == 1:
            category = int(rng.choice(self.categories))
            row = int(rng.choice(self.rows_by_category[category]))
            source = int(self.bank.image_ids[row])
            rows, excluded = (row,), {category}
        else:
            if len(self.two_category_images) == 0:
                raise ValueError("no image has segments of two categories: two-object pairs are impossible")
            source = int(rng.choice(self.two_category_images))
            rows = self._two_segments(rng, source)
            excluded = {int(self.bank.category_ids[r]) for r in rows}
        background = self._background(rng, excluded, source)
        border_crop = objects == 1 and rng.random() < self.config.border_crop_prob
        size = self.config.image_size
        regions = ((0, 0, size, size),) if objects == 1 else self._split_regions(rng, size)
        plans = tuple(self._object(rng, row, objects == 2) for row in rows)
        return PairPlan(source, background, plans, regions, bool(border_crop))

    def _two_segments(self, rng, image_id: int) -> tuple:
        rows = self.bank.segments_of_image(image_id)
        cats = np.asarray(self.bank.category_ids)[rows]
        first, second = rng.choice(np.unique(cats), size=2, replace=False)
        return (int(rng.choice(rows[cats == first])), int(rng.choice(rows[cats == second])))

    def _background(self, rng, excluded: set, source: int, tries: int = 100) -> int:
        """A random image containing none of the ``excluded`` categories (and not the source)."""
        for _ in range(tries):
            image = int(rng.choice(self.background_ids))
            if image != source and not (self.bank.categories_of_image(image) & excluded):
                return image
        raise LookupError(f"no background without categories {sorted(excluded)} found in {tries} tries")

    def _split_regions(self, rng, size: int) -> tuple:
        """Two disjoint rectangles: the target cut along a random axis, one grid stride apart."""
        gap = self.config.stride
        cut = int(rng.uniform(0.35, 0.65) * size)
        low, high = cut - gap // 2, cut + (gap - gap // 2)
        if rng.random() < 0.5:
            regions = [(0, 0, low, size), (high, 0, size, size)]
        else:
            regions = [(0, 0, size, low), (0, high, size, size)]
        if rng.random() < 0.5:
            regions.reverse()
        return tuple(regions)

    def _object(self, rng, row: int, two_objects: bool) -> ObjectPlan:
        warp = self.config.warp
        ratios, probs = warp.scale_ratios(two_objects)
        use_tps = rng.random() < warp.tps_prob
        return ObjectPlan(
            segment_row=row,
            aspect_x=float(rng.uniform(warp.aspect_min, warp.aspect_max)),
            aspect_y=float(rng.uniform(warp.aspect_min, warp.aspect_max)),
            angle_deg=float(rng.uniform(-warp.rotation_deg, warp.rotation_deg)),
            ratio=float(rng.choice(ratios, p=probs)),
            position=(float(rng.random()), float(rng.random())),
            tps_grid=int(rng.choice(warp.tps_grid_sizes)) if use_tps else 0,
            tps_seed=int(rng.integers(2**31)),
        )


def objects_for_attempt(rng: np.random.Generator, mode: str) -> int:
    """1 or 2 objects for this attempt under ``--objects`` mode 1, 2 or mix (half and half)."""
    if mode == "mix":
        return 1 if rng.random() < 0.5 else 2
    return int(mode)
