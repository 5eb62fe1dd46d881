"""What of a build is already in its output: which shards are finished (and may be kept), whether
the output holds shards of another build, and the leftovers of a killed one.

The output is a local folder (a ``Path``) or a store (a :class:`~datagen.format.storage.Store`,
``--out s3://...``); every check is the same for both. A shard is finished when its stats marker
is there, comes from this build (same config hash, root seed and inputs checksum:
:class:`BuildIdentity`) and agrees with the tar's own bytes: its size, and its sha256 recomputed
from the stored tar (a store's tar is read back from the store, streamed, not trusted from its
listing). So re-running a command after a crash rebuilds only the missing or damaged shards, and
a larger ``n`` adds shards (and refills a last, partial one).

A store is queried from :data:`STORE_THREADS` threads at once (each check waits on the network).
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from datagen.format.hashing import sha256_file
from datagen.format.manifest import STATS_KEYS, read_stats, stats_name
from datagen.format.shards import parse_shard_index, shard_name
from datagen.format.storage import Store
from datagen.runner.errors import BuildError

STORE_THREADS = 8
"""Shards of a store checked at once."""
MAX_STATS_BYTES = 1 << 20
"""Largest stats marker read from a store (one is well under a kilobyte)."""


@dataclass(frozen=True)
class BuildIdentity:
    """What makes shards of two runs interchangeable: the config hash, the root seed and the
    inputs checksum (:func:`datagen.runner.inputs.inputs_checksum`)."""

    config_hash: str
    root_seed: int
    inputs_sha256: str | None = None

    def made(self, stats: dict) -> bool:
        """Whether a shard's stats come from this build."""
        return (stats["config_hash"] == self.config_hash and stats.get("root_seed") == self.root_seed
                and stats.get("inputs_sha256") == self.inputs_sha256)


def _names(out: Path | Store, pattern: str) -> list[str]:
    if isinstance(out, Store):
        return out.names(pattern)
    return sorted(p.name for p in out.glob(pattern))


def _stats(out: Path | Store, name: str) -> dict | None:
    """The stats marker ``name`` of ``out``, or None (as :func:`~datagen.format.manifest.read_stats`)."""
    if not isinstance(out, Store):
        return read_stats(out / name)
    try:
        data = out.read(name, MAX_STATS_BYTES)
        stats = None if data is None else json.loads(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(stats, dict) or any(key not in stats for key in STATS_KEYS):
        return None
    return stats


def _map(out: Path | Store, function, items: list) -> list:
    """``[function(item) for item in items]``, on threads for a store."""
    if not isinstance(out, Store) or len(items) < 2:
        return [function(item) for item in items]
    with ThreadPoolExecutor(min(STORE_THREADS, len(items))) as pool:
        return list(pool.map(function, items))


def _tar_differs(out: Path | Store, name: str, stats: dict) -> bool | None:
    """Whether the tar ``name`` differs from its stats' size or sha256; None when it is missing."""
    if isinstance(out, Store):
        size = out.size(name)
        if size is None:
            return None
        if size != stats["bytes"]:
            return True
        try:
            return out.sha256(name) != (stats["sha256"], size)
        except FileNotFoundError:
            return None
    tar = out / name
    if not tar.is_file():
        return None
    return tar.stat().st_size != stats["bytes"] or sha256_file(tar) != stats["sha256"]


def shard_is_done(out: Path | Store, shard: int, count: int, identity: BuildIdentity, log=None) -> dict | None:
    """The shard's stats if it is complete for this build (marker present, same build and
    count, and the tar's own bytes: its size and sha256 as the stats record them), else None.
    ``log`` hears of a shard whose bytes changed after it was written (it is rebuilt)."""
    stats = _stats(out, stats_name(shard))
    if stats is None or not (identity.made(stats) and stats["samples"] == count):
        return None
    name = shard_name(shard)
    differs = _tar_differs(out, name, stats)
    if differs is None:
        return None
    if differs:
        if log is not None:
            where = out.url_of(name) if isinstance(out, Store) else name
            log(f"{where}: its bytes differ from the checksum recorded when it was written; rebuilding it")
        return None
    return stats


def finished_shards(out: Path | Store, shards: list[tuple[int, int]], identity: BuildIdentity,
                    log=None) -> dict[int, dict]:
    """{shard index: stats} of the planned ``(index, count)`` shards that are done."""
    if isinstance(out, Store):
        present = set(out.names("shard-*.stats.json"))
        shards = [(k, count) for k, count in shards if stats_name(k) in present]
        if shards and log is not None:
            log(f"{out}: checking the {len(shards)} shard(s) already there (each read back and hashed) ...")
    found = _map(out, lambda shard: shard_is_done(out, shard[0], shard[1], identity, log), shards)
    return {k: stats for (k, _), stats in zip(shards, found) if stats is not None}


def check_out_dir(out: Path | Store, identity: BuildIdentity, overwrite: bool) -> None:
    """Refuse to mix shards of another config, seed or inputs into ``out`` unless ``overwrite``."""
    if overwrite:
        return
    names = _names(out, "shard-*.stats.json")
    for name, stats in zip(names, _map(out, lambda name: _stats(out, name), names)):
        if stats is None:
            continue
        if not identity.made(stats):
            theirs = stats.get("inputs_sha256")
            raise BuildError(
                f"{out} holds shards of another build ({name}: config {stats['config_hash'][:12]}, "
                f"seed {stats.get('root_seed')}, annotations {str(theirs)[:12]}; "
                f"this build: config {identity.config_hash[:12]}, seed {identity.root_seed}, "
                f"annotations {str(identity.inputs_sha256)[:12]}). Use another --out, or --overwrite to replace them.")


def shards_beyond(out: Path | Store, n_shards: int) -> list[str]:
    """Names of the shard tars in ``out`` past the first ``n_shards`` (of a larger earlier build)."""
    return [name for name in _names(out, "shard-*.tar") if parse_shard_index(name) >= n_shards]


def remove_leftovers(out: Path) -> None:
    """Remove the temporary files of shards that a killed build left in a local ``out`` (no other
    writer can exist while the lock is held)."""
    for path in [*out.glob("shard-*.tmp"), out / "manifest.json.tmp"]:
        path.unlink(missing_ok=True)
