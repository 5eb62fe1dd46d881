"""Shard tasks for the cluster tests that must reach Dask worker processes by pickle, so they live
in a module the workers can import (the workers inherit the test process's ``sys.path``), not in
a test file."""
from __future__ import annotations

import os
from pathlib import Path

from datagen.runner.task import ShardTask

FAILING_SHARD = 1
ATTEMPTS_LOG = "failing-shard-attempts.log"
"""File of the build's output folder (next to its bank) where each attempt at the failing shard
adds a line: the test counts the attempts from it, across worker processes."""


class FailingShardTask(ShardTask):
    """A shard task whose shard :data:`FAILING_SHARD` raises on every attempt (after logging it);
    the others are built as usual. Stands in for ``ShardTask`` in a build (a subclass of the
    frozen dataclass: same fields, so the build makes it as it makes a ShardTask)."""

    def __call__(self, progress=None, remote_style=None) -> dict:
        if self.shard == FAILING_SHARD:
            with open(Path(self.bank_dir).parent / ATTEMPTS_LOG, "a") as log:
                log.write(f"pid {os.getpid()}\n")
            raise RuntimeError("broken on purpose")
        return super().__call__(progress=progress, remote_style=remote_style)


def attempt_together(task: ShardTask, staging: str, barrier, results) -> None:
    """One attempt of ``task`` (a process of its own: a process's loaded bank is not shared by
    threads) that starts building when every process of ``barrier`` has arrived; its stats go to
    ``results``."""
    from datagen.runner.dask_distributor import run_attempt

    barrier.wait()
    results.put(run_attempt(task, staging, lambda staged: staged()))
