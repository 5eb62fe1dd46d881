"""``datagen build`` on damaged inputs: broken images are rejected per attempt (named in the
per-sample parquet), odd but valid image formats are used, bad annotations are skipped with a
reason, and an annotation file that is not COCO stops the build before any shard."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import all_output, build_args, run_cli, shard_files
from PIL import Image
from synthetic import SAMPLE_ANNOTATIONS, SAMPLE_IMAGES

from datagen.format.manifest import read_sample_rows

N_PAIRS = 30
SHARD_SIZE = 15
IMAGE_IDS = (9, 25, 30, 34, 36, 42, 49, 61, 64, 71, 72, 73)
"""The first 12 images of the embedded sample (by id)."""
BROKEN = {25: "truncated JPEG", 34: "file not found", 30: "too small"}
"""Images that cannot be used, and the words their rejection must contain."""
ODD_FORMATS = {42: "grayscale JPEG", 49: "CMYK JPEG", 61: "RGBA PNG", 71: "16-bit PNG"}
"""Images in unusual but valid formats: they must be used like any other."""
BAD_ANNOTATIONS = {
    9_000_001: ("outside", "empty mask"),
    9_000_002: ("zero_area", "empty mask"),
    9_000_003: ("degenerate", "need at least 3"),
}


def make_damaged_coco(root: Path) -> dict:
    """A COCO-layout copy of 12 images of the embedded sample with damaged images and annotations."""
    dataset = json.loads(SAMPLE_ANNOTATIONS.read_text())
    images = {image["id"]: dict(image) for image in dataset["images"] if image["id"] in IMAGE_IDS}
    assert sorted(images) == sorted(IMAGE_IDS)
    annotations = [dict(a) for a in dataset["annotations"] if a["image_id"] in images]
    image_dir = root / "train2017"
    image_dir.mkdir(parents=True)
    for image_id, image in images.items():
        source = SAMPLE_IMAGES / image["file_name"]
        target = image_dir / image["file_name"]
        stem = Path(image["file_name"]).stem
        if image_id == 25:  # truncated JPEG
            data = source.read_bytes()
            target.write_bytes(data[: len(data) // 2])
        elif image_id == 34:  # missing file: listed in the JSON, not on disk
            pass
        elif image_id == 30:  # an 8x8 image (the JSON says so too)
            Image.open(source).convert("RGB").resize((8, 8)).save(target, quality=90)
            image.update(width=8, height=8)
        elif image_id == 42:
            Image.open(source).convert("L").save(target, quality=90)
        elif image_id == 49:
            cmyk = Image.open(source).convert("CMYK")
            assert cmyk.mode == "CMYK"
            cmyk.save(target, quality=90)
        elif image_id == 61:
            rgba = Image.open(source).convert("RGBA")
            rgba.putalpha(128)
            image["file_name"] = f"{stem}.png"
            rgba.save(image_dir / image["file_name"])
        elif image_id == 71:
            bgr = cv2.imread(str(source), cv2.IMREAD_COLOR)
            image["file_name"] = f"{stem}.png"
            assert cv2.imwrite(str(image_dir / image["file_name"]), bgr.astype(np.uint16) * 257)
        else:
            shutil.copyfile(source, target)
    first = images[9]
    category = annotations[0]["category_id"]
    w, h = first["width"], first["height"]
    polygons = {
        "outside": [w + 50, h + 50, w + 150, h + 50, w + 150, h + 150, w + 50, h + 150],
        "zero_area": [10, 10, 100, 100, 200, 200, 300, 300],
        "degenerate": [10, 10, 300, 300],
    }
    for annotation_id, (kind, _) in BAD_ANNOTATIONS.items():
        annotations.append({"id": annotation_id, "image_id": 9, "category_id": category, "iscrowd": 0,
                            "segmentation": [polygons[kind]], "area": 5000.0, "bbox": [10, 10, 100, 100]})
    dataset.update(images=list(images.values()), annotations=annotations)
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(dataset))
    return {image_id: image["file_name"] for image_id, image in images.items()}


@pytest.fixture(scope="module")
def damaged_build(tmp_path_factory):
    """(coco root, output dir, {image id: file name}, CLI result) of a build on damaged COCO."""
    base = tmp_path_factory.mktemp("damaged")
    root, out = base / "coco", base / "out"
    files = make_damaged_coco(root)
    for image_id, mode in ((42, "L"), (49, "CMYK"), (61, "RGBA")):  # the odd formats are what they claim
        with Image.open(root / "train2017" / files[image_id]) as image:
            assert image.mode == mode
    png16 = cv2.imread(str(root / "train2017" / files[71]), cv2.IMREAD_UNCHANGED)
    assert png16.dtype == np.uint16 and png16.shape[2] == 3
    result = run_cli(build_args(out, n=N_PAIRS, shard_size=SHARD_SIZE, extra=["--coco-root", root, "--seed", "1"]))
    return root, out, files, result


def sample_rows(out: Path) -> list[dict]:
    return [row for path in sorted(out.glob("shard-*.samples.parquet")) for row in read_sample_rows(path)]


def test_build_completes_with_the_requested_pairs(damaged_build):
    _, out, _, _ = damaged_build
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n_samples"] == N_PAIRS
    assert shard_files(out) == ["shard-000000.tar", "shard-000001.tar"]
    assert sum(row["status"] == "accepted" for row in sample_rows(out)) == N_PAIRS
    assert run_cli(["verify", out, "--quiet"]).exit_code == 0


def test_broken_images_are_rejected_with_reasons_naming_the_file(damaged_build):
    _, out, files, _ = damaged_build
    rows = sample_rows(out)
    named = set()
    for row in rows:
        used = {row["source_image_id"], row["background_image_id"]}
        if row["status"] == "accepted":
            assert not used & set(BROKEN), f"an accepted pair used a broken image: {row}"
            continue
        for image_id, words in BROKEN.items():
            if files[image_id] in row["reason"]:
                assert image_id in used, row
                assert row["reason"].startswith("bad_image") and words in row["reason"], row
                named.add(image_id)
    assert named, "no broken image was drawn: the test data no longer exercises them"
    assert named == set(BROKEN), f"only {sorted(named)} of the broken images were drawn"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rejected"].get("bad_image", 0) >= len(named)


def test_odd_image_formats_are_used(damaged_build):
    _, out, files, _ = damaged_build
    rows = sample_rows(out)
    for row in rows:
        if row["status"] == "rejected":
            assert not any(files[i] in row["reason"] for i in ODD_FORMATS), row
    used = {image_id for row in rows if row["status"] == "accepted"
            for image_id in (row["source_image_id"], row["background_image_id"]) if image_id in ODD_FORMATS}
    assert used, "no accepted pair used a grayscale, CMYK, RGBA or 16-bit image"
    # With 12 images over ~50 attempts every format is drawn (checked over seeds 0-5).
    assert used == set(ODD_FORMATS), f"never in an accepted pair: {[ODD_FORMATS[i] for i in set(ODD_FORMATS) - used]}"


def test_bad_annotations_are_skipped_with_reasons(damaged_build):
    _, out, _, result = damaged_build
    skipped = {row["ident"]: row for row in pq.read_table(out / "bank" / "skipped.parquet").to_pylist()}
    for annotation_id, (kind, words) in BAD_ANNOTATIONS.items():
        row = skipped.get(str(annotation_id))
        assert row is not None, f"the {kind} annotation {annotation_id} is not in skipped.parquet"
        assert row["kind"] == "annotation" and words in row["reason"], row
    segments = pq.read_table(out / "bank" / "segments.parquet", columns=["segment_id", "image_id"]).to_pylist()
    assert not {s["segment_id"] for s in segments} & set(BAD_ANNOTATIONS)
    assert not [s for s in segments if s["image_id"] == 30], "segments of the 8x8 image were kept"
    assert "skipped.parquet" in all_output(result)


@pytest.mark.parametrize("content", [
    b"this is not JSON",
    b"[1, 2, 3]",
    b'{"images": [], "annotations": []}',
    b'{"images": [{"id": "x"}], "annotations": [], "categories": []}',
], ids=["not_json", "list", "no_categories", "bad_image_entry"])
def test_non_coco_annotation_file_fails_before_any_shard(tmp_path, content):
    root, out = tmp_path / "coco", tmp_path / "out"
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    annotation_file = root / "annotations" / "instances_train2017.json"
    annotation_file.write_bytes(content)
    result = run_cli(build_args(out, n=10, shard_size=5, extra=["--coco-root", root]), expect=None)
    assert result.exit_code != 0
    message = all_output(result)
    assert str(annotation_file) in message and "Traceback" not in message, message
    assert not out.exists() or not list(out.glob("shard-*")), sorted(p.name for p in out.iterdir())
