"""``datagen verify --rebuild-check N``: rebuild a few shards of a set from its recorded config,
seed and inputs, and compare their bytes with the set's.

A fingerprint says that two copies of a set hold the same bytes; a rebuild check says whether
this machine can *make* those bytes. It needs what the build read: the set's ``bank/`` beside its
shards (the segment bank) and the images at the manifest's ``image_root`` (and, for a stylised
set, the same style images and weights). Package versions that differ from the manifest's are
named with what they decide, so a team knows whether it can reproduce another team's set or
only verify it.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from datagen.config import BuildConfig
from datagen.format.hashing import config_hash, sha256_file
from datagen.format.manifest import version_differences
from datagen.format.shards import iter_tar_samples, parse_shard_index, sample_sha256
from datagen.format.shardset import resolve_shard_set
from datagen.format.storage import is_url


@dataclass
class RebuildReport:
    """Which shards were rebuilt, which came out identical, and what differed."""

    rebuilt: list = field(default_factory=list)
    identical: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    versions: list = field(default_factory=list)


def pick_shards(count: int, wanted: int) -> list[int]:
    """``wanted`` shard positions spread evenly over ``count`` (the first and the last included)."""
    if wanted >= count:
        return list(range(count))
    if wanted == 1:
        return [0]
    return sorted({round(i * (count - 1) / (wanted - 1)) for i in range(wanted)})


def first_difference(rebuilt: Path, stored: Path) -> str:
    """Where two shards first differ: the sample key and field, or the sample count."""
    try:
        ours, theirs = list(iter_tar_samples(rebuilt)), list(iter_tar_samples(stored))
    except Exception as error:  # noqa: BLE001 - a broken stored shard is described, not raised
        return f"one of them cannot be read ({error})"
    for mine, other in zip(ours, theirs):
        if sample_sha256(mine) != sample_sha256(other):
            fields = sorted(name for name in set(mine) | set(other)
                            if name != "__key__" and mine.get(name) != other.get(name))
            return f"first at sample {other.get('__key__')} ({', '.join(fields) or 'its key'})"
    return f"{len(ours)} samples rebuilt, {len(theirs)} stored" if len(ours) != len(theirs) else "in the tar headers"


def rebuild_check(shards, count: int = 2, style=None, log=lambda message: None) -> RebuildReport:
    """Rebuild ``count`` shards of the local whole set ``shards`` into a temporary folder and compare
    them with the stored ones. ``style``: a :class:`~datagen.runner.styling.StyleSpec` for a
    stylised set (its style images and weights). ValueError when the set cannot be rebuilt here
    (a remote set, no bank beside it, no images at the recorded root)."""
    from datagen.runner.styling import StyleSpec
    from datagen.runner.task import ShardTask

    found = resolve_shard_set(shards)
    if not found.whole or found.manifest is None or is_url(found.manifest_path):
        raise ValueError(f"{shards}: --rebuild-check needs a whole local set (its folder or manifest.json); "
                         "pull a remote set first")
    manifest = found.manifest
    folder = Path(found.manifest_path).parent
    report = RebuildReport(versions=version_differences(manifest.get("versions") or {}))
    config = BuildConfig.from_dict(manifest["config"])
    if config_hash(config) != manifest["config_hash"]:
        raise ValueError(f"{found.manifest_path}: this datagen reads its config with another hash "
                         f"({config_hash(config)[:12]}, recorded {manifest['config_hash'][:12]}): a rebuild "
                         "here cannot reproduce it")
    inputs = manifest.get("inputs") or {}
    bank, image_root = folder / "bank", Path(str(inputs.get("image_root", "")))
    if not (bank / "bank.json").is_file():
        raise ValueError(f"{bank}: no segment bank beside the shards; a rebuild needs the bank the set was built from")
    if not image_root.is_dir():
        raise ValueError(f"{image_root}: the images the set was built from (the manifest's image_root) are not here")
    entries = manifest["shards"]
    with tempfile.TemporaryDirectory(prefix="rebuild-check-") as tmp:
        for position in pick_shards(len(entries), count):
            entry = entries[position]
            index = parse_shard_index(entry["name"])
            log(f"rebuilding {entry['name']} ({entry['samples']} samples)")
            task = ShardTask(index, int(entry["samples"]), config, str(bank), str(image_root),
                             int(manifest["root_seed"]), tmp, inputs.get("inputs_sha256"), style or StyleSpec())
            task()
            rebuilt = Path(tmp) / entry["name"]
            report.rebuilt.append(entry["name"])
            if sha256_file(rebuilt) == entry["sha256"]:
                report.identical.append(entry["name"])
            else:
                report.problems.append(f"{entry['name']}: rebuilt bytes differ from the set's, "
                                       f"{first_difference(rebuilt, folder / entry['name'])}")
    return report
