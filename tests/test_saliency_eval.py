"""Saliency metrics of a bank against ground-truth masks (datagen.segments.saliency_eval, ``datagen segments
eval``), on hand-made banks whose scores are known."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from conftest import all_output, run_cli
from pycocotools import mask as mask_utils

from datagen.segments.bank import ImageRow, SegmentRow, write_bank
from datagen.segments.saliency_eval import (
    BETA2,
    COARSE,
    REFINED,
    THRESHOLDS,
    SaliencyScores,
    evaluate,
    fbeta,
    precision_recall,
)


def counts(mask: np.ndarray) -> str:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()


def segment(image_id: int, path: str, mask: np.ndarray, coarse: np.ndarray | None = None) -> SegmentRow:
    height, width = mask.shape
    return SegmentRow(source="lost", image_id=image_id, image_path=path, image_width=width, image_height=height,
                      segment_id=image_id, category_id=image_id, category="object", bbox=(0.0, 0.0, 1.0, 1.0),
                      area=float(mask.sum()), rle=counts(mask), score=0.5, refine_iou=0.9,
                      coarse_rle=None if coarse is None else counts(coarse))


def box(shape, y0, y1, x0, x1) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def f_of(tp: int, predicted: int, positive: int) -> float:
    precision, recall = tp / predicted, tp / positive
    return (1 + BETA2) * precision * recall / (BETA2 * precision + recall)


def test_vectorised_precision_recall_matches_the_definition():
    rng = np.random.default_rng(0)
    prediction = rng.random((20, 30))
    prediction[:3] = 0.0
    prediction[3:5] = 1.0
    truth = rng.random((20, 30)) < 0.4
    precision, recall = precision_recall(prediction, truth)
    for i, t in enumerate(THRESHOLDS):
        positive = prediction >= t
        tp = (positive & truth).sum()
        assert precision[i] == pytest.approx(tp / positive.sum()) and recall[i] == pytest.approx(tp / truth.sum())


def test_fbeta_is_zero_where_undefined():
    np.testing.assert_allclose(fbeta(np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.5, 0.25])),
                               [0.0, 0.5, 1.3 * 0.25 / (0.3 + 0.25)])


def test_scores_of_two_images():
    shape = (10, 10)
    truth_a, pred_a = box(shape, 0, 5, 0, 10), box(shape, 0, 5, 0, 5)  # half the object, no false positive
    truth_b, pred_b = box(shape, 0, 10, 0, 4), box(shape, 0, 10, 0, 8)  # the object and as much background
    scores = SaliencyScores()
    scores.add(pred_a, truth_a)
    scores.add(pred_b, truth_b)
    assert scores.images == 2
    assert scores.iou == pytest.approx((0.5 + 0.5) / 2)
    assert scores.accuracy == pytest.approx((0.75 + 0.6) / 2)
    # best threshold: any t > 0 (the binary masks); t = 0 predicts everything
    at_zero = (f_of(50, 100, 50) + f_of(40, 100, 40)) / 2
    binary = (f_of(25, 25, 50) + f_of(40, 80, 40)) / 2
    assert binary > at_zero and scores.max_fbeta == pytest.approx(binary)


@pytest.fixture
def dataset(tmp_path):
    """A lost bank of 4 images and a ground-truth folder: image 1 refined perfectly (coarse: half),
    image 2 has no segment (empty prediction), image 3's mask has the wrong size, image 4 has no
    ground truth; one mask has no image."""
    shape = (20, 30)
    truth = box(shape, 5, 15, 5, 25)
    rows = [ImageRow("lost", i, name, 30, 20) for i, name in ((1, "a.jpg"), (2, "sub/b.jpg"), (3, "c.jpg"),
                                                             (4, "d.jpg"))]
    segments = [segment(1, "a.jpg", truth, coarse=box(shape, 5, 15, 5, 15)),
                segment(3, "c.jpg", truth, coarse=truth), segment(4, "d.jpg", truth, coarse=truth)]
    write_bank(rows + segments, tmp_path / "bank")
    gt = tmp_path / "gt"
    gt.mkdir()
    for name, mask in (("a.png", truth), ("b.png", truth), ("c.png", np.zeros((21, 30), bool)),
                       ("e.png", truth)):
        cv2.imwrite(str(gt / name), mask.astype(np.uint8) * 255)
    return tmp_path / "bank", gt


def test_evaluate_matches_by_stem_and_scores_coarse_and_refined(dataset):
    bank, gt = dataset
    report = evaluate(bank, gt)
    assert list(report.scores) == [COARSE, REFINED]
    assert report.unmatched == ["e.png"]
    assert [name for name, _ in report.problems] == ["c.png"] and "30x21" in report.problems[0][1]
    refined, coarse = report.scores[REFINED], report.scores[COARSE]
    assert refined.images == coarse.images == 2  # a.png and b.png
    assert refined.iou == pytest.approx((1.0 + 0.0) / 2)
    assert coarse.iou == pytest.approx((0.5 + 0.0) / 2)
    assert refined.accuracy == pytest.approx((1.0 + 400 / 600) / 2)
    assert coarse.accuracy == pytest.approx((500 / 600 + 400 / 600) / 2)
    assert refined.max_fbeta == pytest.approx(0.5)  # F = 1 on a, 0 on b (nothing predicted)
    assert coarse.max_fbeta == pytest.approx(f_of(100, 100, 200) / 2)


def test_segments_eval_prints_the_table_and_writes_json(dataset, tmp_path):
    bank, gt = dataset
    result = run_cli(["segments", "eval", "--pred", bank, "--gt", gt, "--json", tmp_path / "scores.json"])
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["method", "images", "maxFβ", "IoU", "Acc"]
    assert lines[1].split()[:2] == ["LOST", "2"] and lines[2].startswith(REFINED)
    assert lines[2].split()[-3:] == ["0.500", "0.500", "0.833"]
    assert "1 ground-truth masks have no image" in all_output(result) and "c.png" in all_output(result)
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["scores"][REFINED]["iou"] == pytest.approx(0.5) and scores["unmatched"] == ["e.png"]


def test_segments_eval_of_unrelated_folders_fails_clearly(dataset, tmp_path):
    bank, _ = dataset
    other = tmp_path / "other"
    other.mkdir()
    cv2.imwrite(str(other / "zzz.png"), np.zeros((4, 4), np.uint8))
    assert "no ground-truth mask" in all_output(run_cli(["segments", "eval", "--pred", bank, "--gt", other], expect=1))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no mask file" in all_output(run_cli(["segments", "eval", "--pred", bank, "--gt", empty], expect=1))


def test_a_bank_without_coarse_masks_is_scored_once(tmp_path):
    truth = box((8, 8), 0, 4, 0, 8)
    write_bank([ImageRow("coco", 1, "x.jpg", 8, 8), segment(1, "x.jpg", truth)], tmp_path / "bank")
    (tmp_path / "gt").mkdir()
    cv2.imwrite(str(tmp_path / "gt" / "x.png"), truth.astype(np.uint8) * 255)
    report = evaluate(tmp_path / "bank", tmp_path / "gt")
    assert list(report.scores) == ["bank"] and report.scores["bank"].iou == 1.0
