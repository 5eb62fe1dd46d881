"""Shard tasks on a Dask distributed cluster (``datagen build --scheduler tcp://HOST:PORT``).

:class:`DaskDistributor` implements :class:`~datagen.runner.distribute.Distributor` with a
``distributed.Client``: one future per :class:`~datagen.runner.task.ShardTask`, keyed by the
shard's name (``shard-000003.tar-<run>``, so the dashboard and the logs say which shard a retry
or a failure is), gathered as they complete. The bytes are those of a local build: a shard is a
pure function of (config, bank, seed, index), whichever machine builds it.

What the cluster must provide: the same ``datagen`` install on every worker, and the output
folder (with its segment bank) and the source images on a file system that every worker sees at
the same path (NFS, Lustre, a mounted bucket). The workers write the shards; the client writes
the manifest and holds the build's lock on the folder (workers never take it).

With a store URL as ``--out`` (``s3://...``, :mod:`~datagen.runner.store`) the shared folder is
the build's work folder (``--work``, with the bank) instead, and each worker uploads the shards
it builds itself (tar, rows, stats marker last; :class:`~datagen.runner.task.ShardTask` does it):
every worker needs the store's credentials, and no shard passes through the client.

Progress: a worker counts the pairs a task writes and sends the count of the attempt so far as a
Dask event (``Worker.log_event``) every :data:`PROGRESS_SECONDS` or every tenth of a shard; the
client keeps, per shard, the largest count any attempt reached, so a retried shard does not count
its pairs twice.

Failures: a task that raises is retried ``retries`` times (on any worker); a worker that dies
mid-task has its tasks rescheduled by Dask (``distributed.scheduler.allowed-failures`` deaths,
then the task fails). Shards that still fail are listed (name and error) in one
:class:`~datagen.runner.errors.BuildError` once every other shard is done; the done ones are
complete on disk, so rerunning the command builds only the failed ones.

Kill safety: an attempt writes its shard (tar, sample rows, stats marker) into a folder of its
own, ``OUT/.cluster-staging/<run>/<shard>-<attempt>/``, then renames the three files into ``OUT``
(stats marker last). Two attempts of one shard may overlap in time (the scheduler takes a worker
for dead while it still writes, or a task goes on after its build was interrupted): each writes
only its own temporary files, and the renames are atomic and carry identical bytes, so whichever
lands last leaves the same complete shard. The client removes its run's staging folder when the
run ends however it ends (and a new build removes any that a killed client left, under the lock):
an attempt still going then finds its files gone and its renames fail, so it cannot write into
``OUT`` once the build that planned it is over (at most a rename already under way as the folder
goes lands, and it carries the bytes of that build's shard; a shard without its stats marker is
rebuilt by the next build). For a store, the staging folder is under the work folder's upload
folder and an attempt uploads its files from there (each object put whole) instead of renaming
them: the same holds, with an upload under way in place of a rename.

Style on GPU workers: each worker runs its tasks through :class:`ShardPlugin`, registered by the
client for the run. On a worker with one thread (CPU machines: ``--nworkers N --nthreads 1``) a
task runs in the worker's own thread, with its own stylizer, as in a local joblib worker. On a
worker with several threads (a GPU machine: one worker process with ``--nthreads K``) the plugin
gives the worker what a local build's process has: a pool of K processes that build the pairs
(pair building holds the GIL much of the time, so threads scale poorly, and a process's loaded
bank and pair builder are not made to be shared by threads), and, when
:func:`~datagen.runner.styling.serve_style` says so (a stylizer on CUDA, or ``style_server=True``),
one stylizer in the worker process serving them all through a
:class:`~datagen.style.pipeline.StyleServer`: one copy of the networks per GPU, fed by every
pair-building process of the machine. Such a worker must be allowed to start processes (Dask's
nanny starts daemonic workers unless ``DASK_DISTRIBUTED__WORKER__DAEMON=False``).

``distributed`` is imported with this module only, which only ``--scheduler`` imports.
"""
from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import queue
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from distributed import Client, as_completed, get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from datagen.config import BuildConfig
from datagen.format.atomic import fsync_dir
from datagen.format.manifest import samples_name, stats_name
from datagen.format.shards import shard_name
from datagen.runner.distribute import CLUSTER_STAGING_DIR
from datagen.runner.errors import BuildError
from datagen.runner.lock import die_with_parent
from datagen.runner.styling import StyleSpec, serve_style
from datagen.runner.task import ShardTask
from datagen.style import NO_STYLE, make_stylizer

IDLE_SECONDS = 60.0
"""A worker's pool and served stylizer close after this long without a shard task."""
PROGRESS_SECONDS = 0.5
"""A worker sends its pair count at most this often (and every tenth of a shard)."""
LISTED_FAILURES = 20
"""Failed shards named one by one in the error; the rest are counted."""


class _Throttle:
    """``progress(k)`` for a task: counts the pairs of this attempt and calls ``send(done)`` with
    the running count every ``every`` pairs or :data:`PROGRESS_SECONDS`, whichever comes first
    (one message per pair would flood the scheduler); :meth:`flush` sends what is left."""

    def __init__(self, send: Callable[[int], None], every: int):
        self.send, self.every = send, max(1, every)
        self.done = self.sent = 0
        self.last = time.monotonic()

    def __call__(self, k: int = 1) -> None:
        self.done += k
        if self.done - self.sent >= self.every or time.monotonic() - self.last >= PROGRESS_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.done > self.sent:
            self.send(self.done)
            self.sent, self.last = self.done, time.monotonic()


def _every(task: ShardTask) -> int:
    return max(1, task.count // 10)


# -- on a worker -------------------------------------------------------------------------------

def _publish(attempt: Path, out: Path, shard: int) -> None:
    """Move an attempt's finished files into ``out``: tar, sample rows, stats marker last. Each
    rename is atomic; a rename fails when the run's staging folder is gone (the build is over)."""
    for name in (shard_name(shard), samples_name(shard), stats_name(shard)):
        os.replace(attempt / name, out / name)
    fsync_dir(out)


def run_attempt(task: ShardTask, staging: str | os.PathLike, run: Callable[[ShardTask], dict]) -> dict:
    """One attempt of ``task``: ``run`` builds it into a new folder of its own under ``staging``
    (the run's staging folder, which must exist), whose files are then renamed into
    ``task.out_dir``, unless the task uploads them to its store itself (``task.store``); the
    folder goes in any case. Returns the shard's stats."""
    attempt = Path(staging) / f"{shard_name(task.shard)}-{uuid.uuid4().hex[:12]}"
    attempt.mkdir()  # FileNotFoundError once the client has removed the run's staging folder
    try:
        stats = run(dataclasses.replace(task, out_dir=str(attempt)))
        if task.store is None:
            _publish(attempt, Path(task.out_dir), task.shard)
        return stats
    finally:
        shutil.rmtree(attempt, ignore_errors=True)


def _run_on_worker(task: ShardTask, staging: str, topic: str, plugin_name: str) -> dict:
    """The Dask task of one shard: check that this machine sees the build's folder, run one
    attempt (in this thread, or in the worker's pool through the run's :class:`ShardPlugin`), and
    send its progress to the client as events on ``topic``."""
    worker = get_worker()
    if not Path(task.bank_dir).is_dir() or not Path(staging).is_dir():
        raise BuildError(f"worker {worker.address} on {socket.gethostname()} does not see {task.out_dir} (its "
                         f"segment bank or staging folder is missing): {_shared_option(task)} must be on a file "
                         f"system that every worker sees at the same path")

    def send(done: int) -> None:
        worker.log_event(topic, {"shard": task.shard, "done": done})

    plugin = worker.plugins.get(plugin_name)
    if not isinstance(plugin, ShardPlugin):
        raise BuildError(f"worker {worker.address} lacks this build's plugin {plugin_name} (was it removed?)")
    if plugin.pooled:
        return run_attempt(task, staging, lambda staged: plugin.run(staged, send))

    def in_thread(staged: ShardTask) -> dict:
        throttle = _Throttle(send, _every(staged))
        stats = staged(progress=throttle)
        throttle.flush()
        return stats

    return run_attempt(task, staging, in_thread)


def _run_in_pool(task: ShardTask, counts, remote_style) -> dict:
    """A task in a process of :class:`ShardPlugin`'s pool: pair counts go back through ``counts``."""
    throttle = _Throttle(counts.put, _every(task))
    stats = task(progress=throttle, remote_style=remote_style)
    throttle.flush()
    return stats


class ShardPlugin(WorkerPlugin):
    """What a worker needs to run one build's shard tasks (see the module's description): nothing
    on a one-thread worker; else a pool of one process per worker thread and, when served, the
    build's stylizer in the worker process behind a :class:`~datagen.style.pipeline.StyleServer`.

    One per run (its name has the run's id), so that two builds with other style options on one
    cluster never share a stylizer; removed by the client when its run ends. The pool and the
    server are made when a task first needs them (in a task's thread, not in the worker's event
    loop: loading AdaIN takes seconds) and closed after :data:`IDLE_SECONDS` without a task (so a
    killed client's plugin does not keep processes and a stylizer for long), on removal, or when
    the worker closes; the pool's processes and the queue server kill themselves when the worker
    process dies (:func:`~datagen.runner.lock.die_with_parent`)."""

    def __init__(self, name: str, config: BuildConfig, style: StyleSpec, style_server: bool | None = None,
                 topic: str = ""):
        self.name, self.config, self.style, self.style_server, self.topic = name, config, style, style_server, topic
        self._worker = None
        self._threads = 1
        self._lock = threading.Lock()
        self._active = 0
        self._idle: threading.Timer | None = None
        self._manager = self._server = self._pool = None

    def __getstate__(self) -> dict:
        return {"name": self.name, "config": self.config, "style": self.style, "style_server": self.style_server,
                "topic": self.topic}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def setup(self, worker) -> None:
        self._worker, self._threads = worker, worker.state.nthreads

    @property
    def pooled(self) -> bool:
        """Whether this worker's tasks go to a pool: when it runs several at once."""
        return self._threads > 1

    def _start(self) -> None:
        """The pool, its queue server and the served stylizer (called under the lock)."""
        from multiprocessing.managers import SyncManager

        from datagen.style.pipeline import StyleServer

        if multiprocessing.current_process().daemon:
            raise BuildError(f"a worker with {self._threads} threads runs its shards in a pool of processes, and this "
                             "worker is a daemonic process, which may not start any: start the workers with "
                             "DASK_DISTRIBUTED__WORKER__DAEMON=False, or with --nthreads 1")
        stylizer = None
        if self.config.style != NO_STYLE and self.style_server is not False:
            # its own, not this process's cached one (STATE): closing the server lets it go
            stylizer = make_stylizer(self.config.style, **self.style.options.given())
        serve = serve_style(stylizer, self._threads, self.style_server)
        context = multiprocessing.get_context("spawn")  # the worker has threads: no fork
        self._manager = SyncManager(ctx=context)
        self._manager.start(die_with_parent, (os.getpid(),))
        if serve:
            self._server = StyleServer(stylizer, self._manager).__enter__()
        self._pool = self._new_pool()
        served = f"one stylizer on {getattr(stylizer, 'device', 'the CPU')} serving them" if serve else ""
        self._worker.log_event(self.topic, {"worker": self._worker.address, "processes": self._threads,
                                            "served": served})

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self._threads, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=die_with_parent, initargs=(os.getpid(),))

    def run(self, task: ShardTask, send: Callable[[int], None]) -> dict:
        """Build ``task`` in a pool process, passing its pair counts to ``send``. A pool broken by
        a dead process is replaced, and this attempt fails (to be retried)."""
        with self._lock:
            if self._idle is not None:
                self._idle.cancel()
                self._idle = None
            if self._pool is None:
                self._start()
            self._active += 1
            pool = self._pool
            counts = self._manager.Queue()
            styler = self._server.styler() if self._server is not None else None
        try:
            future = pool.submit(_run_in_pool, task, counts, styler)
            while True:
                try:
                    send(counts.get(timeout=0.2))
                except queue.Empty:
                    if future.done():
                        break
            with contextlib.suppress(queue.Empty):
                while True:
                    send(counts.get_nowait())
            return future.result()
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:
                    self._pool = self._new_pool()
            raise
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0 and self._pool is not None:
                    self._idle = threading.Timer(IDLE_SECONDS, self._close_if_idle)
                    self._idle.daemon = True
                    self._idle.start()

    def _close_if_idle(self) -> None:
        with self._lock:
            if self._active == 0:
                self._close()

    def _close(self) -> None:
        """Stop the pool, the style server and the queue server (called under the lock)."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._server is not None:
            self._server.__exit__(None, None, None)
        if self._manager is not None:
            self._manager.shutdown()
        self._manager = self._server = self._pool = None

    def teardown(self, worker) -> None:
        with self._lock:
            self._close()


# -- on the client -----------------------------------------------------------------------------

class _Events:
    """The client's side of a run's events: per shard the largest pair count an attempt reported
    (``progress`` hears only increases), and how each pooled worker runs its tasks (``log``).
    Events arrive on the client's event-loop thread."""

    def __init__(self, progress: Callable[[int], None], log: Callable[[str], None]):
        self.progress, self.log = progress, log
        self.seen: dict[int, int] = {}
        self._lock = threading.Lock()

    def reached(self, shard: int, done: int) -> None:
        with self._lock:
            more = done - self.seen.get(shard, 0)
            if more > 0:
                self.seen[shard] = done
                self.progress(more)

    def event(self, event) -> None:
        _, message = event
        if "shard" in message:
            self.reached(int(message["shard"]), int(message["done"]))
        else:
            served = f"; {message['served']}" if message.get("served") else ""
            self.log(f"worker {message['worker']}: shards in a pool of {message['processes']} processes{served}")


def _absolute(task: ShardTask) -> ShardTask:
    """The task with absolute paths (the workers do not share the client's working directory)."""
    return dataclasses.replace(task, out_dir=str(Path(task.out_dir).absolute()),
                               bank_dir=str(Path(task.bank_dir).absolute()),
                               image_root=str(Path(task.image_root).absolute()))


def _shared_option(task: ShardTask) -> str:
    """The option naming the folder every worker must see: ``--out``, or ``--work`` for a store."""
    return "--out" if task.store is None else "--work"


def _failure(future) -> str:
    if future.status == "cancelled":
        return "cancelled (the scheduler lost the task or the client's connection)"
    error = future.exception()
    return f"{type(error).__name__}: {error}"


class DaskDistributor:
    """Shard tasks on the Dask cluster whose scheduler is at ``address`` (see the module's
    description; the output folder must be shared by every worker at the same path).

    ``retries``: how many more times a task that raised runs before its shard is listed as
    failed. ``style_server``: whether a worker with several threads serves one stylizer to its
    pool (default: when the stylizer is on a GPU). Use as a context manager to connect before the
    build starts (an unreachable scheduler is then an error before any work); else :meth:`run`
    connects and disconnects itself. ``connect_timeout``: seconds to reach the scheduler (default:
    Dask's ``distributed.comm.timeouts.connect``)."""

    def __init__(self, address: str, retries: int = 2, style_server: bool | None = None,
                 log: Callable[[str], None] = print, connect_timeout: float | None = None):
        if retries < 0:
            raise ValueError(f"retries must be at least 0, got {retries}")
        self.address, self.retries, self.style_server = address, retries, style_server
        self.log, self.connect_timeout = log, connect_timeout
        self.client: Client | None = None

    def connect(self) -> Client:
        """The client of the scheduler (connected on first call); BuildError when unreachable."""
        if self.client is None:
            try:
                timeout = {} if self.connect_timeout is None else {"timeout": self.connect_timeout}
                self.client = Client(self.address, set_as_default=False, **timeout)
            except (OSError, TimeoutError, ValueError) as error:
                raise BuildError(f"--scheduler {self.address}: cannot reach the Dask scheduler ({error})") from error
        return self.client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def __enter__(self) -> DaskDistributor:
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, tasks: Sequence[ShardTask], progress: Callable[[int], None]) -> list[dict]:
        """Run every task on the cluster; returns their stats, or raises BuildError listing the
        shards that failed after their retries (once all the others are done)."""
        if not tasks:
            return []
        opened = self.client is None
        client = self.connect()
        try:
            return self._run(client, [_absolute(task) for task in tasks], progress)
        finally:
            if opened:
                self.close()

    def _run(self, client: Client, tasks: list[ShardTask], progress: Callable[[int], None]) -> list[dict]:
        run = uuid.uuid4().hex[:8]
        out = Path(tasks[0].out_dir)
        root = out / CLUSTER_STAGING_DIR  # a killed client's is removed with the build's leftovers
        staging = root / run
        staging.mkdir(parents=True)
        events = _Events(progress, self.log)
        topic, plugin = f"datagen-{run}", f"datagen-shards-{run}"
        futures = {}
        try:
            workers = client.scheduler_info().get("workers", {})
            threads = sum(info.get("nthreads", 0) for info in workers.values())
            where = out if tasks[0].store is None else f"{tasks[0].store} through {out}"
            self.log(f"cluster {self.address}: {len(workers)} workers, {threads} threads; {len(tasks)} shards into "
                     f"{where} (a folder every worker must see at this path)")
            unseen = [address for address, sees in client.run(os.path.isdir, str(staging)).items() if not sees]
            if unseen:
                raise BuildError(f"{len(unseen)} of {len(workers)} workers do not see {out} (e.g. {unseen[0]}): "
                                 f"{_shared_option(tasks[0])} must be on a file system that every worker sees at "
                                 f"the same path")
            client.subscribe_topic(topic, events.event)
            client.register_plugin(ShardPlugin(plugin, tasks[0].config, tasks[0].style, self.style_server, topic))
            for task in tasks:
                future = client.submit(_run_on_worker, task, str(staging), topic, plugin,
                                       key=f"{shard_name(task.shard)}-{run}", retries=self.retries, pure=False)
                futures[future] = task
            built, failed = [], []
            for future in as_completed(futures, loop=client.loop):
                task = futures[future]
                if future.status == "finished":
                    built.append(future.result())
                    events.reached(task.shard, task.count)
                else:
                    failed.append(f"{shard_name(task.shard)}: {_failure(future)}")
                future.release()
        except BaseException:
            with contextlib.suppress(Exception):
                client.cancel(list(futures))  # queued shards stop; running ones can no longer publish
            raise
        finally:
            with contextlib.suppress(Exception):
                client.unsubscribe_topic(topic)
            with contextlib.suppress(Exception):
                client.unregister_worker_plugin(plugin)
            shutil.rmtree(staging, ignore_errors=True)  # attempts still going cannot publish now
            with contextlib.suppress(OSError):
                root.rmdir()
        if failed:
            failed.sort()
            more = len(failed) - LISTED_FAILURES
            raise BuildError(f"{len(failed)} of {len(tasks)} shards failed after {self.retries + 1} attempts each "
                             f"(the other shards are complete; rerun the command to retry these):\n  "
                             + "\n  ".join(failed[:LISTED_FAILURES]) + (f"\n  ... and {more} more" if more > 0 else ""))
        return built
