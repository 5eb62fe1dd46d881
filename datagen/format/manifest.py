"""Per-sample parquet rows, the per-shard stats marker, and the manifest of a shard set.

For shard ``k`` a build writes, in this order:

1. ``shard-00000k.tar``              the samples (:class:`datagen.format.shards.ShardWriter`)
2. ``shard-00000k.samples.parquet``  one row per attempt, accepted or rejected
3. ``shard-00000k.stats.json``       the commit marker: written last, so a shard whose stats
                                     file reads back is complete

``manifest.json`` then sums up all shards. It holds no timestamps, host names or command
lines: the same build gives the same manifest bytes (package versions aside).
Every file is written atomically (:func:`datagen.format.atomic.atomic_write_bytes`: ``<name>.tmp``,
fsync, rename).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import io
import json
import platform
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from datagen.format.atomic import atomic_write_bytes
from datagen.format.hashing import canonical_json
from datagen.format.hashing import config_hash as compute_config_hash
from datagen.format.schema import SCHEMA_VERSION
from datagen.format.shards import shard_name
from datagen.format.storage import is_url, location, read_limited

MANIFEST_NAME = "manifest.json"
MAX_ROWS_BYTES = 256 << 20
"""Largest ``*.samples.parquet`` read (a shard of 10k attempts takes about a megabyte)."""
MAX_MANIFEST_BYTES = 64 << 20
"""Largest manifest read (a set of a million pairs in 1000 shards has a manifest of about 300 KB)."""
STATUSES = ("accepted", "rejected")
STATS_KEYS = ("shard", "name", "samples", "attempted", "rejected", "bytes", "sha256",
              "config_hash", "schema_version")

SAMPLE_ROWS_SCHEMA = pa.schema([
    pa.field("shard", pa.int32(), nullable=False),
    pa.field("attempt", pa.int32(), nullable=False),
    pa.field("key", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("reason", pa.string()),
    pa.field("objects", pa.int8()),
    pa.field("source_image_id", pa.int64()),
    pa.field("background_image_id", pa.int64()),
    pa.field("segment_ids", pa.list_(pa.int64())),
    pa.field("category_ids", pa.list_(pa.int32())),
    pa.field("seed", pa.string()),
    pa.field("bytes", pa.int64(), nullable=False),
    pa.field("sha256", pa.string()),
])
"""One row per attempt of a shard. ``key`` is null and ``bytes`` 0 for rejected attempts;
``reason`` is null for accepted ones. ``sha256`` is the accepted sample's checksum
(:func:`datagen.format.shards.sample_sha256`, null for rejected attempts and in sets built before it
was recorded): ``datagen verify`` names the sample whose bytes changed. ``seed`` is a readable string such as
``"root=0 shard=3 attempt=17"``."""

# Fixed writer options: the same rows give the same parquet bytes (with one pyarrow version).
_PARQUET_OPTIONS = dict(compression="zstd", compression_level=3, use_dictionary=True,
                        write_statistics=True, version="2.6", data_page_version="1.0",
                        row_group_size=1 << 20)


class ManifestError(ValueError):
    """A manifest (or stats file) is missing or invalid; the message names the file."""


def _json_bytes(data) -> bytes:
    return (json.dumps(data, sort_keys=True, indent=2, ensure_ascii=True) + "\n").encode()


def _shard_stem(shard_index: int) -> str:
    return shard_name(shard_index)[: -len(".tar")]


# -- per-sample rows ---------------------------------------------------------------------------

def samples_name(shard_index: int) -> str:
    """``samples_name(12) == "shard-000012.samples.parquet"``."""
    return _shard_stem(shard_index) + ".samples.parquet"


def _check_row(index: int, row: dict) -> None:
    where = f"sample row {index} (shard {row.get('shard')}, attempt {row.get('attempt')})"
    unknown = set(row) - set(SAMPLE_ROWS_SCHEMA.names)
    if unknown:
        raise ValueError(f"{where}: unknown columns {sorted(unknown)}")
    status = row.get("status")
    if status not in STATUSES:
        raise ValueError(f"{where}: status must be one of {STATUSES}, got {status!r}")
    if status == "accepted" and (row.get("key") is None or row.get("reason") is not None):
        raise ValueError(f"{where}: an accepted row needs a key and no reason")
    if status == "rejected" and (row.get("key") is not None or not row.get("reason")
                                 or row.get("sha256") is not None):
        raise ValueError(f"{where}: a rejected row needs a reason, and no key or checksum")


def sample_rows_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts with the columns of SAMPLE_ROWS_SCHEMA; missing optional ones are null) -> Table."""
    rows = [dict(row) for row in rows]
    for index, row in enumerate(rows):
        row.setdefault("bytes", 0)
        _check_row(index, row)
    try:
        return pa.Table.from_pylist(rows, schema=SAMPLE_ROWS_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise ValueError(f"sample rows do not fit SAMPLE_ROWS_SCHEMA: {error}") from error


def write_sample_rows(rows: list[dict], path) -> Path:
    """Write the rows of one shard as parquet, deterministically and atomically."""
    table = sample_rows_table(rows)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **_PARQUET_OPTIONS)
    return atomic_write_bytes(path, sink.getvalue().to_pybytes())


def read_sample_rows(path) -> list[dict]:
    """Read a ``*.samples.parquet`` file back as a list of row dicts (``sha256`` None in files
    written before it was recorded)."""
    try:
        table = pq.read_table(io.BytesIO(read_limited(path, MAX_ROWS_BYTES)))
        if "sha256" not in table.column_names:
            table = table.append_column("sha256", pa.nulls(len(table), pa.string()))
        return table.select(SAMPLE_ROWS_SCHEMA.names).cast(SAMPLE_ROWS_SCHEMA).to_pylist()
    except (OSError, ValueError, KeyError, pa.ArrowException) as error:
        raise ManifestError(f"{path}: unreadable sample rows: {error}") from error


# -- per-shard stats (the commit marker) ----------------------------------------------------------

def stats_name(shard_index: int) -> str:
    """``stats_name(12) == "shard-000012.stats.json"``."""
    return _shard_stem(shard_index) + ".stats.json"


def make_stats(*, shard_index: int, samples: int, attempted: int, rejected: dict, bytes: int,
               sha256: str, config_hash: str, **extra) -> dict:
    """The stats dict of one shard, with the file names and schema version filled in."""
    stats = dict(extra)
    stats.update(shard=int(shard_index), name=shard_name(shard_index), samples=int(samples),
                 attempted=int(attempted), rejected={str(k): int(v) for k, v in sorted(rejected.items())},
                 bytes=int(bytes), sha256=sha256, config_hash=config_hash,
                 schema_version=SCHEMA_VERSION, samples_file=samples_name(shard_index),
                 stats_file=stats_name(shard_index))
    return stats


def write_stats(path, stats: dict) -> Path:
    """Write a shard's stats JSON atomically. Call it LAST for a shard: it marks the shard done."""
    missing = [key for key in STATS_KEYS if key not in stats]
    if missing:
        raise ValueError(f"{path}: stats lack keys {missing}")
    return atomic_write_bytes(path, _json_bytes(stats))


def read_stats(path) -> dict | None:
    """The stats dict, or None when the file is missing, unreadable, not JSON or lacks keys."""
    try:
        stats = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(stats, dict) or any(key not in stats for key in STATS_KEYS):
        return None
    return stats


# -- versions and fingerprint -------------------------------------------------------------------

_PACKAGES = {
    "numpy": (("numpy",), "numpy"),
    "opencv": (("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless",
                "opencv-contrib-python"), "cv2"),
    "pycocotools": (("pycocotools",), "pycocotools"),
    "pyarrow": (("pyarrow",), "pyarrow"),
    "scipy": (("scipy",), "scipy"),  # its FFTs solve the Poisson blend: the image bytes depend on it
    "torch": (("torch",), "torch"),
    "datagen": (("segswap", "datagen"), "datagen"),
}
BYTES_DEPEND_ON = {
    "python": "no known effect on the bytes",
    "numpy": "random draws and array maths: where segments go and their pixels",
    "opencv": "JPEG and PNG coding, resizing, warping and blending: image and mask bytes",
    "pycocotools": "polygon rasterisation: the segment masks",
    "pyarrow": "the parquet tables' bytes only (not the shards, not the fingerprint)",
    "scipy": "the Poisson blend's FFTs: the blended pixels",
    "torch": "AdaIN's stylised images and LOST's masks (not the pairs of an unstylised COCO build)",
    "datagen": "the generator itself: any of the pairs",
}
"""What each recorded package decides in a set's bytes, for telling a user whether a set can be
rebuilt here byte for byte or only verified."""


def _version(distributions: tuple, module: str) -> str | None:
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:  # noqa: BLE001 - a missing or broken package is recorded as None
        return None


def package_versions() -> dict:
    """{"python": "3.11.9", "numpy": ..., "opencv": ..., ...}; None for a missing package."""
    versions = {"python": platform.python_version()}
    for label, (distributions, module) in _PACKAGES.items():
        versions[label] = _version(distributions, module)
    return versions


def version_differences(recorded: dict, current: dict | None = None) -> list[str]:
    """One line per package whose version in a manifest's ``versions`` (``recorded``) differs from
    this machine's (``current``, default :func:`package_versions`), saying what that changes."""
    current = package_versions() if current is None else current
    lines = []
    for name in sorted(set(recorded) | set(current)):
        if name in recorded and recorded.get(name) != current.get(name):
            effect = BYTES_DEPEND_ON.get(name, "unknown effect on the bytes")
            lines.append(f"{name} {recorded.get(name)} in the set, {current.get(name)} here: {effect}")
    return lines


def fingerprint(config_hash: str, shards: list[dict]) -> str:
    """sha256 of the schema version, config hash and sorted (name, sha256, samples) of all shards.

    Independent of the order of ``shards``; changes when any shard's bytes change.
    """
    entries = sorted([str(s["name"]), str(s["sha256"]), int(s["samples"])] for s in shards)
    payload = {"schema_version": SCHEMA_VERSION, "config_hash": config_hash, "shards": entries}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


# -- manifest -----------------------------------------------------------------------------------

def _datagen_version() -> str:
    import datagen

    return str(getattr(datagen, "__version__", "unknown"))


def build_manifest(*, config, root_seed: int, inputs: dict, shard_stats: list[dict],
                   n_requested: int) -> dict:
    """The manifest dict of a shard set from its config (a config dataclass with ``to_dict()``, a
    :class:`datagen.config.BuildConfig`) and the stats of every shard.

    Raises ValueError when two stats name the same shard, or a shard was built with another
    config or schema version.
    """
    chash = compute_config_hash(config)
    seen: set[int] = set()
    for stats in shard_stats:
        name = stats.get("name", stats.get("shard"))
        if stats["shard"] in seen:
            raise ValueError(f"shard {name} appears twice in the shard stats")
        seen.add(stats["shard"])
        if stats["config_hash"] != chash:
            raise ValueError(f"shard {name} was built with config {stats['config_hash'][:12]}, "
                             f"this build's config is {chash[:12]}")
        if stats["schema_version"] != SCHEMA_VERSION:
            raise ValueError(f"shard {name} has schema version {stats['schema_version']}, "
                             f"expected {SCHEMA_VERSION}")
    ordered = sorted(shard_stats, key=lambda s: int(s["shard"]))
    shards = [{
        "name": s["name"],
        "samples": int(s["samples"]),
        "bytes": int(s["bytes"]),
        "sha256": s["sha256"],
        "samples_file": s.get("samples_file", samples_name(int(s["shard"]))),
        "stats_file": s.get("stats_file", stats_name(int(s["shard"]))),
    } for s in ordered]
    rejected: dict[str, int] = {}
    for stats in ordered:
        for reason, count in stats["rejected"].items():
            rejected[reason] = rejected.get(reason, 0) + int(count)
    version = _datagen_version()
    return {
        "schema_version": SCHEMA_VERSION,
        "datagen_version": version,
        "created_by": f"datagen {version}",
        "config": json.loads(canonical_json(config.to_dict())),  # tuples -> lists, as loaded back
        "config_hash": chash,
        "root_seed": int(root_seed),
        "inputs": json.loads(json.dumps(inputs, sort_keys=True, default=str)),
        "versions": package_versions(),
        "n_requested": int(n_requested),
        "n_samples": sum(s["samples"] for s in shards),
        "n_attempted": sum(int(s["attempted"]) for s in ordered),
        "rejected": dict(sorted(rejected.items())),
        "shards": shards,
        "fingerprint": fingerprint(chash, shards),
    }


def write_manifest(manifest: dict, out_dir, copies_dir=None) -> Path:
    """Write ``out_dir/manifest.json`` (and ``copies_dir/<out_dir name>-<fingerprint[:12]>.json``).

    Returns the path of ``out_dir/manifest.json``.
    """
    out_dir = Path(out_dir)
    data = _json_bytes(manifest)
    path = atomic_write_bytes(out_dir / MANIFEST_NAME, data)
    if copies_dir is not None:
        copy_name = f"{out_dir.resolve().name}-{manifest['fingerprint'][:12]}.json"
        atomic_write_bytes(Path(copies_dir) / copy_name, data)
    return path


def load_manifest(path_or_dir) -> dict:
    """Read a manifest file (or ``<dir>/manifest.json``; a local path or a URL); ManifestError names
    the file on failure. A file over :data:`MAX_MANIFEST_BYTES` is refused unread."""
    path = location(path_or_dir)
    if not is_url(path) and path.is_dir():
        path = path / MANIFEST_NAME
    try:
        text = read_limited(path, MAX_MANIFEST_BYTES).decode("utf-8")
    except FileNotFoundError as error:
        raise ManifestError(f"{path}: manifest not found") from error
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ManifestError(f"{path}: cannot read manifest: {error}") from error
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as error:  # RecursionError: JSON nested thousands deep
        raise ManifestError(f"{path}: invalid JSON: {type(error).__name__}: {str(error)[:200]}") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: a manifest is a JSON object, got {type(manifest).__name__}")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ManifestError(f"{path}: schema version {version!r}, this code reads {SCHEMA_VERSION}")
    missing = [key for key in ("config_hash", "shards", "fingerprint") if key not in manifest]
    if missing:
        raise ManifestError(f"{path}: manifest lacks keys {', '.join(missing)}")
    if not isinstance(manifest["shards"], list):
        raise ManifestError(f"{path}: 'shards' is a {type(manifest['shards']).__name__}, not a list")
    for index, entry in enumerate(manifest["shards"]):
        problem = _entry_problem(entry)
        if problem:
            raise ManifestError(f"{path}: shard entry {index}: {problem}")
    return manifest


_ENTRY_TYPES = {"name": str, "bytes": int, "sha256": str, "samples": int}


def _entry_problem(entry) -> str | None:
    """What is wrong with one manifest shard entry, or None."""
    if not isinstance(entry, dict):
        return f"a {type(entry).__name__}, not an object"
    for key, kind in _ENTRY_TYPES.items():
        value = entry.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{key} is {value!r}, expected a {kind.__name__}"
    if entry["bytes"] < 0 or entry["samples"] < 0:
        return "negative bytes or samples"
    return None
