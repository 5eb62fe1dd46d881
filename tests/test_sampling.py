"""The sampler's random choices checked against the released generators' definitions: the share of
two-object pairs, the two-object layouts, the scales and the thin-plate splines' control moves."""
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from datagen.config import BuildConfig, WarpConfig
from datagen.synth.geometry import mask_boundary
from datagen.synth.pairs import make_warp
from datagen.synth.sampling import (
    Sampler,
    attempt_rng,
    layout_names,
    objects_for_sample,
    separate,
    two_object_layouts,
)

SAMPLE = Path(__file__).resolve().parents[1] / "datagen" / "sample_data" / "coco"

# The 16 layouts at 480 px with a 16 px gap, written out from the definition: quadrants and halves
# of the target, 8 px taken from each region along a side it shares with the other.
TL, TR, BL, BR = (0, 0, 240, 240), (240, 0, 480, 240), (0, 240, 240, 480), (240, 240, 480, 480)
LEFT, RIGHT, TOP, BOTTOM = (0, 0, 240, 480), (240, 0, 480, 480), (0, 0, 480, 240), (0, 240, 480, 480)
EXPECTED_480 = {
    # quarter / quarter: side by side, one above the other, and the 2 diagonals (a corner shared)
    ((0, 0, 232, 240), (248, 0, 480, 240)),        # TL, TR
    ((0, 240, 232, 480), (248, 240, 480, 480)),    # BL, BR
    ((0, 0, 240, 232), (0, 248, 240, 480)),        # TL, BL
    ((240, 0, 480, 232), (240, 248, 480, 480)),    # TR, BR
    ((0, 0, 232, 232), (248, 248, 480, 480)),      # TL, BR
    ((248, 0, 480, 232), (0, 248, 232, 480)),      # TR, BL
    # quarter / half: each quadrant with the two halves that do not contain it
    ((0, 0, 232, 240), (248, 0, 480, 480)),        # TL, right
    ((0, 0, 240, 232), (0, 248, 480, 480)),        # TL, bottom
    ((248, 0, 480, 240), (0, 0, 232, 480)),        # TR, left
    ((240, 0, 480, 232), (0, 248, 480, 480)),      # TR, bottom
    ((0, 240, 232, 480), (248, 0, 480, 480)),      # BL, right
    ((0, 248, 240, 480), (0, 0, 480, 232)),        # BL, top
    ((248, 240, 480, 480), (0, 0, 232, 480)),      # BR, left
    ((240, 248, 480, 480), (0, 0, 480, 232)),      # BR, top
    # half / half
    ((0, 0, 232, 480), (248, 0, 480, 480)),        # left, right
    ((0, 0, 480, 232), (0, 248, 480, 480)),        # top, bottom
}


def unordered(pairs) -> set:
    return {frozenset(pair) for pair in pairs}


# -- point 1: half one-object, half two-object pairs ---------------------------------------------

@pytest.mark.parametrize("count", [1, 2, 5, 10, 1000, 1001])
def test_mix_gives_every_shard_exactly_half_two_object_samples(count):
    objects = [objects_for_sample(index, "mix") for index in range(count)]
    assert objects.count(2) == count // 2 and objects.count(1) == count - count // 2
    assert objects == [1, 2] * (count // 2) + [1] * (count % 2)  # alternating, one object first


def test_fixed_object_modes_ignore_the_index():
    assert {objects_for_sample(index, "1") for index in range(7)} == {1}
    assert {objects_for_sample(index, "2") for index in range(7)} == {2}


# -- point 6: the two-object layouts ---------------------------------------------------------------

def test_the_sixteen_layouts_are_the_released_generators():
    names = layout_names()
    assert len(names) == len(set(map(frozenset, names))) == 16
    kinds = Counter((a in ("left", "right", "top", "bottom")) + (b in ("left", "right", "top", "bottom"))
                    for a, b in names)
    assert kinds == {0: 6, 1: 8, 2: 2}  # quarter/quarter, quarter/half, half/half
    layouts = two_object_layouts(480, 16)
    assert len(layouts) == 16 and unordered(layouts) == unordered(EXPECTED_480)


def test_with_twice_the_stride_the_layouts_are_the_released_scripts_boxes():
    """``choice_bbox`` of the released generate_2obj.py (bb_width = 240, stride_net = 16), copied
    as written: each region one stride away from the side it shares, 32 px between the two."""
    bb, stride, size = 240, 16, 480
    released = [[(0, 0, bb, bb - stride), (0, bb + stride, bb, size)],
                [(0, 0, bb - stride, bb - stride), (bb + stride, bb + stride, size, size)],
                [(0, 0, bb - stride, bb), (bb + stride, 0, size, bb)],
                [(0, 0, bb, bb - stride), (0, bb + stride, size, size)],
                [(0, 0, bb - stride, bb), (bb + stride, 0, size, size)],
                [(0, bb, bb - stride, size), (bb + stride, bb, size, size)],
                [(0, bb + stride, bb - stride, size), (bb + stride, 0, size, bb - stride)],
                [(0, bb + stride, bb, size), (0, 0, size, bb - stride)],
                [(0, bb, bb - stride, size), (bb + stride, 0, size, size)],
                [(bb, bb + stride, size, size), (bb, 0, size, bb - stride)],
                [(bb, bb + stride, size, size), (0, 0, size, bb - stride)],
                [(bb + stride, bb, size, size), (0, 0, bb - stride, size)],
                [(bb + stride, 0, size, bb), (0, 0, bb - stride, size)],
                [(bb, 0, size, bb - stride), (0, bb + stride, size, size)],
                [(0, 0, size, bb - stride), (0, bb + stride, size, size)],
                [(0, 0, bb - stride, size), (bb + stride, 0, size, size)]]
    assert unordered(two_object_layouts(size, 2 * stride)) == unordered(released)
    assert WarpConfig().two_object_gap_px == 2 * stride  # the default is the released boxes


def test_layout_regions_are_quadrants_or_halves_apart_by_the_gap():
    for size, gap in ((480, 16), (480, 0), (480, 32), (256, 16), (96, 7)):
        half = size // 2
        bases = [(0, 0, half, half), (half, 0, size, half), (0, half, half, size), (half, half, size, size),
                 (0, 0, half, size), (half, 0, size, size), (0, 0, size, half), (0, half, size, size)]
        for first, second in two_object_layouts(size, gap):
            for region in (first, second):
                shrunk = [[r - b for r, b in zip(region, base)] for base in bases]
                # a base box less at most the larger half of the gap on a side, nothing added
                assert any(0 <= d[0] <= gap and 0 <= d[1] <= gap and -gap <= d[2] <= 0 and -gap <= d[3] <= 0
                           and max(d[0], d[1], -d[2], -d[3]) <= gap - gap // 2 for d in shrunk), region
            apart_x = max(first[0] - second[2], second[0] - first[2])
            apart_y = max(first[1] - second[3], second[1] - first[3])
            assert max(apart_x, apart_y) == gap  # apart by the gap along one axis (both for a diagonal)
            assert min(apart_x, apart_y) in (gap, -min(first[2] - first[0], second[2] - second[0]),
                                             -min(first[3] - first[1], second[3] - second[1]))


def test_separate_shrinks_only_along_shared_sides():
    assert separate(LEFT, RIGHT, 16) == ((0, 0, 232, 480), (248, 0, 480, 480))
    assert separate(TL, BR, 16) == ((0, 0, 232, 232), (248, 248, 480, 480))
    assert separate(BOTTOM, TR, 16) == ((0, 248, 480, 480), (240, 0, 480, 232))
    assert separate(TL, TR, 0) == (TL, TR)
    assert separate(TOP, BOTTOM, 5) == ((0, 0, 480, 238), (0, 243, 480, 480))


def test_layouts_are_drawn_uniformly_with_either_object_in_either_region(bank):
    """3200 two-object plans: each of the 16 layouts about 1/16 of the time (within 4.5 standard
    deviations), and each object in each region of it about half the time."""
    sampler = Sampler(bank, BuildConfig(objects="2", warp=WarpConfig(two_object_gap_px=16)))
    draws = [sampler.plan(attempt_rng(5, 0, attempt), 2).regions for attempt in range(3200)]
    layouts = Counter(frozenset(regions) for regions in draws)
    assert set(layouts) == unordered(EXPECTED_480)
    expected, sd = 3200 / 16, np.sqrt(3200 * (1 / 16) * (15 / 16))
    assert all(abs(n - expected) < 4.5 * sd for n in layouts.values()), layouts
    ordered = Counter(draws)
    assert len(ordered) == 32  # both orders of every layout
    first_as_listed = sum(n for regions, n in ordered.items() if regions in two_object_layouts(480, 16))
    assert abs(first_as_listed - 1600) < 4.5 * np.sqrt(800)


def test_two_object_scales_are_the_released_ratios(bank):
    warp = WarpConfig()
    assert warp.two_object_scale_min == 0.5
    ratios, probs = warp.scale_ratios(two_objects=True)
    assert np.allclose(ratios, np.linspace(0.5, 1.0, 10))
    assert np.allclose(probs, np.exp(-np.arange(10) / 10) / np.exp(-np.arange(10) / 10).sum())
    sampler = Sampler(bank, BuildConfig(objects="2"))
    drawn = {round(obj.ratio, 6) for attempt in range(300)
             for obj in sampler.plan(attempt_rng(0, 0, attempt), 2).objects}
    assert drawn == {round(r, 6) for r in ratios}


def test_the_cut_layout_is_kept_as_an_option(bank):
    config = BuildConfig(objects="2", warp=WarpConfig(two_object_layout="cut", two_object_gap_px=16))
    sampler = Sampler(bank, config.validate())
    for attempt in range(50):
        first, second = sampler.plan(attempt_rng(0, 0, attempt), 2).regions
        spans = [(first[0], first[2], second[0], second[2]), (first[1], first[3], second[1], second[3])]
        cut = [s for s in spans if s[1] <= s[2] or s[3] <= s[0]]
        assert len(cut) == 1  # one axis cut, the other spans the whole target
        a0, a1, b0, b1 = cut[0]
        assert max(b0 - a1, a0 - b1) == 16 and 0.35 * 480 - 8 <= min(a1, b1) <= 0.65 * 480
    with pytest.raises(ValueError, match="two_object_layout"):
        BuildConfig(warp=WarpConfig(two_object_layout="grid")).validate()


# -- point 2: the thin-plate splines' control moves ------------------------------------------------

def test_tps_control_points_move_as_the_authors_tps_trans(bank):
    """The authors move a g x g grid on [-1, 1] by (rand - 0.5) / g: U[-0.25 / g, 0.25 / g] of the
    image. The moves of the splines that the default config's plans give, times g, follow
    U[-0.25, 0.25] (Kolmogorov-Smirnov), not the former U[-0.5, 0.5]."""
    config = BuildConfig()
    assert config.warp.tps_jitter == 0.25
    sampler = Sampler(bank, config)
    moves, grids = [], Counter()
    mask = np.zeros((480, 480), np.uint8)
    mask[100:300, 150:350] = 1
    boundary = mask_boundary(mask)
    for attempt in range(400):
        for obj in sampler.plan(attempt_rng(0, 0, attempt), 1).objects:
            if obj.tps_grid:
                warp, _ = make_warp(obj, boundary, (480, 480), (0, 0, 480, 480), config)
                tps = warp.tps
                grid = int(round(np.sqrt(len(tps.controls))))
                assert grid == obj.tps_grid
                grids[grid] += 1
                moves.append(((tps.targets - tps.controls) * grid).ravel())
    moves = np.concatenate(moves)
    assert set(grids) == {4, 6} and len(moves) > 5000
    assert np.abs(moves).max() <= 0.25 and np.abs(moves).max() > 0.249
    assert stats.kstest(moves, stats.uniform(-0.25, 0.5).cdf).pvalue > 0.01
    assert stats.kstest(moves, stats.uniform(-0.5, 1.0).cdf).pvalue < 1e-6  # the test tells them apart
