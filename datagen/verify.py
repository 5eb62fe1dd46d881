"""``datagen verify``: check a shard set against its manifest and its own warps.

The set is named in any form of :mod:`datagen.format.shardset`. For each shard: the file exists, its
size and sha256 match its manifest entry, it reads as a tar, it holds the recorded number of
samples with unique keys, each sample's bytes match the checksum its build recorded in the shard's
``*.samples.parquet`` (so that damage is traced to the sample it hit), every sample decodes under
the schema, and its stored correspondence fields and grid masks agree with those recomputed from
the sample's JSON warps and source mask.
For a manifest's whole set, the fingerprint is recomputed from what was measured on disk. Each
problem names the shard and, where known, the sample.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from datagen.format.grids import recompute_grids
from datagen.format.hashing import sha256_file
from datagen.format.manifest import (
    MANIFEST_NAME,
    ManifestError,
    fingerprint,
    read_sample_rows,
    samples_name,
    version_differences,
)
from datagen.format.schema import SchemaError, decode_sample
from datagen.format.shards import ShardError, iter_tar_samples, parse_shard_index, sample_sha256
from datagen.format.shardset import resolve_shard_set

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
    versions: list = field(default_factory=list)
    """Packages whose versions here differ from the set's manifest, and what they decide: a set
    verifies all the same, but a rebuild here may give other bytes."""
    fingerprint: str | None = None
    """The set's fingerprint recomputed from the bytes on disk (sha256 and sample count of every
    shard), when the set is a manifest's whole set; None otherwise."""
    notes: list = field(default_factory=list)
    """What could not be checked (no manifest, part of a set), for the user to read."""
    quick: bool = False
    """Only sizes and the manifest were checked (``--quick``)."""


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


def recorded_sample_checksums(tar: Path) -> dict | None:
    """{key: sha256} of the accepted samples of shard ``tar``, from the ``*.samples.parquet`` its build
    wrote beside it; None when there is none, or it predates per-sample checksums. ManifestError
    when it cannot be read."""
    try:
        rows_path = tar.parent / samples_name(parse_shard_index(tar.name))
    except ValueError:
        return None
    if not rows_path.is_file():
        return None
    accepted = [row for row in read_sample_rows(rows_path) if row["status"] == "accepted"]
    if not accepted or any(row["sha256"] is None for row in accepted):
        return None
    return {row["key"]: row["sha256"] for row in accepted}


def verify_dir(shards, progress: bool = True, quick: bool = False) -> VerifyReport:
    """Verify a shard set (any form of :func:`datagen.format.shardset.resolve_shard_set`, local or
    by URL); never raises for bad data. Each shard is checked against its manifest entry when its
    manifest lists it; for a manifest's whole set, the fingerprint is recomputed from the checksums
    and sample counts measured on disk and compared with the manifest's. ``quick``: only that each
    listed shard exists with its recorded size, and that the manifest's fingerprint is that of its
    shard list (no byte is read: for a remote set, a check in seconds)."""
    report = VerifyReport()
    try:
        found = resolve_shard_set(shards)
    except (ValueError, OSError) as error:
        report.problems.append(str(error))
        return report
    if found.manifest is not None and isinstance(found.manifest.get("versions"), dict):
        report.versions = version_differences(found.manifest["versions"])
    if quick:
        return _quick(found, report)
    if found.manifest is None:
        report.notes.append(f"{found.spec}: no {MANIFEST_NAME} beside the shards: sizes, checksums and "
                            "counts not checked, only the samples themselves")
    elif not found.whole:
        report.notes.append(f"{found.spec}: {len(found.tars)} shard(s) of the set in {found.manifest_path} "
                            "checked against its entries; the set's fingerprint needs the whole set")
    entries = [found.entry(tar) for tar in found.tars]
    total = found.declared_samples
    measured = []
    with tqdm(total=total, unit="sample", desc="verify", disable=not progress, file=sys.stderr) as bar:
        for tar, entry in zip(found.tars, entries):
            report.shards += 1
            problems, digest, samples = verify_shard(tar, entry, report, bar.update)
            report.problems += problems
            measured.append({"name": tar.name, "sha256": digest, "samples": samples})
    if found.manifest is not None and found.manifest_path is not None:
        for tar, entry in zip(found.tars, entries):
            if entry is None:
                report.problems.append(f"{tar.name}: not listed in {found.manifest_path}")
    if found.whole:
        manifest = found.manifest
        if report.samples != manifest.get("n_samples", report.samples):
            report.problems.append(f"manifest says {manifest['n_samples']} samples, found {report.samples}")
        if fingerprint(manifest["config_hash"], manifest["shards"]) != manifest["fingerprint"]:
            report.problems.append(f"{found.manifest_path}: its fingerprint does not match its shard list")
        on_disk = fingerprint(manifest["config_hash"], measured)
        if on_disk != manifest["fingerprint"]:
            report.problems.append(f"the shards on disk have fingerprint {on_disk[:12]}, the manifest says "
                                   f"{manifest['fingerprint'][:12]}")
        else:
            report.fingerprint = on_disk
    return report


def _quick(found, report: VerifyReport) -> VerifyReport:
    """``--quick``: sizes and the manifest only."""
    report.quick = True
    if found.manifest is None:
        report.problems.append(f"{found.spec}: no {MANIFEST_NAME} beside the shards: --quick has nothing to "
                               "check against")
        return report
    for tar in found.tars:
        report.shards += 1
        entry = found.entry(tar)
        if entry is None:
            report.problems.append(f"{tar.name}: not listed in {found.manifest_path}")
            continue
        try:
            size = tar.stat().st_size if tar.is_file() else None
        except (OSError, ValueError) as error:
            report.problems.append(f"{tar.name}: cannot reach it ({error})")
            continue
        if size is None:
            report.problems.append(f"{tar.name}: missing")
        elif size != entry["bytes"]:
            report.problems.append(f"{tar.name}: {size} bytes, manifest says {entry['bytes']}")
    if found.whole:
        manifest = found.manifest
        if fingerprint(manifest["config_hash"], manifest["shards"]) != manifest["fingerprint"]:
            report.problems.append(f"{found.manifest_path}: its fingerprint does not match its shard list")
    report.notes.append("--quick: sizes and the manifest checked; checksums and samples not read")
    return report


def verify_shard(path: Path, entry: dict | None, report: VerifyReport,
                 advance=lambda n: None) -> tuple[list[str], str | None, int]:
    """(problems, sha256, samples) of one shard ``path``, measured on disk and checked against its
    manifest ``entry`` (name, bytes, sha256, samples) when there is one."""
    name = path.name
    if not path.is_file():
        return [f"{name}: missing"], None, 0
    problems = []
    try:
        recorded = recorded_sample_checksums(path)
    except ManifestError as error:
        problems.append(f"{name}: {error}")
        recorded = None
    size = path.stat().st_size
    if entry is not None and size != entry["bytes"]:
        problems.append(f"{name}: {size} bytes, manifest says {entry['bytes']}")
    digest = sha256_file(path)
    if entry is not None and digest != entry["sha256"]:
        problems.append(f"{name}: sha256 {digest[:12]} differs from the manifest's {entry['sha256'][:12]}")
    keys = set()
    damaged, read_to_end = 0, False
    try:
        for members in iter_tar_samples(path):
            key = members.get("__key__", "?")
            report.samples += 1
            advance(1)
            if key in keys:
                problems.append(f"{name}: sample {key}: duplicate key")
            keys.add(key)
            if recorded is not None:
                mismatches = [f"{name}: sample {key}: {p}" for p in _checksum_problems(members, recorded)]
                damaged += len(mismatches)
                problems += mismatches
            try:
                sample = decode_sample(members)
            except SchemaError as error:
                problems.append(f"{name}: {error}")
                continue
            try:
                problems += [f"{name}: sample {key}: {p}" for p in check_sample_grids(sample)]
            except Exception as error:  # noqa: BLE001 - malformed warps in the JSON: reported, not raised
                problems.append(f"{name}: sample {key}: its grids cannot be recomputed from its JSON "
                                f"({type(error).__name__}: {error})")
        read_to_end = True
    except ShardError as error:
        problems.append(f"{name}: unreadable tar: {error}")
    if entry is not None and len(keys) != entry["samples"]:
        problems.append(f"{name}: {len(keys)} samples, manifest says {entry['samples']}")
    if recorded is not None and read_to_end:
        absent = sorted(set(recorded) - keys)
        if absent:
            problems.append(f"{name}: {len(absent)} recorded sample(s) not in the tar: {', '.join(absent[:3])}"
                            f"{' ...' if len(absent) > 3 else ''}")
        if entry is not None and digest != entry["sha256"] and not damaged and not absent:
            problems.append(f"{name}: every sample matches its recorded checksum: the changed bytes are in "
                            f"the tar's headers or padding, not in sample data")
    return problems, digest, len(keys)


def _checksum_problems(members: dict, recorded: dict) -> list[str]:
    """Problems of one raw sample against the checksums its build recorded ({key: sha256})."""
    expected = recorded.get(members["__key__"])
    if expected is None:
        return ["not among the samples its build recorded"]
    if sample_sha256(members) != expected:
        return ["its bytes differ from the checksum recorded when it was written"]
    return []
