"""The cross-image transformer (paper section 3.2 and the authors' released model).

Both images' projected features are concatenated into one token sequence (source tokens first)
and passed through post-norm encoder layers that differ only by their attention mask:

- S (self-attention): a token attends to tokens of its own image only. DETR's 2-D sine positional
  encoding, weighted by ``pos_weight``, is added to the tokens before each S layer.
- C (cross-attention): a token attends to tokens of the other image only; no positional encoding.

Hidden tokens (``src_hide`` / ``tgt_hide``, True = hidden) are key padding in every layer: no token
reads them, but they are still queries and get an output. An image whose tokens are ALL hidden is
treated as not hidden at all: otherwise its own queries (S layers) and the other image's queries
(C layers) would have no key left and attention would return NaN.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from trainer.config import TrainConfig, TransformerConfig
from trainer.models import register

CLAMP_EPS = 1e-7
"""Outputs are clamped to [CLAMP_EPS, 1 - CLAMP_EPS] (keeps the BCE finite)."""


def sine_position_encoding(h: int, w: int, num_pos_feats: int, temperature: float = 10000.0,
                           scale: float = 2 * math.pi, device=None, dtype=torch.float32) -> Tensor:
    """DETR's normalised 2-D sine encoding of an h x w grid: (2 * num_pos_feats, h, w).

    Row i has y = (i + 1) / (h + 1e-6) * scale, column j has x = (j + 1) / (w + 1e-6) * scale.
    Channel k < num_pos_feats encodes y: sin(y / t_k) for even k, cos(y / t_k) for odd k, with
    t_k = temperature ** (2 * (k // 2) / num_pos_feats); channels num_pos_feats + k encode x alike.
    """
    if num_pos_feats % 2:
        raise ValueError(f"num_pos_feats must be even, got {num_pos_feats}")
    eps = 1e-6
    y = torch.arange(1, h + 1, device=device, dtype=torch.float32) / (h + eps) * scale
    x = torch.arange(1, w + 1, device=device, dtype=torch.float32) / (w + eps) * scale
    k = torch.arange(num_pos_feats, device=device, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / num_pos_feats)

    def encode(values: Tensor) -> Tensor:  # (n,) -> (num_pos_feats, n), sin/cos interleaved
        angles = values[None, :] / dim_t[:, None]
        return torch.stack((angles[0::2].sin(), angles[1::2].cos()), dim=1).flatten(0, 1)

    pos_y = encode(y)[:, :, None].expand(num_pos_feats, h, w)
    pos_x = encode(x)[:, None, :].expand(num_pos_feats, h, w)
    return torch.cat((pos_y, pos_x), dim=0).to(dtype)


def _flat_hide(hide: Tensor | None, batch: int, h: int, w: int, name: str, device) -> Tensor:
    """(B, h, w) bool hide mask -> (B, h * w) bool, all False when None."""
    if hide is None:
        return torch.zeros(batch, h * w, dtype=torch.bool, device=device)
    if hide.dtype != torch.bool or tuple(hide.shape) != (batch, h, w):
        raise ValueError(f"{name} must be a bool tensor of shape {(batch, h, w)}, "
                         f"got {hide.dtype} {tuple(hide.shape)}")
    return hide.reshape(batch, h * w)


def _unhide_fully_hidden(hide: Tensor) -> Tensor:
    """(B, n) bool: rows where every token is hidden become all False (see the module docstring)."""
    return hide & ~hide.all(dim=1, keepdim=True)


def _self_attention_layer(layer: nn.TransformerEncoderLayer, queries: Tensor, others: Tensor,
                          pad: Tensor, other_pad: Tensor) -> Tensor:
    """The post-norm encoder layer within one image: (B, n, d) tokens, (B, n) key padding."""
    return layer(queries, src_key_padding_mask=pad)


def _cross_attention_layer(layer: nn.TransformerEncoderLayer, queries: Tensor, others: Tensor,
                           pad: Tensor, other_pad: Tensor) -> Tensor:
    """The same post-norm layer (its weights, its order of operations) with the keys and values
    taken from the other image: (B, n, d) queries, (B, m, d) other tokens, (B, m) key padding."""
    attended = layer.self_attn(queries, others, others, key_padding_mask=other_pad, need_weights=False)[0]
    x = layer.norm1(queries + layer.dropout1(attended))
    feedforward = layer.linear2(layer.dropout(layer.activation(layer.linear1(x))))
    return layer.norm2(x + layer.dropout2(feedforward))


def _paired(layer, src: Tensor, tgt: Tensor, src_pad: Tensor, tgt_pad: Tensor, block) -> tuple[Tensor, Tensor]:
    """Apply ``block`` to the source's queries and to the target's (one batched call when both
    grids have the same number of tokens)."""
    if src.shape[1] == tgt.shape[1]:
        both = block(layer, torch.cat((src, tgt)), torch.cat((tgt, src)),
                     torch.cat((src_pad, tgt_pad)), torch.cat((tgt_pad, src_pad)))
        return both[:src.shape[0]], both[src.shape[0]:]
    return block(layer, src, tgt, src_pad, tgt_pad), block(layer, tgt, src, tgt_pad, src_pad)


class CrossImageTransformer(nn.Module):
    """Projection 1x1 conv + Dropout2d, S/C encoder layers, 1x1 conv to 3 channels + sigmoid.

    See :mod:`trainer.models` for the forward's shapes and channel meaning.
    """

    def __init__(self, config: TransformerConfig = TransformerConfig()):
        super().__init__()
        if not config.layers or any(kind not in "SC" for kind in config.layers):
            raise ValueError(f"layers must be a non-empty string of S and C, got {config.layers!r}")
        if config.d_model % config.heads:
            raise ValueError(f"d_model ({config.d_model}) must be divisible by heads ({config.heads})")
        if config.d_model % 4:
            raise ValueError(f"d_model must be a multiple of 4 for the 2-D sine encoding, got {config.d_model}")
        self.config = config
        self.kinds = config.layers
        self.proj = nn.Conv2d(config.feat_dim, config.d_model, kernel_size=1)
        self.feat_dropout = nn.Dropout2d(config.feat_dropout)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(config.d_model, nhead=config.heads, dim_feedforward=config.feedforward,
                                       dropout=config.dropout, activation="relu", batch_first=True,
                                       norm_first=False)
            for _ in config.layers)
        self.head = nn.Conv2d(config.d_model, 3, kernel_size=1)

    def _check_features(self, src_feat: Tensor, tgt_feat: Tensor) -> None:
        for name, feat in (("src_feat", src_feat), ("tgt_feat", tgt_feat)):
            if feat.dim() != 4 or feat.shape[1] != self.config.feat_dim:
                raise ValueError(f"{name} must be (B, {self.config.feat_dim}, h, w), got {tuple(feat.shape)}")
        if src_feat.shape[0] != tgt_feat.shape[0]:
            raise ValueError(f"src_feat and tgt_feat batch sizes differ: {src_feat.shape[0]} vs {tgt_feat.shape[0]}")

    def _tokens(self, feat: Tensor) -> Tensor:
        """(B, feat_dim, h, w) features -> (B, h * w, d_model) tokens, row-major."""
        return self.feat_dropout(self.proj(feat)).flatten(2).transpose(1, 2)

    def _positions(self, h: int, w: int, like: Tensor) -> Tensor:
        """(h * w, d_model) weighted positional encoding of an h x w grid, row-major."""
        pos = sine_position_encoding(h, w, self.config.d_model // 2, device=like.device, dtype=like.dtype)
        return self.config.pos_weight * pos.flatten(1).transpose(0, 1)

    def forward(self, src_feat: Tensor, tgt_feat: Tensor, src_hide: Tensor | None = None,
                tgt_hide: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, C, hs, ws), (B, C, ht, wt) features -> (B, 3, hs, ws), (B, 3, ht, wt) in (0, 1)."""
        self._check_features(src_feat, tgt_feat)
        (batch, _, hs, ws), (_, _, ht, wt) = src_feat.shape, tgt_feat.shape
        n_src = hs * ws
        tokens = torch.cat((self._tokens(src_feat), self._tokens(tgt_feat)), dim=1)
        pos = torch.cat((self._positions(hs, ws, tokens), self._positions(ht, wt, tokens)), dim=0)

        src_pad = _unhide_fully_hidden(_flat_hide(src_hide, batch, hs, ws, "src_hide", tokens.device))
        tgt_pad = _unhide_fully_hidden(_flat_hide(tgt_hide, batch, ht, wt, "tgt_hide", tokens.device))
        src_tokens, tgt_tokens = tokens[:, :n_src], tokens[:, n_src:]
        src_pos, tgt_pos = pos[:n_src], pos[n_src:]
        # Each layer attends within one image (S) or from one image to the other (C): computed
        # as two attention blocks of one image's queries, never as the full masked (L, L)
        # attention over both images, which costs twice as much for the same result.
        for kind, layer in zip(self.kinds, self.layers):
            if kind == "S":
                src_tokens, tgt_tokens = _paired(layer, src_tokens + src_pos, tgt_tokens + tgt_pos,
                                                 src_pad, tgt_pad, _self_attention_layer)
            else:
                src_tokens, tgt_tokens = _paired(layer, src_tokens, tgt_tokens, src_pad, tgt_pad,
                                                 _cross_attention_layer)
        return self._head(src_tokens, hs, ws), self._head(tgt_tokens, ht, wt)

    def _head(self, tokens: Tensor, h: int, w: int) -> Tensor:
        """(B, h * w, d_model) tokens -> (B, 3, h, w) clamped sigmoid outputs."""
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
        return torch.sigmoid(self.head(grid)).clamp(CLAMP_EPS, 1 - CLAMP_EPS)


@register("transformer")
def build_transformer(config: TrainConfig) -> CrossImageTransformer:
    """The cross-image transformer of ``config.transformer``."""
    return CrossImageTransformer(config.transformer)
