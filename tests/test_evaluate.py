"""trainer.evaluate: the metrics on hand-built cases, and ``trainer eval`` on the reference shards."""
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import all_output, make_runner

from trainer.cli import main
from trainer.config import TrainConfig, TransformerConfig
from trainer.evaluate import (
    METRIC_NAMES,
    average_precision,
    correspondence_distances,
    correspondence_error,
    evaluate_model,
    mask_iou,
    mean_mask_iou,
)
from trainer.inference import load_for_inference
from trainer.loop import FitOptions, Trainer

SMALL = TrainConfig(image_size=96, positives=3, negatives=4, warmup_steps=1, lr=1e-3, steps=3, shuffle_buffer=4,
                    transformer=TransformerConfig(d_model=32, heads=2, feedforward=32, layers="SCS"))


def centres(h: int, w: int) -> np.ndarray:
    """(2, h, w) normalised x, y of the cell centres of an h x w grid."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x + 0.5) / w, (y + 0.5) / h]).astype(np.float32)


# -- masks ---------------------------------------------------------------------------------------

def test_mask_iou_of_known_masks():
    truth = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    pred = np.array([[0.9, 0.2, 0.7], [0.1, 0.0, 0.0]])  # hits 1 of 2, one false positive
    assert mask_iou(pred, truth) == pytest.approx(1 / 3)
    assert mask_iou(truth, truth) == 1.0
    assert mask_iou(np.zeros((2, 3)), truth) == 0.0
    assert math.isnan(mask_iou(np.zeros((2, 3)), np.zeros((2, 3))))  # both empty: undefined
    assert mask_iou(np.full((2, 3), 0.5), truth) == 0.0  # the threshold is strict
    soft_truth = np.array([[0.6, 0.4, 0.0], [0.0, 0.0, 0.0]])  # ground truth thresholded too
    assert mask_iou(truth, soft_truth) == pytest.approx(1 / 2)


def test_mean_mask_iou_is_the_mean_over_images():
    truth = torch.zeros(2, 1, 2, 2)
    truth[0, 0, 0, 0] = truth[1, 0, :, :] = 1
    pred = torch.zeros(2, 1, 2, 2)
    pred[0, 0, 0, :] = 0.9  # image 0: 1/2
    pred[1, 0, 0, 0] = 0.9  # image 1: 1/4
    assert mean_mask_iou(pred, truth) == pytest.approx((1 / 2 + 1 / 4) / 2)
    # an image without ground-truth cell > 0.5 is left out, whatever is predicted there
    empty = torch.cat([truth, torch.full((2, 1, 2, 2), 0.4)])
    assert mean_mask_iou(torch.cat([pred, torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)]), empty) \
        == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert math.isnan(mean_mask_iou(pred, torch.zeros(2, 1, 2, 2)))
    with pytest.raises(ValueError):
        mean_mask_iou(pred, truth[:1])


# -- correspondences -----------------------------------------------------------------------------

def test_half_a_cell_off_is_an_error_of_one_half_all_within_one_cell():
    truth = centres(4, 4)
    pred = truth.copy()
    pred[0] += 0.5 / 4
    mask = np.ones((4, 4))
    distances = correspondence_distances(pred, truth, mask)
    assert distances.shape == (16,)
    result = correspondence_error(distances)
    assert result["mean"] == pytest.approx(0.5) and result["within_1"] == 1.0 and result["cells"] == 16


def test_two_cells_off_is_an_error_of_two_none_within_one_cell():
    truth = centres(4, 4)
    pred = truth.copy()
    pred[1] -= 2 / 4
    result = correspondence_error(correspondence_distances(pred[None], truth[None], np.ones((1, 1, 4, 4))))
    assert result["mean"] == pytest.approx(2.0) and result["within_1"] == 0.0


def test_correspondence_error_counts_only_mask_cells_in_the_other_grid():
    truth = centres(4, 4)
    pred = truth.copy()
    pred[0] += 3 / 8  # 3 cells of an 8-wide other grid
    pred[1] += 4 / 8  # 4 cells of an 8-high other grid: distance 5
    pred[:, 0, 0] = 5.0  # far off, but outside the mask
    mask = np.zeros((4, 4))
    mask[1:3, 1:3] = 0.75
    mask[3, 3] = 0.5  # not > 0.5
    result = correspondence_error(correspondence_distances(pred, truth, mask, other_grid=(8, 8)))
    assert result["cells"] == 4 and result["mean"] == pytest.approx(5.0)
    assert math.isnan(correspondence_error(np.array([]))["mean"])


# -- average precision ---------------------------------------------------------------------------

def test_average_precision_by_hand():
    assert average_precision([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0]) == pytest.approx(1.0)
    # ranked: 1, 0, 1, 0 -> (1/1 + 2/3) / 2
    assert average_precision([4.0, 3.0, 2.0, 1.0], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    # ranked: 0, 0, 1, 1 -> (1/3 + 2/4) / 2
    assert average_precision(np.array([1.0, 4.0, 2.0, 3.0]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 12)
    # a tie counts both as ranked together: precision 1/2 at the tied positive
    assert average_precision([1.0, 1.0], [1, 0]) == pytest.approx(1 / 2)
    assert math.isnan(average_precision([1.0, 2.0], [0, 0]))
    with pytest.raises(ValueError):
        average_precision([1.0, float("nan")], [1, 0])


# -- trainer eval ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory) -> Path:
    """A checkpoint of a few training steps of a small config on the reference shards."""
    run_dir = tmp_path_factory.mktemp("eval_run")
    torch.manual_seed(0)
    options = FitOptions(run_dir=run_dir, device="cpu", workers=0, log_every=1, backbone_weights="random",
                         progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(SMALL, reference, options)
        trainer.fit()
    return trainer.checkpoint_path


@pytest.mark.slow
def test_eval_prints_and_writes_all_four_metrics(reference, checkpoint, tmp_path):
    out = tmp_path / "metrics.json"
    result = make_runner().invoke(main, ["eval", "--shards", str(reference), "--ckpt", str(checkpoint),
                                         "--batch", "6", "--json", str(out), "--no-progress"])
    assert result.exit_code == 0, all_output(result)
    for words in ("mask IoU", "mean predicted mask, negatives", "correspondence error", "within 1 cell",
                  "AP"):
        assert words in result.output
    metrics = json.loads(out.read_text())
    assert metrics["samples"] == 20 and metrics["negatives"] == 20 and metrics["step"] == SMALL.steps
    for name in METRIC_NAMES:
        assert math.isfinite(metrics[name]), (name, metrics)
    assert 0 <= metrics["mask_iou"] <= 1 and 0 <= metrics["neg_mask_mean"] <= 1
    assert 0 <= metrics["corr_within_1"] <= 1 and 0 <= metrics["score_ap"] <= 1 and metrics["corr_cells"] > 0


def test_metrics_do_not_depend_on_the_batch_size(reference, checkpoint):
    """Negatives cross batch boundaries (sample i's source with sample i+1's target, cyclically)."""
    config, backbone, model, *_ = load_for_inference(checkpoint, "cpu")
    one = evaluate_model(config, backbone, model, reference, max_samples=5, batch=1, progress=False)
    many = evaluate_model(config, backbone, model, reference, max_samples=5, batch=8, progress=False)
    assert one["negatives"] == many["negatives"] == 5
    # score_ap ranks the 10 pair scores of a barely trained model, some a float rounding apart:
    # the batch size's rounding can swap two of them, so the scores themselves are compared
    for name in (*(m for m in METRIC_NAMES if m != "score_ap"), "pos_score_mean", "neg_score_mean"):
        assert one[name] == pytest.approx(many[name], rel=1e-4, abs=1e-5), name


def test_eval_errors_name_the_file(reference, tmp_path):
    missing = tmp_path / "missing.pt"
    result = make_runner().invoke(main, ["eval", "--shards", str(reference), "--ckpt", str(missing)])
    assert result.exit_code == 2 and "missing.pt" in all_output(result)
    bogus = tmp_path / "bogus.pt"
    bogus.write_text("not a checkpoint")
    result = make_runner().invoke(main, ["eval", "--shards", str(reference), "--ckpt", str(bogus)])
    assert result.exit_code == 1 and "bogus.pt" in all_output(result)


def test_eval_help_documents_every_option():
    result = make_runner().invoke(main, ["eval", "--help"])
    assert result.exit_code == 0
    for option in ("--shards", "--ckpt", "--max-samples", "--batch", "--device", "--json", "--no-progress"):
        assert option in result.output
