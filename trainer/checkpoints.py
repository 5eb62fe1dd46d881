"""Trainer checkpoint files: written atomically, read weights-only.

A checkpoint (``checkpoint.pt``) holds the config, the network, the frozen backbone's weights,
the optimiser, schedule and random states of a run (:meth:`trainer.loop.Trainer.save`);
:mod:`trainer.inference` loads one ready to run.
"""
from __future__ import annotations

from pathlib import Path

import torch

from datagen.format.atomic import atomic_write

CHECKPOINT_FORMAT = 1


class ResumeError(RuntimeError):
    """A checkpoint that does not belong to this run (other config or data) or is unreadable."""


def atomic_save(payload: dict, path: Path) -> None:
    """torch.save through :func:`datagen.format.atomic.atomic_write` (``path.tmp``, fsync, rename):
    a checkpoint file is never half written, and a failed save leaves the previous one."""
    atomic_write(path, lambda handle: torch.save(payload, handle))


def load_checkpoint(path) -> dict:
    """A checkpoint read with ``weights_only=True`` (tensors and plain data only, never code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - reported with the file's name
        raise ResumeError(f"{path}: not a readable checkpoint ({error})") from error
