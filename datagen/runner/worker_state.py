"""What a process keeps between the shards it builds: the segment bank with its sampler and pair
builder, and the stylizer.

Loading a bank and making a sampler take seconds, loading AdaIN's networks longer. A worker
process builds many shards (joblib reuses its processes), so it loads each once and reuses it for
every shard of the same inputs. Each is one slot of :data:`STATE`, this process's only
:class:`WorkerState`, replaced when its key changes: a rescan into the same bank folder gives
another inputs checksum, so the old bank is never reused, and the old value is released before
the new one is made. The build's own process has the same slots: the stylizer it makes to check
the style options (and to describe them in the manifest) is the one its in-process shards use.

This is the only state of the build that outlives a call. It is per process and never shared: a
distributor that runs tasks in other processes (or on other machines) gets fresh slots there, and
the bytes of a shard do not depend on what a slot held before.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from pathlib import Path

from datagen.config import BuildConfig


class _Slot:
    """One value, made on first use and made again when its key changes."""

    def __init__(self):
        self._key: Hashable = None
        self._value = None
        self._filled = False

    def get(self, key: Hashable, make: Callable):
        if not self._filled or self._key != key:
            self._key, self._value, self._filled = None, None, False  # the old value goes first
            self._value = make()
            self._key, self._filled = key, True
        return self._value


class WorkerState:
    """This process's loaded bank tools and stylizer (see the module's description)."""

    def __init__(self):
        self._shard_tools = _Slot()
        self._stylizer = _Slot()

    def shard_tools(self, bank_dir, image_root, config: BuildConfig, inputs_sha256: str | None = None):
        """(:class:`~datagen.synth.sampling.Sampler`, :class:`~datagen.synth.pairs.PairBuilder`)
        of the bank in ``bank_dir`` with images under ``image_root``, for ``config``."""
        from datagen.segments.bank import SegmentBank
        from datagen.synth.pairs import PairBuilder
        from datagen.synth.sampling import Sampler

        def load():
            bank = SegmentBank.load(bank_dir)
            return Sampler(bank, config), PairBuilder(bank, Path(image_root), config)

        return self._shard_tools.get((str(bank_dir), str(image_root), config, inputs_sha256), load)

    def stylizer(self, method: str, options: dict):
        """The stylizer ``method`` made with the keyword ``options`` (its networks load once)."""
        from datagen.style import make_stylizer

        key = (method, tuple(sorted(options.items())))
        return self._stylizer.get(key, lambda: make_stylizer(method, **options))


STATE = WorkerState()
"""This process's state: module level, since a worker process runs tasks that arrive one by one."""
