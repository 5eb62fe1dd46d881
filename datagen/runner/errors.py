"""The error of a build that cannot go on (raised by its shard tasks, its resume checks and itself)."""
from __future__ import annotations


class BuildError(RuntimeError):
    """A build cannot go on (a whole shard failing, an output directory of another build)."""
