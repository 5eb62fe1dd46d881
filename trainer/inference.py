"""A checkpoint loaded ready to run: config, backbone, network, in eval mode on a device.

Reads trainer checkpoints (:mod:`trainer.checkpoints`) and the authors' released file, converted
in memory (:mod:`trainer.released`). Used by eval, predict, retrieve and discover.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from datagen.format.device import resolve_device
from datagen.format.hashing import sha256_file

from .backbone import Backbone
from .checkpoints import ResumeError, load_checkpoint
from .config import TrainConfig
from .models import build_model
from .released import ReleasedCheckpointError, is_released_checkpoint, released_checkpoint


class Inference(NamedTuple):
    """A checkpoint ready to run: in eval mode, on the device asked for."""

    config: TrainConfig
    backbone: Backbone
    model: torch.nn.Module
    step: int
    backbone_record: dict
    """Where the backbone's weights came from: ``{"source", "format", "sha256"}``; source "random"
    for a run trained with ``--backbone-weights random``."""


def load_for_inference(path, device: str = "auto") -> Inference:
    """The config, backbone, model, step and backbone record of a checkpoint, in eval mode on
    ``device``: the checkpoint holds the frozen backbone's weights too, so evaluation and
    prediction need no other file. The authors' released file (``hard_mining_neg5.pth``) is
    read too, converted in memory as ``trainer import-released`` would (their 'small' model).
    Anything that is not a trainer checkpoint with a valid config raises :class:`ResumeError`."""
    state = load_checkpoint(path)
    if is_released_checkpoint(state):
        try:
            state, _ = released_checkpoint(state, source=str(Path(path).resolve()), sha256=sha256_file(path))
        except ReleasedCheckpointError as error:
            raise ResumeError(f"{path}: the authors' released file, but: {error}") from error
    try:
        config = TrainConfig.from_dict(state["config"]).validate()
        backbone = Backbone()
        backbone.load_state_dict(state["backbone_state"])
        model = build_model(config)
        model.load_state_dict(state["model"])
        step = int(state["step"])
        record = dict(state.get("backbone") or {})
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as error:
        raise ResumeError(f"{path}: not a trainer checkpoint ({type(error).__name__}: {error})") from error
    target = resolve_device(device)
    return Inference(config, backbone.to(target).eval(), model.to(target).eval(), step, record)
