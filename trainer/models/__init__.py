"""Registry of the networks that read a pair of backbone feature maps.

Every network is built from a :class:`~trainer.config.TrainConfig` by :func:`build_model`, chosen
by ``config.arch``. Its forward is::

    forward(src_feat, tgt_feat, src_hide=None, tgt_hide=None) -> (src_out, tgt_out)

- ``src_feat`` (B, C, hs, ws), ``tgt_feat`` (B, C, ht, wt): float32 backbone features, L2-normalised
  along C (C = ``config.transformer.feat_dim``, 1024 for ResNet-50 conv4); the grids may differ.
- ``src_hide`` (B, hs, ws), ``tgt_hide`` (B, ht, wt): optional bool, True = the token is hidden from
  attention (never used as a key; it still gets an output).
- ``src_out`` (B, 3, hs, ws), ``tgt_out`` (B, 3, ht, wt): float32 in (0, 1). Channels 0, 1: x, y of
  the correspondence in the OTHER image, normalised to [0, 1] (cell j's centre is (j + 0.5) / w);
  channel 2: the probability that the cell belongs to the shared pattern.

A new architecture is a module of this package that decorates its factory with
:func:`register`, listed in :data:`MODELS` as a lazy ``"module:factory"`` entry so that listing the
names (``trainer --help``) does not import torch.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from datagen.format.registry import Registry
from trainer.config import TrainConfig

if TYPE_CHECKING:
    from torch import nn

ModelFactory = Callable[[TrainConfig], "nn.Module"]

MODELS: Registry[ModelFactory] = Registry("architecture", lazy={
    "transformer": "trainer.models.cross_image:build_transformer",
    "ncnet": "trainer.models.ncnet:build_ncnet",  # Sparse NC-Net
})
"""Architecture name -> factory ``(TrainConfig) -> nn.Module``; a module is imported when its
architecture is first built."""


def register(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator adding a factory ``(TrainConfig) -> nn.Module`` to :data:`MODELS` under ``name``."""
    return MODELS.register(name)


def build_model(config: TrainConfig) -> nn.Module:
    """The network named by ``config.arch``, freshly initialised."""
    return MODELS.get(config.arch)(config)
