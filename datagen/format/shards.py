"""Writing and reading WebDataset tar shards.

A shard is a plain (uncompressed, USTAR) tar in WebDataset's layout (members ``<key>.<field>``,
a sample's fields in sorted order, as ``webdataset.TarWriter`` writes them) with fixed owner,
mode and mtime, so the same samples always give the same bytes. Its headers come from the stdlib
``tarfile`` module (``TarInfo.tobuf``) and each sample goes to the file in one write: importing
webdataset imports torch (seconds and hundreds of MB in every build worker), which data
generation has no use for, and ``TarFile.addfile`` streams every member through small buffers.
The bytes are those ``TarFile`` writes (tested); a member's header is ``TarInfo.tobuf``'s for
one template member with its name, size and checksum put in (:func:`member_header`), checked
against ``tobuf`` when the module loads. It is written to ``<path>.tmp`` and renamed to
``<path>`` only once complete: a file named ``shard-*.tar`` is never half written. Reading uses
the stdlib ``tarfile`` module only (no decoding, no unpickling): members are grouped by key into
``{"__key__": key, field: bytes}`` dicts.
"""
from __future__ import annotations

import hashlib
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from datagen.format.atomic import fsync_dir, temporary_path
from datagen.format.hashing import sha256_file
from datagen.format.storage import copy_hashed, is_url, location

SHARD_DIGITS = 6
MAX_INDEX = 10 ** SHARD_DIGITS - 1
TAR_USER = "datagen"
TAR_GROUP = "datagen"
TAR_MODE = 0o444
TAR_MTIME = 0
_END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)
_COMPRESSED_MAGIC = (("gzip", b"\x1f\x8b"), ("bzip2", b"BZh"), ("xz", b"\xfd7zXZ\x00"), ("zstd", b"\x28\xb5\x2f\xfd"),
                     ("lz4", b"\x04\x22\x4d\x18"))
SPOOL_MEMORY = 256 << 20
"""Bytes of a fetched remote shard kept in memory before its spool moves to a temporary file."""
MAX_MEMBER_BYTES = 64 << 20
"""Largest tar member a reader takes (a 480 px pair's largest is about 60 KB)."""
_SHARD_NAME = re.compile(rf"^shard-(\d{{{SHARD_DIGITS},}})\.")


class ShardError(Exception):
    """A shard cannot be read: the message names the shard and, if known, the last good key."""

    def __init__(self, path, message: str, last_key: str | None = None):
        self.path = str(path)
        self.message = message
        self.last_key = last_key
        where = f" (last good sample {last_key})" if last_key else " (no good sample before it)"
        super().__init__(f"shard {self.path}: {message}{where}")


def _check_index(value: int, what: str) -> int:
    if not isinstance(value, (int,)) or isinstance(value, bool) or not 0 <= value <= MAX_INDEX:
        raise ValueError(f"{what} must be an int in [0, {MAX_INDEX}], got {value!r}")
    return int(value)


def shard_name(index: int) -> str:
    """Shard file name: ``shard_name(12) == "shard-000012.tar"``."""
    return f"shard-{_check_index(index, 'shard index'):0{SHARD_DIGITS}d}.tar"


def sample_key(shard_index: int, sample_index: int) -> str:
    """Sample key (no dots): ``sample_key(12, 345) == "000012_000345"``."""
    shard = _check_index(shard_index, "shard index")
    sample = _check_index(sample_index, "sample index")
    return f"{shard:0{SHARD_DIGITS}d}_{sample:0{SHARD_DIGITS}d}"


def parse_shard_index(name) -> int:
    """Shard index from a shard file name or path (``.tar``, ``.stats.json``, ``.samples.parquet``...)."""
    match = _SHARD_NAME.match(Path(str(name)).name)
    if not match:
        raise ValueError(f"not a shard file name: {str(name)!r} (expected shard-NNNNNN.*)")
    return int(match.group(1))


def sample_sha256(members: dict) -> str:
    """sha256 hex digest of one sample ``{"__key__": key, field: bytes}``: its key, then each field
    in sorted order as name, byte length and bytes. Recorded per sample when a shard is written
    (``*.samples.parquet``), so that damage can be traced to the sample it hit."""
    digest = hashlib.sha256(str(members.get("__key__", "")).encode("utf-8", "surrogateescape") + b"\0")
    for field in sorted(name for name in members if name != "__key__"):
        data = members[field]
        digest.update(field.encode("utf-8", "surrogateescape") + b"\0" + len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _tobuf_header(name: str, size: int) -> bytes:
    """The USTAR header that ``TarFile.addfile`` writes for a member of the shard format."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, TAR_MTIME, TAR_MODE
    info.uname, info.gname = TAR_USER, TAR_GROUP
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


# USTAR offsets: name [0, 100), size [124, 136), checksum [148, 156) (six octal digits, NUL, space)
_TEMPLATE = _tobuf_header("", 0)
_TEMPLATE_MIDDLE, _TEMPLATE_TAIL = _TEMPLATE[100:124], _TEMPLATE[136:148]
_TEMPLATE_END = _TEMPLATE[156:]
# the checksum counts its own field as eight spaces; the name and size fields are added per member
_TEMPLATE_SUM = sum(_TEMPLATE_MIDDLE) + sum(_TEMPLATE_TAIL) + sum(_TEMPLATE_END) + 8 * 0x20


def _patched_header(name: str, size: int) -> bytes | None:
    """:func:`_tobuf_header` from the template, or None where it does not apply (a name over 100
    bytes, which ``tobuf`` splits into a prefix, or a size of 12 octal digits)."""
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > 100 or not 0 <= size < 8 ** 11:
        return None
    size_field = b"%011o\0" % size
    checksum = _TEMPLATE_SUM + sum(encoded) + sum(size_field)
    return b"".join((encoded, bytes(100 - len(encoded)), _TEMPLATE_MIDDLE, size_field, _TEMPLATE_TAIL,
                     b"%06o\0 " % checksum, _TEMPLATE_END))


# the template stands for tobuf only if this Python's tarfile lays the header out as expected
_PATCHABLE = all(_patched_header(name, size) == _tobuf_header(name, size)
                 for name, size in (("000000_000000.json", 0), ("000012_000345.src.gridmask.npy", 1234),
                                    ("k" * 100, 8 ** 11 - 1), ("\u00e9t\u00e9.x\udcff", 512)))


def member_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header of a member ``name`` of ``size`` bytes, as ``TarInfo.tobuf``
    writes it with the shard format's owner, mode and mtime (an order of magnitude faster than
    ``tobuf``: the header of a template member with the name, size and checksum put in)."""
    header = _patched_header(name, size) if _PATCHABLE else None
    return _tobuf_header(name, size) if header is None else header


class WrittenSample(NamedTuple):
    """What :meth:`ShardWriter.write` wrote of one sample."""

    bytes: int
    """Total bytes of its members' data (tar headers and padding not counted)."""
    sha256: str
    """:func:`sample_sha256` of the sample."""


class _HashingFile:
    """Write-only file wrapper that hashes and counts what goes through it."""

    def __init__(self, handle):
        self.handle = handle
        self.digest = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.bytes += len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


class ShardWriter:
    """Write one tar shard atomically and reproducibly.

    Usage::

        with ShardWriter(out_dir / shard_name(3)) as writer:
            writer.write(encode_sample(sample, quality))
        writer.sha256, writer.bytes, writer.count

    Samples go to ``<path>.tmp`` (:func:`datagen.format.atomic.temporary_path`, streamed there
    rather than written by :func:`~datagen.format.atomic.atomic_write` in one call); a clean exit
    flushes, fsyncs and renames it to ``path`` (replacing an older file). An exception inside the
    ``with`` removes the tmp file and leaves ``path`` untouched. ``sha256`` and ``bytes`` (size of
    the tar file) are set after a clean exit; ``count`` (samples written) is live.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.tmp_path = temporary_path(self.path)
        self.sha256: str | None = None
        self.bytes: int | None = None
        self.count = 0
        self.member_bytes = 0
        self._keys: set[str] = set()
        self._handle = None
        self._hashing = None
        self._used = False

    def __enter__(self) -> ShardWriter:
        if self._used:
            raise RuntimeError(f"shard {self.path}: a ShardWriter writes one shard, once")
        self._used = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.tmp_path, "wb")
        self._hashing = _HashingFile(self._handle)
        return self

    def write(self, members: dict) -> WrittenSample:
        """Add one sample ``{"__key__": key, field: bytes}``; returns its member bytes and checksum."""
        if self._handle is None:
            raise RuntimeError(f"shard {self.path}: write() outside the 'with' block")
        key = members.get("__key__")
        if not isinstance(key, str) or not key or "." in key or "/" in key:
            raise ValueError(f"shard {self.path}: bad sample key {key!r} (non-empty, no dots or slashes)")
        if key in self._keys:
            raise ValueError(f"shard {self.path}: sample {key} written twice")
        for field, value in members.items():
            if field == "__key__":
                continue
            if not field or field.startswith("_"):
                raise ValueError(f"shard {self.path}: sample {key}: bad field name {field!r}")
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise ValueError(f"shard {self.path}: sample {key}: field {field} is "
                                 f"{type(value).__name__}, expected bytes")
        size, parts = 0, []
        for field in sorted(name for name in members if name != "__key__"):
            data = members[field]
            if type(data) is not bytes:
                data = bytes(data)
            padding = -len(data) % tarfile.BLOCKSIZE  # zeros up to a whole block
            parts += [member_header(f"{key}.{field}", len(data)), data, _ZERO_BLOCK[:padding]]
            size += len(data)
        self._hashing.write(b"".join(parts))
        self._keys.add(key)
        self.count += 1
        self.member_bytes += size
        return WrittenSample(size, sample_sha256(members))

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self._commit()
        else:
            self._abort()
        return False

    def _commit(self) -> None:
        try:
            # TarFile.close's end: two zero blocks, then zeros up to a whole 10 KiB record
            end = self._hashing.bytes + _END_OF_ARCHIVE
            self._hashing.write(bytes(_END_OF_ARCHIVE + -end % tarfile.RECORDSIZE))
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            os.replace(self.tmp_path, self.path)
        except BaseException:
            self._abort()
            raise
        fsync_dir(self.path.parent)
        self.sha256 = self._hashing.digest.hexdigest()
        self.bytes = self._hashing.bytes
        self._handle = None

    def _abort(self) -> None:
        try:
            if self._handle is not None:
                self._handle.close()
        except Exception:  # noqa: BLE001 - the original error matters, not this one
            pass
        self._handle = None
        try:
            self.tmp_path.unlink()
        except FileNotFoundError:
            pass


def _split_name(name: str) -> tuple[str, str]:
    key, dot, field = name.partition(".")
    return key, field if dot else ""


def _open_checked(path, sha256: str | None):
    """An open binary file of shard ``path`` (a spooled copy for a URL) whose bytes hash to
    ``sha256`` when given; ShardError otherwise, or when it cannot be read."""
    try:
        if is_url(path):
            handle = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)
            try:
                digest, _ = copy_hashed(path, handle)
            except BaseException:
                handle.close()
                raise
            handle.seek(0)
        else:
            digest = sha256_file(path) if sha256 is not None else None
            handle = open(path, "rb")
    except Exception as error:  # noqa: BLE001 - any failure to fetch (OSError, HTTP, auth) names the shard
        reason = getattr(error, "strerror", None) or error
        raise ShardError(path, f"cannot read: {type(error).__name__}: {reason}") from error
    if sha256 is not None and digest != sha256:
        handle.close()
        raise ShardError(path, f"sha256 {digest[:12]} differs from the manifest's {sha256[:12]}")
    return handle


def iter_tar_samples(path, sha256: str | None = None) -> Iterator[dict]:
    """Yield ``{"__key__": key, field: bytes}`` per sample of a tar shard, in file order.

    ``path`` is a local path or a URL (:mod:`datagen.format.storage`); a URL is fetched in one
    sequential pass into a temporary spool (memory up to :data:`SPOOL_MEMORY`, then disk), one
    shard at a time. ``sha256``: the shard's bytes must hash to it before any sample is yielded
    (hashed on the way in for a URL, by one more read for a local file).

    Consecutive members with the same key (name up to the first dot) form one sample.
    Raises :class:`ShardError` naming the shard and the last good sample key when the tar
    is truncated or corrupt (including a missing end-of-archive marker), compressed (only plain
    tars are read: a small gzip file can expand to gigabytes), a member is not a regular file or
    declares more than :data:`MAX_MEMBER_BYTES`, a member name has no field, or a key or field
    appears twice.
    """
    path = location(path)
    last_key = None
    with _open_checked(path, sha256) as handle:
        magic = handle.read(6)
        handle.seek(0)
        for name, prefix in _COMPRESSED_MAGIC:
            if magic.startswith(prefix):
                raise ShardError(path, f"a {name}-compressed file, not a plain tar (compressed shards are refused: "
                                       f"a small one can expand to gigabytes)")
        try:
            tar = tarfile.open(fileobj=handle, mode="r:")
        except tarfile.TarError as error:
            raise ShardError(path, f"not a readable tar: {error}") from error
        current: dict | None = None
        seen: set[str] = set()
        try:
            for member in tar:
                if not member.isreg():
                    raise ShardError(path, f"member {member.name!r} is not a regular file", last_key)
                key, field = _split_name(member.name)
                if not key or not field:
                    raise ShardError(path, f"member {member.name!r} has no key.field name", last_key)
                if current is None or key != current["__key__"]:
                    if current is not None:
                        yield current
                        last_key = current["__key__"]
                    if key in seen:
                        raise ShardError(path, f"sample {key} appears twice", last_key)
                    seen.add(key)
                    current = {"__key__": key}
                if field in current:
                    raise ShardError(path, f"sample {key}: field {field} appears twice", last_key)
                if member.size > MAX_MEMBER_BYTES:
                    raise ShardError(path, f"member {member.name!r} declares {member.size} bytes (limit "
                                           f"{MAX_MEMBER_BYTES})", last_key)
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise ShardError(path, f"truncated in member {member.name!r}", last_key)
                current[field] = data
            end = tar.offset
        except tarfile.TarError as error:
            raise ShardError(path, f"truncated or corrupt tar: {error}", last_key) from error
        except OSError as error:
            raise ShardError(path, f"read error: {error}", last_key) from error
        # tarfile silently stops at a truncated or garbled header: a complete archive ends with
        # two zero blocks, so check for them.
        handle.seek(end)
        trailer = handle.read(_END_OF_ARCHIVE)
        if len(trailer) != _END_OF_ARCHIVE or trailer.count(0) != _END_OF_ARCHIVE:
            reading = f" while reading sample {current['__key__']}" if current is not None else ""
            raise ShardError(path, f"truncated or corrupt tar: no end-of-archive marker at byte {end}"
                             f"{reading}", last_key)
        if current is not None:
            yield current
