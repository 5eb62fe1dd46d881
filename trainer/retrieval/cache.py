"""Backbone features computed once per image, cached on disk as float16, memory-mapped.

Retrieval scores every query against every database image, each time from the backbone's conv4
features ((1024, H/16, W/16) per image, :mod:`trainer.backbone`). They are computed once per image
and kept in a :class:`FeatureCache`: one raw float16 array on disk, read through a memory map, so
that a collection never needs to fit in RAM (Brueghel: 1,587 images at 640x640 -> 1024 x 40 x 40
float16 = 3.3 MB each, 5.2 GB in all), filled in batches that survive any interruption
(Ctrl-C, ``kill -9``: a rerun computes only what is missing), and reused by every run with the same
backbone weights, resolution and images. Nothing is pickled: raw bytes, JSON and a fixed-size
binary record log.

On disk, ``ROOT/<id>/`` where ``id`` is the first 16 hex digits of the sha256 of the canonical JSON
of the cache's identity ``{format version, key, feature_shape, dtype, image_ids}``:

- ``features.f16``  the (N, C, h, w) little-endian float16 array, C-ordered, no header: row ``i``
  (image ``i``) is bytes ``[i * row_bytes, (i + 1) * row_bytes)``, ``row_bytes = C * h * w * 2``.
  Made sparse at full size when the cache is created.
- ``meta.json``     format, version, key, feature shape, dtype, byte order, rows, row and file
  sizes, the image ids (a record for people and a check on open; written last at creation).
- ``state.bin``     which rows are done: an append-only log of 32-byte records (row: uint64 LE,
  digest: the first 16 bytes of the sha256 of the row's bytes, all zeros for "not done", check:
  8-byte BLAKE2b of the two keyed with the cache's id). The last valid record of a row wins.
- ``.lock``         the writers' lock (:class:`datagen.format.locking.FolderLock`) and its holder.

Guarantees:

- **Done means written.** :meth:`FeatureCache.put` writes the rows and fsyncs the features before
  appending their records (and fsyncing those); a kill in between leaves rows not done, never done
  with other bytes. A row that is overwritten is first marked not done.
- **One writer.** Every write (:meth:`~FeatureCache.put`, :meth:`~FeatureCache.verify`, :func:`fill`)
  holds an exclusive ``flock`` on the folder; a second process waits (saying once on stderr whom
  for), then reloads the state and finds the rows done. Reading needs no lock.
- **Damage is found, never served.** A ``meta.json`` that is unreadable or describes another
  cache: everything is rebuilt. A ``features.f16`` of the wrong size, a ``state.bin`` with torn or
  garbled records: the file is repaired, and every done row is re-hashed (the ones that do not
  match recomputed). Each with a :class:`FeatureCacheWarning` naming the file. A process that opens
  such a cache without writing sees no row done until a writer has repaired it. A byte changed
  inside a done row is found by :meth:`~FeatureCache.verify`, which :func:`fill` runs before
  computing: it re-reads and hashes every done row, at about sha256's speed (1-2 GB/s on a current
  x86 CPU, plus the disk's read time when the file is not in the page cache: ~3-5 s for Brueghel).
  :meth:`~FeatureCache.get` does not re-hash (it is called for every pair scored).

A new image list starts from the rows its images already have in other caches of the same root,
key and shape (:func:`copy_from_siblings`, called by :func:`fill`), each re-hashed before it is
copied: a run on other short-lists or a grown database computes only its new images.

The device is not part of the key: CPU and GPU features differ by about float16's rounding and are
treated as the same. A row being recomputed (damaged) may be read torn by another process reading
without the lock; a file changed by hand while a reader maps it may crash that reader (SIGBUS).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from datagen.format.atomic import atomic_write_bytes
from datagen.format.hashing import canonical_json, sha256_file
from datagen.format.locking import FolderLock

FORMAT = "segswap-feature-cache"
VERSION = 1
DTYPE = np.dtype("<f2")
FEATURES_NAME = "features.f16"
META_NAME = "meta.json"
STATE_NAME = "state.bin"
LOCK_NAME = ".lock"
EXTRACTOR = "resnet50-layer3-l2norm"
"""What the features are (:class:`trainer.backbone.Backbone`): part of :func:`cache_key`, so that
changing the extractor changes every key."""
DIGEST = "sha256/128"
"""The per-row digest: the first 16 bytes of the sha256 of the row's float16 bytes."""
DIGEST_BYTES = 16
RECORD = struct.Struct("<Q16s8s")
"""One ``state.bin`` record: row (uint64), digest (16 bytes, zeros = not done), check (8 bytes)."""
NOT_DONE = bytes(DIGEST_BYTES)


class FeatureCacheWarning(UserWarning):
    """A cache file was damaged and is being rebuilt (the message names it and says what is kept)."""


def image_id(path) -> str:
    """Content id of an image file: the sha256 hex digest of its bytes (a local path or a URL).
    A renamed or moved file keeps its id (its features are reused); an edited one does not."""
    return sha256_file(path)


def backbone_digest(backbone) -> str:
    """sha256 of a module's weights (names, dtypes, shapes and bytes of its ``state_dict()``, in
    name order): the key of a backbone that has no weights file (random initialisation) or came
    from a checkpoint."""
    import torch  # only here: reading a cache needs no torch

    h = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|{data.numel()}|".encode())
        h.update(data.numpy().tobytes())
    return h.hexdigest()


def cache_key(backbone_record: Mapping[str, Any], width: int, height: int, resize: str, backbone=None) -> dict:
    """What features depend on, for :meth:`FeatureCache.open`: the extractor, the backbone's
    weights, the image size fed to it (``width`` x ``height`` pixels) and how images are brought to
    that size (``resize``: a name the caller chooses, e.g. "squash"; include the interpolation if
    it can change).

    ``backbone_record``: :func:`trainer.backbone.load_backbone_weights`'s ``{"source", "format",
    "sha256"}``: its sha256 (of the weights file) is the backbone's identity. A backbone without a
    file (``sha256`` None: random weights) needs ``backbone`` (the module), whose weights are hashed
    (:func:`backbone_digest`)."""
    key = {"extractor": EXTRACTOR, "width": int(width), "height": int(height), "resize": str(resize)}
    sha = backbone_record.get("sha256") if backbone_record else None
    if sha:
        key["backbone_sha256"] = str(sha)
    elif backbone is not None:
        key["backbone_state_sha256"] = backbone_digest(backbone)
    else:
        raise ValueError("the backbone record has no sha256 (random weights?): pass backbone=<the module> so "
                         "that its weights are hashed, or nothing can be cached safely")
    if key["width"] <= 0 or key["height"] <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    return key


def _shape(feature_shape) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in feature_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) <= 0:
        raise ValueError(f"feature_shape must be three positive ints (C, h, w), got {feature_shape!r}")
    return shape  # type: ignore[return-value]


def _as_float16(features, n: int, shape: tuple[int, int, int]) -> np.ndarray:
    """(n, C, h, w) float tensor or array -> C-contiguous little-endian float16 numpy array."""
    if hasattr(features, "detach"):  # a torch tensor (bfloat16 has no numpy twin: go through float32)
        features = features.detach().cpu().float().numpy()
    array = np.asarray(features)
    if array.dtype.kind != "f":
        raise ValueError(f"features must be floating point, got {array.dtype}")
    if array.shape != (n, *shape):
        raise ValueError(f"features of shape {array.shape} for {n} rows; expected {(n, *shape)}")
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(array, dtype=DTYPE)
    if not np.isfinite(out).all():
        raise ValueError("features hold NaN or infinite values (or values beyond float16's range, 65504): "
                         "not cached")
    return out


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _row_digest(data) -> bytes:
    return hashlib.sha256(data).digest()[:DIGEST_BYTES]


class FeatureCache:
    """Backbone features of an ordered list of images: (N, C, h, w) float16 on disk, memory-mapped.

    Open with :meth:`open`; fill with :func:`fill` (or :meth:`put`); read with :meth:`get`. Row
    ``i`` is the image ``image_ids[i]``. See the module's description for the files and guarantees.
    """

    def __init__(self, folder: Path, key: dict, image_ids: list[str], feature_shape: tuple[int, int, int],
                 identity: str):
        self.folder = folder
        self.key, self.image_ids, self.feature_shape = key, image_ids, feature_shape
        self.rows = len(image_ids)
        """N, the number of images."""
        self.row_bytes = int(np.prod(feature_shape)) * DTYPE.itemsize
        """Bytes of one image's features (C * h * w * 2)."""
        self._check_key = bytes.fromhex(identity)
        self._done = np.zeros(self.rows, dtype=bool)
        self._digests = np.zeros((self.rows, DIGEST_BYTES), dtype=np.uint8)
        self._map: np.memmap | None = None
        self._writing = 0
        self._found_damaged: set[int] = set()
        self._verified = False

    # ---- paths and identity -------------------------------------------------------------------

    @property
    def features_path(self) -> Path:
        return self.folder / FEATURES_NAME

    @property
    def meta_path(self) -> Path:
        return self.folder / META_NAME

    @property
    def state_path(self) -> Path:
        return self.folder / STATE_NAME

    @classmethod
    def open(cls, root, key: Mapping[str, Any], image_ids: Sequence[str],
             feature_shape: tuple[int, int, int]) -> FeatureCache:
        """The cache of ``image_ids`` (content ids, :func:`image_id`; row ``i`` is image ``i``) with
        features of shape ``feature_shape`` = (C, h, w) computed as ``key`` says (JSON-able, e.g.
        :func:`cache_key`), under the folder ``root``. Opening reads the done rows and writes
        nothing; the folder is made by the first write. A different key, shape or image list (even
        one image, or their order) is another cache."""
        shape = _shape(feature_shape)
        ids = list(image_ids)
        if not all(isinstance(i, str) and i for i in ids):
            raise ValueError("image_ids must be non-empty strings (image_id(path) of each image)")
        try:
            key = json.loads(canonical_json(dict(key)))
        except (TypeError, ValueError) as error:
            raise ValueError(f"the cache key must be a JSON-able mapping: {error}") from None
        identity = hashlib.sha256(canonical_json(
            {"format": FORMAT, "version": VERSION, "key": key, "feature_shape": list(shape), "dtype": "float16",
             "image_ids": ids}).encode()).hexdigest()
        cache = cls(Path(root) / identity[:16], key, ids, shape, identity)
        cache._load(locked=False)
        return cache

    def _meta(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "key": self.key, "feature_shape": list(self.feature_shape),
                "dtype": "float16", "byteorder": "little", "rows": self.rows, "row_bytes": self.row_bytes,
                "file_bytes": self.rows * self.row_bytes, "features": FEATURES_NAME, "state": STATE_NAME,
                "digest": DIGEST, "image_ids": self.image_ids}

    # ---- reading the state --------------------------------------------------------------------

    def _check(self, row: int, digest: bytes) -> bytes:
        return hashlib.blake2b(struct.pack("<Q", row) + digest, digest_size=8, key=self._check_key).digest()

    def _record(self, row: int, digest: bytes) -> bytes:
        return RECORD.pack(row, digest, self._check(row, digest))

    def _meta_problem(self) -> str | None:
        """None when meta.json describes this cache, else what is wrong ("missing" when absent)."""
        expected = self._meta()
        limit = len(json.dumps(expected)) * 2 + 4096
        try:
            size = self.meta_path.stat().st_size
            if size > limit:
                return f"{size} bytes, more than a meta.json of this cache can have"
            meta = json.loads(self.meta_path.read_bytes())
        except FileNotFoundError:
            return "missing"
        except (OSError, ValueError) as error:
            return f"unreadable ({error})"
        if not isinstance(meta, dict):
            return "not a JSON object"
        meta = {k: v for k, v in meta.items() if k != "created"}
        if meta != expected:
            wrong = sorted(k for k in set(meta) | set(expected) if meta.get(k) != expected.get(k))
            return f"does not describe this cache (fields {', '.join(wrong[:6])} differ)"
        return None

    def _size_problem(self) -> str | None:
        expected = self.rows * self.row_bytes
        try:
            size = self.features_path.stat().st_size
        except FileNotFoundError:
            return "missing"
        if size != expected:
            return f"{size} bytes where {self.rows} rows of {self.row_bytes} bytes make {expected}"
        return None

    def _read_state(self) -> tuple[np.ndarray, np.ndarray, int, int, bool]:
        """(done, digests, bad records, torn tail bytes, file exists) of state.bin."""
        done = np.zeros(self.rows, dtype=bool)
        digests = np.zeros((self.rows, DIGEST_BYTES), dtype=np.uint8)
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            return done, digests, 0, 0, False
        whole = len(data) - len(data) % RECORD.size
        bad = 0
        for row, digest, check in RECORD.iter_unpack(data[:whole]):
            if row >= self.rows or check != self._check(row, digest):
                bad += 1
            elif digest == NOT_DONE:
                done[row] = False
            else:
                done[row] = True
                digests[row] = np.frombuffer(digest, dtype=np.uint8)
        return done, digests, bad, len(data) - whole, True

    def _load(self, locked: bool) -> None:
        """Read the done rows. Without the lock, a cache with any damage shows no row done (a
        writer repairs it first); with it, :meth:`_repair` runs."""
        self._map = None
        self._verified = False
        if locked:
            self._repair()
            return
        self._done[:] = False
        if self._meta_problem() or self._size_problem():
            return
        done, digests, bad, _, _ = self._read_state()  # a torn tail may be a record being appended
        if not bad:
            self._done, self._digests = done, digests

    # ---- repairs (under the lock) -------------------------------------------------------------

    def _warn(self, path: Path, what: str) -> None:
        warnings.warn(f"feature cache {path}: {what}", FeatureCacheWarning, stacklevel=4)

    def _reset(self) -> None:
        """A new empty cache: sparse features file, empty state, then meta.json (last, so that a
        kill in between leaves a folder without meta.json, which is reset again)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / (FEATURES_NAME + ".tmp")
        with open(tmp, "wb") as handle:
            handle.truncate(self.rows * self.row_bytes)
            os.fsync(handle.fileno())
        os.replace(tmp, self.features_path)  # a new file: readers of the old one keep theirs
        atomic_write_bytes(self.state_path, b"")
        meta = {**self._meta(), "created": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        atomic_write_bytes(self.meta_path, (json.dumps(meta, indent=1) + "\n").encode())
        self._done[:] = False
        self._digests[:] = 0

    def _compact(self) -> None:
        """Rewrite state.bin atomically with one record per done row."""
        data = b"".join(self._record(int(row), self._digests[row].tobytes()) for row in np.flatnonzero(self._done))
        atomic_write_bytes(self.state_path, data)

    def _repair(self) -> None:
        """Under the lock: make the files trustworthy (see the module's description)."""
        self._found_damaged = set()
        meta_problem = self._meta_problem()
        done, digests, bad, tail, state_exists = self._read_state()
        if meta_problem:
            if meta_problem != "missing" or done.any():
                self._warn(self.meta_path, f"{meta_problem}; all {self.rows} rows are recomputed")
            self._reset()
            return
        self._done, self._digests = done, digests
        suspect = False
        size_problem = self._size_problem()
        if size_problem:
            self._warn(self.features_path, f"{size_problem} (truncated or damaged): resized, done rows are "
                                           f"re-hashed and the damaged ones recomputed")
            with open(self.features_path, "ab") as handle:
                handle.truncate(self.rows * self.row_bytes)
                os.fsync(handle.fileno())
            suspect = True
        if not state_exists:
            self._warn(self.state_path, f"missing: no row can be trusted, all {self.rows} rows are recomputed")
        if bad or tail or not state_exists:
            if bad or tail:
                self._warn(self.state_path, f"{bad} unreadable record(s) and {tail} stray byte(s) ignored; done "
                                            f"rows are re-hashed and the damaged ones recomputed")
            self._compact()
            suspect = True
        elif self.state_path.stat().st_size > (2 * self.rows + 1024) * RECORD.size:
            self._compact()
        if suspect:
            self._verify_locked()

    # ---- writing ------------------------------------------------------------------------------

    def _say_waiting(self, holder: str) -> None:
        print(f"feature cache {self.folder}: waiting for {holder}, which is filling it", file=sys.stderr,
              flush=True)

    @contextmanager
    def writing(self) -> Iterator[FeatureCache]:
        """``with cache.writing():`` hold the folder's lock (waiting for another writer, saying
        once on stderr whom for), reload the state (what another process wrote meanwhile), repair
        damage. :meth:`put`, :meth:`verify` and :func:`fill` take it themselves; holding it over a
        loop of puts saves re-locking. Re-entrant within this object."""
        if self._writing:
            self._writing += 1
            try:
                yield self
            finally:
                self._writing -= 1
            return
        lock = FolderLock(self.folder, "a feature cache fill", option="cache root", name=LOCK_NAME, wait=True,
                          on_wait=self._say_waiting)
        with lock:
            self._writing = 1
            try:
                self._load(locked=True)
                yield self
            finally:
                self._writing = 0
                self._verified = False

    def _append(self, records: Sequence[tuple[int, bytes]]) -> None:
        fd = os.open(self.state_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _pwrite_all_append(fd, b"".join(self._record(row, digest) for row, digest in records))
            os.fsync(fd)
        finally:
            os.close(fd)
        for row, digest in records:
            self._done[row] = digest != NOT_DONE
            self._digests[row] = np.frombuffer(digest, dtype=np.uint8)

    def _rows(self, rows) -> np.ndarray:
        array = np.asarray(rows)
        if array.ndim == 0:
            array = array.reshape(1)
        if array.size == 0:
            return np.zeros(0, dtype=np.int64)
        if array.ndim != 1 or array.dtype.kind not in "iu":
            raise ValueError(f"rows must be a sequence of int indices, got {rows!r:.80}")
        if array.min() < 0 or array.max() >= self.rows:
            raise IndexError(f"rows out of range [0, {self.rows}): {array[(array < 0) | (array >= self.rows)][:8]}")
        return array.astype(np.int64)

    def put(self, rows: Sequence[int], features) -> None:
        """Store ``features`` ((n, C, h, w) float, torch tensor or numpy array, any device) as the
        rows ``rows`` (n distinct indices), converted to float16. The rows are written and fsynced,
        then recorded done with their digests (rows done before are first recorded not done)."""
        index = self._rows(rows)
        if len(np.unique(index)) != len(index):
            raise ValueError("put: rows must be distinct")
        data = _as_float16(features, len(index), self.feature_shape)
        with self.writing():
            again = [(int(row), NOT_DONE) for row in index if self._done[row]]
            if again:
                self._append(again)
            digests = []
            fd = os.open(self.features_path, os.O_RDWR)
            try:
                for i, row in enumerate(index):
                    _pwrite_all(fd, data[i], int(row) * self.row_bytes)
                    digests.append(_row_digest(data[i]))
                os.fsync(fd)
            finally:
                os.close(fd)
            self._append([(int(row), digest) for row, digest in zip(index, digests)])

    def _damaged(self, rows: Sequence[int]) -> list[int]:
        """Those of ``rows`` whose bytes do not hash to their recorded digest (read with pread,
        one row at a time: memory stays at one row)."""
        damaged = []
        try:
            fd = os.open(self.features_path, os.O_RDONLY)
        except FileNotFoundError:
            return [int(r) for r in rows]
        try:
            for row in rows:
                data = os.pread(fd, self.row_bytes, int(row) * self.row_bytes)
                if len(data) != self.row_bytes or _row_digest(data) != self._digests[row].tobytes():
                    damaged.append(int(row))
        finally:
            os.close(fd)
        return damaged

    def _verify_locked(self) -> list[int]:
        damaged = self._damaged(np.flatnonzero(self._done))
        if damaged:
            self._append([(row, NOT_DONE) for row in damaged])
            self._found_damaged.update(damaged)
        self._verified = True
        return damaged

    def verify(self) -> list[int]:
        """Re-read and hash every done row (about sha256's speed: ~1-2 GB/s, plus the disk's read
        time); mark those that do not match their digest not done, and return them (sorted).
        Takes the lock."""
        with self.writing():
            if self._verified:  # the lock's repair just hashed every row
                return sorted(self._found_damaged)
            return self._verify_locked()

    # ---- reading ------------------------------------------------------------------------------

    @property
    def missing(self) -> np.ndarray:
        """Indices (int64, ascending) of the rows not computed yet, or found damaged."""
        return np.flatnonzero(~self._done)

    @property
    def complete(self) -> bool:
        """Whether every row is done (as far as this object knows: another process may have filled
        rows since it was opened)."""
        return bool(self._done.all())

    def _mapping(self) -> np.memmap:
        if self._map is None:
            problem = self._size_problem()
            if problem:
                raise RuntimeError(f"feature cache {self.features_path}: {problem}; reopen or fill it again")
            self._map = np.memmap(self.features_path, dtype=DTYPE, mode="r", shape=(self.rows, *self.feature_shape))
        return self._map

    def get(self, rows: Sequence[int]) -> np.ndarray:
        """Features of ``rows`` (int indices, repeats allowed): (n, C, h, w) float16, a copy of just
        those rows read through the memory map. Raises KeyError if a row is not done."""
        index = self._rows(rows)
        if not self._done[index].all():
            raise KeyError(f"feature cache {self.folder}: rows not computed: {index[~self._done[index]][:8].tolist()} "
                           f"(fill the cache first)")
        out = np.empty((len(index), *self.feature_shape), dtype=DTYPE)
        if len(index):
            np.take(self._mapping(), index, axis=0, out=out)
        return out

    def close(self) -> None:
        """Drop the memory map (arrays returned by :meth:`get` are copies and stay valid)."""
        self._map = None

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def __repr__(self) -> str:
        return (f"FeatureCache({str(self.folder)!r}, rows={self.rows}, shape={self.feature_shape}, "
                f"done={int(self._done.sum())})")


def _pwrite_all_append(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


MAX_META_BYTES = 256 << 20
"""A sibling's meta.json larger than this is not read (a few million image ids)."""


def _siblings(cache: FeatureCache) -> Iterator[FeatureCache]:
    """The other caches of ``cache``'s root with its key and feature shape, opened read-only (a
    folder whose meta.json is unreadable, or does not name that folder, is passed over)."""
    root = cache.folder.parent
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and p != cache.folder)
    except FileNotFoundError:
        return
    for folder in folders:
        meta_path = folder / META_NAME
        try:
            if meta_path.stat().st_size > MAX_META_BYTES:
                continue
            meta = json.loads(meta_path.read_bytes())
        except (OSError, ValueError):
            continue
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION \
                or meta.get("key") != cache.key or meta.get("feature_shape") != list(cache.feature_shape):
            continue
        ids = meta.get("image_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
            continue
        sibling = FeatureCache.open(root, cache.key, ids, cache.feature_shape)
        if sibling.folder == folder:
            yield sibling


def copy_from_siblings(cache: FeatureCache, rows: Sequence[int], batch: int = 16) -> int:
    """Copy into ``cache`` those of ``rows`` whose image is done in a sibling cache (same root, key
    and feature shape; another image list). Each row copied is first re-hashed in the sibling and
    taken only if it matches the sibling's digest. Returns the number of rows copied."""
    wanted = {cache.image_ids[int(row)]: int(row) for row in rows}
    copied = 0
    for sibling in _siblings(cache):
        if not wanted:
            break
        pairs = [(wanted[image], source) for source, image in enumerate(sibling.image_ids)
                 if image in wanted and sibling._done[source]]
        damaged = set(sibling._damaged([source for _, source in pairs]))
        pairs = [(target, source) for target, source in pairs if source not in damaged]
        for first in range(0, len(pairs), batch):
            chunk = pairs[first: first + batch]
            cache.put([target for target, _ in chunk], sibling.get([source for _, source in chunk]))
            copied += len(chunk)
        for target, _ in pairs:
            wanted.pop(cache.image_ids[target], None)
        sibling.close()
    return copied


def fill(cache: FeatureCache, compute: Callable[[Sequence[int]], Any], batch: int = 16, progress: bool = True,
         desc: str = "features", verify: bool = True) -> dict:
    """Compute the missing rows of ``cache``: ``compute(rows)`` (a list of up to ``batch`` row
    indices) returns their features, (len(rows), C, h, w) float (torch or numpy). Holds the cache's
    lock throughout (a second process filling the same cache waits, then finds the rows done).

    ``verify``: first re-hash every done row (:meth:`FeatureCache.verify`; the damaged ones are
    recomputed). A complete cache is verified without taking the lock, so several runs can read
    one at the same time. ``progress``: a progress bar on stderr, in images/s.
    Rows missing here but done in another cache of the same root, key and shape (another list of
    images: a query set, other short-lists) are copied from it, checked against its digests
    (:func:`copy_from_siblings`), before anything is computed.
    Returns ``{"computed", "reused", "copied", "damaged", "seconds"}``: rows computed, rows found
    done and sound, rows copied from other caches, rows found damaged (recomputed), wall time in
    seconds."""
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    start = time.perf_counter()

    def result(computed: int, reused: int, damaged: int, copied: int = 0) -> dict:
        return {"computed": computed, "reused": reused, "copied": copied, "damaged": damaged,
                "seconds": round(time.perf_counter() - start, 3)}

    if cache.complete and (not verify or not cache._damaged(np.arange(cache.rows))):
        return result(0, cache.rows, 0)
    with cache.writing():
        if verify:
            cache.verify()
        damaged = len(cache._found_damaged)
        reused = cache.rows - len(cache.missing)
        copied = copy_from_siblings(cache, cache.missing, batch)
        missing = cache.missing
        need = len(missing) * cache.row_bytes
        free = shutil.disk_usage(cache.folder).free
        if need > free:
            raise OSError(errno.ENOSPC, f"feature cache {cache.folder}: {len(missing)} rows need {need / 1e9:.2f} GB "
                                        f"and the disk has {free / 1e9:.2f} GB free")
        with tqdm(total=len(missing), unit="img", desc=desc, disable=not progress or not len(missing),
                  file=sys.stderr, dynamic_ncols=True) as bar:
            for first in range(0, len(missing), batch):
                rows = missing[first:first + batch].tolist()
                cache.put(rows, compute(rows))
                bar.update(len(rows))
    return result(len(missing), reused, damaged, copied)
