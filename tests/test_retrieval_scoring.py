"""The retrieval scores and the preparation of queries, against their definitions on hand-built cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.retrieval.engine import Resolution, mask_box, query_view, region_mask
from trainer.retrieval.scoring import box_cell_mask, eq3_scores, released_scores, self_consistent_mask


def identity_out(batch: int, h: int, w: int, mask: float = 1.0) -> torch.Tensor:
    """(B, 3, h, w) outputs sending every cell to the same cell of the other image."""
    xs = (torch.arange(w) + 0.5) / w
    ys = (torch.arange(h) + 0.5) / h
    out = torch.empty(batch, 3, h, w)
    out[:, 0] = xs[None, None, :]
    out[:, 1] = ys[None, :, None]
    out[:, 2] = mask
    return out


def test_box_cell_mask_covers_the_box_cells_grown_by_one():
    # 640 px on 40 cells: the box 64..128 is cells 4..7 (x2 = 128 is the edge of cell 8), grown to 3..8
    mask = box_cell_mask([64, 96, 128, 160], (640, 640), (40, 40), dilate=1)
    expected = torch.zeros(40, 40)
    expected[5:11, 3:9] = 1
    assert torch.equal(mask, expected)
    # clipped at the border, and a non-square grid (640 x 480 -> 30 x 40 cells)
    edge = box_cell_mask([0, 0, 32, 16], (640, 480), (30, 40), dilate=1)
    assert edge.shape == (30, 40) and edge[:2, :3].all() and edge.sum() == 6
    # a box smaller than a cell still covers the cell of its centre
    tiny = box_cell_mask([100, 100, 102, 102], (640, 640), (40, 40), dilate=0)
    assert tiny.sum() == 1 and tiny[6, 6] == 1


def test_eq3_equals_the_sum_over_the_region_for_identical_images():
    torch.manual_seed(0)
    features = F.normalize(torch.randn(2, 8, 4, 5), dim=1)
    region = torch.zeros(4, 5)
    region[1:3, 1:4] = 1
    scores = eq3_scores(region, identity_out(2, 4, 5), identity_out(2, 4, 5), features, features)
    assert torch.allclose(scores, torch.full((2,), 6.0), atol=1e-5)
    # halving the candidate's mask halves the score; orthogonal features give 0
    assert torch.allclose(eq3_scores(region, identity_out(2, 4, 5), identity_out(2, 4, 5, 0.5), features, features),
                          torch.full((2,), 3.0), atol=1e-5)
    other = torch.zeros_like(features)
    other[:, 0] = 1
    ortho = torch.zeros_like(features)
    ortho[:, 1] = 1
    assert torch.allclose(eq3_scores(region, identity_out(2, 4, 5), identity_out(2, 4, 5), other, ortho),
                          torch.zeros(2), atol=1e-6)


def released_by_loop(region, query_out, cand_out, query_features, cand_features):
    """The authors' evaluation score re-stated with loops (evalBrueghel.py's score_local_feat_match
    after transported_mask): per query cell, the nearest candidate cell of its correspondence; the
    weight is the query mask x region x the candidate's mask read bilinearly there; each candidate
    cell keeps its best weighted cosine, floored at 0; the score is their sum."""
    scores = []
    for b in range(query_out.shape[0]):
        h_c, w_c = cand_features.shape[2:]
        transported = F.grid_sample(cand_out[b: b + 1, 2:3], (query_out[b: b + 1, :2].permute(0, 2, 3, 1) - 0.5) * 2,
                                    mode="bilinear", align_corners=False)[0, 0]
        weight = query_out[b, 2] * region * transported
        best: dict[tuple[int, int], float] = {}
        for i in range(query_out.shape[2]):
            for j in range(query_out.shape[3]):
                col = int(np.round(float(query_out[b, 0, i, j]) * (w_c - 1)))
                row = int(np.round(float(query_out[b, 1, i, j]) * (h_c - 1)))
                cosine = float(F.normalize(query_features[b, :, i, j], dim=0)
                               @ F.normalize(cand_features[b, :, row, col], dim=0))
                best[(row, col)] = max(best.get((row, col), 0.0), cosine * float(weight[i, j]))
        scores.append(sum(best.values()))
    return torch.tensor(scores)


def test_released_score_equals_the_authors_definition():
    generator = torch.Generator().manual_seed(3)
    query_out = torch.rand(3, 3, 4, 5, generator=generator)
    cand_out = torch.rand(3, 3, 6, 7, generator=generator)
    query_features = torch.randn(3, 8, 4, 5, generator=generator)
    cand_features = torch.randn(3, 8, 6, 7, generator=generator)
    region = (torch.rand(4, 5, generator=generator) > 0.3).float()
    got = released_scores(region, query_out, cand_out, query_features, cand_features)
    expected = released_by_loop(region, query_out, cand_out, query_features, cand_features)
    assert torch.allclose(got, expected, atol=1e-5)
    # many query cells sent to one candidate cell count once: the score of a collapse is one cosine
    collapsed = torch.ones(3, 3, 4, 5)
    collapsed[:, :2] = 0.5  # every query cell -> the candidate's centre, mask 1
    features = torch.ones(3, 8, 6, 7)
    score = released_scores(torch.ones(4, 5), collapsed, identity_out(3, 6, 7), features[:, :, :4, :5], features)
    assert torch.allclose(score, torch.ones(3), atol=1e-5)
    assert torch.allclose(eq3_scores(torch.ones(4, 5), collapsed, identity_out(3, 6, 7), features[:, :, :4, :5],
                                     features), torch.full((3,), 20.0), atol=1e-4)  # Eq. 3 counts all 20


def test_self_consistent_mask_keeps_what_the_network_finds_again():
    region = torch.zeros(4, 4)
    region[1:3, 1:3] = 1
    out = identity_out(1, 4, 4)[0]
    assert torch.allclose(self_consistent_mask(region, out, out), region, atol=1e-6)
    faded = out.clone()
    faded[2] = 0.5  # the network is half sure of every cell: 0.5 (start) x 0.5 (there) = 0.25
    assert torch.allclose(self_consistent_mask(region, faded, faded), region * 0.125, atol=1e-6)


def test_query_view_with_box_side_rescales_the_box_and_cuts_a_window_around_it():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    resolution = Resolution(128, 96)
    view, box = query_view(image, [100, 50, 180, 90], resolution, box_side=32)
    assert view.shape == (96, 128, 3)
    x1, y1, x2, y2 = box
    assert 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 96
    assert round(x2 - x1) == 32 and round(y2 - y1) == 16  # 80 x 40 px -> 32 x 16 (whole cells)
    # without box_side the query is prepared like a database image, the box scaled with it
    view, box = query_view(image, [100, 50, 180, 90], resolution)
    assert view.shape == (96, 128, 3) and np.allclose(box, [32, 16, 57.6, 28.8])
    assert region_mask(None, resolution).sum() == 6 * 8
    with pytest.raises(ValueError, match="not inside"):
        query_view(image, [100, 50, 500, 90], resolution)


def test_mask_box_bounds_the_cells_above_half_or_the_best_cell():
    masks = torch.zeros(2, 4, 8)
    masks[0, 1:3, 2:5] = 0.9
    masks[1, 3, 7] = 0.3  # nothing passes: the best cell
    boxes = mask_box(masks)
    assert torch.allclose(boxes[0], torch.tensor([2 / 8, 1 / 4, 5 / 8, 3 / 4]))
    assert torch.allclose(boxes[1], torch.tensor([7 / 8, 3 / 4, 1.0, 1.0]))


def test_resolution_parse():
    assert Resolution.parse("640") == Resolution(640, 640)
    assert Resolution.parse("640x480").grid == (30, 40)
    for bad in ("640x", "abc", "650", "640x480x3"):
        with pytest.raises(ValueError):
            Resolution.parse(bad)
