"""The paper's retrieval benchmarks, run through :func:`trainer.retrieval.rank.retrieve`.

- **Brueghel one-shot detail retrieval** (Table 1): every image of the folder is the database;
  each query (an image and a box, from ``brueghelVal.json`` / ``brueghelTest.json``) ranks every
  other image; AP per query over its ground-truth images other than itself (one never ranked
  counts as missed), mAP per category, and the mean of the categories' mAPs, as the paper reports.
  Defaults of the authors' evaluation: 640 x 640 database images, the query rescaled so its box's
  longer side is 64 px, then a 640 x 640 window around it. With detection, a ground-truth image
  counts only when the box around the region the network finds in it overlaps one of its
  ground-truth boxes with IoU > 0.3.
- **Place recognition** (Table 2): query and database lists with UTM positions from NetVLAD's
  ``.mat`` files (Pitts30k, Tokyo 24/7), each query's top-100 short-list from a global descriptor
  re-ranked by the pair score at 640 x 480; R@1/5/10 within the file's distance threshold (25 m),
  before and after re-ranking, and after Tokyo 24/7's spatial non-maximum suppression. Queries
  and database images are normalised alike (the authors' script did not).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from datagen.format.atomic import atomic_write_bytes

from .datasets import read_brueghel, read_place_mat, read_shortlists
from .engine import Resolution
from .metrics import detection_correct, mean_average_precision, ranked_average_precision, recall_at_n, spatial_nms
from .rank import Query, QueryResult, RetrieveOptions, retrieve

BRUEGHEL_DEFAULTS = {"resolution": Resolution(640, 640), "box_side": 64}
PLACES_DEFAULTS = {"resolution": Resolution(640, 480), "box_side": None}
RECALL_NS = (1, 5, 10, 100)


def _write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=_plain) + "\n").encode())


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and value != value:
        return None
    return str(value)


def brueghel_benchmark(checkpoint, annotations, image_dir, out_dir, options: RetrieveOptions | None = None,
                       detection: bool = False, iou_threshold: float = 0.3, device: str = "auto") -> dict:
    """Run the Brueghel protocol; writes ``out_dir``/results.json (and the run's ranking.parquet)
    and returns {"mean", "per_category", "queries", "per_query", ...}."""
    options = options or RetrieveOptions(**BRUEGHEL_DEFAULTS)
    image_dir = Path(image_dir)
    annotated = read_brueghel(annotations, image_dir)
    by_name = {f"{q.category}/{q.index}": q for q in annotated}
    queries = [Query(name, q.image, q.box) for name, q in by_name.items()]
    sizes: dict[str, tuple[int, int]] = {}
    per_query: dict[str, dict] = {}

    def on_result(result: QueryResult) -> None:
        annotated_query = by_name[result.query.name]
        truth = set(annotated_query.relevant_images)
        relevant = np.array([c in truth for c in result.candidates], bool)
        entry = {"category": annotated_query.category, "image": annotated_query.image,
                 "ap": ranked_average_precision(result.scores, relevant, n_relevant=len(truth))}
        if detection:
            gt_boxes = {}
            for name, box in annotated_query.gt:
                gt_boxes.setdefault(name, []).append(box)
            correct = relevant.copy()
            for i in np.flatnonzero(relevant):
                width, height = sizes.setdefault(result.candidates[i], _image_size(image_dir / result.candidates[i]))
                x1, y1, x2, y2 = result.boxes[i]
                correct[i] = detection_correct([x1 * width, y1 * height, x2 * width, y2 * height],
                                               gt_boxes[result.candidates[i]], iou_threshold)
            entry["detection_ap"] = ranked_average_precision(result.scores, correct, n_relevant=len(truth))
        per_query[result.query.name] = entry

    run = retrieve(checkpoint, image_dir, queries, image_dir, out_dir, options, device=device, on_result=on_result)
    categories: dict[str, list[float]] = {}
    for entry in per_query.values():
        categories.setdefault(entry["category"], []).append(entry["ap"])
    result = {"benchmark": "brueghel", "annotations": str(annotations), **mean_average_precision(categories)}
    if detection:
        detection_categories: dict[str, list[float]] = {}
        for entry in per_query.values():
            detection_categories.setdefault(entry["category"], []).append(entry["detection_ap"])
        result["detection"] = {"iou_threshold": iou_threshold, **mean_average_precision(detection_categories)}
    result.update({"per_query": per_query, "run": run})
    _write_json(Path(out_dir) / "results.json", result)
    return result


def _image_size(path: Path) -> tuple[int, int]:
    from .images import inspect_image

    return inspect_image(path.parent, path.name).size


def places_benchmark(checkpoint, mat_file, query_dir, database_dir, shortlists_file, out_dir,
                     options: RetrieveOptions | None = None, top: int = 100, nms: bool | None = None,
                     device: str = "auto") -> dict:
    """Run the place-recognition protocol; writes ``out_dir``/results.json and returns
    {"recall": {"shortlist", "reranked"[, "shortlist_nms", "reranked_nms"]}, ...}. ``nms``: apply
    the spatial non-maximum suppression (default: for Tokyo 24/7, whose file name has 'tokyo')."""
    options = options or RetrieveOptions(**PLACES_DEFAULTS)
    places = read_place_mat(mat_file)
    shortlists = read_shortlists(shortlists_file, places.query_images, places.db_images, top=top)
    nms = ("tokyo" in places.name.lower()) if nms is None else nms
    queries = [Query(name, name) for name in places.query_images]
    reranked: dict[str, list[str]] = {}

    def on_result(result: QueryResult) -> None:
        order = sorted(range(len(result.candidates)), key=lambda i: (-float(result.scores[i]), result.candidates[i]))
        reranked[result.query.name] = [result.candidates[i] for i in order]

    run = retrieve(checkpoint, database_dir, queries, query_dir, out_dir, options, shortlists=shortlists,
                   device=device, on_result=on_result)
    index = {name: i for i, name in enumerate(places.db_images)}
    width = max((len(v) for v in shortlists.values()), default=0)

    def matrix(lists: dict[str, list[str]]) -> np.ndarray:
        out = np.full((len(places.query_images), max(width, 1)), -1, np.int64)
        for q, name in enumerate(places.query_images):
            row = [index[c] for c in lists.get(name, [])]
            out[q, : len(row)] = row
        return out

    rankings = {"shortlist": matrix(shortlists), "reranked": matrix(reranked)}
    if nms:
        rankings.update({f"{key}_nms": spatial_nms(value, places.db_utm) for key, value in list(rankings.items())})
    recall = {key: recall_at_n(value, places.db_utm, places.query_utm, RECALL_NS, radius=places.pos_dist_thr)
              for key, value in rankings.items()}
    result = {"benchmark": places.name, "mat": str(mat_file), "radius_m": places.pos_dist_thr, "top": top,
              "nms": nms, "recall": {key: {f"R@{n}": v for n, v in values.items()} for key, values in recall.items()},
              "run": run, "options": {k: str(v) for k, v in dataclasses.asdict(options).items()}}
    _write_json(Path(out_dir) / "results.json", result)
    return result
