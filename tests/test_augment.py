"""The train-time TPS on the target (trainer.augment): the warped image and every grid field
against the definition, through the backward spline T (warped target -> original target)."""
from __future__ import annotations

import random

import numpy as np
import pytest

from datagen.format.schema import PairSample
from datagen.format.warps import ThinPlateSpline, grid_centres
from trainer.augment import (
    INVERSE_TOLERANCE,
    pixel_map,
    random_target_tps,
    sample_cells,
    warp_image,
    warp_target_fields,
)
from trainer.config import TrainConfig
from trainer.data import augment_target, to_example

SIZE, GRID = 128, 8  # 16 px cells, the network's stride
SHIFT = np.array([16.0, 8.0])  # pixels: the target shows the source moved right 16, down 8
BACKGROUND, MARK = 20, 250
MARKED_CELLS = [(1, 1), (1, 4), (3, 2), (4, 5), (5, 1), (6, 3)]
"""Source cells (row, column) whose centre carries a 4 x 4 bright square (cells 2 apart or more,
away from the edges once shifted)."""


def tps_of(seed: int, jitter: float = 0.5) -> ThinPlateSpline:
    """A train-time spline drawn as the trainer draws it; jitter 0.5 (twice the default) moves
    the content by up to 16 px at 128 px, well above the test's 1 px tolerance."""
    tps = random_target_tps(random.Random(seed), (4, 6), jitter)
    assert tps is not None
    return tps


def marked_pair() -> PairSample:
    """A SIZE x SIZE pair: a dark source with a bright square at each marked cell's centre, the
    target the same moved by SHIFT; exact linear fields on the GRID x GRID grid, the source mask
    covering the marked region, the target mask its transport."""
    src = np.full((SIZE, SIZE, 3), BACKGROUND, np.uint8)
    cell = SIZE // GRID
    for i, j in MARKED_CELLS:
        cy, cx = i * cell + cell // 2, j * cell + cell // 2  # continuous centre (cx, cy): pixels cx-2 .. cx+1
        src[cy - 2:cy + 2, cx - 2:cx + 2] = MARK
    tgt = np.roll(np.roll(src, int(SHIFT[0]), axis=1), int(SHIFT[1]), axis=0)
    centres = grid_centres(GRID, GRID)
    shift = SHIFT / SIZE
    src_grid = np.zeros((GRID, GRID), np.float32)
    src_grid[1:6, 1:7] = 1.0
    tgt_to_src = (centres - shift).astype(np.float32)
    tgt_grid = sample_cells(src_grid, tgt_to_src).astype(np.float32) * (tgt_to_src > 0).all(-1)
    masks = np.zeros((SIZE, SIZE), np.uint8)
    return PairSample(key="marked", src_image=src, tgt_image=tgt, src_mask=masks, tgt_mask=masks,
                      src_grid_mask=src_grid, tgt_grid_mask=tgt_grid.astype(np.float32),
                      src_to_tgt=(centres + shift).astype(np.float32), tgt_to_src=tgt_to_src)


PLAIN = TrainConfig(image_size=SIZE, swap_prob=0.0, style_prob=0.0, hide_prob=0.0, tps_prob=0.0)


def bright_centroid(image: np.ndarray, around: np.ndarray, radius: int = 8) -> tuple[np.ndarray, float]:
    """Continuous (x, y) pixel centroid of the brightness above the background within ``radius``
    of ``around`` (continuous pixels), and the weight found there."""
    x0, y0 = np.floor(around).astype(int)
    ys, xs = np.mgrid[max(y0 - radius, 0):min(y0 + radius + 1, SIZE), max(x0 - radius, 0):min(x0 + radius + 1, SIZE)]
    weight = np.clip(image[ys, xs, 0].astype(float) - BACKGROUND, 0, None)
    total = weight.sum()
    return np.array([(weight * (xs + 0.5)).sum(), (weight * (ys + 0.5)).sum()]) / max(total, 1e-9), total


# -- the warp itself --------------------------------------------------------------------------

def test_the_spline_is_drawn_as_the_authors_draw_it_from_the_streams_generator():
    sizes = set()
    for seed in range(40):
        tps = random_target_tps(random.Random(seed), (4, 6), 0.25)
        g = round(np.sqrt(len(tps.controls)))
        sizes.add(g)
        moves = tps.targets - tps.controls
        assert np.abs(moves).max() <= 0.25 / g + 1e-12  # U[-0.25/g, 0.25/g] of the image ...
        assert tps.targets.min() >= 0 and tps.targets.max() <= 1  # ... clamped to the image
        inner = (tps.controls > 0) & (tps.controls < 1)
        assert np.abs(moves[inner]).max() > 0.25 / g / 4  # and not degenerate
        assert tps.min_jacobian_determinant() > 0  # no fold
    assert sizes == {4, 6}
    again = random_target_tps(random.Random(3), (4, 6), 0.25)
    assert np.array_equal(again.targets, random_target_tps(random.Random(3), (4, 6), 0.25).targets)
    assert not np.array_equal(again.targets, random_target_tps(random.Random(4), (4, 6), 0.25).targets)


@pytest.mark.parametrize("side", [128, 480])
def test_the_pixel_map_is_the_spline_at_every_pixel_centre(side):
    for seed in range(5):
        tps = tps_of(seed, jitter=0.25)
        exact = tps(grid_centres(side, side))
        assert np.abs(pixel_map(tps, side, side) - exact).max() < 4e-4  # 0.2 px at 480 px


def test_image_pixels_move_by_the_spline():
    """Pixel q of the warped image shows the original at T(q): a bright square at an original
    position p appears where T maps back to p."""
    image = np.full((SIZE, SIZE, 3), BACKGROUND, np.uint8)
    image[62:66, 30:34] = MARK  # centre (32, 64) in continuous pixels
    original = np.array([32.0, 64.0])
    tps = tps_of(1)
    warped = warp_image(image, tps)
    assert warped.shape == image.shape and warped.dtype == image.dtype
    where = tps.inverse(original / SIZE) * SIZE
    assert np.linalg.norm(where - original) > 3  # the warp does move it
    found, weight = bright_centroid(warped, where)
    assert weight > 0.5 * 16 * (MARK - BACKGROUND)
    assert np.linalg.norm(found - where) < 0.5


# -- the grid fields against the definition ----------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_the_warped_fields_follow_their_definition(seed):
    """With linear fields and a linear target mask, every rule is checked exactly:
    new tgt_to_src(q) = old(T(q)); new tgt mask(q) = old(T(q)), 0 where T(q) leaves the image;
    T(new src_to_tgt(p)) = old src_to_tgt(p); a source cell keeps its mask exactly when its
    content stays in the warped target."""
    h = w = 12
    tps = tps_of(seed)
    centres = grid_centres(h, w)
    shift = np.array([0.1, -0.05])
    src_to_tgt = (centres + shift).astype(np.float32)
    tgt_to_src = (centres @ np.array([[0.9, 0.1], [-0.1, 0.9]]).T + 0.05).astype(np.float32)  # an affine field
    src_mask = np.zeros((h, w), np.float32)
    src_mask[2:11, 1:10] = 1.0
    src_mask[5, 5] = 0.5
    tgt_mask = centres[..., 0].astype(np.float32)  # a ramp: linear, so bilinear reading is exact
    new = warp_target_fields(tps, src_mask, tgt_mask, src_to_tgt, tgt_to_src)

    landed = tps(centres)  # T(q)
    within = np.all((landed >= 0.5 / h) & (landed <= 1 - 0.5 / h), axis=-1)  # between the outer centres
    assert within.sum() > 0.5 * h * w
    expected_t2s = landed @ np.array([[0.9, 0.1], [-0.1, 0.9]]).T + 0.05
    assert np.abs(new.tgt_to_src - expected_t2s)[within].max() < 1e-6
    inside = np.all((landed > 0) & (landed < 1), axis=-1)
    assert np.abs(new.tgt_mask - landed[..., 0] * inside)[within].max() < 1e-6
    assert np.all(new.tgt_mask[~inside] == 0)

    kept = new.src_mask > 0
    assert np.abs(tps(new.src_to_tgt.astype(np.float64)) - src_to_tgt)[kept].max() < 2 * INVERSE_TOLERANCE
    assert np.all((new.src_to_tgt[kept] > 0) & (new.src_to_tgt[kept] < 1))
    content_stays = np.all((new.src_to_tgt > 0) & (new.src_to_tgt < 1), axis=-1)
    assert np.array_equal(new.src_mask, src_mask * content_stays)
    for name in ("src_mask", "tgt_mask", "src_to_tgt", "tgt_to_src"):
        assert getattr(new, name).dtype == np.float32


def test_the_two_warped_fields_stay_inverse_to_each_other():
    """old tgt_to_src(old src_to_tgt(p)) = p for a shift; after the warp, new tgt_to_src read at
    new src_to_tgt(p) still returns p (to the bilinear reading of a non-linear field: a small
    fraction of a cell)."""
    h = w = 30
    centres = grid_centres(h, w)
    shift = np.array([0.1, 0.05])
    src_mask = np.zeros((h, w), np.float32)
    src_mask[3:20, 3:20] = 1.0
    tgt_mask = sample_cells(src_mask, centres - shift).astype(np.float32)
    for seed in range(4):
        new = warp_target_fields(tps_of(seed, jitter=0.25), src_mask, tgt_mask, (centres + shift).astype(np.float32),
                                 (centres - shift).astype(np.float32))
        back = sample_cells(new.tgt_to_src, new.src_to_tgt)
        kept = new.src_mask > 0
        assert kept.sum() > 0.9 * src_mask.sum()
        assert np.abs(back - centres)[kept].max() < 0.02 / w * 30  # 0.02 of a cell
        assert new.tgt_mask.max() == 1.0  # fully covered cells stay exactly 1 (the loss's mask cells)


def test_fully_covered_cells_stay_exactly_one():
    mask = np.zeros((30, 30), np.float32)
    mask[5:25, 5:25] = 1.0
    centres = grid_centres(30, 30)
    new = warp_target_fields(tps_of(2, jitter=0.25), mask, mask, centres.astype(np.float32),
                             centres.astype(np.float32))
    deep = np.zeros((30, 30), bool)
    deep[9:21, 9:21] = True  # cells whose T(q) lies among fully covered cells (T moves < 2 cells here)
    assert np.all(new.tgt_mask[deep] == 1.0)


# -- through the trainer's examples -----------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_the_warped_target_shows_each_source_cells_content_where_src_to_tgt_says(seed):
    """End to end: each marked source cell's bright square is found in the warped target image
    at the cell's new src_to_tgt, and the target cell there points back at the source cell."""
    base = to_example(marked_pair(), PLAIN, random.Random(0))
    tps = tps_of(seed)
    example = augment_target(base, tps)
    cell = SIZE / GRID
    moved = checked = 0
    for i, j in MARKED_CELLS:
        where = example.src_to_tgt[:, i, j] * SIZE
        if example.src_mask[0, i, j] == 0 or not np.all((where > 3) & (where < SIZE - 3)):
            continue  # pushed out of the warped target, or cut by its edge
        checked += 1
        found, weight = bright_centroid(example.tgt_image, where)
        assert weight > 0.5 * 16 * (MARK - BACKGROUND), (i, j)
        assert np.linalg.norm(found - where) < 1.0, (i, j, found, where)
        moved += np.linalg.norm(where - base.src_to_tgt[:, i, j] * SIZE) > 2
        q = np.minimum((where // cell).astype(int), GRID - 1)  # the target cell showing it
        back = example.tgt_to_src[:, q[1], q[0]] * SIZE
        assert np.abs(back - np.array([j + 0.5, i + 0.5]) * cell).max() < cell  # within the cell it came from
    assert checked >= 4 and moved >= 2  # the warp really moved the content
    assert np.array_equal(example.src_image, base.src_image)


def test_to_example_warps_with_the_configured_draws_and_hides_by_the_warped_mask():
    sample = marked_pair()
    config = TrainConfig(image_size=SIZE, swap_prob=0.0, style_prob=0.0, hide_prob=1.0, tps_prob=1.0, tps_jitter=0.5)
    example = to_example(sample, config, random.Random(5), random.Random(6))
    plain = to_example(sample, config, random.Random(5))  # no TPS generator: no TPS
    assert np.array_equal(plain.tgt_image, sample.tgt_image)
    tps_rng = random.Random(6)  # the TPS's draws, by hand: its coin, then the spline
    tps_rng.random()
    expected = augment_target(plain, random_target_tps(tps_rng, config.tps_grid_sizes, config.tps_jitter))
    for name in ("src_image", "tgt_image", "src_mask", "tgt_mask", "src_to_tgt", "tgt_to_src"):
        assert np.array_equal(getattr(example, name), getattr(expected, name)), name
    assert not np.array_equal(example.tgt_image, plain.tgt_image)
    assert np.array_equal(example.tgt_hide, example.tgt_mask[0] < 0.5)
    assert not np.array_equal(example.tgt_hide, plain.tgt_mask[0] < 0.5)  # the warped mask, not the old one
    again = to_example(sample, config, random.Random(5), random.Random(6))
    assert all(np.array_equal(getattr(again, n), getattr(example, n)) for n in ("tgt_image", "src_to_tgt"))


def test_tps_prob_is_the_share_of_warped_targets_and_zero_draws_nothing():
    sample = marked_pair()
    config = TrainConfig(image_size=SIZE, swap_prob=0.0, style_prob=0.0, hide_prob=0.5)
    rng, tps_rng = random.Random(1), random.Random(2)
    changed = [not np.array_equal(to_example(sample, config, rng, tps_rng).tgt_image, sample.tgt_image)
               for _ in range(200)]
    assert 0.4 < np.mean(changed) < 0.6  # p = 0.5, the authors'
    off = TrainConfig(**{**config.__dict__, "tps_prob": 0.0})
    rng, tps_rng = random.Random(2), random.Random(3)
    examples = [to_example(sample, off, rng, tps_rng) for _ in range(20)]
    assert tps_rng.getstate() == random.Random(3).getstate()  # no TPS draw at all
    assert rng.getstate() == _after_draws(random.Random(2), 20 * 2)  # swap and hide only
    assert all(np.array_equal(e.tgt_image, sample.tgt_image) for e in examples)


def _after_draws(rng: random.Random, count: int):
    for _ in range(count):
        rng.random()
    return rng.getstate()


def test_a_stylised_target_gets_the_same_warp():
    sample = marked_pair()
    sample.src_style_image = 255 - sample.src_image
    sample.tgt_style_image = 255 - sample.tgt_image
    plain = TrainConfig(image_size=SIZE, swap_prob=0.0, style_prob=0.0, hide_prob=0.0, tps_prob=1.0)
    stylised = TrainConfig(**{**plain.__dict__, "style_prob": 1.0})
    a = to_example(sample, plain, random.Random(9), random.Random(10))
    b = to_example(sample, stylised, random.Random(9), random.Random(10))
    assert not np.array_equal(a.tgt_image, sample.tgt_image)
    assert np.abs((255 - b.tgt_image.astype(int)) - a.tgt_image.astype(int)).max() <= 1  # rounding
    assert np.array_equal(a.src_to_tgt, b.src_to_tgt) and np.array_equal(a.tgt_mask, b.tgt_mask)


def test_after_a_role_swap_the_new_target_is_the_one_warped():
    sample = marked_pair()
    config = TrainConfig(image_size=SIZE, swap_prob=1.0, style_prob=0.0, hide_prob=0.0, tps_prob=1.0)
    example = to_example(sample, config, random.Random(3), random.Random(4))
    assert np.array_equal(example.src_image, sample.tgt_image)  # the old target, now the source, as it was
    assert not np.array_equal(example.tgt_image, sample.src_image)  # the old source, now the target, warped
