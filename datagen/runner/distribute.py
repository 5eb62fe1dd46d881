"""Where shard tasks run: a :class:`Distributor` takes a list of :class:`~datagen.runner.task.ShardTask`,
runs them, reports per-sample progress and returns their stats.

The split follows img2dataset's downloader/distributor: the task knows how to build one shard,
the distributor only where and how many at once. Two local ones:

- :class:`InProcessDistributor`: one task after the other in this process (one worker);
- :class:`JoblibDistributor`: joblib worker processes that die with the build, progress through
  a manager queue, and optionally one stylizer of this process serving every worker (a
  :class:`~datagen.style.pipeline.StyleServer`, for a GPU).

A cluster one, :class:`~datagen.runner.dask_distributor.DaskDistributor` (``datagen build
--scheduler``), implements the same ``run`` on a Dask cluster: the tasks pickle, and their bytes
do not depend on where they run. It lives in its own module so that only a cluster build imports
``distributed`` (the ``cluster`` extra).
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from joblib import Parallel, delayed

from datagen.runner.lock import die_with_parent
from datagen.runner.styling import serve_style
from datagen.runner.task import ShardTask

CLUSTER_STAGING_DIR = ".cluster-staging"
"""Folder of a build's output where the attempts of a cluster build write their shard before its
files are renamed into the output (:mod:`~datagen.runner.dask_distributor`); what a killed build
left there is removed with its other leftovers."""

Progress = Callable[[int], None]
"""Called with a number of samples just written."""


class Distributor(Protocol):
    """Runs shard tasks and hands back their stats (in any order)."""

    def run(self, tasks: Sequence[ShardTask], progress: Progress) -> list[dict]:
        """Run every task; ``progress(k)`` as samples are written; a task's error propagates."""
        ...


class InProcessDistributor:
    """Every task in this process, in order: the stylizer the build made for its checks is reused."""

    def run(self, tasks: Sequence[ShardTask], progress: Progress) -> list[dict]:
        return [task(progress=progress) for task in tasks]


def _run_in_worker(task: ShardTask, progress: Progress, remote_style, build_pid: int) -> dict:
    """A task in a joblib worker process, which kills itself when the build's process is gone
    (:func:`~datagen.runner.lock.die_with_parent`), so that no shard is written after a build is killed."""
    die_with_parent(build_pid)
    return task(progress=progress, remote_style=remote_style)


class JoblibDistributor:
    """Tasks on ``workers`` joblib processes; per-sample progress flows back through a queue.

    ``served_stylizer``: a stylizer of this process that every worker uses through a
    :class:`~datagen.style.pipeline.StyleServer` (a GPU one); else each worker makes its own from
    its tasks' style options. ``log`` hears how busy the server was."""

    def __init__(self, workers: int, served_stylizer=None, log: Callable[[str], None] = print):
        self.workers = workers
        self.served_stylizer = served_stylizer
        self.log = log

    def run(self, tasks: Sequence[ShardTask], progress: Progress) -> list[dict]:
        from multiprocessing.managers import SyncManager

        from datagen.style.pipeline import StyleServer

        manager = SyncManager()
        manager.start(die_with_parent, (os.getpid(),))  # its server process goes with a killed build too
        updates = manager.Queue()
        stop = threading.Event()

        def drain():
            while not stop.is_set() or not updates.empty():
                try:
                    progress(updates.get(timeout=0.2))
                except queue.Empty:
                    continue

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        try:
            with contextlib.ExitStack() as stack:
                server = (stack.enter_context(StyleServer(self.served_stylizer, manager))
                          if self.served_stylizer is not None else None)
                jobs = (delayed(_run_in_worker)(task, updates.put, server.styler() if server else None, os.getpid())
                        for task in tasks)
                built = list(Parallel(n_jobs=self.workers, return_as="generator_unordered")(jobs))
            if server is not None:
                busy = 100 * server.busy_seconds / max(server.open_seconds, 1e-9)
                self.log(f"style server: {server.served} requests, stylising {server.busy_seconds:.1f} s of "
                         f"{server.open_seconds:.1f} s ({busy:.0f}% busy)")
            return built
        finally:
            stop.set()
            reader.join()
            manager.shutdown()


def local_distributor(workers: int, stylizer=None, style_server: bool | None = None,
                      log: Callable[[str], None] = print) -> Distributor:
    """The distributor of a local build on ``workers`` processes: in process for one, else
    joblib, with this process's ``stylizer`` serving the workers when
    :func:`~datagen.runner.styling.serve_style` says so (``style_server``; default: on a GPU)."""
    if workers <= 1:
        return InProcessDistributor()
    served = stylizer if serve_style(stylizer, workers, style_server) else None
    if served is not None:
        log(f"style server: {workers} workers share one stylizer on {getattr(served, 'device', 'the CPU')}")
    return JoblibDistributor(workers, served, log)
