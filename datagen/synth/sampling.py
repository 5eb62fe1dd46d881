"""Seeded random choices for one attempted pair: which segments, which background, which warps.

Everything random about a pair is drawn here, from one ``numpy.random.Generator`` seeded by
``SeedSequence(root_seed, spawn_key=(shard, attempt))``, into a plain :class:`PairPlan`. The
builder (``pairs.py``) then only executes the plan, so a plan fully determines a sample. How many
objects a pair has is not drawn: it follows from the sample's index in its shard
(:func:`objects_for_sample`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from itertools import combinations

import numpy as np

from datagen.config import BuildConfig


def attempt_rng(root_seed: int, shard: int, attempt: int) -> np.random.Generator:
    """The generator of one attempt: independent streams per (shard, attempt)."""
    return np.random.default_rng(np.random.SeedSequence(root_seed, spawn_key=(shard, attempt)))


def objects_for_sample(index: int, mode: str) -> int:
    """1 or 2 objects for the accepted sample ``index`` of a shard under ``--objects`` mode 1, 2
    or mix. In mix, even indices have one object and odd ones two: every shard holds as many
    one-object as two-object pairs (one more one-object pair when its count is odd), whatever
    share of the attempts of each kind is rejected, and a shard's first samples are those of any
    shorter shard of the same seed. The authors train on two sets of equal size, one of each."""
    if mode == "mix":
        return 1 if index % 2 == 0 else 2
    return int(mode)


QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
HALVES = ("left", "right", "top", "bottom")


def region_box(name: str, size: int) -> tuple:
    """(x0, y0, x1, y1) pixels of a quadrant or half of the size x size target, before gaps."""
    half = size // 2
    return {"top-left": (0, 0, half, half), "top-right": (half, 0, size, half),
            "bottom-left": (0, half, half, size), "bottom-right": (half, half, size, size),
            "left": (0, 0, half, size), "right": (half, 0, size, size),
            "top": (0, 0, size, half), "bottom": (0, half, size, size)}[name]


def _contains(outer: tuple, inner: tuple) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def layout_names() -> tuple:
    """The 16 layouts of the released two-object generator, as pairs of region names: the 6 pairs
    of distinct quadrants (2 of them diagonal), each quadrant with the 2 halves that do not
    contain it (8), and left + right, top + bottom (2)."""
    quarter_quarter = list(combinations(QUADRANTS, 2))
    quarter_half = [(quadrant, half) for quadrant in QUADRANTS for half in HALVES
                    if not _contains(region_box(half, 2), region_box(quadrant, 2))]
    return tuple(quarter_quarter + quarter_half + [("left", "right"), ("top", "bottom")])


def separate(first: tuple, second: tuple, gap: int) -> tuple:
    """Two boxes (x0, y0, x1, y1) that meet, moved apart by ``gap`` pixels: on each axis where
    one ends where the other starts, the one before gives up ``gap // 2`` pixels and the one
    after the rest. Quadrants on a diagonal meet on both axes (at a corner): both shrink on both."""
    boxes = [list(first), list(second)]
    for low, high in ((0, 2), (1, 3)):  # x, then y
        for a, b in ((0, 1), (1, 0)):
            if boxes[a][high] == boxes[b][low]:
                boxes[a][high] -= gap // 2
                boxes[b][low] += gap - gap // 2
    return tuple(boxes[0]), tuple(boxes[1])


@lru_cache(maxsize=16)
def two_object_layouts(size: int, gap: int) -> tuple:
    """The 16 layouts (:func:`layout_names`) as pairs of (x0, y0, x1, y1) regions of the size x
    size target, separated by ``gap`` pixels where they meet (:func:`separate`). The released
    script lists the same 16 by hand, each region a whole grid stride away from the side it
    shares, which is ``gap`` twice the stride here (tested)."""
    return tuple(separate(region_box(a, size), region_box(b, size), gap) for a, b in layout_names())


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
        # the scale choices (ratios, probabilities) of one- and two-object pairs, as arrays: drawn
        # for every object, the same values as warp.scale_ratios gives
        self._scales = {two: tuple(np.asarray(values) for values in config.warp.scale_ratios(two))
                        for two in (False, True)}

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
        regions = ((0, 0, size, size),) if objects == 1 else self._two_regions(rng, size)
        plans = tuple(self._object(rng, row, objects == 2) for row in rows)
        return PairPlan(source, background, plans, regions, bool(border_crop))

    def _two_segments(self, rng, image_id: int) -> tuple:
        rows = self.bank.segments_of_image(image_id)
        cats = np.asarray(self.bank.category_ids)[rows]
        first, second = rng.choice(np.unique(cats), size=2, replace=False)
        return (int(rng.choice(rows[cats == first])), int(rng.choice(rows[cats == second])))

    def _background(self, rng, excluded: set, source: int, tries: int = 100) -> int:
        """A random image with no annotation of the ``excluded`` categories, kept as a segment or not
        (and not the source)."""
        for _ in range(tries):
            image = int(rng.choice(self.background_ids))
            if image != source and not (self.bank.annotated_categories_of_image(image) & excluded):
                return image
        raise LookupError(f"no background without categories {sorted(excluded)} found in {tries} tries")

    def _two_regions(self, rng, size: int) -> tuple:
        """The regions of the first and second object of a two-object pair (``warp.two_object_layout``):
        a fixed layout drawn uniformly, then which object goes where (a fair coin)."""
        if self.config.warp.two_object_layout == "cut":
            return self._split_regions(rng, size)
        layouts = two_object_layouts(size, self.config.warp.two_object_gap_px)
        regions = layouts[int(rng.integers(len(layouts)))]
        return regions[::-1] if rng.random() < 0.5 else regions

    def _split_regions(self, rng, size: int) -> tuple:
        """Two disjoint rectangles: the target cut along a random axis, ``warp.two_object_gap_px`` apart."""
        gap = self.config.warp.two_object_gap_px
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
        ratios, probs = self._scales[two_objects]
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
