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
class NCNetConfig:
    """Sparse NC-Net (paper section 3.2; Rocco et al. 2020), the paper's second network."""

    k: int = 10
    """Top-k matches kept per cell, in each direction, as sites of the sparse correlation."""
    kernel_sizes: tuple = (3, 3)
    """Kernel size of each sparse 4-D convolution (odd)."""
    channels: tuple = (16, 1)
    """Output channels of each sparse 4-D convolution (the last is 1: the matching score)."""
    symmetric: bool = True
    """Also run the convolutions on the pair with its images swapped and add the result."""
    temperature: float = 0.1
    """The softmax of Eq. 1 reads the consensus scores divided by this. Sparse NC-Net's own loss
    uses 1; the scores of a freshly initialised consensus are about 0.01 to 0.1 while a peaked
    softmax over some 900 cells needs a margin of about ln 900 = 7, which 0.1 reaches with weights
    10 times smaller: in small tests it learns as fast as 1 does with a 10 times larger rate."""

    def validate(self) -> NCNetConfig:
        checks = [
            (isinstance(self.k, int) and self.k >= 1, f"ncnet k must be a positive integer, got {self.k!r}"),
            (len(self.kernel_sizes) >= 1 and len(self.kernel_sizes) == len(self.channels),
             f"ncnet kernel sizes {tuple(self.kernel_sizes)} and channels {tuple(self.channels)} must be "
             f"non-empty and of the same length (one of each per layer)"),
            (all(isinstance(k, int) and k >= 1 and k % 2 == 1 for k in self.kernel_sizes),
             f"ncnet kernel sizes must be odd positive integers, got {tuple(self.kernel_sizes)}"),
            (all(isinstance(c, int) and c >= 1 for c in self.channels),
             f"ncnet channels must be positive integers, got {tuple(self.channels)}"),
            (not self.channels or self.channels[-1] == 1,
             f"the last ncnet layer must have 1 channel (the matching score), got {tuple(self.channels)}"),
            (self.temperature > 0, f"ncnet temperature must be positive, got {self.temperature}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self


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
    tps_prob: float = 0.5
    """Probability of warping the target of a positive pair (after the role swap) by a random
    thin-plate spline each time it is loaded, as the authors' training loader does: a new
    deformation every epoch, on top of the one fixed when the pair was built
    (:mod:`trainer.augment`). 0: off."""
    tps_jitter: float = 0.25
    """Control points of that spline's g x g grid move by U[-tps_jitter/g, tps_jitter/g] of the
    image (the authors' ``(rand - 0.5) / g`` on a [-1, 1] grid); same meaning as datagen's
    ``WarpConfig.tps_jitter``, which is 0.5 for the build-time warp of a segment."""
    tps_grid_sizes: tuple = (4, 6)
    """Sizes g of that control grid, one drawn per warp (the authors' and datagen's)."""
    eta: float = 8.0
    """Weight of the correspondence L1 term in Eq. 2 (0: the paper's "no correspondence" ablation)."""
    mask_loss: bool = True
    """Keep the mask BCE of Eq. 2 on the positives (each image's predicted mask against its
    ground truth); False is an ablation of the paper's Table 3. The negatives' masks stay
    supervised towards 0 either way."""
    transported_mask_loss: bool = True
    """Keep the transported-mask BCE of Eq. 2 (the other image's predicted mask read at this
    image's predicted correspondences, against this image's ground truth); False is an
    ablation of the paper's Table 3."""
    lr: float = 2e-4
    betas: tuple = (0.5, 0.999)
    warmup_steps: int = 1000
    steps: int = 200_000
    milestone: int | None = None
    """Step from which the learning rate is multiplied by ``lr_decay``; None (the default): no
    decay, the paper's 200k steps at 2e-4 (its 5k steps at 1e-5 with hard negatives are a
    separate stage)."""
    lr_decay: float = 0.05
    """Factor of the learning rate from ``milestone`` on (only used with a milestone)."""
    shuffle_buffer: int = 1000
    seed: int = 0
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    ncnet: NCNetConfig = field(default_factory=NCNetConfig)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.stride

    def validate(self) -> TrainConfig:
        checks = [
            (self.positives >= 2 or self.negatives == 0, "--positives must be at least 2 to build negatives"),
            (self.negatives <= self.positives * (self.positives - 1),
             f"--negatives must be at most P (P - 1) = {self.positives * (self.positives - 1)}"),
            (self.image_size % self.stride == 0, "--image-size must be a multiple of the stride"),
            (self.steps >= 1, "--steps must be at least 1"),
            (self.milestone is None or self.milestone >= 1, "--milestone must be at least 1"),
            (self.lr_decay > 0, "--lr-decay must be positive"),
            (0 <= self.tps_prob <= 1, f"--train-tps-prob must be in [0, 1], got {self.tps_prob}"),
            (self.tps_jitter >= 0, f"--train-tps-jitter must be >= 0, got {self.tps_jitter}"),
            (len(self.tps_grid_sizes) >= 1 and all(isinstance(g, int) and g >= 2 for g in self.tps_grid_sizes),
             f"--train-tps-grid-sizes must be integers >= 2, got {tuple(self.tps_grid_sizes)}"),
            (all(c in "SC" for c in self.transformer.layers), "transformer layers use only S and C"),
            (self.transformer.d_model % self.transformer.heads == 0, "d_model must be divisible by heads"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.ncnet.validate()
        return self

    def to_dict(self) -> dict:
        """Plain data. ``ncnet`` is left out when it cannot matter (another architecture, default
        settings), so configs, and the hashes of checkpoints, from before it existed are unchanged."""
        data = dataclasses.asdict(self)
        if self.arch != "ncnet" and self.ncnet == NCNetConfig():
            del data["ncnet"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """The inverse of :meth:`to_dict`; a missing ``transformer`` or ``ncnet`` takes its defaults.

        A config stored before the train-time TPS existed (no ``tps_prob`` key) is read as it
        trained: no TPS, and its learning rate decayed at half of its steps when it named no
        milestone (the default of that time)."""
        data = dict(data)
        if "tps_prob" not in data:
            data["tps_prob"] = 0.0
            if data.get("milestone") is None:
                data["milestone"] = int(data.get("steps", cls.steps)) // 2
        transformer = TransformerConfig(**dict(data.pop("transformer", {}) or {}))
        ncnet = dict(data.pop("ncnet", {}) or {})
        for name in ("kernel_sizes", "channels"):
            if name in ncnet:
                ncnet[name] = tuple(ncnet[name])
        for name in ("betas", "tps_grid_sizes"):
            if name in data:
                data[name] = tuple(data[name])
        return cls(transformer=transformer, ncnet=NCNetConfig(**ncnet), **data)
