"""The segment bank: write -> load round trip, determinism, crash safety, lookups."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils
from synthetic import SAMPLE_ANNOTATIONS, SAMPLE_IMAGES

from datagen.segments.bank import ImageRow, SegmentBank, SegmentRow, Skipped, write_bank
from datagen.segments.coco_source import CocoSource

BANK_FILES = ("segments.parquet", "images.parquet", "skipped.parquet", "bank.json")


@pytest.fixture(scope="module")
def items() -> list:
    return list(CocoSource(SAMPLE_ANNOTATIONS, SAMPLE_IMAGES).scan())


@pytest.fixture(scope="module")
def bank_dir(items, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("bank")
    write_bank(items, directory)
    return directory


@pytest.fixture(scope="module")
def bank(bank_dir) -> SegmentBank:
    return SegmentBank.load(bank_dir)


def of_type(items, kind) -> list:
    return [item for item in items if isinstance(item, kind)]


def test_round_trip_rows(items, bank, bank_dir):
    segments = of_type(items, SegmentRow)
    assert len(bank) == len(segments) == bank.summary.segments
    assert [bank.row(i) for i in range(len(bank))] == segments
    np.testing.assert_array_equal(bank.segment_ids, [row.segment_id for row in segments])
    np.testing.assert_array_equal(bank.image_ids, [row.image_id for row in segments])
    np.testing.assert_array_equal(bank.category_ids, [row.category_id for row in segments])
    np.testing.assert_array_equal(bank.areas, [row.area for row in segments])
    images = of_type(items, ImageRow)
    assert bank.images.image_ids.tolist() == [row.image_id for row in images]
    assert bank.images.paths.tolist() == [row.image_path for row in images]
    assert bank.images.widths.tolist() == [row.width for row in images]
    assert bank.images.heights.tolist() == [row.height for row in images]
    skipped = pq.read_table(bank_dir / "skipped.parquet").to_pylist()
    assert [Skipped(**row) for row in skipped] == of_type(items, Skipped)


def test_round_trip_masks(items, bank):
    segments = of_type(items, SegmentRow)
    for index in range(0, len(bank), 37):
        row = segments[index]
        expected = mask_utils.decode({"size": [row.image_height, row.image_width], "counts": row.rle.encode()})
        mask = bank.mask(index)
        assert mask.shape == (row.image_height, row.image_width) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1}
        np.testing.assert_array_equal(mask, expected)
        assert mask.sum() == bank.areas[index]


def test_optional_scores_round_trip(tmp_path):
    mask = np.zeros((3, 4), np.uint8)
    mask[0, 1] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))["counts"].decode("ascii")
    base = dict(source="lost", image_id=7, image_path="a/b.jpg", image_width=4, image_height=3, category_id=1,
                category="object", bbox=(1.0, 0.0, 1.0, 1.0), area=1.0, rle=rle)
    rows = [SegmentRow(segment_id=1, **base),
            SegmentRow(segment_id=2, score=0.25, refine_iou=0.875, **base)]
    summary = write_bank(rows, tmp_path)
    assert (summary.source, summary.segments, summary.images, summary.skipped) == ("lost", 2, 0, 0)
    bank = SegmentBank.load(tmp_path)
    assert [bank.row(0), bank.row(1)] == rows
    np.testing.assert_array_equal(bank.mask(1), mask)


def test_same_items_same_bytes(items, bank_dir, tmp_path):
    write_bank(iter(items), tmp_path)
    for name in BANK_FILES:
        assert (tmp_path / name).read_bytes() == (bank_dir / name).read_bytes(), name


def test_lookups(items, bank):
    rows_of_image = defaultdict(list)
    categories_of_image = defaultdict(set)
    for index, row in enumerate(of_type(items, SegmentRow)):
        rows_of_image[row.image_id].append(index)
        categories_of_image[row.image_id].add(row.category_id)
    for image in of_type(items, ImageRow):
        assert bank.segments_of_image(image.image_id).tolist() == rows_of_image.get(image.image_id, [])
        assert bank.categories_of_image(image.image_id) == frozenset(categories_of_image.get(image.image_id, ()))
        assert bank.image_path(image.image_id) == image.image_path
        assert bank.image_size(image.image_id) == (image.width, image.height)
    backgrounds = [image.image_id for image in of_type(items, ImageRow) if image.image_id not in rows_of_image]
    assert backgrounds and bank.segments_of_image(backgrounds[0]).size == 0
    assert bank.categories_of_image(backgrounds[0]) == frozenset()
    for row in of_type(items, SegmentRow):
        assert bank.category_name(row.category_id) == row.category
    with pytest.raises(KeyError, match="image id 123456789"):
        bank.image_path(123456789)
    with pytest.raises(KeyError, match="category id 999"):
        bank.category_name(999)
    with pytest.raises(IndexError):
        bank.mask(len(bank))


def test_missing_bank_names_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*bank.json"):
        SegmentBank.load(tmp_path)


def test_bank_without_summary_is_not_a_bank(items, tmp_path):
    write_bank(items, tmp_path)
    (tmp_path / "bank.json").unlink()
    with pytest.raises(FileNotFoundError, match="bank.json"):
        SegmentBank.load(tmp_path)


def test_mismatched_files_are_rejected(items, tmp_path):
    write_bank(items, tmp_path / "full")
    write_bank(items[:50], tmp_path / "part")
    (tmp_path / "part" / "segments.parquet").replace(tmp_path / "full" / "segments.parquet")
    with pytest.raises(ValueError, match=f"{tmp_path / 'full'}.*do not match"):
        SegmentBank.load(tmp_path / "full")


def test_crash_while_writing_keeps_the_old_bank(items, bank_dir, tmp_path):
    write_bank(items, tmp_path)

    def crashing():
        yield from items[:300]
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_bank(crashing(), tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(BANK_FILES)
    for name in BANK_FILES:
        assert (tmp_path / name).read_bytes() == (bank_dir / name).read_bytes(), name


def test_wrong_item_type_is_rejected(tmp_path):
    with pytest.raises(TypeError, match="dict"):
        write_bank([{"segment_id": 1}], tmp_path)
    assert list(tmp_path.iterdir()) == []
