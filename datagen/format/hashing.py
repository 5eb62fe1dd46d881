"""Checksums: files (sha256 in chunks), and configs (sha256 of their canonical JSON), the
values that manifests, checkpoints and fingerprints record.
"""
from __future__ import annotations

import hashlib
import json

from datagen.format.storage import copy_hashed


def canonical_json(data) -> str:
    """JSON with sorted keys and no whitespace: the form that is hashed."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_hash(config) -> str:
    """sha256 of a config dataclass's canonical JSON (``config.to_dict()``)."""
    return hashlib.sha256(canonical_json(config.to_dict()).encode()).hexdigest()


def sha256_file(path, chunk_size: int = 1 << 20) -> str:
    """sha256 hex digest of a file (a local path or a URL, :mod:`datagen.format.storage`), read in
    chunks."""
    return copy_hashed(path, None, chunk_size=chunk_size)[0]
