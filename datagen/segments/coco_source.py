"""COCO instance segments (the paper's segment source), rasterised with pycocotools.

Every image entry becomes an :class:`ImageRow` (a usable background); every usable
annotation a :class:`SegmentRow`; anything else a :class:`Skipped` with the reason.
Images are not opened here: they are decoded when pairs are built.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from datagen.config import options_from
from datagen.format.hashing import sha256_file
from datagen.segments.bank import BankItem, ImageRow, SegmentRow, Skipped, SourceInputs

MAX_COORDINATE = 1e6
"""Polygon coordinates beyond +-this many pixels are rejected (the rasteriser uses C ints)."""


class NotCocoError(ValueError):
    """The annotation file is not COCO instances JSON; the message names the file and what is wrong."""


class _Unusable(Exception):
    """Internal: an annotation's segmentation cannot be used; the message is the reason."""


def coco_paths(root, split: str = "train2017") -> tuple[Path, Path]:
    """(annotations JSON, images directory) in the standard layout.

    That is ``ROOT/annotations/instances_{split}.json`` and ``ROOT/{split}/``; FileNotFoundError
    names the missing path.
    """
    root = Path(root)
    annotations = root / "annotations" / f"instances_{split}.json"
    images_dir = root / split
    for path, what in ((annotations, "annotation file"), (images_dir, "image directory")):
        if not path.exists():
            raise FileNotFoundError(
                f"COCO {what} not found: {path} (expected ROOT/annotations/instances_{split}.json "
                f"and ROOT/{split}/ under {root})")
    return annotations, images_dir


@dataclass(frozen=True)
class CocoOptions:
    """Options of the coco source: a COCO ``root`` in the standard layout with its ``split``, or
    an ``annotations`` file and its ``images_dir`` (one form or the other). Paths are recorded
    with a bank, not hashed into the config: moving COCO does not change a build."""

    root: Path | str | None = None
    split: str = "train2017"
    annotations: Path | str | None = None
    images_dir: Path | str | None = None

    def __post_init__(self):
        if self.root is not None and (self.annotations is not None or self.images_dir is not None):
            raise ValueError("the coco source takes root= (and split=), or annotations= and images_dir=, not both")
        if self.root is None and (self.annotations is None or self.images_dir is None):
            raise ValueError("the coco source needs root=, or annotations= and images_dir=")

    @classmethod
    def of(cls, options: Mapping) -> CocoOptions:
        """From keyword options; an unknown one is a ValueError naming it and the source."""
        return options_from(cls, options, "the coco source")

    def paths(self) -> tuple[Path, Path]:
        """(annotations JSON, images directory), without reading either (the ``root`` form checks
        that both exist: :func:`coco_paths`)."""
        if self.root is not None:
            return coco_paths(self.root, self.split)
        return Path(self.annotations), Path(self.images_dir)

    def record(self) -> dict[str, str]:
        """The options as a bank's inputs record them: the form given, as strings (``split``
        only with ``root``, where it means something)."""
        given = {"root": self.root, "split": self.split} if self.root is not None else {
            "annotations": self.annotations, "images_dir": self.images_dir}
        return {key: str(value) for key, value in sorted(given.items())}


def coco_source_inputs(**options) -> SourceInputs:
    """The images directory and the annotation file's sha256 (the source's checksum), found
    without parsing the file. ``options``: the fields of :class:`CocoOptions`."""
    annotations, images_dir = CocoOptions.of(options).paths()
    digest = sha256_file(annotations)
    return SourceInputs(image_root=images_dir.resolve(), record={"annotations_sha256": digest}, sha256=digest)


def make_coco_source(*, min_area: float = 1024.0, **options) -> CocoSource:
    """A :class:`CocoSource` of the :class:`CocoOptions` ``options`` (a COCO ``root`` and
    ``split``, or ``annotations`` and ``images_dir``)."""
    return CocoSource(*CocoOptions.of(options).paths(), min_area=min_area)


class CocoSource:
    """Segments of a COCO instances file; ``min_area`` in mask pixels at the image's resolution."""

    name = "coco"

    def __init__(self, annotations, images_dir, min_area: float = 1024.0):
        self.annotations_path = Path(annotations)
        self.images_dir = Path(images_dir)
        self.min_area = float(min_area)
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"COCO image directory not found: {self.images_dir}")
        dataset = _load_dataset(self.annotations_path)
        annotations, self._malformed = self._split_annotations(dataset["annotations"])
        self._coco = _index({**dataset, "annotations": annotations})

    def scan(self) -> Iterator[BankItem]:
        """Items in ascending image id, then annotation id; malformed annotation entries last."""
        coco = self._coco
        seen_ids: set[int] = set()
        for image_id in sorted(coco.imgs.keys() | coco.imgToAnns.keys()):
            image = coco.imgs.get(image_id)
            if image is None:
                annotation_problem = f"unknown image_id {image_id}"
            else:
                problem = _image_problem(image)
                yield self._image_item(image, problem)
                annotation_problem = problem and f"its image is skipped: {problem}"
            for annotation in sorted(coco.imgToAnns.get(image_id, ()), key=lambda a: a["id"]):
                if annotation["id"] in seen_ids:
                    yield self._skip(annotation, "duplicate annotation id")
                else:
                    seen_ids.add(annotation["id"])
                    yield self._annotation_item(annotation, image, annotation_problem)
        yield from self._malformed

    def _image_item(self, image: dict, problem: str | None) -> ImageRow | Skipped:
        if problem is not None:
            return Skipped(self.name, "image", image["file_name"],
                           f"image {image['id']} ({image['file_name']}): {problem}")
        categories = tuple(sorted({int(a["category_id"]) for a in self._coco.imgToAnns.get(image["id"], ())}))
        return ImageRow(self.name, image["id"], image["file_name"], int(image["width"]), int(image["height"]),
                        categories)

    def _annotation_item(self, annotation: dict, image: dict | None, image_problem: str | None
                         ) -> SegmentRow | Skipped:
        """``image_problem`` says why ``image`` (None if unknown) cannot hold segments."""
        if annotation.get("iscrowd", 0):
            return self._skip(annotation, "iscrowd=1 (a crowd region, not one object)")
        if image_problem is not None:
            return self._skip(annotation, image_problem)
        category = self._coco.cats.get(annotation["category_id"])
        if category is None:
            return self._skip(annotation, f"unknown category_id {annotation['category_id']}")
        height, width = int(image["height"]), int(image["width"])
        try:
            rle = _segmentation_rle(annotation.get("segmentation"), height, width)
        except _Unusable as error:
            return self._skip(annotation, str(error))
        area = float(mask_utils.area(rle))
        if area == 0:
            return self._skip(annotation, "empty mask: polygon outside the image or of zero area")
        if area < self.min_area:
            return self._skip(annotation, f"mask area {area:g} px < min_area {self.min_area:g}")
        x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
        return SegmentRow(
            source=self.name, image_id=image["id"], image_path=image["file_name"], image_width=width,
            image_height=height, segment_id=annotation["id"], category_id=annotation["category_id"],
            category=category["name"], bbox=(x, y, w, h), area=area, rle=rle["counts"].decode("ascii"))

    def _skip(self, annotation: dict, reason: str) -> Skipped:
        return Skipped(self.name, "annotation", str(annotation["id"]),
                       f"annotation {annotation['id']} (image {annotation['image_id']}) "
                       f"in {self.annotations_path}: {reason}")

    def _split_annotations(self, annotations: list) -> tuple[list[dict], list[Skipped]]:
        """(well-formed annotations, Skipped for entries without integer id/image_id/category_id)."""
        good, bad = [], []
        for index, annotation in enumerate(annotations):
            missing = [key for key in ("id", "image_id", "category_id")
                       if not (isinstance(annotation, dict) and _is_int(annotation.get(key)))]
            if missing:
                ident = f"annotations[{index}]" if "id" in missing else str(annotation["id"])
                bad.append(Skipped(self.name, "annotation", ident,
                                   f"annotations[{index}] in {self.annotations_path}: "
                                   f"no integer {', '.join(missing)}"))
            else:
                good.append(annotation)
        return good, bad


def _load_dataset(path: Path) -> dict:
    """The parsed JSON, checked to be COCO instances: else :class:`NotCocoError` naming the file."""
    try:
        with open(path, "rb") as file:
            data = json.load(file)
    except FileNotFoundError:
        raise FileNotFoundError(f"COCO annotation file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise NotCocoError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise NotCocoError(f"{path}: not COCO instances JSON (top level is a {type(data).__name__}, not an object)")
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise NotCocoError(f"{path}: not COCO instances JSON (no list {', '.join(map(repr, missing))})")
    _check_entries(path, data["images"], "images", "file_name")
    _check_entries(path, data["categories"], "categories", "name")
    return data


def _check_entries(path: Path, entries: list, name: str, text_key: str) -> None:
    """Every entry must be an object with an integer ``id`` and a string ``text_key``."""
    for index, entry in enumerate(entries):
        if not (isinstance(entry, dict) and _is_int(entry.get("id")) and isinstance(entry.get(text_key), str)):
            raise NotCocoError(f"{path}: {name}[{index}] is not a COCO entry "
                               f"(needs an integer 'id' and a string {text_key!r})")


def _index(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _image_problem(image: dict) -> str | None:
    for key in ("width", "height"):
        value = image.get(key)
        if value is None:
            return f"missing {key}"
        if not (_is_int(value) and value > 0):
            return f"{key} {value!r} is not a positive integer"
    return None


def _segmentation_rle(segmentation, height: int, width: int) -> dict:
    """Compressed RLE dict (``counts`` bytes) of polygons or RLE; raises :class:`_Unusable`."""
    if isinstance(segmentation, list):
        return _polygons_rle(segmentation, height, width)
    if isinstance(segmentation, dict):
        return _dict_rle(segmentation, height, width)
    raise _Unusable(f"segmentation is neither polygons nor RLE ({type(segmentation).__name__})")


def _polygons_rle(polygons: list, height: int, width: int) -> dict:
    problems = [_polygon_problem(polygon) for polygon in polygons]
    kept = [[float(v) for v in polygon] for polygon, problem in zip(polygons, problems) if problem is None]
    if not kept:
        details = "; ".join(f"polygon {i}: {problem}" for i, problem in enumerate(problems))
        raise _Unusable(f"no valid polygon ({details or 'empty list'})")
    return mask_utils.merge(mask_utils.frPyObjects(kept, height, width))


def _polygon_problem(polygon) -> str | None:
    if not isinstance(polygon, list) or not all(_is_number(v) for v in polygon):
        return "not a list of numbers"
    if len(polygon) % 2:
        return f"odd number of coordinates ({len(polygon)})"
    if len(polygon) < 6:
        return f"{len(polygon) // 2} points, need at least 3"
    if not all(math.isfinite(v) for v in polygon):
        return "non-finite coordinate"
    if any(abs(v) > MAX_COORDINATE for v in polygon):
        return f"coordinate beyond +-{MAX_COORDINATE:g} pixels"
    return None


def _dict_rle(rle: dict, height: int, width: int) -> dict:
    """Uncompressed (list counts) or compressed (string counts) RLE, checked against the image size."""
    size, counts = rle.get("size"), rle.get("counts")
    if size != [height, width]:
        raise _Unusable(f"RLE size {size} is not the image's [height, width] [{height}, {width}]")
    if isinstance(counts, (str, bytes)):
        counts = _decode_counts(counts)
    if not isinstance(counts, list) or not all(_is_int(c) and c >= 0 for c in counts):
        raise _Unusable("RLE counts are not non-negative integers")
    if sum(counts) != height * width:
        raise _Unusable(f"RLE counts cover {sum(counts)} pixels, the image has {height * width}")
    return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)


def _decode_counts(counts: str | bytes) -> list[int]:
    """Run lengths of a COCO compressed RLE string (as pycocotools' rleFrString reads it)."""
    try:
        data = counts.encode("ascii") if isinstance(counts, str) else counts
    except UnicodeEncodeError:
        raise _Unusable("RLE counts string is not ASCII") from None
    runs: list[int] = []
    position = 0
    while position < len(data):
        value, shift, more = 0, 0, True
        while more:
            if position == len(data):
                raise _Unusable("RLE counts string ends inside a number")
            chunk = data[position] - 48
            value |= (chunk & 0x1F) << shift
            more = chunk & 0x20
            position += 1
            shift += 5
            if not more and chunk & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
