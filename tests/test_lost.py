"""LOST's maths on hand-built patch features (datagen.segments.lost)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from datagen.segments.lost import degrees, lost

GRID = (8, 8)
REGION = [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
"""A small object: 6 mutually similar patches, 4-connected."""
DIAGONAL = (3, 4)
"""Object-like patch touching the region only by a corner (not 4-connected)."""
FAR = (6, 6)
"""Object-like patch far from the region."""


def features(seed: int = 0, noise: float = 0.05) -> np.ndarray:
    """(64, 3) features: background patches near +e0, object-like patches near -e0 + e1 (negatively
    correlated with the background), with a little noise."""
    rng = np.random.default_rng(seed)
    feats = np.tile([1.0, 0.0, 0.0], (GRID[0] * GRID[1], 1))
    for y, x in REGION + [DIAGONAL, FAR]:
        feats[y * GRID[1] + x] = [-1.0, 1.0, 0.0]
    return (feats + rng.normal(0, noise, feats.shape)).astype(np.float32)


def index(y: int, x: int) -> int:
    return y * GRID[1] + x


def test_seed_is_inside_the_small_similar_region_and_the_mask_is_that_region():
    result = lost(features(), GRID)
    # eight object-like patches all have degree 7 (each other); the 56 background ones 55
    assert result.degree == 7
    assert result.seed == index(*REGION[0])  # ties: the lowest index
    expected = np.zeros(GRID, bool)
    for y, x in REGION:
        expected[y, x] = True
    np.testing.assert_array_equal(result.mask, expected)  # neither the corner nor the far patch
    assert result.box == (1, 1, 4, 3)
    assert sorted(result.similar) == sorted(index(y, x) for y, x in REGION + [DIAGONAL, FAR])
    assert result.score == pytest.approx(1 - 7 / 63)


def test_seed_expansion_uses_only_the_k_lowest_degree_patches():
    result = lost(features(), GRID, k=1)
    assert result.similar == (result.seed,)
    assert result.mask[1, 1] and result.mask.sum() == len(REGION)


def test_degree_counts_positive_entries_without_the_diagonal():
    similarity = torch.tensor([[5.0, 1.0, -1.0],
                               [1.0, 2.0, 0.0],
                               [-1.0, 0.0, -3.0]])
    assert degrees(similarity).tolist() == [1, 1, 0]


def test_seed_is_the_lowest_degree_patch_wherever_it_is():
    feats = features(noise=0.0)
    feats[index(5, 0)] = [0.0, 0.0, 1.0]  # orthogonal to everything: degree 0
    result = lost(feats, GRID)
    assert result.seed == index(5, 0) and result.degree == 0
    assert result.mask.sum() == 1 and result.mask[5, 0]  # only it is positive with itself


def test_zero_feature_seed_gives_the_seed_alone():
    feats = features()
    feats[index(7, 7)] = 0.0  # degree 0, and its map value is 0
    result = lost(feats, GRID)
    assert result.seed == index(7, 7)
    assert result.mask.sum() == 1 and result.mask[7, 7]


def test_numpy_and_torch_inputs_agree_and_shapes_are_checked():
    feats = features(seed=3)
    a, b = lost(feats, GRID), lost(torch.from_numpy(feats), GRID)
    assert a.seed == b.seed and np.array_equal(a.mask, b.mask)
    with pytest.raises(ValueError, match="h \\* w"):
        lost(feats, (7, 8))
    with pytest.raises(ValueError, match="k must be"):
        lost(feats, GRID, k=0)


def test_non_square_grid_is_row_major():
    feats = np.tile([1.0, 0.0], (3 * 5, 1)).astype(np.float32)
    feats[index_rc := 1 * 5 + 4] = [-1.0, 1.0]  # row 1, column 4 of a 3 x 5 grid
    result = lost(feats, (3, 5))
    assert result.seed == index_rc and result.mask.shape == (3, 5) and result.mask[1, 4]
