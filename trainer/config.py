"""Typed configuration of a training run, with the paper's defaults (section 3.2, Eq. 2).

Everything that changes what is learned lives in :class:`TrainConfig`; its hash
(``datagen.config.config_hash``, sha256 of the canonical JSON) goes into every checkpoint so a
resume can refuse a run of another configuration.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field



@dataclass(frozen=True)
class TransformerConfig:
    """The cross-image transformer (paper section 3.2; the authors' "small" model)."""

    feat_dim: int = 1024
    """Channels of the backbone features (ResNet-50 conv4)."""
    d_model: int = 256
    heads: int = 2
    feedforward: int = 256
    dropout: float = 0.1
    feat_dropout: float = 0.1
    """2-D dropout on the projected features."""
    pos_weight: float = 0.1
    """Weight of DETR's 2-D sine positional encoding, added before self-attention layers."""
    layers: str = "SCSCS"
    """S: self-attention within each image; C: cross-attention between the two images."""


@dataclass(frozen=True)
class TrainConfig:
    arch: str = "transformer"
    """Network name in the registry (trainer.models)."""
    image_size: int = 480
    stride: int = 16
    """Backbone stride: 480 / 16 = a 30 x 30 grid."""
    positives: int = 5
    """Positive pairs per step (P)."""
    negatives: int = 15
    """Negative pairs per step (N), made by pairing the source of one positive with the target of another."""
    style_prob: float = 0.5
    """Probability of using the stylised version of each image, when the shard has one."""
    swap_prob: float = 0.5
    """Probability of swapping the source and target roles of a positive pair."""
    hide_prob: float = 0.5
    """Probability of hiding the target's tokens outside its mask from attention (as the authors do)."""
    eta: float = 8.0
    """Weight of the correspondence L1 term in Eq. 2."""
    lr: float = 2e-4
    betas: tuple = (0.5, 0.999)
    warmup_steps: int = 1000
    steps: int = 200_000
    milestone: int | None = None
    """Step at which the learning rate is multiplied by ``lr_decay``; None: half of ``steps``."""
    lr_decay: float = 0.05
    shuffle_buffer: int = 1000
    seed: int = 0
    transformer: TransformerConfig = field(default_factory=TransformerConfig)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.stride

    @property
    def milestone_step(self) -> int:
        return self.milestone if self.milestone is not None else self.steps // 2

    def validate(self) -> "TrainConfig":
        checks = [
            (self.positives >= 2 or self.negatives == 0, "--positives must be at least 2 to build negatives"),
            (self.negatives <= self.positives * (self.positives - 1),
             f"--negatives must be at most P (P - 1) = {self.positives * (self.positives - 1)}"),
            (self.image_size % self.stride == 0, "--image-size must be a multiple of the stride"),
            (self.steps >= 1, "--steps must be at least 1"),
            (all(c in "SC" for c in self.transformer.layers), "transformer layers use only S and C"),
            (self.transformer.d_model % self.transformer.heads == 0, "d_model must be divisible by heads"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        data = dict(data)
        transformer = TransformerConfig(**dict(data.pop("transformer", {}) or {}))
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(transformer=transformer, **data)
