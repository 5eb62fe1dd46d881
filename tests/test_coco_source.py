"""CocoSource on the embedded sample and on modified copies of its annotations."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from synthetic import SAMPLE_ANNOTATIONS, SAMPLE_IMAGES

from datagen.cli import SAMPLE_ROOT
from datagen.segments import SOURCES, get_source
from datagen.segments.bank import ImageRow, SegmentBank, SegmentRow, Skipped, write_bank
from datagen.segments.coco_source import CocoSource, NotCocoError, coco_paths

ANNOTATIONS = SAMPLE_ANNOTATIONS
IMAGES = SAMPLE_IMAGES
MIN_AREA = 1024.0


@pytest.fixture(scope="module")
def reference() -> COCO:
    return COCO(str(ANNOTATIONS))


@pytest.fixture(scope="module")
def items() -> list:
    return list(CocoSource(ANNOTATIONS, IMAGES, min_area=MIN_AREA).scan())


def of_type(items, kind) -> list:
    return [item for item in items if isinstance(item, kind)]


def test_usable_annotations_match_pycocotools(reference, items):
    expected = {ann["id"] for ann in reference.dataset["annotations"]
                if not ann["iscrowd"] and reference.annToMask(ann).sum() >= MIN_AREA}
    assert 0 < len(expected) < len(reference.dataset["annotations"])
    segments = of_type(items, SegmentRow)
    assert [row.segment_id for row in segments if row.segment_id in expected] == [r.segment_id for r in segments]
    assert {row.segment_id for row in segments} == expected
    skipped = of_type(items, Skipped)
    assert len(segments) + len(skipped) == len(reference.dataset["annotations"])
    assert all("min_area" in item.reason for item in skipped)


def test_segment_fields_match_pycocotools(reference, items):
    for row in of_type(items, SegmentRow)[::40]:
        annotation = reference.anns[row.segment_id]
        image = reference.imgs[row.image_id]
        mask = reference.annToMask(annotation)
        assert (row.image_id, row.category_id) == (annotation["image_id"], annotation["category_id"])
        assert row.category == reference.cats[row.category_id]["name"]
        assert (row.image_path, row.image_width, row.image_height) == \
            (image["file_name"], image["width"], image["height"])
        assert row.area == mask.sum()
        assert row.bbox == mask_bbox(mask)


def test_bank_masks_equal_ann_to_mask(reference, items, tmp_path):
    write_bank(items, tmp_path / "bank")
    bank = SegmentBank.load(tmp_path / "bank")
    for index in range(0, len(bank), 50):
        expected = reference.annToMask(reference.anns[int(bank.segment_ids[index])])
        mask = bank.mask(index)
        assert mask.dtype == np.uint8 and mask.shape == expected.shape
        np.testing.assert_array_equal(mask, expected)


def test_every_image_is_a_row_in_id_order(reference, items):
    images = of_type(items, ImageRow)
    assert [row.image_id for row in images] == sorted(reference.imgs)
    assert {row.image_id for row in images} - {row.image_id for row in of_type(items, SegmentRow)}
    keys = [(item.image_id, 0) if isinstance(item, ImageRow) else (item.image_id, item.segment_id)
            for item in items if not isinstance(item, Skipped)]
    assert keys == sorted(keys)


def test_scan_does_not_open_images(tmp_path):
    source = CocoSource(ANNOTATIONS, tmp_path, min_area=MIN_AREA)  # no image files there
    assert len(of_type(source.scan(), ImageRow)) == 60


# --- not COCO -------------------------------------------------------------------------------

@pytest.mark.parametrize("content, expected", [
    ("[1, 2, 3]", "top level is a list"),
    ('{"images": [], "categories": []}', "'annotations'"),
    ('{"images": [{"id": 1, "width": 5, "height": 5}], "annotations": [], "categories": []}', "file_name"),
    ('{"images": [], "annotations": [', "not valid JSON"),
    ("", "not valid JSON"),
])
def test_not_coco(tmp_path, content, expected):
    path = tmp_path / "instances.json"
    path.write_text(content)
    with pytest.raises(NotCocoError) as info:
        CocoSource(path, tmp_path)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_coco_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        coco_paths(tmp_path, "val2017")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").symlink_to(ANNOTATIONS)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "val2017")):
        coco_paths(tmp_path, "val2017")
    (tmp_path / "val2017").symlink_to(IMAGES)
    assert coco_paths(tmp_path, "val2017") == (tmp_path / "annotations" / "instances_val2017.json",
                                               tmp_path / "val2017")
    source = get_source("coco", root=tmp_path, split="val2017", min_area=MIN_AREA)
    assert source.name == "coco" and source.images_dir == tmp_path / "val2017"


def test_options_are_typed_and_an_unknown_one_is_an_error_naming_it(tmp_path):
    from datagen.runner.inputs import SourceSpec
    from datagen.segments import source_inputs
    from datagen.segments.coco_source import CocoOptions

    for call in (lambda: get_source("coco", root=SAMPLE_ROOT, spilt="train2017"),
                 lambda: source_inputs("coco", root=SAMPLE_ROOT, spilt="train2017"),
                 lambda: SourceSpec("coco", {"root": SAMPLE_ROOT, "spilt": "train2017"})):
        with pytest.raises(ValueError, match="unknown option 'spilt' of the coco source; its options: root, split"):
            call()
    with pytest.raises(ValueError, match="not both"):
        CocoOptions(root=SAMPLE_ROOT, annotations=ANNOTATIONS)
    with pytest.raises(ValueError, match="needs root=, or annotations= and images_dir="):
        CocoOptions(annotations=ANNOTATIONS)
    spec = SourceSpec("coco", {"annotations": ANNOTATIONS, "images_dir": IMAGES})
    assert spec.options == CocoOptions(annotations=ANNOTATIONS, images_dir=IMAGES)
    assert spec.to_json() == {"name": "coco", "options": {"annotations": str(ANNOTATIONS), "images_dir": str(IMAGES)}}
    assert source_inputs("coco", **spec.kwargs()).sha256 == hashlib.sha256(ANNOTATIONS.read_bytes()).hexdigest()


def test_the_recorded_options_are_those_recorded_before_they_were_typed():
    """A bank is current only if its recorded options are equal: the command's record must not
    change (else every existing build would scan its source again)."""
    from datagen.runner.inputs import SourceSpec
    from datagen.segments.coco_source import CocoOptions

    root = SAMPLE_ROOT.resolve()
    old = {"name": "coco", "options": {k: str(v) for k, v in sorted({"root": root, "split": "train2017"}.items())}}
    assert SourceSpec("coco", CocoOptions(root=root, split="train2017")).to_json() == old
    assert SourceSpec("coco", {"root": root, "split": "train2017"}).to_json() == old


def test_unknown_source_lists_known_names():
    assert "coco" in SOURCES
    with pytest.raises(ValueError, match="'nope'.*known sources: coco, lost"):
        get_source("nope")


# --- bad annotations ------------------------------------------------------------------------

def test_bad_annotations_are_skipped_with_reasons(tmp_path, reference, items):
    data = json.loads(ANNOTATIONS.read_text())
    image = data["images"][0]
    width, height, image_id = image["width"], image["height"], image["id"]
    square = [100.0, 100.0, 300.0, 100.0, 300.0, 300.0, 100.0, 300.0]
    good_rle = mask_utils.merge(mask_utils.frPyObjects([square], height, width))
    bad_image = dict(data["images"][1], width=0)

    def annotation(ann_id, segmentation, **fields):
        return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                "segmentation": segmentation, "area": 1.0, "bbox": [0, 0, 1, 1], **fields}

    bad = {
        90001: (annotation(90001, [[10, 10, 20, 20]]), "need at least 3"),
        90002: (annotation(90002, [[10, 10, 20, 20, 30]]), "odd number of coordinates"),
        90003: (annotation(90003, [[10, 10, float("nan"), 20, 30, 30]]), "non-finite"),
        90004: (annotation(90004, [[width + 10, 0, width + 100, 0, width + 100, 100]]), "empty mask"),
        90005: (annotation(90005, [[100, 100, 200, 100, 300, 100]]), "empty mask"),
        90006: (annotation(90006, [square], iscrowd=1), "iscrowd"),
        90007: (annotation(90007, [square], category_id=999), "unknown category_id 999"),
        90008: (annotation(90008, [square], image_id=123456789), "unknown image_id 123456789"),
        90009: (annotation(90009, [[100, 100, 110, 100, 110, 110]]), "< min_area"),
        90010: (annotation(90010, {"size": [height + 1, width], "counts": good_rle["counts"].decode()}),
                "RLE size"),
        90011: (annotation(90011, {"size": [height, width], "counts": [5, 7]}), "RLE counts cover 12 pixels"),
        90012: (annotation(90012, [square], image_id=bad_image["id"]), "its image is skipped"),
    }
    good = {
        # A degenerate polygon beside a valid one: only the degenerate one is dropped.
        90101: annotation(90101, [[1, 1, 2, 2], square]),
        90102: annotation(90102, {"size": [height, width], "counts": good_rle["counts"].decode()}),
        90103: annotation(90103, {"size": [height, width],
                                  "counts": rle_runs(mask_utils.decode(good_rle))}),
    }
    data["images"][1] = bad_image
    data["annotations"] += [ann for ann, _ in bad.values()] + list(good.values()) + ["not an annotation"]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))

    scanned = list(CocoSource(path, IMAGES, min_area=MIN_AREA).scan())
    skipped = {item.ident: item for item in of_type(scanned, Skipped) if item.kind == "annotation"}
    for ann_id, (_, reason) in bad.items():
        assert reason in skipped[str(ann_id)].reason, (ann_id, skipped[str(ann_id)].reason)
        assert f"annotation {ann_id}" in skipped[str(ann_id)].reason
        assert str(path) in skipped[str(ann_id)].reason
    assert "annotations[" in scanned[-1].reason and scanned[-1].kind == "annotation"

    (image_skip,) = [item for item in scanned if isinstance(item, Skipped) and item.kind == "image"]
    assert image_skip.ident == bad_image["file_name"] and "width 0" in image_skip.reason

    segments = {row.segment_id: row for row in of_type(scanned, SegmentRow)}
    square_mask = mask_utils.decode(good_rle)
    for ann_id in good:
        row = segments[ann_id]
        decoded = mask_utils.decode({"size": [height, width], "counts": row.rle.encode()})
        np.testing.assert_array_equal(decoded, square_mask)
        assert row.bbox == mask_bbox(square_mask)
    # Every original usable segment still comes through, except those of the image made unusable.
    original = {row.segment_id for row in of_type(items, SegmentRow) if row.image_id != bad_image["id"]}
    assert set(segments) == original | set(good)


def rle_runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts of a (H, W) 0/1 mask: run lengths in column-major order, zeros first."""
    flat = mask.flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]]))
    return ([0] if flat[0] else []) + runs.tolist()


def mask_bbox(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(x, y, w, h) of the nonzero pixels."""
    ys, xs = np.nonzero(mask)
    return (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
