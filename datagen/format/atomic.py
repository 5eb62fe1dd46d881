"""Atomic file writes: a file is either its old content or its new content, never half written.

Every file that a build, a style training or a training run writes goes through
:func:`atomic_write`: ``<name>.tmp`` beside the target, fsync, rename over the target, fsync of the
folder; on any error (a full disk, Ctrl-C) the temporary file is removed and the target is left
as it was. Writers of one path are serialised by their owner (the build's lock, a run folder).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(directory) -> None:
    """Best effort: make a rename in ``directory`` durable (not possible on every platform)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_path(path) -> Path:
    """Where :func:`atomic_write` writes ``path`` before renaming it: ``<path>.tmp``."""
    return Path(str(path) + ".tmp")


def atomic_write(path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(handle)`` on ``<path>.tmp`` (a binary file), fsync it and rename it to ``path``.
    Makes the parent folder. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda handle: handle.write(data))
