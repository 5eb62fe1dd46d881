"""Where a shard set lives: a local path, or a URL read through fsspec (``http(s)://``, ``s3://``,
``gs://``), as one kind of location with the pathlib interface.

A URL becomes a ``upath.UPath`` (universal_pathlib, the fsspec project's pathlib for URLs), a
local path a ``pathlib.Path``: readers call ``.name``, ``.parent``, ``/ name``,
``.stat().st_size`` and ``.is_file()`` on either, and read files through :func:`open_read`, which
streams a URL in one sequential pass (an HTTP server need not support range requests). Only the
schemes in :data:`READ_SCHEMES` are taken; ``pipe:`` (which webdataset runs as a shell command)
and any other scheme are refused, so that a shard list or manifest from elsewhere can never run
a command. Credentials and
endpoints come from the usual places of each filesystem (for S3: ``AWS_*`` variables such as
``AWS_ENDPOINT_URL``, ``~/.aws``).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import BinaryIO, Union

READ_SCHEMES = ("http", "https", "s3", "gs", "gcs", "file")
"""URL schemes a shard set may be read from."""
WRITE_SCHEMES = ("s3", "gs", "gcs", "file")
"""URL schemes a shard set may be published to (an HTTP server is read-only here)."""
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")

Location = Union[Path, "UPath"]  # noqa: F821 - upath is imported when a URL is used


class LocationError(ValueError):
    """A location that is refused (an executing or unknown scheme); the message names it."""


def scheme_of(spec: str) -> str | None:
    """The URL scheme of ``spec`` in lower case (``"s3"``), or None for a local path (a Windows
    drive letter such as ``C:`` is a path, not a scheme)."""
    match = _SCHEME.match(spec)
    if not match or len(match.group(1)) == 1:
        return None
    return match.group(1).lower()


def is_url(spec) -> bool:
    """Whether ``spec`` names a URL (any scheme, refused ones included) rather than a local path."""
    if isinstance(spec, Path) and not _is_upath(spec):
        return False
    return scheme_of(str(spec)) is not None


def _is_upath(value) -> bool:
    return type(value).__module__.startswith("upath.")


def check_scheme(spec: str, allowed: tuple[str, ...] = READ_SCHEMES) -> str:
    """The scheme of URL ``spec`` if it is in ``allowed``; LocationError otherwise."""
    scheme = scheme_of(spec)
    if scheme == "pipe":
        raise LocationError(f"{spec}: 'pipe:' runs a shell command; shard sets are read from files or URLs only")
    if scheme not in allowed:
        raise LocationError(f"{spec}: the {scheme}:// scheme is not supported here (supported: "
                            f"{', '.join(s + '://' for s in allowed)})")
    return scheme


def open_read(source) -> BinaryIO:
    """Open the file at ``source`` (a path or URL) for one sequential read. A URL is streamed: no
    seeks, no range requests (what ``http.server`` and many static hosts lack); readers that need
    to seek read from a local copy (:func:`copy_hashed`)."""
    loc = location(source)
    if not is_url(loc):
        return open(loc, "rb")
    import fsspec

    options = {"block_size": 0} if scheme_of(str(loc)) in ("http", "https") else {}
    return fsspec.open(str(loc), "rb", **options).open()


def read_limited(source, limit: int) -> bytes:
    """The bytes of the file at ``source``; ValueError when it holds more than ``limit``."""
    with open_read(source) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{source}: over {limit} bytes")
    return data


def copy_hashed(source, target: BinaryIO | None, on_bytes=lambda n: None,
                chunk_size: int = 1 << 20) -> tuple[str, int]:
    """Copy the file at ``source`` (a path or URL) into the open binary file ``target`` (None: only
    hash it), hashing it on the way: one read of a remote file both fetches and checks it.
    Returns (sha256 hex, bytes)."""
    digest, size = hashlib.sha256(), 0
    with open_read(source) as handle:
        while True:
            chunk = handle.read(chunk_size)
            if not chunk:
                break
            digest.update(chunk)
            if target is not None:
                target.write(chunk)
            size += len(chunk)
            on_bytes(len(chunk))
    return digest.hexdigest(), size


def location(spec) -> Location:
    """A local path (``pathlib.Path``) or a URL (``upath.UPath``) for ``spec``; ``file://`` URLs
    are local paths. LocationError for a refused scheme."""
    if isinstance(spec, Path) and (not _is_upath(spec) or type(spec).__name__ in ("PosixUPath", "WindowsUPath")):
        return Path(spec)
    if _is_upath(spec):
        check_scheme(str(spec))
        return spec
    text = str(spec)
    scheme = scheme_of(text)
    if scheme is None:
        return Path(text)
    check_scheme(text)
    if scheme == "file":
        return Path(text[len("file://"):])
    from upath import UPath

    return UPath(text)

