"""Rebuild the embedded sample from coco-mini: the first 60 images by id, longer side 400 px.

    python datagen/sample_data/make_sample.py ../shared/data/coco-mini datagen/sample_data/coco

Polygons, boxes and areas are scaled with the images; licences and attribution are kept.
"""
import json
import sys
from pathlib import Path

import cv2

MAX_SIDE = 400
N_IMAGES = 60


def main(src: Path, dst: Path) -> None:
    data = json.loads((src / "instances.json").read_text())
    images = sorted(data["images"], key=lambda im: im["id"])[:N_IMAGES]
    scales = {}
    (dst / "train2017").mkdir(parents=True, exist_ok=True)
    (dst / "annotations").mkdir(parents=True, exist_ok=True)
    for image in images:
        pixels = cv2.imread(str(src / "images" / image["file_name"]), cv2.IMREAD_COLOR)
        scale = MAX_SIDE / max(pixels.shape[:2])
        width, height = round(pixels.shape[1] * scale), round(pixels.shape[0] * scale)
        pixels = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(dst / "train2017" / image["file_name"]), pixels, [cv2.IMWRITE_JPEG_QUALITY, 88])
        scales[image["id"]] = (width / image["width"], height / image["height"])
        image["width"], image["height"] = width, height
    annotations = []
    for ann in data["annotations"]:
        if ann["image_id"] not in scales:
            continue
        sx, sy = scales[ann["image_id"]]
        ann["segmentation"] = [[round(v * (sx if i % 2 == 0 else sy), 2) for i, v in enumerate(poly)]
                               for poly in ann["segmentation"]]
        x, y, w, h = ann["bbox"]
        ann["bbox"] = [round(x * sx, 2), round(y * sy, 2), round(w * sx, 2), round(h * sy, 2)]
        ann["area"] = round(ann["area"] * sx * sy, 2)
        annotations.append(ann)
    data["images"], data["annotations"] = images, annotations
    data["info"] = dict(data.get("info", {}), description="datagen embedded sample: 60 COCO train2017 "
                        "images downscaled to a longer side of 400 px, with their instance polygons")
    (dst / "annotations" / "instances_train2017.json").write_text(json.dumps(data, separators=(",", ":")))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
