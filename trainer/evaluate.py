"""Held-out evaluation of a trained network on datagen shards.

Every validation sample is read in stored order and turned into an example deterministically
(no style, no role swap, no hidden tokens; images resized and grids recomputed to the
checkpoint's ``image_size`` exactly as in training, by :func:`trainer.data.to_example`). The
network sees each positive pair, and one negative pair per sample: sample i's source with
sample i+1's target (cyclically, the last sample's source with the first sample's target).

Metrics (the pure functions below do the maths, numpy or torch in, floats out):

- ``mask_iou``: on positives, predicted mask > 0.5 against ground-truth grid mask > 0.5, one IoU
  per image (source and target of every pair), then the mean over the images whose ground truth
  has at least one cell > 0.5. Images without one (small objects on a coarse grid) are left out,
  so that predicting nothing earns nothing; ``empty_gt_images`` counts them.
- ``neg_mask_mean``: the mean predicted mask over all cells of both images of the negatives
  (lower is better); ``pos_mask_mean``, the same on positives, shows whether the masks depend on
  the pair at all (a network that predicts the same prior everywhere has both equal).
- ``corr_error``: on positives, |predicted - ground truth| correspondence as a Euclidean distance
  in grid cells of the other image, over the cells where the ground-truth mask is > 0.5, both
  directions (source to target and target to source), pooled over all those cells of all pairs;
  ``corr_within_1``: the share of those cells with a distance <= 1 cell.
- ``score_ap``: average precision of the Eq. 3 pair score (:func:`trainer.score.pair_score` with
  the predicted masks, the predicted source-to-target correspondences and the backbone features)
  ranking the positives (label 1) above the negatives (label 0).
"""
from __future__ import annotations

import dataclasses
import math
import random
import sys

import numpy as np
import torch
from tqdm import tqdm

from .backbone import device_of, features
from .config import TrainConfig
from .inference import load_for_inference
from .score import pair_score

METRIC_NAMES = ("mask_iou", "neg_mask_mean", "corr_error", "corr_within_1", "score_ap")


# -- the maths ----------------------------------------------------------------------------------

def _numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().float().cpu().numpy()
    return np.asarray(array, dtype=np.float64)


def mask_iou(pred, truth, threshold: float = 0.5) -> float:
    """IoU of ``pred > threshold`` and ``truth > threshold`` (same shape; one image). Both empty: NaN."""
    pred, truth = _numpy(pred), _numpy(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"mask_iou: shapes differ, {pred.shape} vs {truth.shape}")
    a, b = pred > threshold, truth > threshold
    union = np.logical_or(a, b).sum()
    return float("nan") if union == 0 else float(np.logical_and(a, b).sum() / union)


def image_ious(preds, truths, threshold: float = 0.5) -> list[float]:
    """Per-image :func:`mask_iou` of (B, [1,] h, w) arrays, for the images whose ground truth has a
    cell > ``threshold`` (the others are left out)."""
    preds, truths = _numpy(preds), _numpy(truths)
    if preds.shape != truths.shape or preds.ndim < 3:
        raise ValueError(f"expected two (B, [1,] h, w) arrays of one shape, got {preds.shape} and {truths.shape}")
    return [mask_iou(p, t, threshold) for p, t in zip(preds, truths) if (t > threshold).any()]


def mean_mask_iou(preds, truths, threshold: float = 0.5) -> float:
    """Mean of :func:`image_ious` (NaN if no image has a ground-truth cell > ``threshold``)."""
    ious = image_ious(preds, truths, threshold)
    return float(np.mean(ious)) if ious else float("nan")


def correspondence_distances(pred, truth, truth_mask, other_grid: tuple[int, int] | None = None,
                             threshold: float = 0.5) -> np.ndarray:
    """Distances in grid cells between predicted and true correspondences, over mask cells.

    ``pred``, ``truth``: (2, h, w) or (B, 2, h, w), x then y normalised to [0, 1] of the OTHER
    image; ``truth_mask``: (h, w), (1, h, w) or (B, 1, h, w). ``other_grid``: (h', w') of the
    other image's grid, which turns x into cells (x * w') and y into cells (y * h'); default: this
    grid. Returns a 1-D array, one Euclidean distance per cell where ``truth_mask > threshold``.
    """
    pred, truth, mask = _numpy(pred), _numpy(truth), _numpy(truth_mask)
    if pred.ndim == 3:
        pred, truth = pred[None], truth[None]
    if pred.shape != truth.shape or pred.ndim != 4 or pred.shape[1] != 2:
        raise ValueError(f"correspondences must be (B, 2, h, w) or (2, h, w) of one shape, "
                         f"got {pred.shape} and {truth.shape}")
    mask = mask.reshape(pred.shape[0], *pred.shape[2:])
    h_other, w_other = other_grid or pred.shape[2:]
    dx = (pred[:, 0] - truth[:, 0]) * w_other
    dy = (pred[:, 1] - truth[:, 1]) * h_other
    return np.hypot(dx, dy)[mask > threshold]


def correspondence_error(distances) -> dict:
    """``{"mean", "within_1", "cells"}`` of distances in cells (NaN means when there are none)."""
    distances = _numpy(distances).ravel()
    if distances.size == 0:
        return {"mean": float("nan"), "within_1": float("nan"), "cells": 0}
    return {"mean": float(distances.mean()), "within_1": float((distances <= 1.0).mean()),
            "cells": int(distances.size)}


def average_precision(scores, labels) -> float:
    """Average precision of ``scores`` ranking label 1 above label 0: the mean over positives of
    the precision among all items scoring at least as high as that positive (ties count as
    ranked together, as in scikit-learn). NaN when there is no positive."""
    scores, labels = _numpy(scores).ravel(), _numpy(labels).ravel().astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"average_precision: {scores.size} scores but {labels.size} labels")
    if not np.isfinite(scores).all():
        raise ValueError("average_precision: scores must be finite")
    if not labels.any():
        return float("nan")
    positives = scores[labels]
    at_least = scores.size - np.searchsorted(np.sort(scores), positives, side="left")
    positives_at_least = positives.size - np.searchsorted(np.sort(positives), positives, side="left")
    return float(np.mean(positives_at_least / at_least))


# -- running a network on pairs -----------------------------------------------------------------

def eval_config(config: TrainConfig) -> TrainConfig:
    """``config`` with no style, no role swap and no hidden tokens: the deterministic examples."""
    return dataclasses.replace(config, style_prob=0.0, swap_prob=0.0, hide_prob=0.0)


@torch.no_grad()
def run_pair(model: torch.nn.Module, src_feat: torch.Tensor, tgt_feat: torch.Tensor) -> tuple:
    """(src_out, tgt_out, score): the network's outputs (B, 3, h, w) and the Eq. 3 score (B,)."""
    src_out, tgt_out = model(src_feat, tgt_feat)
    src_out, tgt_out = src_out.float(), tgt_out.float()
    score = pair_score(src_out[:, 2:3], tgt_out[:, 2:3], src_out[:, :2], src_feat, tgt_feat)
    return src_out, tgt_out, score


def _chunks(shards, config: TrainConfig, batch: int, max_samples: int | None):
    """Lists of at most ``batch`` deterministic examples, in stored order."""
    from .data import iter_samples, to_example

    deterministic, rng = eval_config(config), random.Random(0)
    chunk, seen = [], 0
    if max_samples is not None and max_samples < 1:
        return
    for sample in iter_samples(shards):
        chunk.append(to_example(sample, deterministic, rng))
        seen += 1
        if len(chunk) == batch:
            yield chunk
            chunk = []
        if max_samples is not None and seen >= max_samples:
            break
    if chunk:
        yield chunk


def _sample_count(shards) -> int | None:
    """The manifest's sample count of the shards (for the progress bar), when it lists them all."""
    from datagen.format.shardset import resolve_shard_set

    try:
        found = resolve_shard_set(shards)
    except (ValueError, OSError):
        return None
    return found.declared_samples


class _Tally:
    """Running sums of the evaluation."""

    def __init__(self):
        self.ious: list[float] = []
        self.pos_mask_means: list[float] = []
        self.empty_gt = 0
        self.distances: list[np.ndarray] = []
        self.neg_mask_means: list[float] = []
        self.scores: list[float] = []
        self.labels: list[int] = []

    def positives(self, examples, src_out, tgt_out, score) -> None:
        stack = lambda name: np.stack([getattr(e, name) for e in examples])  # noqa: E731
        src_mask, tgt_mask = stack("src_mask"), stack("tgt_mask")
        for out, mask, corr, other in ((src_out, src_mask, stack("src_to_tgt"), tgt_out),
                                       (tgt_out, tgt_mask, stack("tgt_to_src"), src_out)):
            pred = out.cpu().numpy()
            self.ious += image_ious(pred[:, 2:3], mask)
            self.pos_mask_means += pred[:, 2].reshape(len(pred), -1).mean(axis=1).tolist()
            self.empty_gt += int((mask.reshape(len(mask), -1) <= 0.5).all(axis=1).sum())
            self.distances.append(correspondence_distances(pred[:, :2], corr, mask, tuple(other.shape[2:])))
        self.scores += score.cpu().tolist()
        self.labels += [1] * len(examples)

    def negatives(self, src_out, tgt_out, score) -> None:
        for out in (src_out, tgt_out):
            self.neg_mask_means += out[:, 2].flatten(1).mean(dim=1).cpu().tolist()
        self.scores += score.cpu().tolist()
        self.labels += [0] * len(score)

    def result(self) -> dict:
        corr = correspondence_error(np.concatenate(self.distances) if self.distances else [])
        negatives = self.labels.count(0)
        return {
            "samples": self.labels.count(1),
            "negatives": negatives,
            "mask_iou": _mean(self.ious),
            "empty_gt_images": self.empty_gt,
            "neg_mask_mean": _mean(self.neg_mask_means),
            "pos_mask_mean": _mean(self.pos_mask_means),
            "corr_error": corr["mean"],
            "corr_within_1": corr["within_1"],
            "corr_cells": corr["cells"],
            "score_ap": average_precision(self.scores, self.labels) if negatives else float("nan"),
            "pos_score_mean": _mean([s for s, label in zip(self.scores, self.labels) if label == 1]),
            "neg_score_mean": _mean([s for s, label in zip(self.scores, self.labels) if label == 0]),
        }


def _mean(values: list) -> float:
    return float(np.mean(values)) if values else float("nan")


def evaluate_model(config: TrainConfig, backbone: torch.nn.Module, model: torch.nn.Module, shards,
                   max_samples: int | None = None, batch: int = 8, progress: bool = True) -> dict:
    """The metrics of ``model`` (with its ``backbone`` and training ``config``) on ``shards``.

    Reads the first ``max_samples`` samples (all by default) in stored order, ``batch`` pairs per
    forward pass, on the device the modules are on; the model is put in eval mode for the run and
    given back in the mode it had. Returns a dict of floats and counts: see the module docstring.
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    was_training = model.training
    model.eval()
    tally = _Tally()
    carry = first_tgt = None  # source features waiting for the next target; the first target
    total = max_samples if max_samples is not None else _sample_count(shards)
    try:
        with tqdm(total=total, unit="pair", desc="eval", disable=not progress, file=sys.stderr,
                  dynamic_ncols=True) as bar:
            for examples in _chunks(shards, config, batch, max_samples):
                src_feat = features(backbone, np.stack([e.src_image for e in examples]))
                tgt_feat = features(backbone, np.stack([e.tgt_image for e in examples]))
                tally.positives(examples, *run_pair(model, src_feat, tgt_feat))
                neg_src = src_feat[:-1] if carry is None else torch.cat([carry, src_feat[:-1]])
                neg_tgt = tgt_feat[1:] if carry is None else tgt_feat
                if len(neg_src):
                    tally.negatives(*run_pair(model, neg_src, neg_tgt))
                carry = src_feat[-1:]
                first_tgt = tgt_feat[:1] if first_tgt is None else first_tgt
                bar.update(len(examples))
            if tally.labels.count(1) >= 2:  # the last source with the first target closes the cycle
                tally.negatives(*run_pair(model, carry, first_tgt))
    finally:
        model.train(was_training)
    if not tally.labels:
        raise ValueError(f"no samples to evaluate in {shards}")
    return tally.result()


def evaluate_checkpoint(checkpoint, shards, max_samples: int | None = None, batch: int = 8,
                        device: str = "auto", progress: bool = True, vs_untrained: bool = False) -> dict:
    """:func:`evaluate_model` of a checkpoint (see :func:`trainer.loop.load_for_inference`), with
    ``checkpoint``, ``step``, ``image_size``, ``shards`` and ``backbone`` (where its weights came
    from) added to the result. ``vs_untrained``: also the metrics of the network as its run started
    (:func:`trainer.loop.initial_model`: the run's seed, the same backbone), under ``untrained``."""
    from .loop import initial_model

    loaded = load_for_inference(checkpoint, device)
    metrics = evaluate_model(loaded.config, loaded.backbone, loaded.model, shards, max_samples, batch, progress)
    result = {"checkpoint": str(checkpoint), "step": loaded.step, "image_size": loaded.config.image_size,
              "shards": str(shards), "backbone": loaded.backbone_record, **metrics}
    if vs_untrained:
        untrained = initial_model(loaded.config).to(device_of(loaded.backbone))
        result["untrained"] = evaluate_model(loaded.config, loaded.backbone, untrained, shards, max_samples, batch,
                                             progress)
    return result


TABLE_ROWS = (
    ("samples (positive pairs)", "samples", "{}"),
    ("negative pairs", "negatives", "{}"),
    ("mask IoU, positives (mean over images; higher is better)", "mask_iou", None),
    ("  images left out (no ground-truth cell > 0.5)", "empty_gt_images", "{}"),
    ("mean predicted mask, negatives (lower is better)", "neg_mask_mean", None),
    ("  (positives, for comparison)", "pos_mask_mean", None),
    ("correspondence error, positives (grid cells; lower is better)", "corr_error", None),
    ("  over ground-truth mask cells, both directions", "corr_cells", "{}"),
    ("share of mask cells within 1 cell (higher is better)", "corr_within_1", None),
    ("pair score AP, positives vs negatives (higher is better)", "score_ap", None),
    ("mean score, positives", "pos_score_mean", None),
    ("mean score, negatives", "neg_score_mean", None),
)
"""(label, metric, format; None: 4 decimals, n/a for NaN) of :func:`format_table`."""


def format_table(metrics: dict, untrained: dict | None = None) -> str:
    """A small aligned table of an evaluation result; with ``untrained``, a second column of the
    untrained network's metrics beside it."""
    def cell(values: dict, name: str, fmt: str | None) -> str:
        return fmt.format(values[name]) if fmt else _fmt(values[name])

    rows = [(label, cell(metrics, name, fmt), cell(untrained, name, fmt) if untrained else None)
            for label, name, fmt in TABLE_ROWS]
    width = max(len(label) for label, _, _ in rows)
    if untrained is None:
        return "\n".join(f"{label:<{width}}  {value}" for label, value, _ in rows)
    header = f"{'':<{width}}  {'trained':>10}  {'untrained':>10}"
    return "\n".join([header] + [f"{label:<{width}}  {value:>10}  {base:>10}" for label, value, base in rows])


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def json_ready(metrics: dict) -> dict:
    """``metrics`` (and the dicts inside it) with NaN replaced by None (JSON has no NaN)."""
    return {k: json_ready(v) if isinstance(v, dict) else None if isinstance(v, float) and math.isnan(v) else v
            for k, v in metrics.items()}
