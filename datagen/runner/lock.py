"""One writer per shard set: an exclusive lock on a build's output folder, and workers that do
not outlive their build.

:class:`OutputLock` holds an OS lock (``flock``) on ``OUT/.build.lock`` for as long as a build
runs; the OS releases it however the build ends (exit, exception, ``kill -9``). The file records
who holds it (pid, host, start time), so that a second build on the same folder can say so.

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
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock (Windows builds are not supported for concurrent use)
    fcntl = None

LOCK_NAME = ".build.lock"
PARENT_POLL_SECONDS = 0.2


class LockedError(RuntimeError):
    """Another process holds the output folder's lock; the message names it."""


def _holder(path: Path) -> str:
    try:
        record = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process (its record is unreadable)"
    if not isinstance(record, dict):
        return "another process"
    return (f"pid {record.get('pid', '?')} on {record.get('host', '?')}, running "
            f"{record.get('command', 'a build')} since {record.get('started', '?')}")


class OutputLock:
    """``with OutputLock(out, "datagen build"):`` holds ``out/.build.lock`` exclusively, or raises
    :class:`LockedError` at once naming the holder. The lock file stays; the lock goes with the
    process."""

    def __init__(self, out_dir, command: str = "a build"):
        self.path = Path(out_dir) / LOCK_NAME
        self.command = command
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        if fcntl is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(f"{self.path.parent} is being written by {_holder(self.path)}; wait for it to "
                              f"finish, or use another --out") from None
        except OSError:
            os.close(fd)
            raise
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> bool:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
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
