"""``datagen verify``: check a shard set against its manifest and its own warps.

For each shard of the manifest: the file exists, its size and sha256 match, it reads as a tar,
it holds the recorded number of samples with unique keys, every sample decodes under the
schema, and its stored correspondence fields and grid masks agree with those recomputed from
the sample's JSON warps and source mask. Each problem names the shard and, where known, the
sample.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .manifest import fingerprint, load_manifest
from .pairs import recompute_grids
from .schema import SchemaError, decode_sample
from .shards import ShardError, iter_tar_samples, sha256_file

FLOW_TOLERANCE = 2e-3
"""Largest allowed |stored - recomputed| of normalised coordinates inside the mask (float16 rounding
of values in [0, 1] is below 5e-4)."""
MASK_TOLERANCE = 2e-2
"""Largest allowed |stored - recomputed| grid-mask value."""


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list = field(default_factory=list)


def check_sample_grids(sample) -> list[str]:
    """Problems of one decoded sample whose fields disagree with its warps (empty list if none)."""
    problems = []
    expected = recompute_grids(sample)
    for name, stored in (("src_grid_mask", sample.src_grid_mask), ("tgt_grid_mask", sample.tgt_grid_mask)):
        error = float(np.abs(stored - expected[name]).max())
        if error > MASK_TOLERANCE:
            problems.append(f"{name} differs from its warp by {error:.3f}")
    for name, stored, mask in (("src_to_tgt", sample.src_to_tgt, expected["src_grid_mask"]),
                               ("tgt_to_src", sample.tgt_to_src, expected["tgt_grid_mask"])):
        inside = mask > 0
        if inside.any():
            error = float(np.abs(stored[inside] - expected[name][inside]).max())
            if error > FLOW_TOLERANCE:
                problems.append(f"{name} differs from its warp by {error:.4f} (normalised)")
    for side, mask, grid in (("src", sample.src_mask, sample.src_grid_mask),
                             ("tgt", sample.tgt_mask, sample.tgt_grid_mask)):
        if grid.sum() > 0 and not mask.any():
            problems.append(f"{side}.mask.png is empty but its grid mask is not")
    return problems


def verify_dir(shard_dir, progress: bool = True) -> VerifyReport:
    """Verify every shard listed in ``shard_dir/manifest.json``; never raises for bad data."""
    shard_dir = Path(shard_dir)
    report = VerifyReport()
    try:
        manifest = load_manifest(shard_dir)
    except (ValueError, OSError) as error:
        report.problems.append(str(error))
        return report
    total = sum(int(s["samples"]) for s in manifest["shards"])
    with tqdm(total=total, unit="sample", desc="verify", disable=not progress, file=sys.stderr) as bar:
        for entry in manifest["shards"]:
            report.shards += 1
            report.problems += verify_shard(shard_dir / entry["name"], entry, report, bar.update)
    if report.samples != manifest.get("n_samples", report.samples):
        report.problems.append(f"manifest says {manifest['n_samples']} samples, found {report.samples}")
    if fingerprint(manifest["config_hash"], manifest["shards"]) != manifest["fingerprint"]:
        report.problems.append("manifest.json: its fingerprint does not match its shard list")
    return report


def verify_shard(path: Path, entry: dict, report: VerifyReport, advance=lambda n: None) -> list[str]:
    """Problems of one shard ``path`` against its manifest ``entry`` (name, bytes, sha256, samples)."""
    name = entry["name"]
    if not path.is_file():
        return [f"{name}: missing"]
    problems = []
    size = path.stat().st_size
    if size != entry["bytes"]:
        problems.append(f"{name}: {size} bytes, manifest says {entry['bytes']}")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        problems.append(f"{name}: sha256 {digest[:12]} differs from the manifest's {entry['sha256'][:12]}")
    keys = set()
    try:
        for members in iter_tar_samples(path):
            key = members.get("__key__", "?")
            report.samples += 1
            advance(1)
            if key in keys:
                problems.append(f"{name}: sample {key}: duplicate key")
            keys.add(key)
            try:
                sample = decode_sample(members)
            except SchemaError as error:
                problems.append(f"{name}: {error}")
                continue
            problems += [f"{name}: sample {key}: {p}" for p in check_sample_grids(sample)]
    except ShardError as error:
        problems.append(f"{name}: unreadable tar: {error}")
    if len(keys) != entry["samples"]:
        problems.append(f"{name}: {len(keys)} samples, manifest says {entry['samples']}")
    return problems
