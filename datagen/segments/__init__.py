"""Segment sources by name: ``get_source(config.segments, **options)``, and what a source reads,
``source_inputs(name, **options)`` (a :class:`~datagen.segments.bank.SourceInputs`: image root and
checksums), found without loading it.

- ``"coco"`` (:mod:`datagen.segments.coco_source`): COCO instance annotations;
- ``"lost"`` (:mod:`datagen.segments.lost_source`): unsupervised segments of any folder of images, LOST
  on DINO features refined by the bilateral solver.

Both tables are :class:`~datagen.format.registry.Registry` objects of lazy ``"module:function"``
entries, imported on first use, so that listing the names (the command line does) imports neither
torch nor timm. A new source adds its two functions to both, under the same name.

The modules of this stage:

- :mod:`~datagen.segments.bank`           segment and image rows, the bank on disk (parquet, RLE masks)
- :mod:`~datagen.segments.coco_source`    COCO annotations through pycocotools
- :mod:`~datagen.segments.lost_source`    LOST on DINO, refined by the bilateral solver, cached per image
- :mod:`~datagen.segments.dino`           DINO ViT-S/16 features (timm), official weights
- :mod:`~datagen.segments.lost`           LOST's seed and seed expansion on patch features
- :mod:`~datagen.segments.bilateral`      the fast bilateral solver
- :mod:`~datagen.segments.refine`         coarse mask -> refined mask (solver, post-processing)
- :mod:`~datagen.segments.saliency_eval`  Table 4's evaluation of the unsupervised masks
"""
from __future__ import annotations

from collections.abc import Callable

from datagen.format.registry import Registry
from datagen.segments.bank import SegmentSource, SourceInputs

SOURCES: Registry[Callable[..., SegmentSource]] = Registry("segment source", plural="sources", lazy={
    "coco": "datagen.segments.coco_source:make_coco_source",
    "lost": "datagen.segments.lost_source:make_lost_source",
})
"""Source name -> ``(min_area=..., **options) -> source``."""
INPUTS: Registry[Callable[..., SourceInputs]] = Registry("segment source", plural="sources", lazy={
    "coco": "datagen.segments.coco_source:coco_source_inputs",
    "lost": "datagen.segments.lost_source:lost_source_inputs",
})
"""Source name -> ``(**options) -> SourceInputs``, without loading the source; the same names as
:data:`SOURCES`."""
RUNTIME_OPTIONS = ("device", "batch_size", "progress")
"""Options that change how a source runs, not which segments it finds: not recorded, so that
e.g. resuming a build on another device does not rescan it."""


def get_source(name: str, **options) -> SegmentSource:
    """The source ``name`` built with ``options``; ValueError listing the known names if unknown."""
    return SOURCES.get(name)(**options)


def source_inputs(name: str, **options) -> SourceInputs:
    """What source ``name`` would read with ``options`` (image root, checksums), without loading it."""
    return INPUTS.get(name)(**{k: v for k, v in options.items() if k not in RUNTIME_OPTIONS})
