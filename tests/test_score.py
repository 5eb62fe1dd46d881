"""trainer.score: transport by grid_sample and the pair score of Eq. 3, on hand-computed cases."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.score import pair_score, transport


def cell_centres(h: int, w: int, dy: int = 0, dx: int = 0) -> torch.Tensor:
    """(1, 2, h, w): for source cell (i, j), the centre of cell (i + dy, j + dx) of an h x w grid (x, y in [0, 1])."""
    ys = (torch.arange(h, dtype=torch.float32) + dy + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + dx + 0.5) / w
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x, y])[None]


def unit(angle_deg: float) -> list[float]:
    return [math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))]


def test_hand_computed_identity_2x2():
    src_mask = torch.tensor([[1.0, 0.5], [0.0, 1.0]]).view(1, 1, 2, 2)
    tgt_mask = torch.tensor([[0.5, 1.0], [1.0, 0.25]]).view(1, 1, 2, 2)
    src_angles = [[0, 90], [45, 30]]
    tgt_angles = [[60, 90], [0, 120]]
    src = torch.tensor([[unit(a) for a in row] for row in src_angles]).permute(2, 0, 1)[None]
    tgt = torch.tensor([[unit(a) for a in row] for row in tgt_angles]).permute(2, 0, 1)[None]
    # cosines: cos 60 = 0.5, cos 0 = 1, cos 45, cos 90 = 0
    expected = 1.0 * 0.5 * 0.5 + 0.5 * 1.0 * 1.0 + 0.0 * 1.0 * math.cos(math.radians(45)) + 1.0 * 0.25 * 0.0
    score = pair_score(src_mask, tgt_mask, cell_centres(2, 2), src, tgt)
    assert score.shape == (1,)
    assert score.item() == pytest.approx(expected, abs=1e-5)


def test_hand_computed_between_cells_renormalises_features():
    # one source cell, matched halfway between the two cells of a 1 x 2 target
    src_mask = torch.ones(1, 1, 1, 1)
    tgt_mask = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    src = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    tgt = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)
    coords = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1)
    # mask: (1 + 0) / 2; features: (1, 0) and (0, 1) average to (0.5, 0.5), cosine with (1, 0) is 1 / sqrt 2
    expected = 0.5 * (1 / math.sqrt(2))
    assert pair_score(src_mask, tgt_mask, coords, src, tgt).item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("dy,dx", [(0, 1), (2, -1), (-3, 0), (1, 2)])
def test_transport_integer_shift(dy, dx):
    torch.manual_seed(0)
    h, w = 6, 7
    mask = torch.rand(1, 1, h, w)
    out = transport(mask, cell_centres(h, w, dy, dx))
    expected = torch.zeros_like(mask)
    for i in range(h):
        for j in range(w):
            if 0 <= i + dy < h and 0 <= j + dx < w:
                expected[0, 0, i, j] = mask[0, 0, i + dy, j + dx]
    assert torch.allclose(out, expected, atol=1e-6)


def test_transport_to_another_grid_size_and_channels():
    torch.manual_seed(1)
    values = torch.rand(2, 3, 4, 4)
    # a 2 x 2 source grid reading the target cells (1, 1), (1, 3), (3, 1), (3, 3)
    coords = torch.tensor([[1.5, 3.5], [1.5, 3.5]]) / 4
    grid = torch.stack([coords[0].view(1, 2).expand(2, 2), coords[1].view(2, 1).expand(2, 2)])
    grid = grid[None].expand(2, -1, -1, -1)
    out = transport(values, grid)
    assert out.shape == (2, 3, 2, 2)
    assert torch.allclose(out, values[:, :, 1::2, 1::2], atol=1e-6)


def test_transport_is_differentiable_in_coords_and_values():
    values = torch.rand(1, 1, 5, 5, requires_grad=True)
    coords = (cell_centres(5, 5) + 0.03).requires_grad_(True)
    transport(values, coords).sum().backward()
    assert values.grad is not None and coords.grad is not None and coords.grad.abs().sum() > 0


def test_identical_images_score_the_number_of_cells():
    torch.manual_seed(2)
    b, c, h, w = 3, 16, 5, 4
    features = F.normalize(torch.randn(b, c, h, w), dim=1)
    ones = torch.ones(b, 1, h, w)
    coords = cell_centres(h, w).expand(b, -1, -1, -1)
    score = pair_score(ones, ones, coords, features, features)
    assert torch.allclose(score, torch.full((b,), float(h * w)), atol=1e-4)
    other = F.normalize(torch.randn(b, c, h, w), dim=1)
    assert (pair_score(ones, ones, coords, features, other) < h * w - 1).all()


def test_matches_outside_the_target_score_zero():
    features = F.normalize(torch.randn(1, 8, 3, 3), dim=1)
    ones = torch.ones(1, 1, 3, 3)
    assert pair_score(ones, ones, cell_centres(3, 3, dy=5), features, features).item() == pytest.approx(0.0, abs=1e-6)


def test_bad_shapes_are_named():
    ones = torch.ones(1, 1, 3, 3)
    features = torch.ones(1, 4, 3, 3)
    with pytest.raises(ValueError, match="coords"):
        transport(ones, torch.zeros(1, 3, 3, 3))
    with pytest.raises(ValueError, match="src_to_tgt"):
        pair_score(ones, ones, torch.zeros(1, 2, 2, 2), features, features)
    with pytest.raises(ValueError, match="tgt_features"):
        pair_score(ones, ones, cell_centres(3, 3), features, torch.ones(1, 5, 3, 3))
