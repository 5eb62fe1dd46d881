"""Sparse NC-Net (paper section 3.2; Rocco et al., "Efficient neighbourhood consensus networks via
submanifold sparse convolutions", ECCV 2020), with the sparse 4-D convolutions of
:mod:`trainer.models.sparse4d` instead of MinkowskiEngine.

1. Sparse correlation (:func:`sparse_correlation`): for every source cell its ``k`` target cells of
   highest feature dot product, and for every target cell its ``k`` source cells; each is a site
   (b, iA, jA, iB, jB) of a sparse 4-D tensor with the dot product as its feature, and a site found
   in both directions carries the sum of the two (as MinkowskiEngine's union does).
2. Neighbourhood consensus (:class:`NeighbourhoodConsensus`): ReLU, then submanifold sparse 4-D
   convolutions each followed by a ReLU (kernel sizes (3, 3), channels (16, 1)). In symmetric mode
   the same stack also runs on the pair with its images swapped and the result, swapped back, is
   added. Both branches run as one stack: swapping the images is the same as swapping the kernel's
   source and target axes (:func:`~trainer.models.sparse4d.swap_images`), so the two branches are
   the two diagonal blocks of one weight. The kernel map is built once per correlation.
3. Heads (the paper's Eq. 1, :func:`match_heads`): the consensus scores, divided by ``temperature``,
   stand for a dense 4-D tensor that is zero off the sites (the last ReLU makes every score >= 0,
   as Sparse NC-Net's own loss pads absent cells with zeros). For each source cell, the softmax of
   that tensor over ALL target cells; mask = its maximum, correspondence = its expectation of the
   target cell centres (soft-argmax, x = (jB + 0.5) / wB). Only the sites are computed: the absent
   cells' shared probability and their coordinate sums come in closed form. The same over source
   cells for each target cell gives the target's outputs.

The hide masks of the forward contract are accepted and ignored: hiding is a way of withholding
keys from attention, and NC-Net's consensus has no keys; every cell is matched in training as in
evaluation. Computation is float32 with autocast disabled (bf16 would blur the top-k ranking, and
the sparse gathers gain nothing from it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trainer.config import NCNetConfig, TrainConfig
from trainer.models import register
from trainer.models.cross_image import CLAMP_EPS
from trainer.models.sparse4d import (
    GridShape,
    KernelMap,
    block_diagonal,
    build_kernel_map,
    coalesce,
    site_coords,
    site_keys,
    sparse_conv4d,
    swap_images,
)

TOPK_CHUNK_ELEMENTS = 1 << 22
"""Dense correlation entries computed at once while ranking (16 MiB of float32): the memory of the
correlation step stays bounded whatever the grid, instead of growing with (hA wA hB wB)."""


@dataclass(frozen=True)
class SparseCorrelation:
    """A sparse 4-D correlation tensor: n sites of the grid ``shape`` = (B, hA, wA, hB, wB)."""

    keys: Tensor
    """(n,) int64 row-major site keys, sorted and unique (:func:`~trainer.models.sparse4d.site_keys`)."""
    coords: Tensor
    """(n, 5) int64 site coordinates (b, iA, jA, iB, jB), in the order of ``keys``."""
    values: Tensor
    """(n,) float correlation at each site (the sum of both directions' where both found it)."""
    shape: GridShape


def top_matches(src: Tensor, tgt: Tensor, k: int,
                chunk_elements: int = TOPK_CHUNK_ELEMENTS) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each cell's k best matches in the other image, by dot product, in both directions.

    (B, C, nA) source and (B, C, nB) target features -> the source cells' (B, nA, kB) dot products
    and int64 target cell indices, and the target cells' (B, nB, kA) dot products and int64 source
    cell indices, with kB = min(k, nB) and kA = min(k, nA); the dot products are differentiable.
    The (B, nA, nB) products are computed a block of source cells at a time (about
    ``chunk_elements`` entries), each block ranked along both axes, the target cells' best sources
    so far merged with the block's.
    """
    batch, _, n_src = src.shape
    n_tgt = tgt.shape[2]
    k_tgt, k_src = min(k, n_tgt), min(k, n_src)
    rows = max(1, chunk_elements // max(1, batch * n_tgt))
    src_values, src_matches = [], []
    tgt_values = tgt_matches = None
    for start in range(0, n_src, rows):
        products = torch.bmm(src[:, :, start:start + rows].transpose(1, 2), tgt)  # (B, r, nB)
        values, matches = products.topk(k_tgt, dim=2)
        src_values.append(values)
        src_matches.append(matches)
        values, matches = products.topk(min(k_src, products.shape[1]), dim=1)  # (B, <=kA, nB)
        matches = matches + start
        if tgt_values is not None:  # merge with the best sources of the blocks before
            values = torch.cat((tgt_values, values), dim=1)
            values, best = values.topk(min(k_src, values.shape[1]), dim=1)
            matches = torch.cat((tgt_matches, matches), dim=1).gather(1, best)
        tgt_values, tgt_matches = values, matches
    return (torch.cat(src_values, dim=1), torch.cat(src_matches, dim=1),
            tgt_values.transpose(1, 2), tgt_matches.transpose(1, 2))


def sparse_correlation(src_feat: Tensor, tgt_feat: Tensor, k: int) -> SparseCorrelation:
    """The sites of both directions' top-k matches: (B, C, hA, wA) source and (B, C, hB, wB) target
    features (L2-normalised) -> a :class:`SparseCorrelation` of at most B (hA wA + hB wB) k sites."""
    (batch, channels, ha, wa), (_, _, hb, wb) = src_feat.shape, tgt_feat.shape
    shape = (batch, ha, wa, hb, wb)
    src, tgt = src_feat.reshape(batch, channels, ha * wa), tgt_feat.reshape(batch, channels, hb * wb)
    forward_values, forward_targets, backward_values, backward_sources = top_matches(src, tgt, k)
    device = src_feat.device

    def cells(batch_index: Tensor, a: Tensor, t: Tensor) -> Tensor:
        """(m,) batch, source cell, target cell indices -> (m,) int64 keys."""
        coords = torch.stack((batch_index, a // wa, a % wa, t // wb, t % wb), dim=1)
        return site_keys(coords, shape)

    b_forward = torch.arange(batch, device=device).view(batch, 1, 1).expand_as(forward_targets)
    a_forward = torch.arange(ha * wa, device=device).view(1, -1, 1).expand_as(forward_targets)
    b_backward = torch.arange(batch, device=device).view(batch, 1, 1).expand_as(backward_sources)
    t_backward = torch.arange(hb * wb, device=device).view(1, -1, 1).expand_as(backward_sources)
    keys = torch.cat((cells(b_forward.reshape(-1), a_forward.reshape(-1), forward_targets.reshape(-1)),
                      cells(b_backward.reshape(-1), backward_sources.reshape(-1), t_backward.reshape(-1))))
    keys, values = coalesce(keys, torch.cat((forward_values.reshape(-1), backward_values.reshape(-1))))
    return SparseCorrelation(keys, site_coords(keys, shape), values, shape)


class SparseConv4d(nn.Module):
    """Weights of one submanifold sparse 4-D convolution: (C_out, C_in, k, k, k, k) and (C_out,) bias,
    initialised as ``torch.nn.Conv3d`` (and NC-Net's Conv4d) are, uniform in +-1 / sqrt(C_in k^4)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel sizes must be odd and positive, got {kernel_size}")
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *(kernel_size,) * 4))
        self.bias = nn.Parameter(torch.empty(out_channels))
        bound = 1 / math.sqrt(in_channels * kernel_size ** 4)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, features: Tensor, kernel_map: KernelMap) -> Tensor:
        """(n, C_in) -> (n, C_out) at the same sites."""
        return sparse_conv4d(features, self.weight, self.bias, kernel_map)


class NeighbourhoodConsensus(nn.Module):
    """ReLU, then (sparse 4-D convolution, ReLU) per layer; in symmetric mode plus the same stack
    on the image-swapped pair, swapped back (see the module docstring)."""

    def __init__(self, kernel_sizes=(3, 3), channels=(16, 1), symmetric: bool = True):
        super().__init__()
        if len(kernel_sizes) != len(channels) or not channels or channels[-1] != 1:
            raise ValueError(f"kernel sizes {tuple(kernel_sizes)} and channels {tuple(channels)} must have the "
                             f"same, non-zero length, and the last layer must have 1 channel")
        self.symmetric = symmetric
        inputs = (1, *channels[:-1])
        self.convs = nn.ModuleList(SparseConv4d(c_in, c_out, k)
                                   for c_in, c_out, k in zip(inputs, channels, kernel_sizes))

    @property
    def kernel_size(self) -> int:
        """The largest kernel size: the kernel map must be built for it."""
        return max(conv.kernel_size for conv in self.convs)

    def forward(self, correlation: Tensor, kernel_map: KernelMap) -> Tensor:
        """(n,) correlation at the kernel map's sites -> (n,) consensus scores >= 0."""
        x = torch.relu(correlation)[:, None]
        for index, conv in enumerate(self.convs):
            weight, bias = conv.weight, conv.bias
            if self.symmetric:  # channels [0, C) the pair, [C, 2C) the swapped pair
                swapped = swap_images(weight)
                weight = torch.cat((weight, swapped)) if index == 0 else block_diagonal(weight, swapped)
                bias = torch.cat((bias, bias))
            x = torch.relu(sparse_conv4d(x, weight, bias, kernel_map))
        return x.sum(dim=1)


def match_heads(scores: Tensor, group: Tensor, other_cell: Tensor, groups: int, other_grid: tuple[int, int]) -> Tensor:
    """Eq. 1 of the paper on the sparse sites, for the cells of one image.

    ``scores`` (n,) float: the logits at the sites; the dense tensor they stand for is 0 elsewhere.
    ``group`` (n,) int64 in [0, groups): the cell of this image (b * h * w + i * w + j) each site
    belongs to. ``other_cell`` (n,) int64: the site's cell in the other image (i * w' + j) of
    ``other_grid`` = (h', w'); each (group, other_cell) appears at most once.

    Returns (3, groups) float: the soft-argmax x, y (expected (j + 0.5) / w', (i + 0.5) / h' under the
    softmax over all h' w' cells of the other image) and the mask (the softmax's maximum).
    """
    other_h, other_w = other_grid
    n_other = other_h * other_w
    absent = n_other - torch.zeros(groups, dtype=scores.dtype, device=scores.device).index_add(
        0, group, torch.ones_like(scores))
    has_absent = absent > 0
    with torch.no_grad():  # the softmax is shift invariant: a detached shift for stability
        shift = torch.where(has_absent, 0.0, -math.inf).to(scores.dtype)
        shift = shift.scatter_reduce(0, group, scores, reduce="amax", include_self=True)
    exp_scores = torch.exp(scores - shift[group])
    absent_exp = absent * torch.exp(-shift)
    partition = torch.zeros_like(shift).index_add(0, group, exp_scores) + absent_exp
    probs = exp_scores / partition[group]
    absent_prob = torch.where(has_absent, torch.exp(-shift) / partition, 0.0)  # each absent cell's

    centre_x = (other_cell % other_w).to(scores.dtype).add(0.5).div(other_w)
    centre_y = torch.div(other_cell, other_w, rounding_mode="floor").to(scores.dtype).add(0.5).div(other_h)
    total = n_other / 2  # sum of (j + 0.5) / w' over the grid, and of (i + 0.5) / h'
    coordinates = []
    for centre in (centre_x, centre_y):
        # sites: p * centre; absent cells: their probability times the centres not covered by sites
        at_sites = torch.zeros_like(shift).index_add(0, group, (probs - absent_prob[group]) * centre)
        coordinates.append(at_sites + absent_prob * total)
    site_max = torch.zeros_like(shift).scatter_reduce(0, group, probs, reduce="amax", include_self=True)
    mask = torch.maximum(site_max, absent_prob)
    return torch.stack((*coordinates, mask))


class SparseNCNet(nn.Module):
    """Sparse correlation, neighbourhood consensus and the Eq. 1 heads; see the module docstring and
    :mod:`trainer.models` for the forward's shapes and channel meaning."""

    def __init__(self, config: NCNetConfig = NCNetConfig()):
        super().__init__()
        self.config = config.validate()
        self.consensus = NeighbourhoodConsensus(config.kernel_sizes, config.channels, config.symmetric)

    def forward(self, src_feat: Tensor, tgt_feat: Tensor, src_hide: Tensor | None = None,
                tgt_hide: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, C, hA, wA), (B, C, hB, wB) features -> (B, 3, hA, wA), (B, 3, hB, wB) in (0, 1).
        ``src_hide`` and ``tgt_hide`` are ignored (see the module docstring)."""
        for name, feat in (("src_feat", src_feat), ("tgt_feat", tgt_feat)):
            if feat.dim() != 4:
                raise ValueError(f"{name} must be (B, C, h, w), got {tuple(feat.shape)}")
        if src_feat.shape[:2] != tgt_feat.shape[:2]:
            raise ValueError(f"src_feat and tgt_feat must agree on batch size and channels: "
                             f"{tuple(src_feat.shape)} vs {tuple(tgt_feat.shape)}")
        with torch.autocast(src_feat.device.type, enabled=False):
            correlation = sparse_correlation(src_feat.float(), tgt_feat.float(), self.config.k)
            return self.heads(correlation, self.scores(correlation))

    def scores(self, correlation: SparseCorrelation) -> Tensor:
        """(n,) consensus scores at the correlation's sites, divided by the temperature."""
        with torch.no_grad():
            kernel_map = build_kernel_map(correlation.keys, correlation.shape, self.consensus.kernel_size)
        return self.consensus(correlation.values, kernel_map) / self.config.temperature

    @staticmethod
    def heads(correlation: SparseCorrelation, scores: Tensor) -> tuple[Tensor, Tensor]:
        """(n,) scores -> (B, 3, hA, wA) source and (B, 3, hB, wB) target outputs, clamped to (0, 1)."""
        batch, ha, wa, hb, wb = correlation.shape
        b, ia, ja, ib, jb = correlation.coords.unbind(dim=1)
        source_cell, target_cell = ia * wa + ja, ib * wb + jb
        src = match_heads(scores, b * ha * wa + source_cell, target_cell, batch * ha * wa, (hb, wb))
        tgt = match_heads(scores, b * hb * wb + target_cell, source_cell, batch * hb * wb, (ha, wa))
        src = src.view(3, batch, ha, wa).transpose(0, 1).contiguous()
        tgt = tgt.view(3, batch, hb, wb).transpose(0, 1).contiguous()
        return src.clamp(CLAMP_EPS, 1 - CLAMP_EPS), tgt.clamp(CLAMP_EPS, 1 - CLAMP_EPS)


@register("ncnet")
def build_ncnet(config: TrainConfig) -> SparseNCNet:
    """Sparse NC-Net of ``config.ncnet``."""
    return SparseNCNet(config.ncnet)
