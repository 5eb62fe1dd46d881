"""A build whose ``--out`` is a store URL (``s3://bucket/sets/x``, ``gs://...``): the shards are
built in a local work folder and uploaded one by one.

The work folder (``--work``, default :func:`default_work_dir`) holds what a build needs on local
disk: the segment bank (``WORK/bank``, reused by a resumed or extended build), the build's
:class:`~datagen.runner.lock.OutputLock`, and, under ``WORK/upload/<name>/``, the files of the
shards being written. Each shard task writes its tar, sample rows and stats marker there as a
local build does, then uploads them in that order, checking the size the store holds after each,
and deletes each local copy once it is stored (:func:`upload_shard`): a shard is complete in the
store before its stats marker, and the work folder never holds more than the shards in progress.
The manifest is uploaded last, once every shard is stored.

An object store writes each object whole or not at all, so what a killed build leaves in the
store is finished objects only: a shard whose stats marker is missing is rebuilt, as is one whose
stored bytes differ from its stats (:mod:`~datagen.runner.resume` reads each back and hashes it).
What it leaves in the work folder (shards not yet uploaded, temporary files) is removed by the
next build under the lock (:func:`clear_uploads`).

A ``file://`` URL is a local path and is built as one.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

from datagen.format.manifest import samples_name, stats_name
from datagen.format.shards import shard_name
from datagen.format.storage import WRITE_SCHEMES, LocationError, Store, check_scheme, is_url
from datagen.runner.errors import BuildError

UPLOAD_DIR = "upload"
"""Folder of the work folder where shards are written before they are uploaded."""


def output_of(out_dir) -> Path | Store:
    """Where a build writes: a local folder (a path, or a ``file://`` URL), or a :class:`Store`.
    BuildError naming ``--out`` for a URL whose scheme cannot be written (``http://``), before
    any work."""
    if not is_url(out_dir):
        return Path(out_dir)
    text = str(out_dir)
    try:
        scheme = check_scheme(text, WRITE_SCHEMES)
    except LocationError as error:
        raise BuildError(f"--out {error}") from None
    if scheme == "file":
        return Path(text[len("file://"):])
    try:
        return Store(text)
    except ImportError as error:  # gs:// without gcsfs, s3:// without s3fs
        raise BuildError(f"--out {text}: {error}") from None


def default_work_dir(url: str) -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/segswap/builds/<first 16 hex of sha256(url)>``: one work
    folder per output URL, so that rerunning a command finds its bank and its lock again."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "segswap" / "builds" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def upload_dir(work: Path, store: Store) -> Path:
    """The local folder where the shards of ``store`` are written before they are uploaded: named
    after the URL's last part, as the manifest copy in ``--manifests-dir`` is."""
    name = store.url.rsplit("/", 1)[-1]
    if name in ("", ".", ".."):
        name = "out"
    return Path(work) / UPLOAD_DIR / name


def clear_uploads(work: Path) -> None:
    """Remove what a killed build left in ``WORK/upload`` (shards not uploaded yet, temporary
    files, a cluster build's attempt folders); call it under the work folder's lock."""
    shutil.rmtree(Path(work) / UPLOAD_DIR, ignore_errors=True)


def upload_shard(local_dir, url: str, shard: int) -> None:
    """Upload shard ``shard``'s tar, sample rows and stats marker (last) from ``local_dir`` to
    the store at ``url``, each checked for its stored size, and delete each local copy once it is
    stored. A failure leaves the shard without its stats marker in the store (rebuilt next time)."""
    store = Store(url)
    for name in (shard_name(shard), samples_name(shard), stats_name(shard)):
        local = Path(local_dir) / name
        try:
            store.put(local, name)
        except OSError:
            raise
        except Exception as error:  # noqa: BLE001 - a client library's own error (expired credentials) as one line
            raise OSError(errno.EIO, f"upload failed ({type(error).__name__}: {error})", store.url_of(name)) from error
        local.unlink()
