"""Dense references of NC-Net's 4-D convolution and neighbourhood consensus, for the sparse ones'
tests and benchmark: written independently of trainer.models.sparse4d, from the definitions.

``conv4d`` is NC-Net's Conv4d (Rocco et al. 2018): a 4-D convolution with zero padding and stride 1
built from 3-D convolutions, one per offset along the first spatial axis. ``dense_consensus``
is the ReLU / (Conv4d, ReLU)* stack with, after every layer, the output multiplied by the mask of
the active sites, which makes it a submanifold convolution.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def conv4d(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """(B, C_in, I, J, K, L) x (C_out, C_in, k, k, k, k) -> (B, C_out, I, J, K, L), k odd:
    out[:, :, i] = bias + sum_p conv3d(x[:, :, i + p - r], weight[:, :, p], padding=r), r = k // 2,
    the slices outside [0, I) being zero (NC-Net's Conv4d)."""
    batch, c_in, size_i = x.shape[:3]
    radius = weight.shape[2] // 2
    padded = F.pad(x, (0, 0, 0, 0, 0, 0, radius, radius))  # zero slices before and after along I
    slices = []
    for i in range(size_i):
        out = sum(F.conv3d(padded[:, :, i + p], weight[:, :, p], padding=radius) for p in range(weight.shape[2]))
        slices.append(out if bias is None else out + bias.view(1, -1, 1, 1, 1))
    return torch.stack(slices, dim=2)


def swap(x: Tensor) -> Tensor:
    """(B, C, hA, wA, hB, wB) -> (B, C, hB, wB, hA, wA): the tensor of the pair with its images swapped."""
    return x.permute(0, 1, 4, 5, 2, 3)


def dense_consensus(x: Tensor, active: Tensor, weights: list[Tensor], biases: list[Tensor],
                    symmetric: bool) -> Tensor:
    """(B, 1, hA, wA, hB, wB) correlation, (B, 1, hA, wA, hB, wB) 0/1 mask of the active sites ->
    ReLU, then conv4d + ReLU per layer, masked to the active sites after each; symmetric: plus the
    same on ``swap(x)``, swapped back."""

    def stack(y: Tensor, mask: Tensor) -> Tensor:
        y = torch.relu(y) * mask
        for weight, bias in zip(weights, biases):
            y = torch.relu(conv4d(y, weight, bias)) * mask
        return y

    out = stack(x, active)
    if symmetric:
        out = out + swap(stack(swap(x), swap(active)))
    return out
