"""``datagen publish`` and ``datagen pull``: a shard set copied to a store (``s3://``, ``gs://``,
``file://``) and back, through fsspec, with its manifest last.

Publishing checks each shard's sha256 against the manifest before it leaves, uploads the shards,
then the per-shard tables, then the manifest, so a reader that finds the manifest finds a
complete set; it records the set in a catalog (``manifests/<name>-<fingerprint>.published.json``:
URL, fingerprint, sample and shard counts). Pulling downloads the files the manifest lists into
a folder (each through ``<name>.tmp`` and a rename), hashes every shard as it arrives, recomputes
the fingerprint from those hashes, and writes the manifest last. Only the manifest's own plain
file names are copied, so a manifest cannot make either command touch a file outside its set.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from datagen.format.atomic import atomic_write, atomic_write_bytes
from datagen.format.hashing import sha256_file
from datagen.format.manifest import MANIFEST_NAME, fingerprint, load_manifest
from datagen.format.shardset import ShardSet, resolve_shard_set
from datagen.format.storage import Store, copy_hashed, is_url, location


@dataclass
class TransferReport:
    """What a publish or pull did: files and bytes copied, the set's fingerprint, problems."""

    files: int = 0
    bytes: int = 0
    fingerprint: str | None = None
    problems: list = field(default_factory=list)
    catalog: Path | None = None


def set_files(found: ShardSet) -> list[str]:
    """The plain file names of a whole set in copy order: each shard, then each shard's sample rows
    and stats (when its entry names them), the manifest last. ValueError for a name that is not a
    plain file name."""
    shards, tables = [], []
    for entry in found.manifest["shards"]:
        shards.append(entry["name"])
        tables += [entry[key] for key in ("samples_file", "stats_file") if entry.get(key)]
    for name in shards + tables:
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError(f"{found.manifest_path}: {name!r} is not a plain file name of the set")
    return shards + tables + [MANIFEST_NAME]


def _whole_set(spec) -> ShardSet:
    found = resolve_shard_set(spec)
    if not found.whole or found.manifest is None:
        raise ValueError(f"{spec}: name a whole set (its folder or its {MANIFEST_NAME}), not single shards")
    found.fingerprint  # noqa: B018 - refuses a manifest whose fingerprint is not its shard list's
    return found


def publish(folder, url: str, catalog_dir="manifests", progress: bool = True) -> TransferReport:
    """Upload the set in local ``folder`` to ``url``; returns what was sent. Raises ValueError before
    uploading anything when a shard's bytes differ from its manifest entry."""
    if is_url(folder):
        raise ValueError(f"{folder}: publish uploads a local set; pull it first")
    found = _whole_set(folder)
    store = Store(url)
    names = set_files(found)
    source = Path(found.manifest_path).parent
    for entry in found.manifest["shards"]:
        digest = sha256_file(source / entry["name"])
        if digest != entry["sha256"]:
            raise ValueError(f"{source / entry['name']}: sha256 {digest[:12]} differs from the manifest's "
                             f"{entry['sha256'][:12]}; run datagen verify, rebuild, then publish")
    report = TransferReport(fingerprint=found.fingerprint)
    total = sum((source / name).stat().st_size for name in names)
    with tqdm(total=total, unit="B", unit_scale=True, desc="publish", disable=not progress, file=sys.stderr) as bar:
        for name in names:
            size = store.put(source / name, name)  # checks the size the store holds
            report.files += 1
            report.bytes += size
            bar.update(size)
    if catalog_dir is not None:
        record = {"url": url.rstrip("/"), "fingerprint": found.fingerprint, "n_samples": found.manifest["n_samples"],
                  "shards": len(found.manifest["shards"]), "config_hash": found.manifest["config_hash"]}
        path = Path(catalog_dir) / f"{source.resolve().name}-{found.fingerprint[:12]}.published.json"
        report.catalog = atomic_write_bytes(path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return report


def _download(url: str, local: Path, bar) -> tuple[str, int]:
    """Copy ``url`` to ``local`` atomically; returns (sha256, bytes) of what arrived."""
    copied = []
    atomic_write(local, lambda handle: copied.append(copy_hashed(url, handle, bar.update)))
    return copied[0]


def pull(url: str, folder, progress: bool = True) -> TransferReport:
    """Download the set at ``url`` into ``folder`` and check every shard's sha256 as it arrives;
    the manifest is written last, and only when every shard matches (a rerun fetches again).
    ``folder`` is locked for the pull (its ``.build.lock``, as a build's): a second pull or a
    build into it stops at once naming this one (:class:`~datagen.runner.lock.LockedError`)."""
    from datagen.runner.lock import OutputLock

    found = _whole_set(url)
    folder = Path(folder)
    with OutputLock(folder, "datagen pull", option="FOLDER"):
        return _pull_locked(url, found, folder, progress)


def _pull_locked(url: str, found: ShardSet, folder: Path, progress: bool) -> TransferReport:
    manifest_url = str(found.manifest_path)
    base = manifest_url.rsplit("/", 1)[0]
    if (folder / MANIFEST_NAME).is_file():
        present = load_manifest(folder / MANIFEST_NAME)
        if present.get("fingerprint") != found.fingerprint:
            raise ValueError(f"{folder} holds another set ({str(present.get('fingerprint'))[:12]}); pull into an "
                             f"empty folder")
    names = set_files(found)
    entries = {entry["name"]: entry for entry in found.manifest["shards"]}
    report = TransferReport()
    total = sum(entry["bytes"] for entry in entries.values())
    measured = []
    with tqdm(total=total, unit="B", unit_scale=True, desc="pull", disable=not progress, file=sys.stderr) as bar:
        for name in names[:-1]:
            digest, size = _download(f"{base}/{name}", folder / name, bar)
            report.files += 1
            report.bytes += size
            entry = entries.get(name)
            if entry is None:
                continue
            measured.append({"name": name, "sha256": digest, "samples": entry["samples"]})
            if digest != entry["sha256"] or size != entry["bytes"]:
                report.problems.append(f"{url.rstrip('/')}/{name}: sha256 {digest[:12]} ({size} bytes) differs from "
                                       f"the manifest's {entry['sha256'][:12]} ({entry['bytes']} bytes)")
    report.fingerprint = fingerprint(found.manifest["config_hash"], measured)
    if report.problems:
        return report
    original = location(manifest_url).read_bytes()
    if json.loads(original) != found.manifest:
        report.problems.append(f"{manifest_url}: the manifest changed while the set was pulled; pull again")
        return report
    atomic_write_bytes(folder / MANIFEST_NAME, original)
    report.files += 1
    return report
