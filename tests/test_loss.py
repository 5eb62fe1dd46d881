"""The training loss (Eq. 2) against hand computations and its defining properties."""
import math

import pytest
import torch

from trainer.loss import PairBatch, mask_cells, pair_loss, step_loss, transported_masks

# --- A 2 x 2 case written out by hand (B = 1). Cell centres are at 0.25 and 0.75. ---
SRC_PRED_MASK = [[0.9, 0.2], [0.6, 0.1]]
TGT_PRED_MASK = [[0.3, 0.8], [0.7, 0.4]]
SRC_GT_MASK = [[1.0, 0.0], [0.5, 0.0]]  # max 1: one mask cell, (0, 0)
TGT_GT_MASK = [[0.0, 1.0], [1.0, 0.25]]  # max 1: mask cells (0, 1) and (1, 0)
# Predicted correspondences, (x, y) per cell, all at cell centres of the other image.
SRC_PRED_XY = [[(0.75, 0.25), (0.25, 0.25)], [(0.25, 0.75), (0.75, 0.75)]]  # -> tgt cells (0,1) (0,0) (1,0) (1,1)
TGT_PRED_XY = [[(0.25, 0.75), (0.25, 0.25)], [(0.75, 0.25), (0.75, 0.75)]]  # -> src cells (1,0) (0,0) (0,1) (1,1)
# Ground-truth correspondences: only the mask cells matter.
SRC_GT_XY = [[(0.70, 0.35), (0.9, 0.9)], [(0.1, 0.1), (0.5, 0.5)]]
TGT_GT_XY = [[(0.9, 0.1), (0.20, 0.25)], [(0.75, 0.45), (0.3, 0.3)]]


def _bce(p, t):
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def _out(mask, xy):
    """(1, 3, h, w) float64 network output from a mask and (x, y) rows."""
    xy = torch.tensor(xy, dtype=torch.float64).permute(2, 0, 1)
    return torch.cat([xy, torch.tensor(mask, dtype=torch.float64)[None]])[None]


def _grid(values):
    return torch.tensor(values, dtype=torch.float64)[None, None]


def _xy(rows):
    return torch.tensor(rows, dtype=torch.float64).permute(2, 0, 1)[None]


def _hand_case():
    src_out, tgt_out = _out(SRC_PRED_MASK, SRC_PRED_XY), _out(TGT_PRED_MASK, TGT_PRED_XY)
    batch = PairBatch(_grid(SRC_GT_MASK), _grid(TGT_GT_MASK), _xy(SRC_GT_XY), _xy(TGT_GT_XY))
    return src_out, tgt_out, batch


# Transported masks, read off by hand: the other image's predicted mask at the cell pointed to.
SRC_VIEW = [[0.8, 0.3], [0.7, 0.4]]
TGT_VIEW = [[0.6, 0.9], [0.2, 0.1]]
HAND_BCE = sum(_bce(p, t) for p, t in [
    (0.9, 1), (0.2, 0), (0.6, 0.5), (0.1, 0),  # source mask vs source ground truth
    (0.3, 0), (0.8, 1), (0.7, 1), (0.4, 0.25),  # target mask vs target ground truth
    (0.8, 1), (0.3, 0), (0.7, 0.5), (0.4, 0),  # transported source vs source ground truth
    (0.6, 0), (0.9, 1), (0.2, 1), (0.1, 0.25),  # transported target vs target ground truth
]) / 16
# |pred - gt| over mask cells: src (0,0); tgt (0,1), (1,0). Three cells, two coordinates each.
HAND_CORR = ((0.05 + 0.10) + (0.05 + 0.0) + (0.0 + 0.20)) / 3 / 2


def test_transported_masks_of_the_hand_case():
    src_out, tgt_out, _ = _hand_case()
    src_view, tgt_view = transported_masks(src_out, tgt_out)
    assert torch.allclose(src_view, _grid(SRC_VIEW), atol=1e-9)
    assert torch.allclose(tgt_view, _grid(TGT_VIEW), atol=1e-9)


def test_pair_loss_equals_the_hand_computation():
    src_out, tgt_out, batch = _hand_case()
    out = pair_loss(src_out, tgt_out, batch.src_mask, batch.tgt_mask, batch.src_to_tgt, batch.tgt_to_src, eta=8.0)
    assert out["mask_bce"].item() == pytest.approx(HAND_BCE, rel=1e-9)
    assert out["corr_l1"].item() == pytest.approx(HAND_CORR, rel=1e-9)
    assert out["loss"].item() == pytest.approx(HAND_BCE + 8.0 * HAND_CORR, rel=1e-9)
    assert pair_loss(src_out, tgt_out, batch.src_mask, batch.tgt_mask, batch.src_to_tgt, batch.tgt_to_src,
                     eta=2.0)["loss"].item() == pytest.approx(HAND_BCE + 2.0 * HAND_CORR, rel=1e-9)


def test_step_loss_equals_the_hand_computation_with_one_negative():
    src_out, tgt_out, batch = _hand_case()
    neg_src = _out([[0.1, 0.6], [0.2, 0.3]], SRC_PRED_XY)
    neg_tgt = _out([[0.7, 0.8], [0.1, 0.2]], TGT_PRED_XY)
    out = step_loss(src_out, tgt_out, neg_src, neg_tgt, batch, eta=8.0)
    neg_bce = sum(_bce(p, 0) for p in [0.1, 0.6, 0.2, 0.3, 0.7, 0.8, 0.1, 0.2])
    mask_bce = (HAND_BCE * 16 + neg_bce) / 24  # one mean over all 24 mask elements
    assert out["mask_bce"] == pytest.approx(mask_bce, rel=1e-9)
    assert out["corr_l1"] == pytest.approx(HAND_CORR, rel=1e-9)
    assert out["loss"].item() == pytest.approx(mask_bce + 8.0 * HAND_CORR, rel=1e-9)
    # Mask cells predicted > 0.5: src 0.9; tgt 0.8, 0.7 -> 3 / 3.
    assert out["acc_pos"] == pytest.approx(1.0)
    # Non-mask cells of the positive < 0.5: src 0.2, 0.1 (not 0.6); tgt 0.3, 0.4 -> 4 / 5;
    # negatives' cells < 0.5: 0.1, 0.2, 0.3, 0.1, 0.2 -> 5 / 8.
    assert out["acc_neg"] == pytest.approx(9 / 13)
    assert out["acc"] == pytest.approx((1 + 9 / 13) / 2)


def test_accuracies_count_mask_cells_and_other_cells_apart():
    src_out = _out([[0.4, 0.3], [0.6, 0.9]], SRC_PRED_XY)
    tgt_out = _out([[0.7, 0.1], [0.8, 0.2]], TGT_PRED_XY)
    # Source mask cells (0, 0), (1, 1); a constant target mask makes all four cells mask cells.
    batch = PairBatch(_grid([[1.0, 0.0], [0.0, 1.0]]), _grid([[0.2, 0.2], [0.2, 0.2]]),
                      _xy(SRC_GT_XY), _xy(TGT_GT_XY))
    out = step_loss(src_out, tgt_out, None, None, batch)
    assert out["acc_pos"] == pytest.approx(3 / 6)  # > 0.5: src 0.9 (not 0.4); tgt 0.7, 0.8 (not 0.1, 0.2)
    assert out["acc_neg"] == pytest.approx(1 / 2)  # < 0.5: src 0.3 (not 0.6)
    assert out["acc"] == pytest.approx(1 / 2)


def test_mask_bce_is_one_mean_over_all_elements_whatever_their_grids():
    g = torch.Generator().manual_seed(2)
    pos_src, pos_tgt = torch.rand(2, 3, 4, 5, generator=g), torch.rand(2, 3, 3, 6, generator=g)
    neg_src, neg_tgt = torch.rand(3, 3, 4, 5, generator=g), torch.rand(3, 3, 3, 6, generator=g)
    batch = PairBatch(torch.rand(2, 1, 4, 5, generator=g), torch.rand(2, 1, 3, 6, generator=g),
                      torch.rand(2, 2, 4, 5, generator=g), torch.rand(2, 2, 3, 6, generator=g))
    src_view, tgt_view = transported_masks(pos_src, pos_tgt)
    pieces = [(pos_src[:, 2:3], batch.src_mask), (pos_tgt[:, 2:3], batch.tgt_mask), (src_view, batch.src_mask),
              (tgt_view, batch.tgt_mask), (neg_src[:, 2:3], 0.0), (neg_tgt[:, 2:3], 0.0)]
    total = sum(-(t * p.double().log() + (1 - t) * (1 - p.double()).log()).sum().item() for p, t in pieces)
    count = 2 * (2 * 20 + 2 * 18) + 3 * (20 + 18)
    out = step_loss(pos_src, pos_tgt, neg_src, neg_tgt, batch)
    assert out["mask_bce"] == pytest.approx(total / count, rel=1e-5)


def test_step_loss_without_negatives_equals_pair_loss():
    src_out, tgt_out, batch = _hand_case()
    pair = pair_loss(src_out, tgt_out, batch.src_mask, batch.tgt_mask, batch.src_to_tgt, batch.tgt_to_src)
    for negatives in [(None, None), (src_out[:0], tgt_out[:0])]:
        step = step_loss(src_out, tgt_out, *negatives, batch)
        assert step["loss"].item() == pytest.approx(pair["loss"].item(), rel=1e-12)
        assert step["acc_neg"] == pytest.approx(4 / 5)


def test_step_loss_returns_a_differentiable_loss_and_detached_floats():
    src_out, tgt_out, batch = _hand_case()
    src_out.requires_grad_(True)
    out = step_loss(src_out, tgt_out, None, None, batch)
    assert out["loss"].requires_grad and out["loss"].dim() == 0
    assert all(type(out[key]) is float for key in ("mask_bce", "corr_l1", "acc_pos", "acc_neg", "acc"))


def test_transported_mask_of_a_one_cell_shift_is_the_shifted_mask():
    h, w = 4, 5
    torch.manual_seed(0)
    src_mask, tgt_mask = torch.rand(1, 1, h, w), torch.rand(1, 1, h, w)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centre_x, centre_y = (xs + 0.5) / w, (ys + 0.5) / h
    # Each source cell (i, j) points at target cell (i, j + 1); each target cell (i, j) at source (i + 1, j).
    src_xy = torch.stack([centre_x + 1 / w, centre_y])[None]
    tgt_xy = torch.stack([centre_x, centre_y + 1 / h])[None]
    src_out = torch.cat([src_xy, src_mask], dim=1)
    tgt_out = torch.cat([tgt_xy, tgt_mask], dim=1)
    src_view, tgt_view = transported_masks(src_out, tgt_out)
    expected_src = torch.zeros(1, 1, h, w)
    expected_src[..., :, :-1] = tgt_mask[..., :, 1:]  # the last column points outside: zero padding
    expected_tgt = torch.zeros(1, 1, h, w)
    expected_tgt[..., :-1, :] = src_mask[..., 1:, :]
    assert torch.allclose(src_view, expected_src.clamp(1e-7, 1 - 1e-7), atol=1e-6)
    assert torch.allclose(tgt_view, expected_tgt.clamp(1e-7, 1 - 1e-7), atol=1e-6)


def _random_step(seed=0, b=2, n=3, h=4, w=5):
    g = torch.Generator().manual_seed(seed)
    outs = [torch.rand(k, 3, h, w, generator=g).clamp(0.01, 0.99) for k in (b, b, n, n)]
    batch = PairBatch(torch.rand(b, 1, h, w, generator=g), torch.rand(b, 1, h, w, generator=g),
                      torch.rand(b, 2, h, w, generator=g), torch.rand(b, 2, h, w, generator=g))
    return outs, batch


def test_negatives_correspondences_do_not_change_the_loss_but_their_masks_do():
    (pos_src, pos_tgt, neg_src, neg_tgt), batch = _random_step()
    base = step_loss(pos_src, pos_tgt, neg_src, neg_tgt, batch)["loss"].item()
    moved = neg_src.clone(), neg_tgt.clone()
    moved[0][:, :2], moved[1][:, :2] = 1 - moved[0][:, :2], torch.rand_like(moved[1][:, :2])
    assert step_loss(pos_src, pos_tgt, *moved, batch)["loss"].item() == base
    for i in range(2):
        masked = [neg_src.clone(), neg_tgt.clone()]
        masked[i][:, 2] = 1 - masked[i][:, 2]
        assert step_loss(pos_src, pos_tgt, *masked, batch)["loss"].item() != pytest.approx(base)


def test_correspondence_term_only_counts_mask_cells():
    (pos_src, pos_tgt, _, _), batch = _random_step(b=1)
    batch.src_mask[0, 0, 1, 2] = 1.0  # the source's single mask cell
    batch.tgt_mask[0, 0] = 0.5
    batch.tgt_mask[0, 0, 3, 0] = 0.9  # the target's single mask cell, a soft maximum
    batch.tgt_mask[0, 0, 2, 0] = 0.899  # close to the maximum, still not a mask cell
    assert mask_cells(batch.src_mask).sum() == 1 and mask_cells(batch.tgt_mask).sum() == 1

    def corr(src_gt, tgt_gt):
        return pair_loss(pos_src, pos_tgt, batch.src_mask, batch.tgt_mask, src_gt, tgt_gt)["corr_l1"].item()

    expected = ((pos_src[0, :2, 1, 2] - batch.src_to_tgt[0, :, 1, 2]).abs().sum()
                + (pos_tgt[0, :2, 3, 0] - batch.tgt_to_src[0, :, 3, 0]).abs().sum()) / 2 / 2
    base = corr(batch.src_to_tgt, batch.tgt_to_src)
    assert base == pytest.approx(expected.item(), rel=1e-6)
    src_gt, tgt_gt = batch.src_to_tgt.clone(), batch.tgt_to_src.clone()
    src_gt[0, :, 0, 0] += 0.3  # not mask cells
    tgt_gt[0, :, 2, 0] += 0.3
    assert corr(src_gt, tgt_gt) == base
    tgt_gt[0, :, 3, 0] += 0.3  # a mask cell
    assert corr(src_gt, tgt_gt) != pytest.approx(base)


def test_transported_term_gives_gradient_to_correspondences_outside_mask_cells():
    (pos_src, pos_tgt, _, _), batch = _random_step(b=1)
    pos_src.requires_grad_(True)
    pair_loss(pos_src, pos_tgt, batch.src_mask, batch.tgt_mask, batch.src_to_tgt, batch.tgt_to_src)["loss"].backward()
    outside = ~mask_cells(batch.src_mask)[0, 0]
    assert pos_src.grad[0, :2][:, outside].abs().sum() > 0


def test_pair_loss_accepts_different_grids_for_the_two_images():
    g = torch.Generator().manual_seed(1)
    src_out, tgt_out = torch.rand(2, 3, 4, 5, generator=g), torch.rand(2, 3, 3, 6, generator=g)
    out = pair_loss(src_out, tgt_out, torch.rand(2, 1, 4, 5, generator=g), torch.rand(2, 1, 3, 6, generator=g),
                    torch.rand(2, 2, 4, 5, generator=g), torch.rand(2, 2, 3, 6, generator=g))
    assert torch.isfinite(out["loss"])


def test_shape_mismatches_raise_clear_errors():
    (pos_src, pos_tgt, neg_src, neg_tgt), batch = _random_step()
    with pytest.raises(ValueError, match="src_mask"):
        pair_loss(pos_src, pos_tgt, batch.src_mask[:, :, :3], batch.tgt_mask, batch.src_to_tgt, batch.tgt_to_src)
    with pytest.raises(ValueError, match="tgt correspondences"):
        pair_loss(pos_src, pos_tgt, batch.src_mask, batch.tgt_mask, batch.src_to_tgt, batch.tgt_to_src[:, :1])
    with pytest.raises(ValueError, match="src_out"):
        step_loss(pos_src[:, :2], pos_tgt, neg_src, neg_tgt, batch)
    with pytest.raises(ValueError, match="neither"):
        step_loss(pos_src, pos_tgt, neg_src, None, batch)
    with pytest.raises(ValueError, match="batch sizes"):
        step_loss(pos_src, pos_tgt, neg_src, neg_tgt[:1], batch)


# --- Ablations of the paper's Table 3: the mask and transported-mask terms switched off ---------

OWN_TERMS = [(0.9, 1), (0.2, 0), (0.6, 0.5), (0.1, 0), (0.3, 0), (0.8, 1), (0.7, 1), (0.4, 0.25)]
"""The hand case's own-mask BCE elements: source then target predicted mask vs ground truth."""
TRANSPORTED_TERMS = [(0.8, 1), (0.3, 0), (0.7, 0.5), (0.4, 0), (0.6, 0), (0.9, 1), (0.2, 1), (0.1, 0.25)]
"""Its transported-mask elements (SRC_VIEW, TGT_VIEW against the ground truths)."""
NEG_TERMS = [(p, 0) for p in (0.1, 0.6, 0.2, 0.3, 0.7, 0.8, 0.1, 0.2)]


def _mean_bce(terms):
    return sum(_bce(p, t) for p, t in terms) / len(terms)


@pytest.mark.parametrize("mask_loss, transported, kept", [
    (True, True, OWN_TERMS + TRANSPORTED_TERMS),
    (False, True, TRANSPORTED_TERMS),
    (True, False, OWN_TERMS),
])
def test_pair_loss_without_a_mask_term_is_the_sum_of_the_remaining_terms(mask_loss, transported, kept):
    src_out, tgt_out, batch = _hand_case()
    out = pair_loss(src_out, tgt_out, batch.src_mask, batch.tgt_mask, batch.src_to_tgt, batch.tgt_to_src, eta=8.0,
                    mask_loss=mask_loss, transported_mask_loss=transported)
    assert out["mask_bce"].item() == pytest.approx(_mean_bce(kept), rel=1e-12)
    assert out["corr_l1"].item() == pytest.approx(HAND_CORR, rel=1e-12)
    assert out["loss"].item() == pytest.approx(_mean_bce(kept) + 8.0 * HAND_CORR, rel=1e-12)


@pytest.mark.parametrize("mask_loss, transported, kept", [
    (False, True, TRANSPORTED_TERMS + NEG_TERMS),
    (True, False, OWN_TERMS + NEG_TERMS),
    (False, False, NEG_TERMS),
])
def test_step_loss_ablations_keep_the_negatives_and_the_correspondence_term(mask_loss, transported, kept):
    src_out, tgt_out, batch = _hand_case()
    neg_src = _out([[0.1, 0.6], [0.2, 0.3]], SRC_PRED_XY)
    neg_tgt = _out([[0.7, 0.8], [0.1, 0.2]], TGT_PRED_XY)
    out = step_loss(src_out, tgt_out, neg_src, neg_tgt, batch, eta=8.0, mask_loss=mask_loss,
                    transported_mask_loss=transported)
    assert out["mask_bce"] == pytest.approx(_mean_bce(kept), rel=1e-12)  # one mean over the elements kept
    assert out["loss"].item() == pytest.approx(_mean_bce(kept) + 8.0 * HAND_CORR, rel=1e-12)


def test_with_no_mask_term_left_the_loss_is_the_correspondence_term_and_still_differentiable():
    src_out, tgt_out, batch = _hand_case()
    src_out.requires_grad_(True)
    out = step_loss(src_out, tgt_out, None, None, batch, eta=8.0, mask_loss=False, transported_mask_loss=False)
    assert out["mask_bce"] == 0.0
    assert out["loss"].item() == pytest.approx(8.0 * HAND_CORR, rel=1e-12)
    out["loss"].backward()
    assert src_out.grad[0, 2].abs().sum() == 0  # nothing supervises the source mask any more
    assert src_out.grad[0, :2].abs().sum() > 0


def test_without_the_transported_term_correspondences_outside_mask_cells_get_no_gradient():
    """The transported term is what supervises correspondences outside the mask cells (through
    the other image's mask read there): with it off, only the L1 over mask cells reaches them."""
    (pos_src, pos_tgt, _, _), batch = _random_step(b=1)
    pos_src.requires_grad_(True)
    pair_loss(pos_src, pos_tgt, batch.src_mask, batch.tgt_mask, batch.src_to_tgt, batch.tgt_to_src,
              transported_mask_loss=False)["loss"].backward()
    outside = ~mask_cells(batch.src_mask)[0, 0]
    assert pos_src.grad[0, :2][:, outside].abs().sum() == 0  # compare the test with the term on, above
