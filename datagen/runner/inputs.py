"""What a build reads besides its config: the segment source (typed options, its inputs record and
checksum), the style's identity, and the segment bank scanned from the source into ``OUT/bank``.

The inputs are found without loading the source (:func:`source_record`), so that resuming a big
build neither parses COCO's annotations nor runs LOST again while ``OUT/bank`` holds a bank of
the same inputs (:func:`current_bank`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datagen.config import BuildConfig, options_from
from datagen.format.hashing import canonical_json
from datagen.segments import RUNTIME_OPTIONS, get_source, source_inputs
from datagen.segments.bank import BANK_FORMAT, write_bank

BANK_DIR = "bank"
BANK_INPUTS = "inputs.json"

SOURCE_OPTIONS: dict[str, Any] = {
    "coco": "datagen.segments.coco_source:CocoOptions",
    "lost": "datagen.segments.lost_source:LostOptions",
}
"""Source name -> its options dataclass (or a "module:Class" string imported on first use). A
source without an entry gets its options as a mapping, and checks them itself."""


def source_options_class(name: str):
    """The options dataclass of source ``name``, or None when it has none."""
    entry = SOURCE_OPTIONS.get(name)
    if isinstance(entry, str):
        module, attribute = entry.split(":")
        entry = SOURCE_OPTIONS[name] = getattr(importlib.import_module(module), attribute)
    return entry


@dataclass(frozen=True)
class SourceSpec:
    """Where segments come from: a source name and its typed options (e.g.
    :class:`~datagen.segments.coco_source.CocoOptions`); a mapping of them is accepted and
    checked, so that an unknown option is an error naming it. Paths are not hashed into the
    config; runtime options such as the device are not recorded."""

    name: str
    options: Any = None

    def __post_init__(self):
        options = {} if self.options is None else self.options
        cls = source_options_class(self.name)
        if cls is not None and isinstance(options, Mapping):
            options = options_from(cls, options, f"the {self.name} source")
        elif cls is not None and not isinstance(options, cls):
            raise TypeError(f"options of the {self.name} source must be {cls.__name__} or a mapping, "
                            f"got {type(options).__name__}")
        object.__setattr__(self, "options", options)

    def kwargs(self) -> dict:
        """The options as keyword arguments of :func:`~datagen.segments.get_source` and
        :func:`~datagen.segments.source_inputs`."""
        if dataclasses.is_dataclass(self.options):
            return dataclasses.asdict(self.options)
        return dict(self.options)

    def to_json(self) -> dict:
        """Name and options as the bank's inputs record and the manifest hold them (strings)."""
        if hasattr(self.options, "record"):
            options = self.options.record()
        else:
            options = {k: str(v) for k, v in sorted(self.options.items()) if k not in RUNTIME_OPTIONS}
        return {"name": self.name, "options": options}


def style_identity(description: dict | None) -> dict | None:
    """What makes stylised bytes differ: the method, the style images and the weights."""
    if description is None:
        return None
    weights = description.get("weights") or {}
    return {"method": description["method"], "styles_sha256": description.get("styles_sha256"),
            "weights": {name: entry.get("sha256") for name, entry in sorted(weights.items())}}


def inputs_checksum(source_sha256: str, style: dict | None) -> str:
    """One checksum of everything a build reads besides its config: the source's inputs (COCO:
    the annotation file's sha256), and the style images and weights when there is a style."""
    if style is None:
        return source_sha256
    # the key stays "annotations" (COCO's), so that shard sets built before other sources stay current
    return hashlib.sha256(canonical_json({"annotations": source_sha256, "style": style}).encode()).hexdigest()


def source_record(spec: SourceSpec, config: BuildConfig) -> dict:
    """The inputs record of a source (options, its checksums and settings, image root), found
    without loading the source. ``source_sha256`` is one checksum of the source's inputs (see
    :class:`~datagen.segments.bank.SourceInputs`). ``bank_format`` is recorded so that a bank of an
    older format is scanned again rather than misread."""
    inputs = source_inputs(spec.name, **spec.kwargs())
    return {
        "bank_format": BANK_FORMAT,
        "source": spec.to_json(),
        "min_area": config.min_area,
        **inputs.record,
        "source_sha256": inputs.sha256,
        "image_root": str(inputs.image_root),
    }


def current_bank(bank_dir: Path, record: dict) -> dict | None:
    """The bank's stored inputs record if ``bank_dir`` holds a bank of exactly these inputs."""
    inputs_path = Path(bank_dir) / BANK_INPUTS
    if not inputs_path.is_file():
        return None
    previous = json.loads(inputs_path.read_text())
    return previous if {k: previous.get(k) for k in record} == record else None


def load_source(spec: SourceSpec, config: BuildConfig):
    """The source of ``spec``, loaded (COCO: the annotations parsed)."""
    return get_source(spec.name, min_area=config.min_area, **spec.kwargs())


def source_to_scan(spec: SourceSpec, config: BuildConfig, bank_dir: Path, record: dict):
    """The loaded source when ``bank_dir`` holds no current bank (it must be scanned), else None.
    A build calls this before it touches ``--out``, so that a bad annotation file fails first."""
    return None if current_bank(bank_dir, record) else load_source(spec, config)


def prepare_bank(spec: SourceSpec, config: BuildConfig, bank_dir: Path, log=print, record=None,
                 source=None) -> dict:
    """Scan the source into ``bank_dir`` unless a bank of the same inputs is already there.

    ``record`` / ``source``: the source's :func:`source_record` and the loaded source, when the
    caller has them already. Returns the inputs record (with the bank's counts).
    """
    bank_dir = Path(bank_dir)
    record = dict(record or source_record(spec, config))
    previous = current_bank(bank_dir, record)
    if previous is not None:
        return previous
    source = source or load_source(spec, config)
    options = ", ".join(f"{k}={v}" for k, v in spec.to_json()["options"].items())
    log(f"scanning {spec.name} segments ({options}) ...")
    summary = write_bank(source.scan(), bank_dir)
    record["bank"] = {"segments": summary.segments, "images": summary.images, "skipped": summary.skipped}
    (bank_dir / BANK_INPUTS).write_text(json.dumps(record, indent=2, sort_keys=True))
    log(f"segment bank: {summary.segments} segments, {summary.images} images, {summary.skipped} skipped "
        f"(see {bank_dir / 'skipped.parquet'})")
    return record
