"""The training loss of the paper's Eq. 2, with the reductions of the authors' released code.

For each image of a positive pair (outputs as described in :mod:`trainer.models`):

- mask BCE: the predicted mask against the ground-truth (soft) mask;
- transported-mask BCE: the OTHER image's predicted mask sampled at this image's predicted
  correspondences (:func:`trainer.score.transport`, clamped to [1e-7, 1 - 1e-7]) against this
  image's ground-truth mask;
- correspondence L1 (weighted by eta): |predicted - ground-truth correspondences| over the
  image's "mask cells".

Reductions, as the authors': all BCE terms (both images' masks, both transported masks, and in
:func:`step_loss` the negatives' masks of both images against 0) are ONE mean over all their
elements; the correspondence term is ``sum(|pred - gt| * m) / sum(m) / 2`` over both images
together, m (B, 1, h, w) broadcast over the x and y channels, so it is the mean L1 per coordinate
over mask cells.

Ablations (the paper's Table 3): ``mask_loss=False`` leaves out the positives' own mask BCE
terms and ``transported_mask_loss=False`` the transported ones; the BCE mean is then over the
elements of the terms left (the negatives' masks stay in it). With no BCE term left at all the
mask BCE is 0.

Mask cells (the authors' definition): the cells where the ground-truth mask equals its maximum over
that image. With the soft grid masks of the shards these are the cells fully covered by the
object (when any is; otherwise the best-covered ones). An all-zero mask makes every cell a mask cell.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.score import transport

CLAMP_EPS = 1e-7


@dataclass
class PairBatch:
    """Ground truth of B positive pairs (float32, from the shards)."""

    src_mask: Tensor
    """(B, 1, hs, ws) soft grid mask of the source, in [0, 1]."""
    tgt_mask: Tensor
    """(B, 1, ht, wt) soft grid mask of the target, in [0, 1]."""
    src_to_tgt: Tensor
    """(B, 2, hs, ws) x then y in [0, 1] of each source cell's correspondence in the target."""
    tgt_to_src: Tensor
    """(B, 2, ht, wt) x then y in [0, 1] of each target cell's correspondence in the source."""

    def to(self, device) -> PairBatch:
        """This batch with every tensor on ``device``."""
        return PairBatch(*(t.to(device) for t in (self.src_mask, self.tgt_mask, self.src_to_tgt, self.tgt_to_src)))


def _check_shape(name: str, tensor: Tensor, shape: tuple) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


def _check_pair(src_out: Tensor, tgt_out: Tensor, batch: PairBatch) -> None:
    """Shapes of one side's outputs (B, 3, h, w) against its ground truth."""
    for side, out, mask, corr in (("src", src_out, batch.src_mask, batch.src_to_tgt),
                                  ("tgt", tgt_out, batch.tgt_mask, batch.tgt_to_src)):
        if out.dim() != 4 or out.shape[1] != 3:
            raise ValueError(f"{side}_out must be (B, 3, h, w), got {tuple(out.shape)}")
        b, _, h, w = out.shape
        _check_shape(f"{side}_mask", mask, (b, 1, h, w))
        _check_shape(f"{side} correspondences", corr, (b, 2, h, w))
    if src_out.shape[0] != tgt_out.shape[0]:
        raise ValueError(f"src_out and tgt_out batch sizes differ: {src_out.shape[0]} vs {tgt_out.shape[0]}")


def mask_cells(mask: Tensor) -> Tensor:
    """(B, 1, h, w) ground-truth mask -> (B, 1, h, w) bool: cells equal to that image's maximum."""
    return mask == mask.flatten(1).amax(dim=1)[:, None, None, None]


def transported_masks(src_out: Tensor, tgt_out: Tensor) -> tuple[Tensor, Tensor]:
    """Each image's view of the other's predicted mask: (B, 1, hs, ws), (B, 1, ht, wt).

    The first is the target's mask sampled at the source's predicted correspondences, the second
    the source's mask at the target's; both clamped to [1e-7, 1 - 1e-7].
    """
    src_view = transport(tgt_out[:, 2:3], src_out[:, 0:2])
    tgt_view = transport(src_out[:, 2:3], tgt_out[:, 0:2])
    return src_view.clamp(CLAMP_EPS, 1 - CLAMP_EPS), tgt_view.clamp(CLAMP_EPS, 1 - CLAMP_EPS)


def _bce_elements(predictions: list[Tensor], targets: list[Tensor]) -> Tensor:
    """Elementwise BCE of each (prediction, target) pair, flattened into one 1-D tensor."""
    return torch.cat([F.binary_cross_entropy(p, t, reduction="none").flatten()
                      for p, t in zip(predictions, targets)])


def _corr_l1(src_out: Tensor, tgt_out: Tensor, batch: PairBatch) -> Tensor:
    """sum(|pred - gt| * m) / sum(m) / 2 over both images, m the mask cells; scalar."""
    total, count = 0.0, 0.0
    for out, mask, corr in ((src_out, batch.src_mask, batch.src_to_tgt),
                            (tgt_out, batch.tgt_mask, batch.tgt_to_src)):
        cells = mask_cells(mask).to(out.dtype)
        total = total + ((out[:, 0:2] - corr).abs() * cells).sum()
        count = count + cells.sum()
    return total / count / 2


def _positive_bce_terms(src_out: Tensor, tgt_out: Tensor, batch: PairBatch, mask_loss: bool = True,
                        transported_mask_loss: bool = True) -> tuple[list, list]:
    """Predictions and targets of the positives' mask BCE: [src, tgt] (if ``mask_loss``), then
    [transported src, transported tgt] (if ``transported_mask_loss``)."""
    predictions, targets = [], []
    if mask_loss:
        predictions += [src_out[:, 2:3], tgt_out[:, 2:3]]
        targets += [batch.src_mask, batch.tgt_mask]
    if transported_mask_loss:
        predictions += list(transported_masks(src_out, tgt_out))
        targets += [batch.src_mask, batch.tgt_mask]
    return predictions, targets


def _bce_mean(predictions: list[Tensor], targets: list[Tensor], like: Tensor) -> Tensor:
    """One mean of the elementwise BCE over all the terms; 0 (on ``like``'s graph, so backward
    still runs) when there is no term."""
    if not predictions:
        return like.sum() * 0.0
    return _bce_elements(predictions, targets).mean()


def pair_loss(src_out: Tensor, tgt_out: Tensor, src_mask: Tensor, tgt_mask: Tensor,
              src_to_tgt: Tensor, tgt_to_src: Tensor, eta: float = 8.0, mask_loss: bool = True,
              transported_mask_loss: bool = True) -> dict:
    """Eq. 2 on B positive pairs. Outputs (B, 3, h, w), masks (B, 1, h, w), correspondences (B, 2, h, w).

    Returns scalar tensors (with their graph): ``loss`` = ``mask_bce`` + eta * ``corr_l1``, the
    mask BCE over the terms kept by ``mask_loss`` and ``transported_mask_loss`` (module docstring).
    """
    batch = PairBatch(src_mask, tgt_mask, src_to_tgt, tgt_to_src)
    _check_pair(src_out, tgt_out, batch)
    mask_bce = _bce_mean(*_positive_bce_terms(src_out, tgt_out, batch, mask_loss, transported_mask_loss), src_out)
    corr_l1 = _corr_l1(src_out, tgt_out, batch)
    return {"loss": mask_bce + eta * corr_l1, "mask_bce": mask_bce, "corr_l1": corr_l1}


def _has_negatives(neg_src_out: Tensor | None, neg_tgt_out: Tensor | None) -> bool:
    if neg_src_out is None and neg_tgt_out is None:
        return False
    if neg_src_out is None or neg_tgt_out is None:
        raise ValueError("give both neg_src_out and neg_tgt_out, or neither")
    for name, out in (("neg_src_out", neg_src_out), ("neg_tgt_out", neg_tgt_out)):
        if out.dim() != 4 or out.shape[1] != 3:
            raise ValueError(f"{name} must be (N, 3, h, w), got {tuple(out.shape)}")
    if neg_src_out.shape[0] != neg_tgt_out.shape[0]:
        raise ValueError(f"neg_src_out and neg_tgt_out batch sizes differ: "
                         f"{neg_src_out.shape[0]} vs {neg_tgt_out.shape[0]}")
    return neg_src_out.shape[0] > 0


def _share(hits: int, count: int) -> float:
    """hits / count; NaN when there is nothing to count."""
    return hits / count if count else float("nan")


@torch.no_grad()
def _accuracies(pos_src_out: Tensor, pos_tgt_out: Tensor, negatives: list[Tensor], batch: PairBatch) -> dict:
    """The authors' logged accuracies of the mask channel (thresholded at 0.5), as floats."""
    pos_hits = pos_count = neg_hits = neg_count = 0
    for out, mask in ((pos_src_out, batch.src_mask), (pos_tgt_out, batch.tgt_mask)):
        cells, pred = mask_cells(mask), out[:, 2:3]
        pos_hits += int(((pred > 0.5) & cells).sum())
        pos_count += int(cells.sum())
        neg_hits += int(((pred < 0.5) & ~cells).sum())
        neg_count += int((~cells).sum())
    for pred in negatives:
        neg_hits += int((pred < 0.5).sum())
        neg_count += pred.numel()
    acc_pos, acc_neg = _share(pos_hits, pos_count), _share(neg_hits, neg_count)
    return {"acc_pos": acc_pos, "acc_neg": acc_neg, "acc": (acc_pos + acc_neg) / 2}


def step_loss(pos_src_out: Tensor, pos_tgt_out: Tensor, neg_src_out: Tensor | None,
              neg_tgt_out: Tensor | None, batch: PairBatch, eta: float = 8.0, mask_loss: bool = True,
              transported_mask_loss: bool = True) -> dict:
    """Eq. 2 on a training step: B positive pairs (ground truth ``batch``) and N negative pairs.

    Outputs are (B, 3, h, w) for the positives and (N, 3, h, w) for the negatives (None or N = 0:
    no negatives). Negatives only add their predicted masks of both images, against 0, to the
    mask BCE mean; they have no correspondence term. ``mask_loss`` and ``transported_mask_loss``
    False leave out the positives' own and transported mask terms (the module docstring).

    Returns ``loss`` (scalar tensor to backprop) = mask_bce + eta * corr_l1, and floats
    ``mask_bce``, ``corr_l1``, ``acc_pos`` (share of the positives' mask cells predicted > 0.5),
    ``acc_neg`` (share of the positives' other cells and of all the negatives' cells predicted
    < 0.5; NaN if there are none), ``acc`` = (acc_pos + acc_neg) / 2.
    """
    _check_pair(pos_src_out, pos_tgt_out, batch)
    predictions, targets = _positive_bce_terms(pos_src_out, pos_tgt_out, batch, mask_loss, transported_mask_loss)
    negatives = []
    if _has_negatives(neg_src_out, neg_tgt_out):
        negatives = [neg_src_out[:, 2:3], neg_tgt_out[:, 2:3]]
    predictions += negatives
    targets += [torch.zeros_like(p) for p in negatives]

    mask_bce = _bce_mean(predictions, targets, pos_src_out)
    corr_l1 = _corr_l1(pos_src_out, pos_tgt_out, batch)
    loss = mask_bce + eta * corr_l1
    logs = {"mask_bce": float(mask_bce.detach()), "corr_l1": float(corr_l1.detach())}
    return {"loss": loss, **logs, **_accuracies(pos_src_out, pos_tgt_out, negatives, batch)}
