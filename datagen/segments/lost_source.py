"""Unsupervised segments of any folder of images: LOST on DINO ViT-S/16 features, refined by the
bilateral solver (the paper's label-free segment source).

Every image file of the folder (recursively, sorted by relative path) becomes an
:class:`ImageRow`; its image id is its 1-based position in that list. Each readable image gives
one :class:`SegmentRow`: LOST's coarse patch mask (:mod:`datagen.segments.lost`), upsampled and refined
by the solver (:mod:`datagen.segments.refine`), with LOST's score, the refinement's IoU with the coarse
mask (below 0.5 the coarse mask was kept), the coarse mask itself (``coarse_rle``) and the
solver's soft output before any threshold (``soft_png``, at the resolution the solver ran at), the
last two for ``datagen segments eval``. Unreadable images are :class:`Skipped` with the reason.

Categories: LOST finds objects, not classes. A build keeps segments of one category out of the
same pair (a background never holds the pasted segment's category), so one shared category
would leave no background at all; each LOST segment is therefore its own category, with id its
image id and name "object": any other image can serve as its background.

Images larger than ``max_size`` (longest side, pixels) are downscaled for DINO and the solver;
the masks are then scaled back to the image's own resolution.
"""
from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from datagen.config import options_from
from datagen.format.hashing import canonical_json, sha256_file
from datagen.format.imageio import IMAGE_SUFFIXES, BadInput, load_rgb
from datagen.segments.bank import BankItem, ImageRow, SegmentRow, Skipped, SourceInputs
from datagen.segments.bilateral import SolverConfig

NAME = "lost"
CATEGORY = "object"


@dataclass(frozen=True)
class LostConfig:
    """What defines LOST segments besides the images and weights (recorded in the bank's inputs).

    k: low-degree patches considered for the seed expansion (LOST: 100).
    max_size: longest side, pixels, at which DINO and the solver see an image (larger images are
    downscaled; 0: never). solver: the bilateral solver's parameters (LOST / TokenCut defaults).
    """

    k: int = 100
    max_size: int = 1024
    solver: SolverConfig = field(default_factory=SolverConfig)

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"LostConfig.k must be an integer >= 1, got {self.k!r}")
        if isinstance(self.max_size, bool) or not isinstance(self.max_size, int) or not (
                self.max_size == 0 or self.max_size >= 32):
            raise ValueError(f"LostConfig.max_size (--max-size) must be 0 (no cap) or >= 32 pixels, "
                             f"got {self.max_size!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def image_files(images_dir) -> list[str]:
    """Relative POSIX paths of the image files under ``images_dir`` (recursive), sorted."""
    root = Path(images_dir)
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for name in names:
            # files with these suffixes (any case) are the folder's images; hidden files and folders are not
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                found.append(Path(directory, name).relative_to(root).as_posix())
    return sorted(found)


def folder_fingerprint(images_dir, files: list[str] | None = None) -> str:
    """sha256 of the sorted lines ``path, size in bytes, mtime in ns`` of the folder's images.

    A stat per file, not a read: about a second for 100k images. It changes when an image is
    added, removed, renamed, rewritten or touched; a copy that does not keep modification times
    (``cp -r`` without ``-p``) changes it too, and then the source is scanned again.
    """
    root = Path(images_dir)
    digest = hashlib.sha256()
    for relative in image_files(root) if files is None else files:
        stat = (root / relative).stat()
        digest.update(f"{relative}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _images_dir(images_dir) -> Path:
    if images_dir is None:
        raise ValueError("the lost source needs a folder of images (--images DIR)")
    path = Path(images_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"image folder not found: {path} (--images)")
    return path


@dataclass(frozen=True)
class LostOptions:
    """Options of the lost source.

    images_dir: the folder of images (searched recursively). dino_weights: the DINO ViT-S/16 file
    (None: ``$SEGSWAP_DINO_WEIGHTS`` or the caches, see :func:`datagen.segments.dino.find_dino_weights`).
    max_size, k: the :class:`LostConfig`. device, batch_size, progress: how the scan runs
    (:data:`RUNTIME`; see :class:`LostSource`), not which segments it finds.
    """

    images_dir: Path | str | None = None
    dino_weights: Path | str | None = None
    max_size: int = LostConfig.max_size
    k: int = LostConfig.k
    device: str = "auto"
    batch_size: int | None = None
    progress: bool = True

    RUNTIME: ClassVar[tuple[str, ...]] = ("device", "batch_size", "progress")
    """Options that change how the scan runs, not which segments it finds: not recorded, so that
    resuming a build on another device does not scan again."""

    def __post_init__(self):
        LostConfig(k=self.k, max_size=self.max_size)  # a k or max_size out of range fails here, naming it

    @classmethod
    def of(cls, options: Mapping) -> LostOptions:
        """From keyword options; an unknown one is a ValueError naming it and the source."""
        return options_from(cls, options, "the lost source")

    @property
    def config(self) -> LostConfig:
        """The settings that define the segments (recorded with the bank)."""
        return LostConfig(k=self.k, max_size=self.max_size)

    def record(self) -> dict[str, str]:
        """The options as a bank's inputs record them, as strings: the folder, the weights when
        given, ``max_size``, and ``k`` when it is not LOST's (so that banks recorded before ``k``
        was an option stay current); never the runtime options."""
        given = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.RUNTIME}
        if self.k == LostConfig.k:
            del given["k"]
        return {key: str(value) for key, value in sorted(given.items()) if value is not None}


def lost_source_inputs(**options) -> SourceInputs:
    """The folder, its :func:`folder_fingerprint` and image count, the DINO weights' sha256 and
    the :class:`LostConfig`, without loading anything (:class:`DinoWeightsError` when there are
    no weights). ``options``: the fields of :class:`LostOptions` (the runtime ones change nothing)."""
    from datagen.segments.dino import find_dino_weights

    chosen = LostOptions.of(options)
    root = _images_dir(chosen.images_dir)
    files = image_files(root)
    record = {"images_sha256": folder_fingerprint(root, files), "images": len(files),
              "dino_weights_sha256": sha256_file(find_dino_weights(chosen.dino_weights)),
              "lost": chosen.config.to_dict()}
    digest = hashlib.sha256(canonical_json(record).encode()).hexdigest()
    return SourceInputs(image_root=root.resolve(), record=record, sha256=digest)


def make_lost_source(*, min_area: float = 1024.0, **options) -> LostSource:
    """A :class:`LostSource` of the :class:`LostOptions` ``options``."""
    chosen = LostOptions.of(options)
    return LostSource(_images_dir(chosen.images_dir), chosen.dino_weights, chosen.config, min_area=min_area,
                      device=chosen.device, batch_size=chosen.batch_size, progress=chosen.progress)


def encode_rle(mask: np.ndarray) -> dict:
    """(H, W) bool mask -> COCO compressed RLE dict (``counts`` bytes)."""
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def working_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """(width, height) at which an image is processed: scaled down so its longest side is at most
    ``max_size`` (0: unchanged), rounded, at least 1."""
    longest = max(width, height)
    if max_size == 0 or longest <= max_size:
        return width, height
    scale = max_size / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass
class _Image:
    """One listed file: id, relative path, and once read, its pixels at full and working size."""

    image_id: int
    path: str
    full: np.ndarray | None = None
    work: np.ndarray | None = None
    problem: str | None = None


class LostSource:
    """LOST + bilateral-solver segments of every image of ``images_dir``.

    weights: the DINO file (None: ``$SEGSWAP_DINO_WEIGHTS`` or the caches, see
    :func:`datagen.segments.dino.find_dino_weights`). ``min_area``: segments with a smaller mask (pixels,
    at the image's resolution) are skipped. ``device``: 'auto' (CUDA when present), 'cpu',
    'cuda'. ``batch_size``: images per DINO forward (same-size images only; default 8 on CUDA, 1
    on the CPU). ``model``: an already loaded ViT (tests), instead of loading ``weights``.
    ``loaders``: threads decoding the next images while DINO and the solver work.
    """

    name = NAME

    def __init__(self, images_dir, weights=None, config: LostConfig = LostConfig(), *, min_area: float = 1024.0,
                 device: str = "auto", batch_size: int | None = None, progress: bool = True, model=None,
                 loaders: int = 4):
        from datagen.segments.dino import find_dino_weights, resolve_device

        self.images_dir = _images_dir(images_dir)
        self.config = config
        self.min_area = float(min_area)
        self.device = resolve_device(device)
        self.batch_size = batch_size or (8 if self.device.type == "cuda" else 1)
        self.progress = progress
        self.loaders = loaders
        self.weights = None if model is not None else find_dino_weights(weights)
        self._model = model

    def model(self):
        """The DINO ViT on this source's device, loaded on first use."""
        from datagen.segments.dino import load_dino

        if self._model is None:
            self._model = load_dino(self.weights, self.device)
        return self._model.to(self.device)

    def scan(self) -> Iterator[BankItem]:
        """Per image, in path order: its ImageRow (or Skipped), then its SegmentRow or Skipped."""
        from tqdm import tqdm

        files = image_files(self.images_dir)
        listed = [_Image(index + 1, path) for index, path in enumerate(files)]
        chunks = [listed[i:i + self.batch_size] for i in range(0, len(listed), self.batch_size)]
        model = self.model() if listed else None
        with tqdm(total=len(listed), unit="image", desc="LOST", disable=not self.progress, file=sys.stderr,
                  dynamic_ncols=True) as bar, ThreadPoolExecutor(self.loaders) as pool:
            pending = [pool.submit(self._read, image) for image in chunks[0]] if chunks else []
            for index, chunk in enumerate(chunks):
                for future in pending:
                    future.result()
                if index + 1 < len(chunks):  # read the next chunk while this one is computed
                    pending = [pool.submit(self._read, image) for image in chunks[index + 1]]
                yield from self._chunk_items(model, chunk)
                bar.update(len(chunk))

    def _read(self, image: _Image) -> None:
        try:
            image.full = load_rgb(self.images_dir / image.path)
        except BadInput as error:
            image.problem = error.reason
            return
        height, width = image.full.shape[:2]
        size = working_size(width, height, self.config.max_size)
        image.work = (image.full if size == (width, height)
                      else cv2.resize(image.full, size, interpolation=cv2.INTER_AREA))

    def _chunk_items(self, model, chunk: list[_Image]) -> Iterator[BankItem]:
        """Items of the images of ``chunk``, in order; same-size images share a DINO forward."""
        from datagen.segments.dino import image_batch, last_keys, padded_grid

        readable = [image for image in chunk if image.problem is None]
        features: dict[int, object] = {}
        for shape in dict.fromkeys(image.work.shape for image in readable):
            group = [image for image in readable if image.work.shape == shape]
            try:
                keys = last_keys(model, image_batch([image.work for image in group], self.device))
            except Exception as error:  # noqa: BLE001 - e.g. out of memory: these images only
                for image in group:
                    features[image.image_id] = error
                continue
            for image, image_keys in zip(group, keys):
                features[image.image_id] = image_keys
        for image in chunk:
            if image.problem is not None:
                yield Skipped(self.name, "image", image.path, f"{self.images_dir / image.path}: {image.problem}")
                continue
            height, width = image.full.shape[:2]
            yield ImageRow(self.name, image.image_id, image.path, width, height)
            yield self._segment(image, features[image.image_id], padded_grid(*image.work.shape[:2]))
            image.full = image.work = None

    def _segment(self, image: _Image, features, grid: tuple[int, int]) -> SegmentRow | Skipped:
        from datagen.segments.lost import lost
        from datagen.segments.refine import encode_soft, refine_mask, upsample_patches

        try:
            if isinstance(features, Exception):
                raise features
            found = lost(features, grid, self.config.k)
            work_height, work_width = image.work.shape[:2]
            coarse = upsample_patches(found.mask, (work_height, work_width))
            refinement = refine_mask(image.work, coarse, self.config.solver)
        except Exception as error:  # noqa: BLE001 - one image never stops a scan of 100k
            return self._skip(image, f"LOST failed: {type(error).__name__}: {error}")
        height, width = image.full.shape[:2]
        mask = _resize_mask(refinement.mask, width, height)
        area = float(mask.sum())
        if area == 0:
            return self._skip(image, "empty mask")
        if area < self.min_area:
            return self._skip(image, f"mask area {area:g} px < min_area {self.min_area:g}")
        rle = encode_rle(mask)
        x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
        return SegmentRow(
            source=self.name, image_id=image.image_id, image_path=image.path, image_width=width,
            image_height=height, segment_id=image.image_id, category_id=image.image_id, category=CATEGORY,
            bbox=(x, y, w, h), area=area, rle=rle["counts"].decode("ascii"), score=found.score,
            refine_iou=refinement.iou,
            coarse_rle=encode_rle(_resize_mask(coarse, width, height))["counts"].decode("ascii"),
            soft_png=encode_soft(refinement.solved))

    def _skip(self, image: _Image, reason: str) -> Skipped:
        return Skipped(self.name, "annotation", image.path, f"image {image.image_id} ({image.path}): {reason}")


def _resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """(h, w) bool -> (height, width) bool: bilinear on 0/1, then >= 0.5 (unchanged if same size)."""
    if mask.shape == (height, width):
        return mask
    scaled = cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    return scaled >= 0.5
