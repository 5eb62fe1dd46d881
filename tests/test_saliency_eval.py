"""Saliency metrics of a bank against ground-truth masks (datagen.segments.saliency_eval, ``datagen segments
eval``): both protocols checked against their definitions on hand-built arrays, then on hand-made banks
whose scores are known."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from conftest import all_output, run_cli
from pycocotools import mask as mask_utils

from datagen.segments.bank import ImageRow, SegmentRow, write_bank
from datagen.segments.refine import encode_soft
from datagen.segments.saliency_eval import (
    BANK,
    BETA2,
    COARSE,
    OURS,
    REFERENCE,
    REFERENCE_THRESHOLDS,
    REFINED,
    THRESHOLDS,
    ImagePrediction,
    SaliencyScores,
    evaluate,
    fbeta,
    precision_recall,
)


def counts(mask: np.ndarray) -> str:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()


def segment(image_id: int, path: str, mask: np.ndarray, coarse: np.ndarray | None = None,
            soft: np.ndarray | None = None) -> SegmentRow:
    height, width = mask.shape
    return SegmentRow(source="lost", image_id=image_id, image_path=path, image_width=width, image_height=height,
                      segment_id=image_id, category_id=image_id, category="object", bbox=(0.0, 0.0, 1.0, 1.0),
                      area=float(mask.sum()), rle=counts(mask), score=0.5, refine_iou=0.9,
                      coarse_rle=None if coarse is None else counts(coarse),
                      soft_png=None if soft is None else encode_soft(soft))


def box(shape, y0, y1, x0, x1) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def grey(mask: np.ndarray) -> np.ndarray:
    """A binary mask as a ground-truth file holds it: 0 / 255."""
    return mask.astype(np.uint8) * 255


def f_of(tp: int, predicted: int, positive: int) -> float:
    """F-beta of the counts, by the formula."""
    precision, recall = tp / predicted, tp / positive
    return (1 + BETA2) * precision * recall / (BETA2 * precision + recall)


def test_our_precision_recall_matches_its_definition():
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


def test_reference_precision_recall_matches_tokencuts_definition():
    """t = k / 255, positives ``prediction > t``, precision 1 where nothing is predicted."""
    rng = np.random.default_rng(1)
    prediction = rng.random((20, 30)) ** 3 * 0.99  # many pixels near 0, none above 254 / 255
    prediction[:2] = 0.0  # never positive, not even at t = 0
    prediction[2, :5] = 3 / 255  # exactly on a threshold: positive only below it
    truth = rng.random((20, 30)) < 0.4
    precision, recall = precision_recall(prediction, truth, REFERENCE_THRESHOLDS, strict=True, empty=1.0)
    assert len(REFERENCE_THRESHOLDS) == 255
    for k in range(255):
        positive = prediction > k / 255
        tp = (positive & truth).sum()
        expected = tp / positive.sum() if positive.any() else 1.0
        assert precision[k] == pytest.approx(expected) and recall[k] == pytest.approx(tp / truth.sum())
    assert precision[-1] == 1.0 and recall[-1] == 0.0  # above the largest value: an empty prediction


def test_fbeta_is_zero_where_undefined():
    np.testing.assert_allclose(fbeta(np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.5, 0.25])),
                               [0.0, 0.5, 1.3 * 0.25 / (0.3 + 0.25)])


def test_an_empty_prediction_has_precision_one_under_the_reference_and_zero_under_ours():
    truth = box((10, 10), 2, 6, 2, 6)
    empty = np.zeros((10, 10))
    precision, recall = precision_recall(empty, truth, REFERENCE_THRESHOLDS, strict=True, empty=1.0)
    assert (precision == 1.0).all() and (recall == 0.0).all() and (fbeta(precision, recall) == 0.0).all()
    precision, recall = precision_recall(empty, truth)  # ours: t = 0 predicts every pixel, then nothing
    assert precision[0] == 16 / 100 and (precision[1:] == 0.0).all() and (recall[1:] == 0.0).all()
    # with an empty truth too, the reference counts a perfect image (P = R = 1), ours a failed one
    reference, ours = SaliencyScores(REFERENCE), SaliencyScores(OURS)
    for scores in (reference, ours):
        scores.add(np.zeros((10, 10), bool), np.zeros((10, 10), np.uint8))
    assert reference.max_fbeta == 1.0 and ours.max_fbeta == 0.0
    assert reference.iou == ours.iou == 1.0 and reference.accuracy == ours.accuracy == 1.0


def test_a_soft_prediction_is_scored_at_its_best_threshold():
    """Object 100 px: 50 at 0.81, 50 at 0.31; background: 20 px at 0.61, 30 at 0.21, the rest 0.
    Per threshold interval: [0, 0.21) predicts 150 px (100 true), [0.21, 0.31) 120 (100),
    [0.31, 0.61) 70 (50), [0.61, 0.81) 50 (50), above nothing; the second is best."""
    soft = np.zeros((20, 20))
    truth = np.zeros((20, 20), bool)
    truth[:5] = True
    soft[:5, :10] = 0.81
    soft[:5, 10:] = 0.31
    soft[10, :20] = 0.61
    soft[12, :20] = 0.21
    soft[13, :10] = 0.21
    per_interval = [f_of(100, 150, 100), f_of(100, 120, 100), f_of(50, 70, 100), f_of(50, 50, 100)]
    assert int(np.argmax(per_interval)) == 1
    scores = SaliencyScores(REFERENCE)
    scores.add(soft, grey(truth), soft=True)
    assert scores.max_fbeta == pytest.approx(max(per_interval))
    assert scores.threshold == 54 / 255  # the first k / 255 >= 0.21 (53 / 255 < 0.21 still predicts those)
    assert scores.iou == pytest.approx(50 / 120) and scores.soft_images == 1  # soft > 0.5: 70 px, 50 true
    assert scores.accuracy == pytest.approx((400 - 20 - 50) / 400)


def test_ground_truth_is_binarised_at_zero_by_the_reference_and_at_127_by_ours():
    """A mask with grey levels: 200 in the core, 60 on its rim. The prediction is core and rim."""
    core = box((20, 20), 5, 15, 5, 15)
    rim = box((20, 20), 4, 16, 4, 16) & ~core
    levels = np.where(core, 200, np.where(rim, 60, 0)).astype(np.uint8)
    prediction = core | rim
    reference, ours = SaliencyScores(REFERENCE), SaliencyScores(OURS)
    reference.add(prediction, levels)
    ours.add(prediction, levels)
    assert reference.max_fbeta == pytest.approx(1.0) and reference.iou == 1.0
    assert ours.max_fbeta == pytest.approx(f_of(100, 144, 100)) and ours.iou == pytest.approx(100 / 144)
    assert ours.accuracy == pytest.approx(1 - 44 / 400)


def test_f_is_averaged_over_images_not_precision_and_recall():
    """TokenCut's F_max: F per image and threshold, averaged over images, the best threshold
    (``F_score(precisions, recalls).mean(dim=0).max()``). Averaging P and R first gives more here:
    one image with P = 1, R = 0.1 and one with P = 0.1, R = 1 average to P = R = 0.55."""
    truth_a, pred_a = box((20, 20), 0, 5, 0, 20), box((20, 20), 0, 1, 0, 10)  # P 1, R 0.1
    truth_b, pred_b = box((20, 20), 0, 1, 0, 10), box((20, 20), 0, 5, 0, 20)  # P 0.1, R 1
    for protocol in (REFERENCE, OURS):
        scores = SaliencyScores(protocol)
        scores.add(pred_a, grey(truth_a))
        scores.add(pred_b, grey(truth_b))
        f_then_mean = (f_of(10, 10, 100) + f_of(10, 100, 10)) / 2
        mean_then_f = float(fbeta(np.array(0.55), np.array(0.55)))
        assert scores.max_fbeta == pytest.approx(f_then_mean)
        assert mean_then_f == pytest.approx(0.55) and abs(mean_then_f - f_then_mean) > 0.3


def test_our_scores_of_two_images():
    shape = (10, 10)
    truth_a, pred_a = box(shape, 0, 5, 0, 10), box(shape, 0, 5, 0, 5)  # half the object, no false positive
    truth_b, pred_b = box(shape, 0, 10, 0, 4), box(shape, 0, 10, 0, 8)  # the object and as much background
    scores = SaliencyScores(OURS)
    scores.add(pred_a, grey(truth_a))
    scores.add(pred_b, grey(truth_b))
    assert scores.images == 2
    assert scores.iou == pytest.approx((0.5 + 0.5) / 2)
    assert scores.accuracy == pytest.approx((0.75 + 0.6) / 2)
    # best threshold: any t > 0 (the binary masks); t = 0 predicts everything
    at_zero = (f_of(50, 100, 50) + f_of(40, 100, 40)) / 2
    binary = (f_of(25, 25, 50) + f_of(40, 80, 40)) / 2
    assert binary > at_zero and scores.max_fbeta == pytest.approx(binary)


def test_a_soft_output_stored_at_the_solvers_size_is_scaled_to_the_image():
    prediction = ImagePrediction(size=(20, 30), rles={}, soft=[encode_soft(np.full((10, 15), 0.6))])
    soft = prediction.soft_output()
    assert soft.shape == (20, 30) and soft == pytest.approx(np.full((20, 30), 153 / 255), abs=1e-6)
    assert ImagePrediction(size=(4, 4), rles={}).soft_output() is None


@pytest.fixture
def dataset(tmp_path):
    """A lost bank of 4 images and a ground-truth folder: image 1 refined perfectly (coarse: half;
    soft output 0.9 on the object, 0.3 on a band below it), image 2 has no segment (empty
    prediction), image 3's mask has the wrong size, image 4 has no ground truth; one mask has no
    image."""
    shape = (20, 30)
    truth = box(shape, 5, 15, 5, 25)
    soft = np.where(truth, 0.9, np.where(box(shape, 15, 20, 5, 25), 0.3, 0.0))
    rows = [ImageRow("lost", i, name, 30, 20) for i, name in ((1, "a.jpg"), (2, "sub/b.jpg"), (3, "c.jpg"),
                                                             (4, "d.jpg"))]
    segments = [segment(1, "a.jpg", truth, coarse=box(shape, 5, 15, 5, 15), soft=soft),
                segment(3, "c.jpg", truth, coarse=truth, soft=soft),
                segment(4, "d.jpg", truth, coarse=truth, soft=soft)]
    write_bank(rows + segments, tmp_path / "bank")
    gt = tmp_path / "gt"
    gt.mkdir()
    for name, mask in (("a.png", truth), ("b.png", truth), ("c.png", np.zeros((21, 30), bool)),
                       ("e.png", truth)):
        cv2.imwrite(str(gt / name), grey(mask))
    return tmp_path / "bank", gt


def test_evaluate_matches_by_stem_and_scores_both_methods_under_both_protocols(dataset):
    bank, gt = dataset
    report = evaluate(bank, gt)
    assert list(report.scores) == [COARSE, REFINED]
    assert report.unmatched == ["e.png"]
    assert [name for name, _ in report.problems] == ["c.png"] and "30x21" in report.problems[0][1]
    for protocol in (REFERENCE, OURS):
        refined, coarse = report.scores[REFINED][protocol.key], report.scores[COARSE][protocol.key]
        assert refined.images == coarse.images == 2  # a.png and b.png
        assert refined.iou == pytest.approx((1.0 + 0.0) / 2)
        assert coarse.iou == pytest.approx((0.5 + 0.0) / 2)
        assert refined.accuracy == pytest.approx((1.0 + 400 / 600) / 2)
        assert coarse.accuracy == pytest.approx((500 / 600 + 400 / 600) / 2)
        assert refined.max_fbeta == pytest.approx(0.5)  # F = 1 on a, 0 on b (nothing predicted)
        assert coarse.max_fbeta == pytest.approx(f_of(100, 100, 200) / 2)
    # the reference scored a's soft output: its best thresholds leave the 0.3 band out
    assert report.scores[REFINED][REFERENCE.key].soft_images == 1
    assert report.scores[REFINED][REFERENCE.key].threshold == 77 / 255  # ceil(0.3 * 255) = 77
    assert report.scores[REFINED][OURS.key].soft_images == 0 and report.scores[COARSE][REFERENCE.key].soft_images == 0
    notes = "\n".join(report.notes())
    assert "1 of 2 images have no stored soft output" in notes


def test_the_reference_scores_the_soft_output_even_where_the_bank_fell_back_to_the_coarse_mask(tmp_path):
    """TokenCut scores the solver's output whatever its IoU check decided; ours scores the bank's mask."""
    truth = box((10, 10), 0, 5, 0, 10)
    coarse = box((10, 10), 0, 5, 0, 5)
    write_bank([ImageRow("lost", 1, "x.jpg", 10, 10),
                segment(1, "x.jpg", coarse, coarse=coarse, soft=truth.astype(float))], tmp_path / "bank")
    (tmp_path / "gt").mkdir()
    cv2.imwrite(str(tmp_path / "gt" / "x.png"), grey(truth))
    scores = evaluate(tmp_path / "bank", tmp_path / "gt").scores[REFINED]
    assert scores[REFERENCE.key].max_fbeta == pytest.approx(1.0) and scores[REFERENCE.key].iou == 1.0
    assert scores[OURS.key].max_fbeta == pytest.approx(f_of(25, 25, 50)) and scores[OURS.key].iou == 0.5


def test_a_bank_without_soft_outputs_falls_back_to_the_binary_mask_and_says_so(tmp_path):
    truth = box((8, 8), 0, 4, 0, 8)
    write_bank([ImageRow("lost", 1, "x.jpg", 8, 8), segment(1, "x.jpg", truth, coarse=truth)], tmp_path / "bank")
    (tmp_path / "gt").mkdir()
    cv2.imwrite(str(tmp_path / "gt" / "x.png"), grey(truth))
    report = evaluate(tmp_path / "bank", tmp_path / "gt")
    reference = report.scores[REFINED][REFERENCE.key]
    assert reference.soft_images == 0 and reference.max_fbeta == pytest.approx(1.0)
    assert any("1 of 1 images have no stored soft output" in note for note in report.notes())


def test_segments_eval_prints_the_table_with_both_protocols_and_writes_json(dataset, tmp_path):
    bank, gt = dataset
    result = run_cli(["segments", "eval", "--pred", bank, "--gt", gt, "--json", tmp_path / "scores.json"])
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["method", "protocol", "images", "maxFβ", "IoU", "Acc"]
    assert lines[1].startswith(COARSE) and REFERENCE.label in lines[1] and lines[1].split()[-4] == "2"
    assert lines[2].startswith(COARSE) and f" {OURS.label} " in lines[2]
    assert lines[3].startswith(REFINED) and REFERENCE.label in lines[3]
    assert lines[4].startswith(REFINED) and lines[4].split()[-3:] == ["0.500", "0.500", "0.833"]
    assert f"{REFERENCE.label}: {REFERENCE.description}" in result.stdout
    assert f"{OURS.label}: {OURS.description}" in result.stdout
    assert "GT grey > 0" in REFERENCE.description and "GT grey > 127" in OURS.description
    assert "1 ground-truth masks have no image" in all_output(result) and "c.png" in all_output(result)
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert set(scores["protocols"]) == {"reference", "ours"}
    assert scores["protocols"]["reference"]["label"] == "reference (TokenCut)"
    assert scores["scores"][REFINED]["ours"]["iou"] == pytest.approx(0.5) and scores["unmatched"] == ["e.png"]
    assert scores["scores"][REFINED]["reference"]["soft_images"] == 1


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
    cv2.imwrite(str(tmp_path / "gt" / "x.png"), grey(truth))
    report = evaluate(tmp_path / "bank", tmp_path / "gt")
    assert list(report.scores) == [BANK] and report.scores[BANK][OURS.key].iou == 1.0
    assert report.scores[BANK][REFERENCE.key].iou == 1.0 and report.scores[BANK][REFERENCE.key].soft_images == 0
