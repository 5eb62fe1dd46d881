"""Co-segmentation scores of Table 5 (precision P and Jaccard J) and the datasets' folder layouts.

- P, "precision" in the Internet dataset's protocol (Rubinstein, Joulin, Kopf, Liu, CVPR 2013,
  and the authors' ``compute_acc_iou``): the share of an image's pixels whose predicted label
  (foreground or background) is the true one, i.e. pixel accuracy.
- J, Jaccard index: |predicted & true| / |predicted | true|, undefined for an image whose ground
  truth is empty (such an image counts in P, not in J).

A class's P and J are means over its images (J over the images with a non-empty ground truth);
a dataset's are means over its classes.

Folder layouts (:func:`read_internet_class`, :func:`read_msrc_class`): a class folder holds its
images (suffixes of :data:`datagen.format.imageio.IMAGE_SUFFIXES`, any case; hidden files left
out) and a ground-truth subfolder of masks (:data:`MASK_SUFFIXES`), matched by file stem. Masks
are read by :func:`load_mask`: any non-zero pixel is foreground.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from datagen.format.imageio import IMAGE_SUFFIXES, BadInput, read_input_bytes

from ..retrieval.images import plain_name_problem

MASK_SUFFIXES = (".png", ".bmp")
"""Suffixes (lower case) of mask files: lossless formats only (a JPEG mask's compression noise
would turn background into foreground under "any non-zero")."""
INTERNET_GT_DIR = "GroundTruth"
MSRC_GT_DIRS = ("GroundTruth", "gt")
MSRC_GT_SUFFIX = "_GT"
LAYOUTS = ("internet", "msrc")
PREDICTION_SUFFIX = ".png"


class LayoutError(ValueError):
    """A dataset or prediction folder that cannot be used; ``str()`` names the file or folder."""


# -- masks and scores ---------------------------------------------------------------------------

def load_mask(path) -> np.ndarray:
    """(H, W) bool mask of a mask file: any non-zero pixel is foreground (0/255 and 0/1 files
    alike; a colour or palette file: any non-black pixel, alpha ignored; 16-bit: any non-zero
    level). Raises :class:`datagen.format.imageio.BadInput` naming the file if it cannot be read
    or decoded. Note that colour-coded class maps (e.g. the raw MSRC-v2 labels, where every class
    has a colour) are not foreground/background masks: every labelled pixel would count."""
    data = read_input_bytes(path, "a mask file")
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    if decoded is None or decoded.size == 0:
        raise BadInput(path, "cannot decode mask (corrupt or unsupported format)")
    if decoded.ndim == 2:
        return decoded != 0
    channels = decoded.shape[2]
    colour = decoded[:, :, :1] if channels <= 2 else decoded[:, :, :3]
    return (colour != 0).any(axis=2)


def _as_mask(mask, what: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{what} must be an (H, W) mask, got shape {mask.shape}")
    if mask.dtype == bool:
        return mask
    if np.issubdtype(mask.dtype, np.integer):
        return mask != 0
    raise TypeError(f"{what} must be a bool (or integer, non-zero = foreground) mask, got {mask.dtype}; "
                    "threshold a soft mask first")


def precision_jaccard(pred, truth) -> tuple[float, float | None]:
    """(P, J) of one image: P = share of pixels where ``pred == truth``; J = |pred & truth| /
    |pred | truth|, None when ``truth`` is empty. Both (H, W) bool masks (integer masks: non-zero
    is foreground) of the same shape; ValueError naming both shapes otherwise (resizing is the
    caller's choice)."""
    pred, truth = _as_mask(pred, "pred"), _as_mask(truth, "truth")
    if pred.shape != truth.shape:
        raise ValueError(f"pred has shape {pred.shape} and truth {truth.shape}: resize the prediction first")
    if pred.size == 0:
        raise ValueError("empty masks")
    precision = float(np.count_nonzero(pred == truth)) / pred.size
    positive = int(np.count_nonzero(truth))
    if positive == 0:
        return precision, None
    union = int(np.count_nonzero(pred | truth))
    return precision, float(np.count_nonzero(pred & truth)) / union


def class_scores(preds: Mapping, truths: Mapping) -> dict:
    """Scores of one class: ``{"P": mean P, "J": mean J over the images with a non-empty truth
    (None if there is none), "images": n, "skipped_j": images with an empty truth, "per_image":
    {name: {"P": p, "J": j or None}}}``. ``preds`` and ``truths`` map image names to masks and must
    hold the same names (ValueError naming the differences); ValueError for no image."""
    missing = sorted(set(truths) - set(preds), key=str)
    extra = sorted(set(preds) - set(truths), key=str)
    if missing or extra:
        raise ValueError(f"predictions and ground truth differ: no prediction for {_first(missing) or 'none'}; "
                         f"no ground truth for {_first(extra) or 'none'}")
    if not truths:
        raise ValueError("no image to score")
    per_image = {}
    for name in sorted(truths, key=str):
        try:
            precision, jaccard = precision_jaccard(preds[name], truths[name])
        except (ValueError, TypeError) as error:
            raise type(error)(f"image {name!r}: {error}") from None
        per_image[name] = {"P": precision, "J": jaccard}
    jaccards = [scores["J"] for scores in per_image.values() if scores["J"] is not None]
    return {"P": float(np.mean([scores["P"] for scores in per_image.values()])),
            "J": float(np.mean(jaccards)) if jaccards else None,
            "images": len(per_image), "skipped_j": len(per_image) - len(jaccards), "per_image": per_image}


def _first(items: Sequence, count: int = 5) -> str:
    shown = ", ".join(repr(item) for item in items[:count])
    return shown + (f" and {len(items) - count} more" if len(items) > count else "")


# -- dataset layouts ----------------------------------------------------------------------------

class GroundTruthItem(NamedTuple):
    """One image of a class folder: ``name`` (the image's file stem, the key of its prediction
    file ``<name>.png``), the image file and its mask file."""

    name: str
    image: Path
    mask: Path


@dataclasses.dataclass
class ClassListing:
    """The images of one class folder that have a mask (``items``, sorted by name), those that do
    not (``skipped``: (image file name, reason)), and mask files that match no image
    (``orphan_masks``). Iterating or indexing it goes over ``items``."""

    folder: Path
    items: list[GroundTruthItem]
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    orphan_masks: list[str] = dataclasses.field(default_factory=list)

    def __iter__(self) -> Iterator[GroundTruthItem]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def _files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    """Plain (non-hidden) files directly in ``folder`` with one of ``suffixes`` (any case), sorted."""
    return sorted(entry for entry in folder.iterdir()
                  if not entry.name.startswith(".") and entry.suffix.lower() in suffixes and entry.is_file())


def _by_stem(folder: Path, files: list[Path], what: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in files:
        if path.stem in found:
            raise LayoutError(f"{folder}: two {what} files for {path.stem!r}: {found[path.stem].name} and {path.name}")
        found[path.stem] = path
    return found


def _class_images(class_dir) -> tuple[Path, dict[str, Path]]:
    folder = Path(class_dir)
    if not folder.is_dir():
        raise LayoutError(f"{folder}: not a folder")
    images = _by_stem(folder, _files(folder, IMAGE_SUFFIXES), "image")
    if not images:
        raise LayoutError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return folder, images


def _match(folder: Path, gt_dir: Path, images: dict[str, Path], masks: dict[str, Path],
           names: str = "{stem}") -> ClassListing:
    items, skipped = [], []
    for stem, image in sorted(images.items()):
        mask = masks.get(stem)
        if mask is None:
            wanted = names.format(stem=stem) + "{" + ",".join(MASK_SUFFIXES) + "}"
            skipped.append((image.name, f"no mask {wanted} in {gt_dir}"))
        else:
            items.append(GroundTruthItem(stem, image, mask))
    orphans = sorted(masks[stem].name for stem in set(masks) - set(images))
    return ClassListing(folder, items, skipped, orphans)


def read_internet_class(class_dir) -> ClassListing:
    """The images of an Internet-dataset class folder (Rubinstein et al. 2013), with their masks.

    Layout: ``Airplane100/*.jpg`` (any image suffix) and ``Airplane100/GroundTruth/<stem>.png``
    (or ``.bmp``), a binary mask per image, 0/255 or 0/1 alike. An image without a mask is listed
    in ``skipped`` with the reason. LayoutError if the folder, its ``GroundTruth`` subfolder or
    its images are missing, or if two images (or two masks) share a stem.
    """
    folder, images = _class_images(class_dir)
    gt_dir = folder / INTERNET_GT_DIR
    if not gt_dir.is_dir():
        raise LayoutError(f"{folder}: no ground-truth folder {INTERNET_GT_DIR}/")
    masks = _by_stem(gt_dir, _files(gt_dir, MASK_SUFFIXES), "mask")
    return _match(folder, gt_dir, images, masks)


def read_msrc_class(class_dir) -> ClassListing:
    """The images of an MSRC-style class folder, with their masks.

    Layout: the images directly in the folder and their masks in ``GroundTruth/`` or ``gt/``
    (exactly one of the two; LayoutError if both or neither), each named ``<stem>_GT.png`` (the
    MSRC convention) or ``<stem>.png`` (``.bmp`` also accepted); both names for one image is a
    LayoutError. The masks must be binary (foreground/background): MSRC-v2's own colour-coded
    class maps are not (see :func:`load_mask`). An image without a mask goes to ``skipped``.
    """
    folder, images = _class_images(class_dir)
    present = [name for name in MSRC_GT_DIRS if (folder / name).is_dir()]
    if len(present) != 1:
        raise LayoutError(f"{folder}: expected one ground-truth folder, {' or '.join(MSRC_GT_DIRS)}/, found "
                          f"{', '.join(present) if present else 'none'}")
    gt_dir = folder / present[0]
    masks: dict[str, Path] = {}
    for stem, path in _by_stem(gt_dir, _files(gt_dir, MASK_SUFFIXES), "mask").items():
        key = stem[: -len(MSRC_GT_SUFFIX)] if stem.endswith(MSRC_GT_SUFFIX) and stem[: -len(MSRC_GT_SUFFIX)] in images \
            else stem
        if key in masks:
            raise LayoutError(f"{gt_dir}: two masks for image {key!r}: {masks[key].name} and {path.name}")
        masks[key] = path
    return _match(folder, gt_dir, images, masks, names="{stem}" + MSRC_GT_SUFFIX + " or {stem}")


READERS = {"internet": read_internet_class, "msrc": read_msrc_class}


# -- evaluating a folder of predictions ---------------------------------------------------------

def _mean(values) -> float | None:
    values = [value for value in values if value is not None]
    return float(np.mean(values)) if values else None


def evaluate_folder(pred_dir, gt_root, layout: str = "internet", classes: Sequence[str] | None = None,
                    resize_predictions: bool = False) -> dict:
    """Score the predicted masks ``pred_dir/<class>/<stem>.png`` or ``pred_dir/<class>/masks/<stem>.png``
    (0/255 PNG as written by ``trainer discover --out pred_dir/<class>``; any non-zero pixel is
    foreground) against the class folders
    ``gt_root/<class>/`` in ``layout`` ("internet" or "msrc").

    The classes are ``classes`` if given, else every (non-hidden) subfolder of ``pred_dir``; each
    must be a folder of ``gt_root``. A missing prediction counts as an empty mask and is listed
    in the class's ``"missing"``; a prediction file with no ground-truth image is listed in
    ``"extra"``; images without a mask are left out and listed in ``"skipped"``. A prediction of
    another size than its mask is a LayoutError naming both files, unless ``resize_predictions``
    (nearest neighbour; the class's ``"resized"`` counts them).

    Returns ``{"layout", "classes": {class: {"P", "J", "images", "skipped_j", "missing",
    "extra", "skipped", "resized", "per_image"}}, "P": mean over classes, "J": mean over the
    classes whose J is defined}``; plain JSON types.
    """
    if layout not in READERS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    pred_root, gt_root = Path(pred_dir), Path(gt_root)
    if not pred_root.is_dir():
        raise LayoutError(f"{pred_root}: prediction folder not found")
    if not gt_root.is_dir():
        raise LayoutError(f"{gt_root}: ground-truth folder not found")
    if classes is None:
        classes = sorted(entry.name for entry in pred_root.iterdir()
                         if entry.is_dir() and not entry.name.startswith("."))
        if not classes:
            raise LayoutError(f"{pred_root}: no class folder (predictions go in {pred_root}/<class>/<stem>.png)")
    for name in classes:
        problem = plain_name_problem(name, "name")
        if problem:
            raise LayoutError(f"class {problem}")
        if not (gt_root / name).is_dir():
            raise LayoutError(f"{gt_root / name}: no ground-truth folder for class {name!r}")
    report = {}
    for name in classes:
        listing = READERS[layout](gt_root / name)
        if not listing.items:
            raise LayoutError(f"{gt_root / name}: no image with a mask ({len(listing.skipped)} without)")
        class_pred = pred_root / name
        if (class_pred / "masks").is_dir():  # the --out folder of 'trainer discover' on that class
            class_pred = class_pred / "masks"
        predicted = _by_stem(class_pred, _files(class_pred, (PREDICTION_SUFFIX,)), "prediction") \
            if class_pred.is_dir() else {}
        preds, truths, missing, resized = {}, {}, [], 0
        for item in listing:
            truth = load_mask(item.mask)
            truths[item.name] = truth
            path = predicted.get(item.name)
            if path is None:
                missing.append(item.name)
                preds[item.name] = np.zeros_like(truth)
                continue
            pred = load_mask(path)
            if pred.shape != truth.shape:
                if not resize_predictions:
                    raise LayoutError(f"{path} is {pred.shape[1]}x{pred.shape[0]} but its mask {item.mask} is "
                                      f"{truth.shape[1]}x{truth.shape[0]} (width x height)")
                pred = cv2.resize(pred.astype(np.uint8), (truth.shape[1], truth.shape[0]),
                                  interpolation=cv2.INTER_NEAREST).astype(bool)
                resized += 1
            preds[item.name] = pred
        scores = class_scores(preds, truths)
        known = {item.name for item in listing}
        report[name] = {"P": scores["P"], "J": scores["J"], "images": scores["images"],
                        "skipped_j": scores["skipped_j"], "missing": missing,
                        "extra": sorted(predicted[stem].name for stem in set(predicted) - known),
                        "skipped": [list(entry) for entry in listing.skipped], "resized": resized,
                        "per_image": scores["per_image"]}
    return {"layout": layout, "classes": report,
            "P": _mean(entry["P"] for entry in report.values()),
            "J": _mean(entry["J"] for entry in report.values())}
