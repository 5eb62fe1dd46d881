"""The pair builder on real COCO images: correspondences checked against what the warp did."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from datagen.config import BuildConfig, WarpConfig
from datagen.format.grids import grids_from_warps, recompute_grids
from datagen.format.warps import SegmentWarp, grid_centres
from datagen.synth.pairs import PairBuilder, Rejected, border_crop_box, dilate, resize_mask
from datagen.synth.sampling import Sampler, attempt_rng, two_object_layouts

SAMPLE = Path(__file__).resolve().parents[1] / "datagen" / "sample_data" / "coco"


def build_pairs(bank, config, count, objects=1, seed=0):
    """The first ``count`` accepted pairs of a seeded run."""
    sampler, builder = Sampler(bank, config), PairBuilder(bank, SAMPLE / "train2017", config)
    pairs, attempt = [], 0
    while len(pairs) < count:
        rng = attempt_rng(seed, 0, attempt)
        attempt += 1
        try:
            pairs.append(builder.build(sampler.plan(rng, objects), f"000000_{len(pairs):06d}"))
        except Rejected:
            continue
    return pairs


def bilinear(image, points):
    """Sample (H, W, 3) ``image`` at (N, 2) continuous pixel coordinates."""
    coords = (points - 0.5).astype(np.float32)
    return cv2.remap(image.astype(np.float32), coords[:, 0:1], coords[:, 1:2], cv2.INTER_LINEAR)[:, 0]


def inner_cells(grid_mask, mask_ids, side_size, stride):
    """Cell centres (continuous pixels) whose whole 3x3 pixel neighbourhood is inside the mask."""
    centres = grid_centres(*grid_mask.shape).reshape(-1, 2) * side_size
    inside = (grid_mask.reshape(-1) > 0.99)
    eroded = cv2.erode((mask_ids > 0).astype(np.uint8), np.ones((9, 9), np.uint8))
    px = np.clip(centres.astype(int), 0, side_size - 1)
    inside &= eroded[px[:, 1], px[:, 0]] > 0
    return np.flatnonzero(inside), centres


@pytest.mark.parametrize("objects", [1, 2])
def test_colour_at_a_source_point_equals_colour_where_it_lands(bank, objects):
    """With blending off, the target pixel at src_to_tgt(p) is the source pixel at p."""
    config = BuildConfig(blend="paste", objects=str(objects), warp=WarpConfig(tps_prob=0.5))
    for sample in build_pairs(bank, config, 6, objects):
        cells, centres = inner_cells(sample.src_grid_mask, sample.src_mask, 480, 16)
        assert len(cells) > 0
        landed = sample.src_to_tgt.reshape(-1, 2)[cells] * 480
        diff = np.abs(bilinear(sample.src_image, centres[cells]) - bilinear(sample.tgt_image, landed))
        assert np.median(diff) < 4.0
        # a control: the same colours compared with shuffled target points differ a lot more
        shuffled = np.random.default_rng(0).permutation(landed)
        control = np.abs(bilinear(sample.src_image, centres[cells]) - bilinear(sample.tgt_image, shuffled))
        assert np.median(diff) < 0.5 * np.median(control) or np.median(control) < 4.0


def test_target_to_source_sends_target_pixels_where_they_came_from(bank):
    config = BuildConfig(blend="paste", objects="1")
    checked = 0
    for sample in build_pairs(bank, config, 6):
        cells, centres = inner_cells(sample.tgt_grid_mask, sample.tgt_mask, 480, 16)
        if len(cells) == 0:
            continue
        came_from = sample.tgt_to_src.reshape(-1, 2)[cells] * 480
        diff = np.abs(bilinear(sample.tgt_image, centres[cells]) - bilinear(sample.src_image, came_from))
        assert np.median(diff) < 4.0
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("objects", [1, 2])
def test_the_two_directions_compose_to_identity_inside_the_masks(bank, objects):
    """tgt_to_src, interpolated at src_to_tgt(cell), comes back to the cell (within one cell)."""
    config = BuildConfig(objects=str(objects))
    checked = 0
    for sample in build_pairs(bank, config, 6, objects):
        landed = sample.src_to_tgt.reshape(-1, 1, 2) * 30 - 0.5
        map_x, map_y = landed[..., 0].astype(np.float32), landed[..., 1].astype(np.float32)
        back = cv2.remap(sample.tgt_to_src, map_x, map_y, cv2.INTER_LINEAR)[:, 0]
        weight = cv2.remap(sample.tgt_grid_mask, map_x, map_y, cv2.INTER_LINEAR)[:, 0]
        # cells well inside the mask on both sides (bilinear interpolation does not mix objects)
        inside = (sample.src_grid_mask.reshape(-1) > 0.5) & (weight > 0.99)
        error_cells = np.abs(back[inside] - grid_centres(30, 30).reshape(-1, 2)[inside]) * 30
        if inside.any():
            assert error_cells.max() <= 1.0
            assert np.median(error_cells) < 0.05
        checked += int(inside.sum())
    assert checked >= 50


def test_tps_pairs_round_trip_far_below_a_tenth_of_a_cell(bank):
    config = BuildConfig(warp=WarpConfig(tps_prob=1.0), objects="1")
    for sample in build_pairs(bank, config, 5):
        warp = SegmentWarp.from_json(sample.meta["objects"][0]["warp"])
        assert warp.tps is not None
        centres = grid_centres(30, 30).reshape(-1, 2) * 480
        error_cells = np.abs(warp.tgt_to_src(warp.src_to_tgt(centres)) - centres).max() / 16
        assert error_cells < 0.01


def test_stored_warp_recomputes_the_grids_at_any_stride(bank):
    sample = build_pairs(bank, BuildConfig(objects="1", warp=WarpConfig(tps_prob=0.0)), 1)[0]
    same = recompute_grids(sample)
    assert np.array_equal(same["src_to_tgt"], sample.src_to_tgt)
    assert np.array_equal(same["tgt_grid_mask"], sample.tgt_grid_mask)
    finer = recompute_grids(sample, (60, 60))
    assert finer["src_to_tgt"].shape == (60, 60, 2)
    # an affine warp: the mean of each 2 x 2 block of fine cells is the coarse cell's value
    blocks = finer["src_to_tgt"].reshape(30, 2, 30, 2, 2).mean(axis=(1, 3))
    assert np.abs(blocks - sample.src_to_tgt).max() < 1e-5


def test_grid_masks_lie_on_the_pixel_masks(bank):
    for sample in build_pairs(bank, BuildConfig(objects="1"), 8):
        for mask, grid in ((sample.src_mask, sample.src_grid_mask), (sample.tgt_mask, sample.tgt_grid_mask)):
            coverage = cv2.resize((mask > 0).astype(np.float32), (30, 30), interpolation=cv2.INTER_AREA)
            assert grid.sum() >= 9
            assert not np.any((grid > 0.5) & (coverage < 0.1))  # no grid cell off the object
            assert 0.6 * coverage.sum() <= grid.sum() <= 1.05 * coverage.sum()


def test_one_object_background_lacks_the_segment_category(bank):
    for sample in build_pairs(bank, BuildConfig(objects="1"), 8):
        category = sample.meta["objects"][0]["category_id"]
        background = sample.meta["background_image"]["id"]
        assert category not in bank.categories_of_image(background)
        assert background != sample.meta["source_image"]["id"]


def test_two_object_pairs_use_two_categories_in_disjoint_regions(bank):
    layouts = {frozenset(pair) for pair in two_object_layouts(480, WarpConfig().two_object_gap_px)}
    for sample in build_pairs(bank, BuildConfig(objects="2"), 5, objects=2):
        assert frozenset(tuple(obj["region"]) for obj in sample.meta["objects"]) in layouts
        first, second = sample.meta["objects"]
        assert first["category_id"] != second["category_id"]
        assert set(np.unique(sample.tgt_mask)) == {0, 1, 2}
        touching = dilate((sample.tgt_mask == 1).astype(np.uint8), 1) & (sample.tgt_mask == 2)
        assert not touching.any()
        a, b = first["region"], second["region"]
        assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def object_grids(sample):
    """Each object's grid fields, gridded alone from the sample's stored warps."""
    warps = [SegmentWarp.from_json(obj["warp"]) for obj in sample.meta["objects"]]
    return [grids_from_warps([warp], (sample.src_mask == k + 1).astype(np.uint8), (30, 30), (480, 480))
            for k, warp in enumerate(warps)]


def test_two_object_pairs_pass_the_released_checks_per_object(bank):
    """Each object covers at least 9 cells in both images, the two objects share no cell in
    either image, and the stored fields are those of all the warps gridded together."""
    for sample in build_pairs(bank, BuildConfig(objects="2"), 8, objects=2):
        first, second = object_grids(sample)
        for side in ("src", "tgt"):
            a, b = first[f"{side}_grid_mask"], second[f"{side}_grid_mask"]
            assert a.sum() >= 9 and b.sum() >= 9
            assert not np.any((a > 0) & (b > 0))
        together = recompute_grids(sample)
        for name in ("src_to_tgt", "tgt_to_src", "src_grid_mask", "tgt_grid_mask"):
            assert np.array_equal(together[name], getattr(sample, name)), name


def square_object(src_mask, box, object_id):
    x0, y0, x1, y1 = box
    src_mask[y0:y1, x0:x1] = object_id


def test_two_objects_whose_grid_masks_share_a_cell_are_rejected(bank):
    """Two squares 5 px apart in one 16 px cell column (the identity warp keeps them there): the
    released generator drops such a pair; 40 px apart they are kept, and the fields are those
    of grids_from_warps on both warps."""
    builder = PairBuilder(bank, SAMPLE / "train2017", BuildConfig())
    identity = SegmentWarp(np.eye(3), (480, 480))
    close = np.zeros((480, 480), np.uint8)
    square_object(close, (100, 100, 200, 200), 1)
    square_object(close, (205, 100, 300, 200), 2)
    with pytest.raises(Rejected) as info:
        builder._grids([identity, identity], close)
    assert info.value.reason == "masks_share_cell" and "src grid masks share" in info.value.detail

    apart = np.zeros((480, 480), np.uint8)
    square_object(apart, (100, 100, 200, 200), 1)
    square_object(apart, (240, 100, 340, 200), 2)
    grids = builder._grids([identity, identity], apart)
    expected = grids_from_warps([identity, identity], apart, (30, 30), (480, 480))
    for name in ("src_to_tgt", "tgt_to_src", "src_grid_mask", "tgt_grid_mask"):
        assert np.array_equal(grids[name], expected[name]), name


def test_each_object_needs_nine_cells_in_both_images(bank):
    """A large object and one of 2 x 2 cells: 103 cells in all, but the small object is too small."""
    builder = PairBuilder(bank, SAMPLE / "train2017", BuildConfig())
    identity = SegmentWarp(np.eye(3), (480, 480))
    src_mask = np.zeros((480, 480), np.uint8)
    square_object(src_mask, (0, 0, 160, 160), 1)
    square_object(src_mask, (320, 320, 352, 352), 2)
    with pytest.raises(Rejected) as info:
        builder._grids([identity, identity], src_mask)
    assert info.value.reason == "small_mask" and info.value.detail.startswith("object 2's src grid mask covers 4.0")
    square_object(src_mask, (320, 320, 368, 368), 2)  # 3 x 3 cells: kept
    assert builder._grids([identity, identity], src_mask)["src_grid_mask"].sum() == 100 + 9


def test_sampled_warps_follow_the_paper_ranges(bank):
    sampler = Sampler(bank, BuildConfig())
    plans = [sampler.plan(attempt_rng(0, 0, a), 1).objects[0] for a in range(400)]
    angles = np.array([p.angle_deg for p in plans])
    assert angles.min() < -12 and angles.max() > 12 and np.abs(angles).max() <= 15
    aspects = np.array([[p.aspect_x, p.aspect_y] for p in plans])
    assert aspects.min() >= 0.7 and aspects.max() <= 1.0
    ratios = np.array([p.ratio for p in plans])
    assert set(np.round(ratios, 6)) <= set(np.round(np.linspace(0.2, 1, 10), 6))
    assert np.mean(ratios < 0.6) > np.mean(ratios > 0.6)  # weights decrease with the ratio
    tps = np.array([p.tps_grid for p in plans])
    assert 0.4 < np.mean(tps > 0) < 0.6 and set(tps) == {0, 4, 6}


def test_the_default_dilation_is_a_diamond_of_l1_radius_20():
    """A pixel grows into every pixel within L1 distance 20 (the result of 20 iterations of a
    3 x 3 cross), nothing else."""
    assert BuildConfig().dilation_px == 20 and BuildConfig().dilation_shape == "diamond"
    mask = np.zeros((100, 100), np.uint8)
    mask[50, 50] = 1
    grown = dilate(mask, 20)
    ys, xs = np.mgrid[:100, :100]
    assert np.array_equal(grown, (np.abs(xs - 50) + np.abs(ys - 50) <= 20).astype(np.uint8))


def random_mask(rng, shape):
    """A (H, W) 0/1 uint8 mask of a few ellipses and thin lines, some cut by the image border."""
    mask = np.zeros(shape, np.uint8)
    for _ in range(int(rng.integers(1, 5))):
        centre = (int(rng.integers(-20, shape[1] + 20)), int(rng.integers(-20, shape[0] + 20)))
        axes = (int(rng.integers(1, 60)), int(rng.integers(1, 60)))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    for _ in range(int(rng.integers(0, 3))):
        ends = rng.integers(0, min(shape), size=4).tolist()
        cv2.line(mask, tuple(ends[:2]), tuple(ends[2:]), 1, 1)
    return mask


@pytest.mark.parametrize("radius", [1, 2, 7, 20])
def test_diamond_dilation_equals_the_released_iterated_cross(radius):
    """The released generator's scipy.ndimage.binary_dilation (a 3 x 3 cross, ``radius``
    iterations), and cv2.dilate with the same cross and iterations, on masks cut by the border."""
    from scipy import ndimage

    rng = np.random.default_rng(radius)
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    for shape in ((120, 160), (97, 61), (200, 200)):
        mask = random_mask(rng, shape)
        grown = dilate(mask, radius)
        assert grown.dtype == np.uint8
        assert np.array_equal(grown, ndimage.binary_dilation(mask.astype(bool), iterations=radius).astype(np.uint8))
        iterated = cv2.dilate(mask, cross, iterations=radius, borderType=cv2.BORDER_CONSTANT, borderValue=0)
        assert np.array_equal(grown, iterated)


def test_dilation_by_zero_changes_nothing():
    mask = random_mask(np.random.default_rng(0), (50, 70))
    assert np.array_equal(dilate(mask, 0), mask) and np.array_equal(dilate(mask, 0, "disc"), mask)


def test_disc_dilation_is_kept_as_an_option():
    mask = np.zeros((100, 100), np.uint8)
    mask[50, 50] = 1
    grown = dilate(mask, 20, "disc")
    ys, xs = np.nonzero(grown)
    assert xs.min() == 30 and xs.max() == 70 and ys.min() == 30 and ys.max() == 70
    assert grown[50 + 14, 50 + 14] == 1 and grown[50 + 15, 50 + 15] == 0  # a disc, not a square
    with pytest.raises(ValueError, match="dilation shape"):
        dilate(mask, 3, "square")
    with pytest.raises(ValueError, match="dilation_shape"):
        BuildConfig(dilation_shape="square").validate()


def test_the_builder_dilates_source_masks_as_the_released_generator(bank):
    """The builder's masks, at the source's resolution, are scipy's 20 iterations of the cross
    (the released call); with dilation_shape 'disc' they are not."""
    from scipy import ndimage

    sampler = Sampler(bank, BuildConfig())
    for attempt in range(6):
        plan = sampler.plan(attempt_rng(0, 0, attempt), 1 + attempt % 2)
        try:
            masks = PairBuilder(bank, SAMPLE / "train2017", BuildConfig())._dilated_masks(plan)
        except Rejected:
            continue
        for obj, mask in zip(plan.objects, masks):
            raw = bank.mask(obj.segment_row).astype(bool)
            assert np.array_equal(mask, ndimage.binary_dilation(raw, iterations=20).astype(np.uint8))
    disc = PairBuilder(bank, SAMPLE / "train2017", BuildConfig(dilation_shape="disc"))
    plan = sampler.plan(attempt_rng(0, 0, 0), 1)
    raw = bank.mask(plan.objects[0].segment_row).astype(bool)
    assert not np.array_equal(disc._dilated_masks(plan)[0], ndimage.binary_dilation(raw, iterations=20))


def test_border_crop_makes_the_object_touch_its_nearest_border():
    mask = np.zeros((100, 200), np.uint8)
    mask[40:60, 150:180] = 1  # nearest border: the right one (20 px away)
    x0, y0, x1, y1 = border_crop_box(mask)
    assert (x0, y0, x1, y1) == (0, 0, 180, 100)
    mask = np.zeros((100, 200), np.uint8)
    mask[5:30, 80:120] = 1  # nearest: top
    assert border_crop_box(mask) == (0, 5, 200, 100)


@pytest.mark.parametrize("shape", [(480, 640), (428, 640), (640, 481), (300, 200)])
def test_resized_mask_is_its_bilinear_interpolation_thresholded_at_one_half(shape):
    rng = np.random.default_rng(shape[0])
    mask = np.zeros(shape, np.uint8)
    for _ in range(12):
        centre = (int(rng.integers(0, shape[1])), int(rng.integers(0, shape[0])))
        axes = (int(rng.integers(3, 80)), int(rng.integers(3, 80)))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    bilinear = cv2.resize(mask.astype(np.float32), (480, 480), interpolation=cv2.INTER_LINEAR)
    resized = resize_mask(mask, 480)
    assert resized.dtype == np.uint8 and set(np.unique(resized)) == {0, 1}
    differ = resized != (bilinear >= 0.5)
    assert np.all(np.abs(bilinear[differ] - 0.5) < 0.002)  # fixed-point rounding at the threshold only


@pytest.mark.slow
def test_every_rejection_is_decided_before_the_images_are_decoded(bank, tmp_path):
    """A builder without images rejects the same attempts for the same reasons (it only fails to
    load, as bad_image, the attempts that would be accepted): no decoding is spent on them."""
    for objects in (1, 2):
        config = BuildConfig(objects=str(objects))
        sampler = Sampler(bank, config)
        with_images = PairBuilder(bank, SAMPLE / "train2017", config)
        without_images = PairBuilder(bank, tmp_path, config)  # an empty folder
        rejected = 0
        for attempt in range(40):
            plan = sampler.plan(attempt_rng(0, 0, attempt), objects)
            try:
                with_images.build(plan, "000000_000000")
                expected = "bad_image"
            except Rejected as error:
                expected = error.reason
                rejected += 1
            with pytest.raises(Rejected) as info:
                without_images.build(plan, "000000_000000")
            assert info.value.reason == expected
        assert rejected > 0
