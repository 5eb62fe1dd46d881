"""Post-processing around the bilateral solver (datagen.segments.refine); the solver itself is
tests/test_bilateral.py's. A stub solver returns a chosen output where the test is about what
happens to it."""
from __future__ import annotations

import numpy as np
import pytest

from datagen.segments.bilateral import SolverConfig
from datagen.segments.refine import (
    MIN_IOU,
    decode_soft,
    encode_soft,
    keep_overlapping,
    mask_iou,
    postprocess,
    refine_mask,
    soft_levels,
    upsample_patches,
)


def returns(output: np.ndarray):
    """A stand-in for bilateral_solve that returns ``output`` (and checks how it is called)."""
    def solve(image, target, confidence, config):
        assert image.dtype == np.uint8 and image.shape[:2] == output.shape
        assert target.dtype == np.float32 and set(np.unique(target)) <= {0.0, 1.0}
        assert confidence is None and isinstance(config, SolverConfig)
        return output.astype(np.float32)
    return solve


def big_object_scene(size: int = 96):
    """An object covering ~80% of the image (all but a band at the bottom), a small separate blob
    in the background, and a coarse mask that is the object's blocky 16-px approximation."""
    obj = np.zeros((size, size), bool)
    obj[:76, :] = True
    blob = np.zeros((size, size), bool)
    blob[84:90, 40:46] = True
    coarse = upsample_patches(obj[::16, ::16], (size, size))  # rows 0-79
    return obj, blob, coarse


def test_upsample_patches_repeats_each_patch_and_crops_the_padding():
    mask = np.array([[1, 0], [0, 1]], bool)
    up = upsample_patches(mask, (20, 30), patch=16)
    assert up.shape == (20, 30) and up.dtype == bool
    assert up[:16, :16].all() and not up[:16, 16:].any() and not up[16:, :16].any() and up[16:, 16:].all()
    with pytest.raises(ValueError, match="does not cover"):
        upsample_patches(mask, (33, 20))


def test_component_selection_when_the_object_is_larger_than_the_background():
    obj, blob, coarse = big_object_scene()
    assert obj.sum() > (~obj).sum()  # "the second-largest label" would be the background here
    kept = keep_overlapping(obj | blob, coarse)
    np.testing.assert_array_equal(kept, obj)


def test_components_mostly_inside_the_coarse_mask_are_kept_too():
    coarse = np.zeros((40, 40), bool)
    coarse[5:35, 5:35] = True
    binary = np.zeros_like(coarse)
    binary[5:20, 5:35] = True  # the largest overlap
    binary[25:35, 5:15] = True  # a second piece of the object, inside the coarse mask
    binary[25:35, 30:40] = True  # half inside: kept
    binary[0:3, 0:3] = True  # outside: dropped
    expected = binary.copy()
    expected[0:3, 0:3] = False
    np.testing.assert_array_equal(keep_overlapping(binary, coarse), expected)
    assert not keep_overlapping(binary & ~coarse, coarse).any()  # nothing touches it: empty


def test_threshold_at_one_half_and_holes_filled():
    solved = np.zeros((30, 30), np.float32)
    solved[5:25, 5:25] = 0.9
    solved[12:16, 12:16] = 0.2  # a hole
    solved[0:3, 0:3] = 0.5  # not above 0.5
    coarse = np.zeros((30, 30), bool)
    coarse[8:20, 8:20] = True
    out = postprocess(solved, coarse)
    expected = np.zeros((30, 30), bool)
    expected[5:25, 5:25] = True
    np.testing.assert_array_equal(out, expected)


def test_refinement_keeps_the_object_larger_than_the_background():
    obj, blob, coarse = big_object_scene()
    image = np.zeros(obj.shape + (3,), np.uint8)
    result = refine_mask(image, coarse, solve=returns(np.where(obj | blob, 0.95, 0.05)))
    assert not result.fallback
    np.testing.assert_array_equal(result.mask, obj)
    assert result.iou == pytest.approx(mask_iou(obj, coarse)) and result.iou >= MIN_IOU


def test_fallback_to_the_coarse_mask_when_the_refinement_disagrees_is_recorded():
    coarse = np.zeros((64, 64), bool)
    coarse[16:48, 16:48] = True
    solved = np.zeros((64, 64))
    solved[16:48, 16:22] = 1.0  # overlaps the coarse mask, but IoU 6 / 32 < 0.5
    result = refine_mask(np.zeros((64, 64, 3), np.uint8), coarse, solve=returns(solved))
    assert result.fallback and result.iou == pytest.approx(6 / 32)
    np.testing.assert_array_equal(result.mask, coarse)
    np.testing.assert_array_equal(result.refined, solved > 0.5)
    empty = refine_mask(np.zeros((64, 64, 3), np.uint8), coarse, solve=returns(np.zeros((64, 64))))
    assert empty.fallback and empty.iou == 0.0 and np.array_equal(empty.mask, coarse)


def test_the_solvers_output_is_kept_before_any_threshold_fallback_or_not():
    coarse = np.zeros((64, 64), bool)
    coarse[16:48, 16:48] = True
    for solved in (np.where(coarse, 0.75, 0.125), np.zeros((64, 64))):  # refined, then fallback
        result = refine_mask(np.zeros((64, 64, 3), np.uint8), coarse, solve=returns(solved))
        assert result.solved.dtype == np.float32
        np.testing.assert_array_equal(result.solved, solved.astype(np.float32))
    assert result.fallback


def test_a_stored_soft_output_keeps_every_threshold_k_over_255():
    """Levels ceil(255 s): ``level > k`` exactly when ``s > k / 255``, for k = 0..254, including
    values just above a threshold (rounding would put them on it) and values outside [0, 1]."""
    rng = np.random.default_rng(0)
    solved = rng.random((40, 60)).astype(np.float32) * 1.2 - 0.1
    k = np.arange(255)
    solved[0, :51] = (k[::5] / 255 + 1e-6).astype(np.float32)  # just above thresholds
    solved[1, :3] = [0.0, 1.0, 0.5]
    levels = decode_soft(encode_soft(solved))
    assert levels.dtype == np.uint8 and levels.shape == solved.shape
    np.testing.assert_array_equal(levels, soft_levels(solved))
    for threshold in range(255):
        np.testing.assert_array_equal(levels > threshold, solved > threshold / 255)
    assert levels[1, :3].tolist() == [0, 255, 128]
    with pytest.raises(ValueError, match="8-bit grey PNG"):
        decode_soft(b"not a png")


def test_the_real_solver_snaps_a_blocky_mask_to_the_object_edges():
    """A bright disk on a dark textured background: the coarse mask (the disk at 16-px patch
    resolution) becomes closer to the disk."""
    size = 128
    yy, xx = np.mgrid[:size, :size]
    disk = (yy - 60) ** 2 + (xx - 66) ** 2 < 30 ** 2
    rng = np.random.default_rng(0)
    image = np.where(disk[..., None], [230, 200, 40], [30, 60, 120]).astype(np.int16)
    image = np.clip(image + rng.integers(-10, 11, image.shape), 0, 255).astype(np.uint8)
    patches = disk.reshape(8, 16, 8, 16).mean(axis=(1, 3)) > 0.5
    coarse = upsample_patches(patches, (size, size))
    result = refine_mask(image, coarse)
    assert not result.fallback
    assert mask_iou(result.mask, disk) > mask_iou(coarse, disk) + 0.05
    assert mask_iou(result.mask, disk) > 0.95
