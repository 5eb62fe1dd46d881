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

Writing goes through :class:`Store`, a folder of a writable store (:data:`WRITE_SCHEMES`) whose
files are named by plain file name: ``datagen publish`` uploads a set with it, and a build whose
``--out`` is a URL uploads each shard with it (:mod:`datagen.runner.store`). One object is
written by one request, so a reader never sees half of one: an upload that fails or is killed
leaves the object as it was (an S3 multipart upload that never completes stays invisible).
"""
from __future__ import annotations

import errno
import fnmatch
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



STORE_CHUNK = 1 << 20
"""Bytes read at a time when a stored file is hashed."""
STORE_BLOCK = 8 << 20
"""Bytes a store's file object fetches per request when a stored file is hashed (the default of
some, 50 MiB for S3, held per file read at once)."""


class Store:
    """The folder of a writable store at ``url`` (``s3://bucket/sets/x``, ``gs://...``,
    ``file:///...``), whose files are named by plain file name (``shard-000003.tar``).

    Every query asks the store itself: fsspec filesystems cache listings per process, and another
    process (a killed build, a user) may have written since. LocationError for a scheme that
    cannot be written (:data:`WRITE_SCHEMES`)."""

    def __init__(self, url: str):
        import fsspec

        check_scheme(url, WRITE_SCHEMES)
        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.root = root.rstrip("/")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def path(self, name: str) -> str:
        """The filesystem path of file ``name`` (no scheme)."""
        return f"{self.root}/{name}"

    def url_of(self, name: str) -> str:
        """The URL of file ``name``."""
        return f"{self.url}/{name}"

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted names of the files in the folder that match the glob ``pattern``; none when the
        folder does not exist."""
        self.fs.invalidate_cache(self.root)
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        names = (str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in entries)
        return sorted(name for name in names if fnmatch.fnmatchcase(name, pattern))

    def size(self, name: str) -> int | None:
        """Bytes of file ``name``, or None when there is none."""
        self.fs.invalidate_cache(self.path(name))
        try:
            return int(self.fs.size(self.path(name)))
        except FileNotFoundError:
            return None

    def read(self, name: str, limit: int) -> bytes | None:
        """The bytes of file ``name`` (None when there is none); ValueError when it holds more
        than ``limit``."""
        try:
            with self.fs.open(self.path(name), "rb") as handle:
                data = handle.read(limit + 1)
        except FileNotFoundError:
            return None
        if len(data) > limit:
            raise ValueError(f"{self.url_of(name)}: over {limit} bytes")
        return data

    def sha256(self, name: str) -> tuple[str, int]:
        """(sha256 hex, bytes) of file ``name``, read back from the store in one sequential pass:
        what is stored, not what was sent. FileNotFoundError when there is none."""
        digest, size = hashlib.sha256(), 0
        with self.fs.open(self.path(name), "rb", block_size=STORE_BLOCK) as handle:
            while chunk := handle.read(STORE_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        return digest.hexdigest(), size

    def put(self, local, name: str) -> int:
        """Upload the local file ``local`` as file ``name``, then check the size the store holds;
        returns the bytes sent. OSError naming the URL when the sizes differ."""
        size = Path(local).stat().st_size
        if _is_local(self.fs):  # an object store has no folders to make
            self.fs.makedirs(self.root, exist_ok=True)
        self.fs.put_file(str(local), self.path(name))
        stored = self.size(name)
        if stored != size:
            raise OSError(errno.EIO, f"the store holds {stored} bytes, sent {size}", self.url_of(name))
        return size

    def write_bytes(self, name: str, data: bytes, exclusive: bool = False) -> None:
        """Store ``data`` as file ``name``. ``exclusive``: FileExistsError when the file exists
        (a conditional write where the filesystem has one, such as S3's ``If-None-Match``;
        elsewhere a check just before the write, which two writers may pass together)."""
        path = self.path(name)
        if _is_local(self.fs):
            self.fs.makedirs(self.root, exist_ok=True)
        if exclusive:
            try:
                self.fs.pipe_file(path, data, mode="create")
                return
            except (TypeError, NotImplementedError):  # a filesystem without the create mode
                if self.size(name) is not None:
                    raise FileExistsError(self.url_of(name)) from None
        self.fs.pipe_file(path, data)

    def remove(self, name: str) -> None:
        """Delete file ``name`` if it is there."""
        try:
            self.fs.rm_file(self.path(name))
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self.path(name))


def _is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols
