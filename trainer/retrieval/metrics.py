"""Ranking metrics of the retrieval benchmarks: pure functions, numpy arrays in, floats or arrays out.

- :func:`ranked_average_precision` and :func:`mean_average_precision`: Brueghel one-shot retrieval
  (AP of each query's ranking of the database, then the mean over categories of the per-category
  means).
- :func:`box_iou`, :func:`boxes_iou`, :func:`detection_correct`: boxes ``[x1, y1, x2, y2]`` in pixel
  corner coordinates (the box covers x1 <= x < x2, area (x2 - x1) * (y2 - y1)).
- :func:`recall_at_n` and :func:`spatial_nms`: place recognition (Pitts30k, Tokyo 24/7), a query
  being found at N when one of its first N candidates lies within 25 m of it.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

PAD = -1
"""Index that fills the tail of a ranking row that holds fewer candidates than the row's width."""


# -- average precision --------------------------------------------------------------------------

def ranked_average_precision(scores, relevant, n_relevant: int | None = None) -> float:
    """Average precision of one query's ranking of ``n`` items.

    ``scores`` (n,) float, higher is better; ``relevant`` (n,) bool. AP = (1 / n_relevant) * the
    sum over the relevant items of the precision at that item, where the precision at an item of
    score s is (#relevant items scoring >= s) / (#items scoring >= s): tied items count as ranked
    together (as :func:`trainer.evaluate.average_precision` and scikit-learn), so a tie between a
    relevant and an irrelevant item costs the relevant one, whatever their order.

    ``n_relevant`` defaults to ``relevant.sum()``. It may be larger: ground-truth items missing from
    the ranking count as never retrieved, each adding 0 to the sum (Brueghel: AP divided by the
    number of ground-truth images). NaN when ``n_relevant`` is 0.
    """
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant)
    if scores.ndim != 1 or relevant.shape != scores.shape:
        raise ValueError(f"ranked_average_precision: scores {scores.shape} and relevant {relevant.shape} "
                         f"must be two 1-D arrays of one length")
    if relevant.dtype != bool:
        if not np.isin(relevant, (0, 1)).all():
            raise ValueError("ranked_average_precision: relevant must be booleans (or 0/1)")
        relevant = relevant.astype(bool)
    if not np.isfinite(scores).all():
        raise ValueError("ranked_average_precision: scores must be finite")
    found = int(relevant.sum())
    if n_relevant is None:
        n_relevant = found
    if isinstance(n_relevant, bool) or int(n_relevant) != n_relevant:
        raise ValueError(f"ranked_average_precision: n_relevant must be an integer, got {n_relevant!r}")
    n_relevant = int(n_relevant)
    if n_relevant < found:
        raise ValueError(f"ranked_average_precision: n_relevant={n_relevant} is less than the {found} "
                         f"relevant items of the ranking")
    if n_relevant == 0:
        return float("nan")
    if found == 0:
        return 0.0
    sorted_scores = np.sort(scores)
    relevant_scores = scores[relevant]
    sorted_relevant = np.sort(relevant_scores)
    at_least = scores.size - np.searchsorted(sorted_scores, relevant_scores, side="left")
    relevant_at_least = found - np.searchsorted(sorted_relevant, relevant_scores, side="left")
    return float(np.sum(relevant_at_least / at_least) / n_relevant)


def mean_average_precision(per_query: Mapping[str, Sequence[float]]) -> dict:
    """Per-category and overall mean of per-query APs.

    ``per_query``: {category: [AP of each query of that category]}. Returns ``{"per_category":
    {category: mean AP}, "mean": mean over categories of the per-category means (the paper's
    Brueghel mAP), "queries": number of APs averaged, "skipped": number of NaN APs left out}``. A
    category whose APs are all NaN (or that has none) gets a NaN mean and is left out of ``"mean"``;
    ``"mean"`` is NaN when no category has a mean.
    """
    per_category, queries, skipped = {}, 0, 0
    for category, aps in per_query.items():
        values = np.asarray(list(aps), dtype=np.float64).ravel()
        nan = np.isnan(values)
        finite = values[~nan]
        outside = ~((finite >= 0) & (finite <= 1))
        if outside.any():
            raise ValueError(f"mean_average_precision: category {category!r} has an AP of {finite[outside][0]}, "
                             f"outside [0, 1]")
        skipped += int(nan.sum())
        queries += int(finite.size)
        per_category[category] = float(finite.mean()) if finite.size else float("nan")
    means = [value for value in per_category.values() if not math.isnan(value)]
    return {"per_category": per_category, "mean": float(np.mean(means)) if means else float("nan"),
            "queries": queries, "skipped": skipped}


# -- boxes --------------------------------------------------------------------------------------

def _boxes(name: str, boxes) -> np.ndarray:
    """``boxes`` as an (n, 4) float64 array of valid [x1, y1, x2, y2] boxes."""
    array = np.asarray(boxes, dtype=np.float64)
    if array.ndim == 1 and array.size == 0:
        array = array.reshape(0, 4)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"{name} must be (n, 4) boxes [x1, y1, x2, y2], got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: box coordinates must be finite")
    bad = (array[:, 2] <= array[:, 0]) | (array[:, 3] <= array[:, 1])
    if bad.any():
        raise ValueError(f"{name}: box {array[bad][0].tolist()} does not have x2 > x1 and y2 > y1")
    return array


def boxes_iou(a, b) -> np.ndarray:
    """Intersection over union of every box of ``a`` (n, 4) with every box of ``b`` (m, 4) -> (n, m).

    Boxes are [x1, y1, x2, y2] pixel corners with x2 > x1 and y2 > y1.
    """
    a, b = _boxes("boxes_iou: a", a), _boxes("boxes_iou: b", b)
    width = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    height = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(width, 0, None) * np.clip(height, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def box_iou(a, b) -> float:
    """Intersection over union of two boxes [x1, y1, x2, y2] (pixel corners, x2 > x1, y2 > y1)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != (4,) or b.shape != (4,):
        raise ValueError(f"box_iou: expected two boxes of 4 numbers, got shapes {a.shape} and {b.shape}")
    return float(boxes_iou(a[None], b[None])[0, 0])


def detection_correct(pred_box, gt_boxes, threshold: float = 0.3) -> bool:
    """Whether ``pred_box`` (4,) overlaps one of ``gt_boxes`` (m, 4) with an IoU > ``threshold``
    (False when there is no ground-truth box)."""
    pred = np.asarray(pred_box, dtype=np.float64)
    if pred.shape != (4,):
        raise ValueError(f"detection_correct: pred_box must be 4 numbers, got shape {pred.shape}")
    ious = boxes_iou(pred[None], gt_boxes)
    return bool((ious > threshold).any())


# -- place recognition --------------------------------------------------------------------------

def _rankings(rankings, n_database: int | None) -> np.ndarray:
    """``rankings`` as a (Q, K) int64 array of database indices in [0, n_database) (no upper bound
    when None) or PAD."""
    array = np.asarray(rankings)
    if array.ndim != 2:
        raise ValueError(f"rankings must be a (Q, K) array of database indices, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"rankings must hold integer database indices, got dtype {array.dtype}")
    array = array.astype(np.int64)
    bad = array < PAD if n_database is None else (array < PAD) | (array >= n_database)
    if bad.any():
        q, k = np.argwhere(bad)[0]
        valid = "0 or more" if n_database is None else f"0 to {n_database - 1}"
        raise ValueError(f"rankings: query {q}, rank {k}: index {array[q, k]} is not a database index "
                         f"({valid}, or {PAD} for padding)")
    return array


def _positions(name: str, positions, rows: int | None = None) -> np.ndarray:
    array = np.asarray(positions, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2 or (rows is not None and array.shape[0] != rows):
        wanted = f"({rows}, 2)" if rows is not None else "(n, 2)"
        raise ValueError(f"{name} must be {wanted} UTM easting, northing in metres, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: positions must be finite")
    return array


def recall_at_n(rankings, db_positions=None, query_positions=None, ns: Iterable[int] = (1, 5, 10),
                radius: float = 25.0, *, positives: Sequence[set[int]] | None = None) -> dict[int, float]:
    """Recall@N of place recognition: {N: share of queries with a true match among their first N candidates}.

    ``rankings`` (Q, K) int: row q holds database indices, best first; ``-1`` pads a row holding
    fewer than K candidates and is ignored (N larger than K counts every candidate). A candidate is
    a true match when it lies within ``radius`` metres (distance <= radius, as in the standard
    protocol) of the query: ``db_positions`` (D, 2) and ``query_positions`` (Q, 2) are UTM easting,
    northing in metres. Or ``positives``: per query, the set of its true database indices (then the
    positions are not used). Every query counts in the denominator, also one without any match.
    """
    ns = [int(n) for n in ns]
    if not ns or min(ns) < 1:
        raise ValueError(f"recall_at_n: ns must be positive integers, got {ns}")
    if positives is not None:
        if db_positions is not None or query_positions is not None:
            raise ValueError("recall_at_n: give either positions or positives, not both")
        n_queries = len(positives)
        ranked = _rankings(rankings, None)
        if ranked.shape[0] != n_queries:
            raise ValueError(f"recall_at_n: {ranked.shape[0]} ranking rows but {n_queries} sets of positives")
        hits = np.array([[index != PAD and int(index) in truth for index in row]
                         for row, truth in zip(ranked, positives)], dtype=bool).reshape(ranked.shape)
    else:
        if db_positions is None or query_positions is None:
            raise ValueError("recall_at_n: give db_positions and query_positions, or positives")
        database = _positions("recall_at_n: db_positions", db_positions)
        ranked = _rankings(rankings, database.shape[0])
        queries = _positions("recall_at_n: query_positions", query_positions, ranked.shape[0])
        candidates = database[np.where(ranked == PAD, 0, ranked)]
        distances = np.linalg.norm(candidates - queries[:, None, :], axis=2)
        hits = (distances <= radius) & (ranked != PAD)
    if hits.shape[0] == 0:
        return {n: float("nan") for n in ns}
    found_at = np.where(hits.any(axis=1), hits.argmax(axis=1), np.iinfo(np.int64).max)
    return {n: float((found_at < n).mean()) for n in ns}


def spatial_nms(rankings, db_positions, tolerance: float = 1e-3) -> np.ndarray:
    """Spatial non-maximum suppression of place-recognition rankings (Tokyo 24/7) -> (Q, K) int64.

    ``rankings`` (Q, K) int database indices, best first (``-1`` padding ignored); ``db_positions``
    (D, 2) UTM metres. Within each row, a candidate whose place (its position, equal to a kept
    candidate's within ``tolerance`` metres) already appeared higher up is removed; the kept ones
    move up in their order and the tail is padded with -1. Tokyo 24/7's database has 12 images per
    place sharing one position; the original code took ``index // 12``, which depends on the file
    order, where this reads the positions.
    """
    database = _positions("spatial_nms: db_positions", db_positions)
    ranked = _rankings(rankings, database.shape[0])
    kept_rankings = np.full(ranked.shape, PAD, dtype=np.int64)
    for q, row in enumerate(ranked):
        kept: list[int] = []
        for index in row:
            if index == PAD:
                continue
            if kept and (np.linalg.norm(database[kept] - database[index], axis=1) <= tolerance).any():
                continue
            kept.append(int(index))
        kept_rankings[q, :len(kept)] = kept
    return kept_rankings
