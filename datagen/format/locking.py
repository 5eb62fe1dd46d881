"""One writer per folder: an OS lock (``flock``) on a lock file inside it, with a record of the holder.

:class:`FolderLock` holds ``FOLDER/<name>`` exclusively for as long as the ``with`` block runs; the
OS releases it however the process ends (exit, exception, ``kill -9``). The file records who holds
it (pid, host, command, start time) so that a second process on the same folder can say so. It
either refuses at once (:class:`LockedError`, naming the holder: a build's output folder) or waits
for the holder to finish, saying once whom it waits for (a feature cache being filled).

Generic (nothing else of ``datagen`` is imported): ``datagen.runner.lock.OutputLock`` (builds,
pulls, publishes) and ``trainer.retrieval.cache`` (feature caches) both use it.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock (Windows is not supported for concurrent use)
    fcntl = None


class LockedError(RuntimeError):
    """Another process holds the folder's lock; the message names it."""


def describe(record) -> str:
    """Who holds a lock, from its record (pid, host, command, start time, work folder)."""
    if not isinstance(record, dict):
        return "another process (its record is unreadable)"
    work = f" (work folder {record['work']})" if record.get("work") else ""
    return (f"pid {record.get('pid', '?')} on {record.get('host', '?')}, running "
            f"{record.get('command', 'a build')} since {record.get('started', '?')}{work}")


def read_holder(path) -> str:
    """:func:`describe` of the record in the lock file ``path``."""
    try:
        record = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return "another process (its record is unreadable)"
    return describe(record)


def holder_record(command: str, **extra) -> dict:
    """The record a lock holder writes: this process's pid, host, ``command``, start time, ``extra``."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), **extra}


_HELD: dict[str, int] = {}
"""Lock files held by this process (resolved path -> pid): a waiting lock taken twice in one process
would wait for itself forever (``flock`` locks belong to open files, not to processes)."""
_HELD_GUARD = threading.Lock()


class FolderLock:
    """``with FolderLock(folder, "datagen build"):`` holds ``folder/<name>`` exclusively.

    ``wait=False``: raise :class:`LockedError` at once when another process holds it (the message
    names the holder and suggests another ``option``). ``wait=True``: wait until it is released;
    ``on_wait(holder)`` is called once first, with :func:`describe` of the holder. Taking a
    waiting lock that this process holds already raises :class:`LockedError` instead of waiting
    forever. The lock file stays; the lock goes with the process. Without ``fcntl`` (not POSIX)
    nothing is locked."""

    def __init__(self, folder, command: str = "a build", option: str = "--out", name: str = ".build.lock",
                 wait: bool = False, on_wait: Callable[[str], object] | None = None):
        self.path = Path(folder) / name
        self.command, self.option = command, option
        self.wait, self.on_wait = wait, on_wait
        self._fd: int | None = None
        self._key: str | None = None

    def _refuse(self, holder: str) -> LockedError:
        return LockedError(f"{self.path.parent} is being written by {holder}; wait for it to finish, or use "
                           f"another {self.option}")

    def __enter__(self) -> FolderLock:
        if fcntl is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        if self.wait:
            with _HELD_GUARD:
                if _HELD.get(key) == os.getpid():
                    raise self._refuse(f"this process (pid {os.getpid()}) already")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not self.wait:
                    raise self._refuse(read_holder(self.path)) from None
                if self.on_wait is not None:
                    self.on_wait(read_holder(self.path))
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder_record(self.command)) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._key = fd, key
        with _HELD_GUARD:
            _HELD[key] = os.getpid()
        return self

    def __exit__(self, *exc) -> bool:
        if self._fd is not None:
            with _HELD_GUARD:
                if _HELD.get(self._key) == os.getpid():
                    del _HELD[self._key]
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = self._key = None
        return False

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now (always False without ``fcntl``)."""
        return self._fd is not None
