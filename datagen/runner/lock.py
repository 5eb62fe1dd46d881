"""One writer per shard set: an exclusive lock on a build's output folder, and workers that do
not outlive their build.

:class:`OutputLock` holds an OS lock (``flock``) on ``OUT/.build.lock`` for as long as a build
runs; the OS releases it however the build ends (exit, exception, ``kill -9``). The file records
who holds it (pid, host, start time), so that a second build on the same folder can say so.

:class:`StoreLock` is the lock of a build whose ``--out`` is a store URL: an object
``URL/.build.lock`` with the same record (and the build's work folder), created with the store's
conditional write where it has one (S3's ``If-None-Match``), checked by reading it back, and
deleted when the build ends. A store cannot release it for a killed process, so a stale one is
recognised where that is certain or near enough: a record of this host whose work folder is the
one this build holds the :class:`OutputLock` of (that build is gone), or whose pid no longer runs.
A record of another host is only taken over with ``--break-lock``. Without conditional writes
(a filesystem that lacks them) two builds starting in the same instant may both pass; the read
back after the write makes that window small.

:func:`die_with_parent` makes a worker process kill itself when the process that started it is
gone: a build killed with ``kill -9`` cannot stop its workers, and without this they would go on
writing shards into a folder that a rerun is already rebuilding.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from datagen.format.locking import FolderLock, LockedError, describe, holder_record

LOCK_NAME = ".build.lock"
PARENT_POLL_SECONDS = 0.2

_describe = describe
_record = holder_record


class OutputLock(FolderLock):
    """``with OutputLock(out, "datagen build"):`` holds ``out/.build.lock`` exclusively, or raises
    :class:`LockedError` at once naming the holder. The lock file stays; the lock goes with the
    process. ``option``: the command-line option that names the folder, for the message.
    (The flock itself is :class:`datagen.format.locking.FolderLock`'s.)"""

    def __init__(self, out_dir, command: str = "a build", option: str = "--out"):
        super().__init__(out_dir, command, option=option, name=LOCK_NAME)


STORE_LOCK_BYTES = 1 << 16
"""Largest lock object read (a record is a few hundred bytes)."""


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return True  # not a pid this host can check: taken as running
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it runs, as another user
        return True
    return True


class StoreLock:
    """``with StoreLock(store, work_dir, "datagen build"):`` holds the lock object
    :data:`LOCK_NAME` of ``store`` (a :class:`~datagen.format.storage.Store`), or raises
    :class:`LockedError` at once naming its holder (see the module's description).

    ``work_dir``: the build's local work folder, whose :class:`OutputLock` the caller holds
    already (a record naming it on this host is stale). ``break_lock``: take over a record that
    is not known to be stale (a build on another machine that is gone). ``log`` hears of every
    lock taken over. The object goes when the build ends, unless another build took it over."""

    def __init__(self, store, work_dir, command: str = "a build", break_lock: bool = False, log=None):
        self.store, self.command, self.break_lock = store, command, break_lock
        self.work = str(Path(work_dir).resolve())
        self.log = log or (lambda message: None)
        self.token: str | None = None

    def _read(self) -> dict | None:
        """The lock's record, {} when it is unreadable, None when there is no lock."""
        try:
            data = self.store.read(LOCK_NAME, STORE_LOCK_BYTES)
        except ValueError:
            return {}
        if data is None:
            return None
        try:
            record = json.loads(data)
        except ValueError:
            return {}
        return record if isinstance(record, dict) else {}

    def _stale(self, record: dict) -> str | None:
        """Why the holder of ``record`` is known to be gone, or None."""
        if not record or record.get("host") != socket.gethostname():
            return None
        if record.get("work") == self.work:
            return "this build holds its work folder's lock, so that build is gone"
        if not _pid_alive(record.get("pid")):
            return f"pid {record.get('pid')} no longer runs on this host"
        return None

    def _refuse(self, record) -> LockedError:
        return LockedError(f"{self.store} is being written by {_describe(record)}; wait for it to finish, or use "
                           f"another --out (if that build is gone, --break-lock takes its lock over)")

    def __enter__(self) -> StoreLock:
        record = self._read()
        if record is not None:
            reason = self._stale(record)
            if reason is None and not self.break_lock:
                raise self._refuse(record)
            self.log(f"{self.store}: taking over the lock of {_describe(record)}: {reason or '--break-lock'}")
            self.store.remove(LOCK_NAME)
        token = uuid.uuid4().hex
        data = (json.dumps(_record(self.command, work=self.work, token=token)) + "\n").encode()
        try:
            self.store.write_bytes(LOCK_NAME, data, exclusive=True)
        except FileExistsError:
            raise self._refuse(self._read()) from None
        now = self._read()
        if not now or now.get("token") != token:
            raise self._refuse(now)
        self.token = token
        return self

    def __exit__(self, *exc) -> bool:
        if self.token is not None:
            try:
                record = self._read()
                if record and record.get("token") == self.token:
                    self.store.remove(LOCK_NAME)
            except Exception as error:  # noqa: BLE001 - an unreachable store must not hide the build's own error
                self.log(f"warning: {self.store.url_of(LOCK_NAME)} could not be removed ({error}); the next build "
                         f"on this host with this work folder takes it over")
            self.token = None
        return False


_WATCHED: set[int] = set()


def die_with_parent(parent_pid: int) -> None:
    """In a worker process that ``parent_pid`` started: a daemon thread kills this process
    (SIGKILL) within :data:`PARENT_POLL_SECONDS` of that parent going away (the worker is then
    adopted by another process). A worker whose parent is gone already (started just as the build
    was killed) dies at once. Once per process; nothing in the parent itself."""
    if os.getpid() == parent_pid or parent_pid in _WATCHED:
        return
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)
    _WATCHED.add(parent_pid)

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM (what ``timeout``, ``kill`` and job schedulers send) raises KeyboardInterrupt in
    the main thread, like Ctrl-C, so a build stops its workers and cleans up the same way.
    Does nothing outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
