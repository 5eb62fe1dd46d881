"""What of a build is already on disk: which shards are finished (and may be kept), whether
``--out`` holds shards of another build, and the leftovers of a killed one.

A shard is finished when its stats marker is there, comes from this build (same config hash,
root seed and inputs checksum: :class:`BuildIdentity`) and agrees with the tar's own bytes. So
re-running a command after a crash rebuilds only the missing shards, and a larger ``n`` adds
shards (and refills a last, partial one).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datagen.format.hashing import sha256_file
from datagen.format.manifest import read_stats, stats_name
from datagen.format.shards import parse_shard_index, shard_name
from datagen.runner.errors import BuildError


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


def shard_is_done(out: Path, shard: int, count: int, identity: BuildIdentity, log=None) -> dict | None:
    """The shard's stats if it is complete for this build (marker present, same build and
    count, and the tar's own bytes: its size and sha256 as the stats record them), else None.
    ``log`` hears of a shard whose bytes changed after it was written (it is rebuilt)."""
    stats = read_stats(out / stats_name(shard))
    tar = out / shard_name(shard)
    if stats is None or not tar.is_file():
        return None
    if not (identity.made(stats) and stats["samples"] == count):
        return None
    if tar.stat().st_size != stats["bytes"] or sha256_file(tar) != stats["sha256"]:
        if log is not None:
            log(f"{tar.name}: its bytes differ from the checksum recorded when it was written; rebuilding it")
        return None
    return stats


def finished_shards(out: Path, shards: list[tuple[int, int]], identity: BuildIdentity, log=None) -> dict[int, dict]:
    """{shard index: stats} of the planned ``(index, count)`` shards that are done."""
    return {k: stats for k, count in shards if (stats := shard_is_done(out, k, count, identity, log)) is not None}


def check_out_dir(out: Path, identity: BuildIdentity, overwrite: bool) -> None:
    """Refuse to mix shards of another config, seed or inputs into ``out`` unless ``overwrite``."""
    for path in sorted(out.glob("shard-*.stats.json")):
        stats = read_stats(path)
        if stats is None or overwrite:
            continue
        if not identity.made(stats):
            theirs = stats.get("inputs_sha256")
            raise BuildError(
                f"{out} holds shards of another build ({path.name}: config {stats['config_hash'][:12]}, "
                f"seed {stats.get('root_seed')}, annotations {str(theirs)[:12]}; "
                f"this build: config {identity.config_hash[:12]}, seed {identity.root_seed}, "
                f"annotations {str(identity.inputs_sha256)[:12]}). Use another --out, or --overwrite to replace them.")


def shards_beyond(out: Path, n_shards: int) -> list[str]:
    """Names of the shard tars in ``out`` past the first ``n_shards`` (of a larger earlier build)."""
    return sorted(p.name for p in out.glob("shard-*.tar") if parse_shard_index(p.name) >= n_shards)


def remove_leftovers(out: Path) -> None:
    """Remove the temporary files of shards that a killed build left (no other writer can exist
    while the lock is held)."""
    for path in [*out.glob("shard-*.tmp"), out / "manifest.json.tmp"]:
        path.unlink(missing_ok=True)
