"""Segment sources by name: ``get_source(config.segments, **options)``, and the files a source
reads, ``source_paths(name, **options)``, found without loading them."""
from __future__ import annotations

from typing import Callable

from datagen.segments import SegmentSource
from datagen.sources.coco import coco_source_paths, make_coco_source

SOURCES: dict[str, Callable[..., SegmentSource]] = {
    "coco": make_coco_source,
}
PATHS: dict[str, Callable[..., tuple]] = {
    "coco": coco_source_paths,
}
"""Source name -> ``(**options) -> (annotations file, images directory)``."""


def _lookup(table: dict, name: str):
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown segment source {name!r}; known sources: {', '.join(sorted(SOURCES))}") from None


def get_source(name: str, **options) -> SegmentSource:
    """The source ``name`` built with ``options``; ValueError listing the known names if unknown."""
    return _lookup(SOURCES, name)(**options)


def source_paths(name: str, **options) -> tuple:
    """(annotations file, images directory) that source ``name`` would read, without reading them."""
    return _lookup(PATHS, name)(**options)
