"""Segment sources by name: ``get_source(config.segments, **options)``."""
from __future__ import annotations

from typing import Callable

from datagen.segments import SegmentSource
from datagen.sources.coco import make_coco_source

SOURCES: dict[str, Callable[..., SegmentSource]] = {
    "coco": make_coco_source,
}


def get_source(name: str, **options) -> SegmentSource:
    """The source ``name`` built with ``options``; ValueError listing the known names if unknown."""
    try:
        factory = SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown segment source {name!r}; known sources: {', '.join(sorted(SOURCES))}") from None
    return factory(**options)
