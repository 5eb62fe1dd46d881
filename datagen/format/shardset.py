"""What a shard-set argument names: one resolver for every command that reads shards.

``datagen verify``, ``datagen preview``, ``trainer inspect``, ``trainer fit`` and ``trainer eval``
all accept the same forms:

- a folder: the shards its ``manifest.json`` lists, or its ``shard-*.tar`` in name order when it
  has no manifest;
- a manifest file in the shards' folder (``shards/coco/manifest.json``; the copies under
  ``manifests/`` name sets, but their shards are not beside them);
- a brace pattern, ``shards/shard-{000000..000009}.tar``: the ``.tar`` files it expands to;
- one ``.tar`` file;
- a list of any of these (from Python).

Each form may also be a URL (``https://``, ``s3://``, ``gs://``; :mod:`datagen.format.storage`):
a folder URL must hold a ``manifest.json`` (an HTTP server cannot list a folder), and its shards
are streamed, never downloaded whole. ``pipe:`` and other schemes are refused.

Tars named by a pattern or one by one keep their manifest entry (size, sha256, sample count) when
the manifest of their folder lists them, so they can still be checked against it.

A manifest's shard names must be plain file names: a name with a path separator, or ``.``/``..``,
is refused, and so is a listed shard that is a link out of the folder or not a regular file (a
FIFO would hang a reader), so that a manifest never makes a command open a file outside the set:
the shards of a manifest are always its names joined to the manifest's own folder (or URL).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand

from datagen.format.manifest import MANIFEST_NAME, ManifestError, fingerprint, load_manifest
from datagen.format.storage import is_url, location

FORMS = ("a shard folder, its manifest.json, a brace pattern such as 'shards/shard-{000000..000009}.tar', "
         "or a .tar file")


class ShardSetError(FileNotFoundError):
    """A shard-set argument that names no shards; the message says what was given and what is accepted."""


@dataclass(frozen=True)
class ShardSet:
    """The shards an argument names, in order, with what their manifest says of them.

    ``manifest`` is the manifest of the shards' folder when there is one; ``entries`` maps a tar's
    path to its manifest entry (``name``, ``bytes``, ``sha256``, ``samples``) for the tars the
    manifest lists. ``whole`` is True when the argument names exactly the manifest's set (a folder
    or a manifest), so that its totals and fingerprint apply.
    """

    spec: str
    tars: tuple[Path, ...]
    manifest: dict | None = None
    manifest_path: Path | None = None
    entries: dict | None = None
    whole: bool = False

    @property
    def fingerprint(self) -> str | None:
        """The manifest's fingerprint when the set is the manifest's whole set, after checking that
        it is the fingerprint of the manifest's own shard list (ManifestError otherwise), so that it
        stands for the shards' checksums; whether the files have those checksums is for the reader
        to check (``datagen verify``, ``trainer fit``)."""
        if not (self.whole and self.manifest):
            return None
        recorded = self.manifest["fingerprint"]
        if fingerprint(self.manifest["config_hash"], self.manifest["shards"]) != recorded:
            raise ManifestError(f"{self.manifest_path}: its fingerprint {str(recorded)[:12]} is not that of its "
                                f"shard list (the manifest was edited or damaged)")
        return recorded

    def entry(self, tar: Path) -> dict | None:
        return (self.entries or {}).get(tar)

    @property
    def declared_samples(self) -> int | None:
        """The samples the manifest records for these shards, when it lists every one of them."""
        entries = [self.entry(tar) for tar in self.tars]
        return sum(int(entry["samples"]) for entry in entries) if entries and None not in entries else None


def _checked_names(manifest: dict, path: Path) -> list[str]:
    names = []
    for index, entry in enumerate(manifest["shards"]):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or os.sep in name \
                or (os.altsep and os.altsep in name) or "\0" in name:
            raise ManifestError(f"{path}: shard {index} has name {name!r}; a shard name must be a plain file "
                                f"name in the manifest's folder")
        names.append(name)
    return names


def _check_inside(tar: Path, folder: Path, manifest_path: Path) -> None:
    """Refuse a listed shard that is a link out of the set's folder, or not a regular file (a FIFO
    would hang a reader). A missing one is left to the reader to report. (A URL's shards are
    objects of the store, joined to the manifest's URL: nothing to check here.)"""
    if is_url(tar):
        return
    if tar.is_symlink() and tar.resolve().parent != folder.resolve():
        raise ManifestError(f"{manifest_path}: shard {tar.name} is a link to {tar.resolve()}, outside the "
                            f"set's folder")
    if tar.exists() and not tar.is_file():
        raise ManifestError(f"{manifest_path}: shard {tar.name} is not a regular file")


def _from_manifest(spec: str, path: Path) -> ShardSet:
    manifest = load_manifest(path)
    folder = path.parent
    names = _checked_names(manifest, path)
    tars = tuple(folder / name for name in names)
    for tar in tars:
        _check_inside(tar, folder, path)
    return ShardSet(spec, tars, manifest, path, dict(zip(tars, manifest["shards"])), whole=True)


def _with_folder_manifest(spec: str, tars: list[Path]) -> ShardSet:
    """Bare tars, with the entries of their folders' manifests when those list them."""
    manifest = manifest_path = None
    entries = {}
    folders = {tar.parent for tar in tars}
    for folder in folders:
        if (folder / MANIFEST_NAME).is_file():
            found = _from_manifest(spec, folder / MANIFEST_NAME)
            entries.update({tar: found.entry(tar) for tar in tars if found.entry(tar) is not None})
            if len(folders) == 1:
                manifest, manifest_path = found.manifest, found.manifest_path
    return ShardSet(spec, tuple(tars), manifest, manifest_path, entries or None, whole=False)


def _url_tars_of(spec: str) -> list | ShardSet:
    """The forms of a URL: a brace pattern of .tar URLs, a manifest URL, one .tar URL, or a folder
    URL with a manifest.json (a store cannot always list a folder, an HTTP server never)."""
    if "{" in spec:
        expanded = [location(item) for item in braceexpand(spec)]
        bad = [str(url) for url in expanded if not url.name.endswith(".tar")]
        if bad:
            raise ShardSetError(f"{spec}: the pattern names {len(bad)} URL(s) that are not .tar files, "
                                f"e.g. {', '.join(bad[:3])}")
        return expanded
    url = location(spec)
    if url.name.endswith(".json"):
        return _from_manifest(spec, url)
    if url.name.endswith(".tar"):
        return [url]
    manifest = url / MANIFEST_NAME
    try:
        listed = manifest.is_file()
    except (OSError, ValueError) as error:
        raise ShardSetError(f"{spec}: cannot reach it ({type(error).__name__}: {error})") from None
    if not listed:
        raise ShardSetError(f"{spec}: no {MANIFEST_NAME} at this URL (a folder URL needs its manifest; or name "
                            f"a .tar URL or a brace pattern of them)")
    return _from_manifest(spec, manifest)


def _tars_of(spec: str) -> list[Path] | ShardSet:
    if is_url(spec):
        return _url_tars_of(spec)
    if "{" in spec:
        expanded = [Path(item) for item in braceexpand(spec)]
        bad = [str(p) for p in expanded if p.suffix != ".tar" or not p.is_file()]
        if bad:
            raise ShardSetError(f"{spec}: the pattern names {len(bad)} path(s) that are not .tar files on disk "
                                f"(missing, or not regular files), e.g. {', '.join(bad[:3])}")
        return expanded
    path = Path(spec)
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            return _from_manifest(spec, path / MANIFEST_NAME)
        tars = sorted(p for p in path.glob("shard-*.tar") if p.is_file())
        if not tars:
            raise ShardSetError(f"{spec}: a folder with neither {MANIFEST_NAME} nor shard-*.tar files "
                                f"(a shard set is {FORMS})")
        return tars
    if path.suffix == ".json" and path.is_file():
        return _from_manifest(spec, path)
    if path.suffix == ".tar" and path.is_file():
        return [path]
    what = "does not exist" if not path.exists() else "is not a shard set"
    raise ShardSetError(f"{spec}: {what} (a shard set is {FORMS})")


def resolve_shard_set(spec) -> ShardSet:
    """The :class:`ShardSet` that ``spec`` names (see the module docstring for the forms).

    Raises :class:`ShardSetError` (a FileNotFoundError) when ``spec`` names no shards, and
    :class:`~datagen.format.manifest.ManifestError` (a ValueError) for an unreadable or unsafe manifest.
    """
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ShardSetError(f"an empty list names no shards (a shard set is {FORMS})")
        if len(spec) == 1:
            return resolve_shard_set(spec[0])
        tars = [tar for item in spec for tar in resolve_shard_set(item).tars]
        return _with_folder_manifest(", ".join(str(item) for item in spec), tars)
    spec = str(spec) if is_url(spec) or not isinstance(spec, os.PathLike) else os.fspath(spec)
    if not spec:
        raise ShardSetError(f"no shard set given (a shard set is {FORMS})")
    found = _tars_of(spec)
    return found if isinstance(found, ShardSet) else _with_folder_manifest(spec, found)
