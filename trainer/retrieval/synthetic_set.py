"""A small retrieval benchmark made from held-out shards, whose every answer is known.

Sample i of the shards gives two images: ``pair{i}_a.jpg`` (its source) and ``pair{i}_b.jpg``
(its target, where the source's object was pasted). The query is the source image with the box
around its object; the only ground truth is the target, with the box around the pasted object.
The annotations are written in Brueghel's format (``retrieval.json``: {category: [{"query":
[image, box], "gt": [[image, box]]}]}, the category being the pasted object's), so the Brueghel
protocol (:func:`trainer.retrieval.protocols.brueghel_benchmark`) runs on it unchanged: every
other image of the folder is a distractor. ``trainer fit --val-retrieval`` selects models on one.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from datagen.format.atomic import atomic_write_bytes

ANNOTATIONS = "retrieval.json"
IMAGES = "images"


def pixel_box(mask: np.ndarray) -> list[float] | None:
    """[x1, y1, x2, y2] pixel corners of the non-zero pixels of an (H, W) mask, None if empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def _jpeg(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise OSError("cannot encode a JPEG")
    return data.tobytes()


def write_retrieval_set(shards, out_dir, n: int | None = 50) -> dict:
    """Write the first ``n`` samples of ``shards`` (all with None) as a retrieval set into
    ``out_dir`` (images/ and retrieval.json); returns {"queries", "images", "categories", "skipped"}.
    A sample whose object is missing from either image is skipped and counted."""
    from ..data import iter_samples

    out = Path(out_dir)
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    annotations: dict[str, list] = {}
    written = skipped = 0
    for index, sample in enumerate(iter_samples(shards)):
        if n is not None and written >= n:
            break
        src_box, tgt_box = pixel_box(sample.src_mask > 0), pixel_box(sample.tgt_mask > 0)
        if src_box is None or tgt_box is None:
            skipped += 1
            continue
        objects = sample.meta.get("objects") or [{}]
        category = str(objects[0].get("category", "object")) if isinstance(objects[0], dict) else "object"
        source, target = f"pair{index:05d}_a.jpg", f"pair{index:05d}_b.jpg"
        atomic_write_bytes(out / IMAGES / source, _jpeg(sample.src_image))
        atomic_write_bytes(out / IMAGES / target, _jpeg(sample.tgt_image))
        annotations.setdefault(category, []).append({"query": [source, src_box], "gt": [[target, tgt_box]],
                                                     "sample": sample.key})
        written += 1
    if not written:
        raise ValueError(f"{shards}: no sample with its object in both images")
    atomic_write_bytes(out / ANNOTATIONS, (json.dumps(annotations, indent=1, sort_keys=True) + "\n").encode())
    return {"queries": written, "images": 2 * written, "categories": len(annotations), "skipped": skipped}
