"""The segment bank: every usable object segment of a source, stored once as Parquet.

A :class:`SegmentSource` scans its annotations into :class:`SegmentRow` / :class:`ImageRow` /
:class:`Skipped` items; :func:`write_bank` stores them in a directory::

    segments.parquet   one row per segment, mask as COCO compressed RLE
    images.parquet     every image of the source (images without segments are backgrounds)
    skipped.parquet    every image or annotation left out, with the reason
    bank.json          source name and row counts, written last: no bank.json, no bank

:class:`SegmentBank` loads a bank as columns (numpy / pyarrow), with no Python object per row.
Image ids are unique within a bank; image paths are relative to the source's image root.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils

from datagen.format.atomic import atomic_write_bytes, fsync_dir, temporary_path

BANK_FORMAT = 2
"""2: images carry the categories of all their annotations."""
SEGMENTS_FILE = "segments.parquet"
IMAGES_FILE = "images.parquet"
SKIPPED_FILE = "skipped.parquet"
SUMMARY_FILE = "bank.json"
_ROW_GROUP_ROWS = 65_536
_REPEATED_COLUMNS = ["source", "image_path", "category"]
"""Segment columns loaded as dictionary arrays: few distinct values, read fast and small."""


@dataclass(frozen=True)
class SegmentRow:
    """One object segment. ``bbox`` is (x, y, w, h) and ``area`` mask pixels, at the image's resolution."""

    source: str
    image_id: int
    image_path: str
    image_width: int
    image_height: int
    segment_id: int
    category_id: int
    category: str
    bbox: tuple[float, float, float, float]
    area: float
    rle: str
    """COCO compressed RLE ``counts`` (ASCII) of the (image_height, image_width) mask."""
    score: float | None = None
    refine_iou: float | None = None
    coarse_rle: str | None = None
    """Unsupervised sources: RLE ``counts`` of the mask before refinement (LOST's coarse mask)."""
    soft_png: bytes | None = None
    """LOST: the bilateral solver's soft output before any thresholding, an 8-bit PNG at the
    resolution the solver ran at (:func:`datagen.segments.refine.encode_soft`), for the reference
    protocol of ``datagen segments eval``. Never loaded by :class:`SegmentBank` (builds do not
    need it); read it from ``segments.parquet`` directly."""


@dataclass(frozen=True)
class ImageRow:
    """One image of the source, with or without segments; size in pixels. ``categories``: the
    category ids of every annotation of the image, kept as a segment or not (crowd, too small):
    a background must show none of the categories pasted into it."""

    source: str
    image_id: int
    image_path: str
    width: int
    height: int
    categories: tuple = ()


@dataclass(frozen=True)
class Skipped:
    """An image or annotation left out of the bank; ``kind`` is "image" or "annotation"."""

    source: str
    kind: str
    ident: str
    reason: str


BankItem = SegmentRow | ImageRow | Skipped


class SegmentSource(Protocol):
    """A provider of segments (COCO annotations, unsupervised ones)."""

    name: str

    def scan(self) -> Iterator[BankItem]:
        ...


@dataclass(frozen=True)
class SourceInputs:
    """What a source reads, found without loading it (so that resuming a build is cheap).

    image_root: the directory image paths are relative to. record: JSON-able checksums and
    settings that define the source's segments (recorded in the bank's inputs). sha256: one
    checksum of them.
    """

    image_root: Path
    record: dict
    sha256: str


@dataclass(frozen=True)
class BankSummary:
    """What a bank holds: source name(s) joined by "+" and row counts."""

    source: str
    segments: int
    images: int
    skipped: int


SEGMENT_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("image_id", pa.int64()),
    ("image_path", pa.string()),
    ("image_width", pa.int64()),
    ("image_height", pa.int64()),
    ("segment_id", pa.int64()),
    ("category_id", pa.int64()),
    ("category", pa.string()),
    ("bbox", pa.list_(pa.float64(), 4)),
    ("area", pa.float64()),
    ("rle", pa.string()),
    ("score", pa.float64()),
    ("refine_iou", pa.float64()),
    ("coarse_rle", pa.string()),
    ("soft_png", pa.binary()),
])
_OPTIONAL_COLUMNS = ("coarse_rle", "soft_png")
"""Segment columns added after the first banks: absent in old files, None when read from them."""
_SPARSE_COLUMNS = ("soft_png",)
"""Segment columns written only by the sources that fill them: the file has the column when a row
of its first row group has a value there, so that the banks of other sources (COCO) keep the
bytes they had before the column existed. A value in a later row of a file without the column is
an error, not a silent loss."""
_UNLOADED_COLUMNS = ("soft_png",)
"""Segment columns :meth:`SegmentBank.load` never reads: large, and only evaluation needs them."""
_ROW_GROUP_BYTES = 64 << 20
"""A row group is also written when its sparse (binary) values reach this many bytes, so that a
scan holds a bounded amount of soft outputs in memory; banks without them are unaffected."""
IMAGE_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("image_id", pa.int64()),
    ("image_path", pa.string()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("categories", pa.list_(pa.int32())),
])
SKIPPED_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("kind", pa.string()),
    ("ident", pa.string()),
    ("reason", pa.string()),
])
_TABLES = {
    SegmentRow: (SEGMENTS_FILE, SEGMENT_SCHEMA),
    ImageRow: (IMAGES_FILE, IMAGE_SCHEMA),
    Skipped: (SKIPPED_FILE, SKIPPED_SCHEMA),
}


class _ParquetRows:
    """Appends dataclass rows to a Parquet file, one row group per ``_ROW_GROUP_ROWS`` rows (or
    ``_ROW_GROUP_BYTES`` of sparse values). The file is opened at the first row group, once it is
    known which of the ``sparse`` columns it holds (see :data:`_SPARSE_COLUMNS`)."""

    def __init__(self, path: Path, schema: pa.Schema, sparse: tuple[str, ...] = ()):
        self.path = path
        self.schema = schema
        self.sparse = tuple(name for name in sparse if name in schema.names)
        self.writer: pq.ParquetWriter | None = None
        self.columns: dict[str, list] = {name: [] for name in schema.names}
        self.sparse_bytes = 0
        self.count = 0

    def add(self, row) -> None:
        for name, column in self.columns.items():
            column.append(getattr(row, name))
        for name in self.sparse:
            value = getattr(row, name)
            self.sparse_bytes += 0 if value is None else len(value)
        self.count += 1
        if len(self.columns["source"]) >= _ROW_GROUP_ROWS or self.sparse_bytes >= _ROW_GROUP_BYTES:
            self._flush()

    def close(self) -> None:
        self._flush()
        if self.writer is None:  # no row at all
            self._open()
        self.writer.close()

    def _open(self) -> None:
        """Open the file with the schema less the sparse columns that no buffered row fills."""
        empty = [name for name in self.sparse if all(value is None for value in self.columns[name])]
        for name in empty:
            self.schema = self.schema.remove(self.schema.get_field_index(name))
        self.writer = pq.ParquetWriter(self.path, self.schema, compression="zstd")

    def _flush(self) -> None:
        if self.columns["source"]:
            if self.writer is None:
                self._open()
            for name in self.sparse:
                if name not in self.schema.names and any(value is not None for value in self.columns[name]):
                    self.columns = {name: [] for name in self.columns}  # so that close() still closes
                    raise ValueError(f"{self.path.name}: a row has {name} but the rows of the first row group "
                                     f"had none (a source fills it in every row or in none)")
            table = {name: self.columns[name] for name in self.schema.names}
            self.writer.write_table(pa.table(table, schema=self.schema))
        self.columns = {name: [] for name in self.columns}
        self.sparse_bytes = 0


def write_bank(items: Iterable[BankItem], directory) -> BankSummary:
    """Write ``items`` (in the order given) as a bank in ``directory``; same items, same bytes.

    The tables are written under temporary names (:func:`datagen.format.atomic.temporary_path`)
    and fsynced; the old ``bank.json`` is removed before they are renamed into place, and the new
    ``bank.json`` is written last (:func:`~datagen.format.atomic.atomic_write_bytes`) once the
    renames are durable, so a crash leaves either a complete bank or none. The three tables are
    written together from one pass over ``items``, hence not by ``atomic_write`` one by one.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = [SEGMENTS_FILE, IMAGES_FILE, SKIPPED_FILE]
    # fixed temporary names: a scan killed midway leaves files that the next scan overwrites
    temporary = {name: temporary_path(directory / name) for name in names}
    try:
        summary = _write_tables(items, temporary)
        for path in temporary.values():
            _fsync(path)
        (directory / SUMMARY_FILE).unlink(missing_ok=True)
        fsync_dir(directory)  # no bank.json on disk before any table changes
        for name in names:
            os.replace(temporary[name], directory / name)
        fsync_dir(directory)  # the tables in place before the new bank.json
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)
    atomic_write_bytes(directory / SUMMARY_FILE, (json.dumps(
        {"format": BANK_FORMAT, **asdict(summary)}, sort_keys=True, indent=1) + "\n").encode())
    return summary


def _write_tables(items: Iterable[BankItem], paths: dict[str, Path]) -> BankSummary:
    writers = {row_type: _ParquetRows(paths[name], schema, _SPARSE_COLUMNS)
               for row_type, (name, schema) in _TABLES.items()}
    sources: set[str] = set()
    try:
        for item in items:
            writer = writers.get(type(item))
            if writer is None:
                raise TypeError(f"a bank holds SegmentRow, ImageRow or Skipped items, got {type(item).__name__}")
            writer.add(item)
            sources.add(item.source)
    finally:
        for writer in writers.values():
            writer.close()
    return BankSummary(source="+".join(sorted(sources)), segments=writers[SegmentRow].count,
                       images=writers[ImageRow].count, skipped=writers[Skipped].count)


def _fsync(path: Path) -> None:
    """Make the content of a file written (and closed) by another writer durable."""
    with open(path, "rb") as file:
        os.fsync(file.fileno())


@dataclass(frozen=True)
class ImageTable:
    """Every image of a bank: ``image_ids`` int64, ``paths`` str (object), ``widths``/``heights`` int64 pixels."""

    image_ids: np.ndarray
    paths: np.ndarray
    widths: np.ndarray
    heights: np.ndarray


class SegmentBank:
    """A loaded bank. Segment ``row_index`` i indexes ``segment_ids``, ``image_ids``, ``category_ids``, ``areas``."""

    def __init__(self, directory: Path, summary: BankSummary, segments: pa.Table, images: pa.Table):
        self.directory = directory
        self.summary = summary
        self._segments = segments
        self.segment_ids = _numpy(segments, "segment_id")
        self.image_ids = _numpy(segments, "image_id")
        self.category_ids = _numpy(segments, "category_id")
        self.areas = _numpy(segments, "area")
        self._heights = _numpy(segments, "image_height")
        self._widths = _numpy(segments, "image_width")
        self.images = ImageTable(
            image_ids=_numpy(images, "image_id"),
            paths=images.column("image_path").to_numpy(),
            widths=_numpy(images, "width"),
            heights=_numpy(images, "height"),
        )
        self._image_categories = images.column("categories").to_pylist()
        self._annotated: dict | None = None

    @classmethod
    def load(cls, directory) -> SegmentBank:
        """Load the bank in ``directory``; FileNotFoundError / ValueError name the directory."""
        directory = Path(directory)
        missing = [name for name in (SUMMARY_FILE, SEGMENTS_FILE, IMAGES_FILE)
                   if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{directory}: not a segment bank, missing {', '.join(missing)}")
        summary = _read_summary(directory)
        present = set(pq.read_schema(directory / SEGMENTS_FILE).names)
        columns = [name for name in SEGMENT_SCHEMA.names if name not in _UNLOADED_COLUMNS
                   and (name in present or name not in _OPTIONAL_COLUMNS)]
        segments = pq.read_table(directory / SEGMENTS_FILE, columns=columns, read_dictionary=_REPEATED_COLUMNS)
        images = pq.read_table(directory / IMAGES_FILE, columns=IMAGE_SCHEMA.names)
        if (segments.num_rows, images.num_rows) != (summary.segments, summary.images):
            raise ValueError(
                f"{directory}: bank files do not match {SUMMARY_FILE} ({segments.num_rows} segments and "
                f"{images.num_rows} images, expected {summary.segments} and {summary.images})")
        return cls(directory, summary, segments, images)

    def __len__(self) -> int:
        return len(self.segment_ids)

    def row(self, row_index: int) -> SegmentRow:
        values = self._segments.slice(self._check_index(row_index), 1).to_pylist()[0]
        return SegmentRow(**{**values, "bbox": tuple(values["bbox"])})

    def mask(self, row_index: int) -> np.ndarray:
        """(image_height, image_width) uint8 0/1 mask of segment ``row_index``."""
        row_index = self._check_index(row_index)
        rle = {"size": [int(self._heights[row_index]), int(self._widths[row_index])],
               "counts": self._segments.column("rle")[row_index].as_py().encode("ascii")}
        return mask_utils.decode(rle)

    def segments_of_image(self, image_id: int) -> np.ndarray:
        """Row indices (ascending, int64) of the segments of ``image_id``; empty if it has none."""
        order, sorted_ids = self._by_image
        start = np.searchsorted(sorted_ids, image_id, side="left")
        stop = np.searchsorted(sorted_ids, image_id, side="right")
        return order[start:stop]

    def categories_of_image(self, image_id: int) -> frozenset[int]:
        """Categories of the bank's segments of ``image_id``."""
        return frozenset(self.category_ids[self.segments_of_image(image_id)].tolist())

    def annotated_categories_of_image(self, image_id: int) -> frozenset[int]:
        """Categories of every annotation of ``image_id``, kept as a segment or not (crowd, too
        small): what a background must not show of the pasted categories."""
        if self._annotated is None:
            self._annotated = dict(zip(self.images.image_ids.tolist(),
                                       (frozenset(c or ()) for c in self._image_categories)))
        return self._annotated.get(int(image_id), frozenset()) | self.categories_of_image(image_id)

    def category_name(self, category_id: int) -> str:
        try:
            return self._category_names[int(category_id)]
        except KeyError:
            raise KeyError(f"category id {category_id} has no segment in bank {self.directory}") from None

    def image_path(self, image_id: int) -> str:
        """Path of ``image_id`` relative to the source's image root."""
        return str(self.images.paths[self._image_row(image_id)])

    def image_size(self, image_id: int) -> tuple[int, int]:
        """(width, height) in pixels that the source declares for ``image_id``."""
        row = self._image_row(image_id)
        return int(self.images.widths[row]), int(self.images.heights[row])

    def _image_row(self, image_id: int) -> int:
        order, sorted_ids = self._image_index
        position = int(np.searchsorted(sorted_ids, image_id))
        if position == len(sorted_ids) or sorted_ids[position] != image_id:
            raise KeyError(f"image id {image_id} is not in bank {self.directory}")
        return int(order[position])

    def _check_index(self, row_index: int) -> int:
        if not 0 <= row_index < len(self):
            raise IndexError(f"segment row {row_index} out of range for a bank of {len(self)} segments")
        return int(row_index)

    @cached_property
    def _by_image(self) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(self.image_ids, kind="stable")
        return order, self.image_ids[order]

    @cached_property
    def _image_index(self) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(self.images.image_ids, kind="stable")
        return order, self.images.image_ids[order]

    @cached_property
    def _category_names(self) -> dict[int, str]:
        ids, first_rows = np.unique(self.category_ids, return_index=True)
        names = self._segments.column("category").take(first_rows).to_pylist()
        return dict(zip(ids.tolist(), names))


def _numpy(table: pa.Table, column: str) -> np.ndarray:
    return table.column(column).to_numpy()


def _read_summary(directory: Path) -> BankSummary:
    try:
        data = json.loads((directory / SUMMARY_FILE).read_text())
        if data.pop("format") != BANK_FORMAT:
            raise ValueError("unsupported bank format")
        return BankSummary(**data)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{directory}: invalid {SUMMARY_FILE} ({error})") from None
