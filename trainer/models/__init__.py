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
:func:`register` and is imported at the bottom of this file.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from trainer.config import TrainConfig

ModelFactory = Callable[[TrainConfig], nn.Module]

MODELS: dict[str, ModelFactory] = {}
"""Architecture name -> factory ``(TrainConfig) -> nn.Module``."""


def register(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator adding a factory ``(TrainConfig) -> nn.Module`` to :data:`MODELS` under ``name``."""

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in MODELS:
            raise ValueError(f"architecture {name!r} is already registered")
        MODELS[name] = factory
        return factory

    return decorator


def build_model(config: TrainConfig) -> nn.Module:
    """The network named by ``config.arch``, freshly initialised."""
    if config.arch not in MODELS:
        known = ", ".join(sorted(MODELS)) or "none"
        raise ValueError(f"unknown architecture {config.arch!r}; known: {known}")
    return MODELS[config.arch](config)


# Architectures register themselves on import; add new ones here.
from trainer.models import cross_image  # noqa: E402,F401  ("transformer")
from trainer.models import ncnet  # noqa: E402,F401  ("ncnet", Sparse NC-Net)
