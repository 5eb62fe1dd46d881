"""The similarity score of an image pair (paper Eq. 3), and the bilinear transport it relies on.

Correspondences are stored as in the shards (datagen.format.schema): x then y, normalised to [0, 1] of
the other image, the centre of cell (i, j) of a w-wide grid at x = (j + 0.5) / w. That is exactly
``F.grid_sample``'s convention with ``align_corners=False`` once mapped to [-1, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(name: str, tensor: torch.Tensor, channels: int | None = None) -> None:
    if tensor.ndim != 4 or (channels is not None and tensor.shape[1] != channels):
        wanted = f"(B, {channels}, h, w)" if channels is not None else "(B, C, h, w)"
        raise ValueError(f"{name} must be {wanted}, got shape {tuple(tensor.shape)}")


def transport(values: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample ``values`` (B, C, h, w) at ``coords`` (B, 2, h', w') -> (B, C, h', w').

    ``coords`` are x then y in [0, 1] of ``values``' image; points outside it read zeros.
    """
    _check("values", values)
    _check("coords", coords, 2)
    if coords.shape[0] != values.shape[0]:
        raise ValueError(f"values and coords have different batch sizes: {values.shape[0]} vs {coords.shape[0]}")
    grid = coords.permute(0, 2, 3, 1).to(values.dtype) * 2.0 - 1.0
    return F.grid_sample(values, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def pair_score(src_mask: torch.Tensor, tgt_mask: torch.Tensor, src_to_tgt: torch.Tensor,
               src_features: torch.Tensor, tgt_features: torch.Tensor) -> torch.Tensor:
    """Eq. 3: sum over source cells of M_s(p) * M_t(T(p)) * cos(f_s(p), f_t(T(p))) -> (B,) float.

    ``src_mask`` (B, 1, h, w) and ``tgt_mask`` (B, 1, h_t, w_t) in [0, 1]; ``src_to_tgt`` (B, 2, h, w),
    the predicted target location T(p) of each source cell (x, y in [0, 1]); features (B, C, h, w)
    and (B, C, h_t, w_t), L2-normalised over C. The target's mask and features are bilinearly
    sampled at T(p) and the sampled features re-normalised, so the cosine is exact. The score is in
    cell units: at most h * w (identical images, full masks, identity correspondences).
    """
    _check("src_mask", src_mask, 1)
    _check("tgt_mask", tgt_mask, 1)
    _check("src_features", src_features)
    _check("tgt_features", tgt_features, src_features.shape[1])
    if src_mask.shape[-2:] != src_to_tgt.shape[-2:] or src_features.shape[-2:] != src_to_tgt.shape[-2:]:
        raise ValueError(f"src_mask {tuple(src_mask.shape)}, src_to_tgt {tuple(src_to_tgt.shape)} and "
                         f"src_features {tuple(src_features.shape)} must share the source grid (h, w)")
    tgt_mask_at = transport(tgt_mask, src_to_tgt)
    tgt_features_at = F.normalize(transport(tgt_features, src_to_tgt), dim=1)
    cosine = (F.normalize(src_features, dim=1) * tgt_features_at).sum(dim=1, keepdim=True)
    return (src_mask * tgt_mask_at * cosine).sum(dim=(1, 2, 3))
