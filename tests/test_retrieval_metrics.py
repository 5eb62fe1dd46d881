"""trainer.retrieval.metrics on hand-computed cases: AP with ties, mAP of category means, box IoU,
recall@N within a radius, spatial non-maximum suppression."""
from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.evaluate import average_precision
from trainer.retrieval.metrics import (
    box_iou,
    boxes_iou,
    detection_correct,
    mean_average_precision,
    ranked_average_precision,
    recall_at_n,
    spatial_nms,
)

# -- ranked_average_precision -------------------------------------------------------------------


def reference_ap(scores, relevant, n_relevant=None) -> float:
    """AP by its definition, one relevant item at a time: precision among the items scoring >= it."""
    total = 0.0
    for i in range(len(scores)):
        if relevant[i]:
            at_least = [j for j in range(len(scores)) if scores[j] >= scores[i]]
            total += sum(bool(relevant[j]) for j in at_least) / len(at_least)
    n = sum(bool(r) for r in relevant) if n_relevant is None else n_relevant
    return total / n


@pytest.mark.parametrize("scores, relevant, expected", [
    ([3, 2, 1], [1, 1, 0], 1.0),                  # both relevant first: precisions 1/1, 2/2
    ([3, 2, 1], [0, 1, 1], (1 / 2 + 2 / 3) / 2),  # ranks 2 and 3
    ([1, 2, 3], [1, 0, 0], 1 / 3),                 # the only relevant item is last
    # ties count as ranked together: the relevant 2 shares its score with the irrelevant 2, so both
    # are at rank 3 (items scoring >= 2: three, one relevant): 1/3; the relevant 1: 2 of 4 items. A
    # stable sort that happened to put the relevant 2 first would give (1/2 + 2/4) / 2 = 0.5 instead.
    ([3, 2, 2, 1], [0, 1, 0, 1], (1 / 3 + 2 / 4) / 2),
    ([1, 1, 1, 1], [1, 0, 0, 1], 0.5),             # all tied: every relevant item sees 2 of 4
])
def test_ap_hand_computed(scores, relevant, expected):
    assert ranked_average_precision(np.array(scores, float), np.array(relevant, bool)) == pytest.approx(expected)


def test_ap_of_the_tie_case_is_five_twelfths():
    assert ranked_average_precision([3.0, 2.0, 2.0, 1.0], [False, True, False, True]) == pytest.approx(5 / 12)


def test_ap_divides_by_n_relevant_for_ground_truth_missing_from_the_ranking():
    # one of two ground-truth images is ranked first, the other is not in the ranking at all
    assert ranked_average_precision([3.0, 2.0, 1.0], [True, False, False], n_relevant=2) == pytest.approx(0.5)
    # (1/2 + 2/3) spread over 4 ground-truth images instead of 2
    assert ranked_average_precision([3.0, 2.0, 1.0], [False, True, True], n_relevant=4) == pytest.approx(7 / 24)
    # ground truth exists but none of it is ranked: AP 0, not NaN
    assert ranked_average_precision([3.0, 2.0], [False, False], n_relevant=3) == 0.0


def test_ap_is_nan_without_ground_truth():
    assert math.isnan(ranked_average_precision([3.0, 2.0], [False, False]))
    assert math.isnan(ranked_average_precision([], [], n_relevant=0))


def test_ap_rejects_bad_inputs():
    with pytest.raises(ValueError, match="less than"):
        ranked_average_precision([3.0, 2.0], [True, True], n_relevant=1)
    with pytest.raises(ValueError, match="finite"):
        ranked_average_precision([np.inf, 2.0], [True, False])
    with pytest.raises(ValueError, match="finite"):
        ranked_average_precision([np.nan, 2.0], [True, False])
    with pytest.raises(ValueError, match="1-D"):
        ranked_average_precision([3.0, 2.0, 1.0], [True, False])
    with pytest.raises(ValueError, match="booleans"):
        ranked_average_precision([3.0, 2.0], [2, 0])


def test_ap_agrees_with_the_definition_and_trainer_evaluate_on_random_rankings():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 30))
        scores = rng.integers(0, 6, size=n).astype(float)  # few values: many ties
        relevant = rng.random(n) < 0.4
        if not relevant.any():
            relevant[int(rng.integers(n))] = True
        extra = int(rng.integers(0, 3))
        expected = reference_ap(scores, relevant, relevant.sum() + extra)
        assert ranked_average_precision(scores, relevant, relevant.sum() + extra) == pytest.approx(expected), trial
        assert ranked_average_precision(scores, relevant) == pytest.approx(average_precision(scores, relevant)), trial


def test_ap_without_ties_equals_the_authors_sorted_list_formula():
    """The Brueghel evaluation of the paper's code: sort by score, AP = sum over relevant positions of
    (relevant so far / position), divided by the number of ground-truth images."""
    rng = np.random.default_rng(1)
    for _ in range(50):
        scores = rng.permutation(40).astype(float)
        relevant = rng.random(40) < 0.2
        n_gt = int(relevant.sum()) + 2
        ranked = relevant[np.argsort(-scores)]
        authors = sum(ranked[: i + 1].sum() / (i + 1) for i in range(40) if ranked[i]) / n_gt
        assert ranked_average_precision(scores, relevant, n_gt) == pytest.approx(authors)


# -- mean_average_precision ---------------------------------------------------------------------

def test_map_is_the_mean_of_category_means_and_skips_nan():
    result = mean_average_precision({"a": [1.0, 0.5], "b": [0.0], "c": [float("nan")], "d": [0.25, float("nan")]})
    assert result["per_category"]["a"] == pytest.approx(0.75)
    assert result["per_category"]["b"] == 0.0
    assert math.isnan(result["per_category"]["c"])
    assert result["per_category"]["d"] == pytest.approx(0.25)
    # (0.75 + 0 + 0.25) / 3 categories with a mean; the mean over the 4 queries would be 1.75 / 4
    assert result["mean"] == pytest.approx(1 / 3)
    assert result["queries"] == 4
    assert result["skipped"] == 2


def test_map_of_nothing_is_nan_and_bad_ap_is_refused():
    empty = mean_average_precision({})
    assert math.isnan(empty["mean"]) and empty["queries"] == 0 and empty["skipped"] == 0
    with pytest.raises(ValueError, match="'x'"):
        mean_average_precision({"x": [0.5, 1.5]})
    with pytest.raises(ValueError, match="'y'"):
        mean_average_precision({"y": [float("inf")]})


# -- boxes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("a, b, expected", [
    ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
    ([0, 0, 10, 10], [5, 0, 15, 10], 50 / 150),   # half overlap
    ([0, 0, 10, 10], [2, 2, 4, 4], 4 / 100),      # contained
    ([0, 0, 10, 10], [10, 0, 20, 10], 0.0),       # touching edges: no area in common
    ([0, 0, 10, 10], [20, 20, 30, 30], 0.0),
    ([0, 0, 4, 2], [2, 1, 6, 3], 2 / 14),          # 2 x 1 overlap, areas 8 and 8
])
def test_box_iou(a, b, expected):
    assert box_iou(a, b) == pytest.approx(expected)
    assert box_iou(b, a) == pytest.approx(expected)


def test_boxes_iou_is_the_matrix_of_box_iou():
    a = np.array([[0, 0, 10, 10], [5, 5, 8, 9]], float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], float)
    matrix = boxes_iou(a, b)
    assert matrix.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert matrix[i, j] == pytest.approx(box_iou(a[i], b[j]))
    assert boxes_iou(a, np.zeros((0, 4))).shape == (2, 0)


def test_boxes_must_be_valid():
    with pytest.raises(ValueError, match="x2 > x1"):
        box_iou([10, 0, 0, 10], [0, 0, 10, 10])
    with pytest.raises(ValueError, match="x2 > x1"):
        boxes_iou([[0, 0, 10, 10]], [[0, 5, 10, 5]])
    with pytest.raises(ValueError, match="4 numbers"):
        box_iou([0, 0, 10], [0, 0, 10, 10])


def test_detection_correct_needs_iou_above_the_threshold():
    gt = [[100, 100, 110, 110], [0, 0, 10, 10]]
    assert detection_correct([5, 0, 15, 10], gt, threshold=0.3)         # IoU 1/3 with the second
    assert not detection_correct([5, 0, 15, 10], gt, threshold=1 / 3)   # strictly greater
    assert not detection_correct([50, 50, 60, 60], gt)
    assert not detection_correct([0, 0, 10, 10], np.zeros((0, 4)))


# -- recall@N -----------------------------------------------------------------------------------

# database images on the x axis (metres); queries at 0, 200 and 1000
DB = np.array([[0.0, 0.0], [100.0, 0.0], [200.0, 0.0], [25.0, 0.0]])
QUERIES = np.array([[0.0, 0.0], [200.0, 0.0], [1000.0, 0.0]])
RANKINGS = np.array([[1, 3, 0],    # query 0: image 3 is exactly 25 m away (a match), at rank 2
                     [2, 0, 1],    # query 1: image 2 at rank 1
                     [0, 1, 2]])   # query 2: nothing within 25 m


def test_recall_at_n_hand_computed():
    recall = recall_at_n(RANKINGS, DB, QUERIES, ns=(1, 2, 3, 5))
    assert recall == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 2 / 3, 5: 2 / 3})


def test_recall_radius_is_inclusive_and_configurable():
    # 24.9 m: image 3 (25 m) no longer matches query 0, image 0 (0 m) at rank 3 does
    assert recall_at_n(RANKINGS, DB, QUERIES, ns=(2, 3), radius=24.9) == pytest.approx({2: 1 / 3, 3: 2 / 3})


def test_recall_ignores_padding():
    # image 0 sits on query 0: if -1 were read as an index (or as the last image), this would count
    rankings = np.array([[1, -1, -1], [2, -1, -1], [-1, -1, -1]])
    assert recall_at_n(rankings, DB, QUERIES, ns=(1, 3)) == pytest.approx({1: 1 / 3, 3: 1 / 3})
    rankings = np.array([[1, -1, -1], [1, -1, -1], [1, -1, -1]])
    database = np.array([[0.0, 0.0], [100.0, 0.0], [1000.0, 0.0]])  # -1 would be image 2, on query 2
    assert recall_at_n(rankings, database, QUERIES, ns=(3,)) == {3: 0.0}


def test_recall_with_positives_instead_of_positions():
    positives = [{0, 3}, {2}, set()]
    assert recall_at_n(RANKINGS, ns=(1, 2, 3), positives=positives) == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 2 / 3})
    assert recall_at_n(np.array([[-1, 0]]), ns=(1, 2), positives=[{0}]) == {1: 0.0, 2: 1.0}


def test_recall_rejects_bad_inputs():
    with pytest.raises(ValueError, match="query 0, rank 1"):
        recall_at_n(np.array([[0, 4, 1]]), DB, QUERIES[:1])
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        recall_at_n(RANKINGS[:2], DB, QUERIES)
    with pytest.raises(ValueError, match="integer"):
        recall_at_n(RANKINGS.astype(float), DB, QUERIES)
    with pytest.raises(ValueError, match="not both"):
        recall_at_n(RANKINGS, DB, QUERIES, positives=[set(), set(), set()])
    with pytest.raises(ValueError, match="positives"):
        recall_at_n(RANKINGS)
    with pytest.raises(ValueError, match="positive integers"):
        recall_at_n(RANKINGS, DB, QUERIES, ns=(0,))


# -- spatial NMS --------------------------------------------------------------------------------

# places A at x=0 (images 0, 4, 5: not contiguous, so index // 12-style grouping would fail), B at
# x=50 (images 1, 2), C at x=100 (image 3)
NMS_DB = np.array([[0.0, 0.0], [50.0, 0.0], [50.0, 0.0], [100.0, 0.0], [0.0, 0.0], [0.0, 0.0]])


def test_spatial_nms_keeps_the_first_image_of_each_place():
    rankings = np.array([[0, 4, 1, 5, 2, 3],
                         [3, 2, 1, 0, -1, -1]])
    kept = spatial_nms(rankings, NMS_DB)
    assert kept.tolist() == [[0, 1, 3, -1, -1, -1],
                             [3, 2, 0, -1, -1, -1]]
    assert kept.dtype == np.int64


def test_spatial_nms_changes_recall_at_5_not_at_1():
    rankings = np.array([[0, 4, 1, 5, 2, 3],   # query at C: C is 6th before NMS, 3rd after
                         [1, 3, 0, 2, 4, 5]])  # query at B: found at rank 1 either way
    queries = np.array([[100.0, 0.0], [50.0, 0.0]])
    before = recall_at_n(rankings, NMS_DB, queries, ns=(1, 5), radius=10.0)
    after = recall_at_n(spatial_nms(rankings, NMS_DB), NMS_DB, queries, ns=(1, 5), radius=10.0)
    assert before == {1: 0.5, 5: 0.5}
    assert after == {1: 0.5, 5: 1.0}


def test_spatial_nms_tolerance():
    database = np.array([[0.0, 0.0], [0.0005, 0.0], [1.0, 0.0]])
    assert spatial_nms([[0, 1, 2]], database).tolist() == [[0, 2, -1]]          # 0.5 mm apart: one place
    assert spatial_nms([[0, 1, 2]], database, tolerance=1e-4).tolist() == [[0, 1, 2]]
    assert spatial_nms([[0, 1, 2]], database, tolerance=2.0).tolist() == [[0, -1, -1]]
    with pytest.raises(ValueError, match="rank 2"):
        spatial_nms([[0, 1, 3]], database)
