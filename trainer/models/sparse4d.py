"""Sparse 4-D tensors and submanifold sparse 4-D convolution in plain PyTorch (CPU and CUDA).

A sparse 4-D tensor of a batch of B image pairs lives on the grid (B, hA, wA, hB, wB): its *sites*
are the active cells (b, iA, jA, iB, jB) and each site carries a feature vector. Sites are held in
one order everywhere: sorted by their integer *key*, the row-major index of the site in that grid
(:func:`site_keys`), so that a site is found by ``torch.searchsorted`` on the keys.

A *submanifold* convolution computes outputs at the input sites only (output sites = input sites):
site s gets ``bias + sum_o W[o] @ x[s + o]`` over the kernel offsets o for which s + o is a site.
It equals a dense 4-D convolution (zero padding, stride 1, "same" size) of the tensor that is zero
off the sites, read at the sites. The *kernel map* (for each offset, which input site feeds which
output site) depends only on the sites, so it is built once (:func:`build_kernel_map`) and shared
by every layer that runs on those sites.

Weights have the dense layout of a 4-D convolution, (C_out, C_in, k, k, k, k), the four kernel
axes in the order (iA, jA, iB, jB), and act as a cross-correlation (as ``torch.nn.Conv3d`` does):
kernel index ``o + k // 2`` reads the input at offset o.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

GridShape = tuple[int, int, int, int, int]
"""(B, hA, wA, hB, wB): the batch size and the two images' grid sizes."""


def _strides(shape: GridShape) -> tuple[int, ...]:
    """Row-major strides of the five site coordinates in a grid of ``shape``."""
    strides = [1] * 5
    for axis in range(3, -1, -1):
        strides[axis] = strides[axis + 1] * shape[axis + 1]
    return tuple(strides)


def site_keys(coords: Tensor, shape: GridShape) -> Tensor:
    """(n, 5) int64 site coordinates (b, iA, jA, iB, jB) -> (n,) int64 row-major keys in ``shape``."""
    strides = torch.tensor(_strides(shape), dtype=torch.int64, device=coords.device)
    return (coords.to(torch.int64) * strides).sum(dim=1)


def site_coords(keys: Tensor, shape: GridShape) -> Tensor:
    """(n,) int64 keys -> (n, 5) int64 coordinates (b, iA, jA, iB, jB); the inverse of :func:`site_keys`."""
    coords = []
    rest = keys
    for stride in _strides(shape):
        coords.append(torch.div(rest, stride, rounding_mode="floor"))
        rest = rest - coords[-1] * stride
    return torch.stack(coords, dim=1)


def coalesce(keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Merge repeated sites: (n,) int64 keys, (n, ...) values -> (m,) sorted unique keys and (m, ...)
    values, the values of repeated keys summed (differentiable in ``values``)."""
    unique_keys, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    summed = values.new_zeros((unique_keys.shape[0], *values.shape[1:])).index_add(0, inverse, values)
    return unique_keys, summed


def kernel_offsets(kernel_size: int, device=None) -> Tensor:
    """(kernel_size ** 4, 4) int64 offsets (diA, djA, diB, djB) in [-r, r], r = kernel_size // 2, in
    the row-major order of the kernel axes: row t is the offset of ``weight.flatten(2)[:, :, t]``."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel sizes must be odd and positive, got {kernel_size}")
    radius = kernel_size // 2
    steps = range(-radius, radius + 1)
    return torch.tensor(list(itertools.product(steps, steps, steps, steps)), dtype=torch.int64, device=device)


@dataclass(frozen=True)
class KernelMap:
    """Which input site feeds which output site, for every offset of a kernel of ``kernel_size``.

    ``neighbours`` (n, K) int64, K = kernel_size ** 4: ``neighbours[s, t]`` is the position (in the
    sorted sites) of the input site at offset t (row t of :func:`kernel_offsets`) from output site
    s, or n where there is none. Offsets t and K - 1 - t are opposite, so the output sites that
    read site s' at offset t are ``neighbours[s', K - 1 - t]``: the same table, read backwards,
    serves the backward pass.
    """

    kernel_size: int
    neighbours: Tensor

    @property
    def sites(self) -> int:
        """n: the number of sites."""
        return int(self.neighbours.shape[0])

    @property
    def pairs(self) -> int:
        """The number of (input site, output site) pairs over all offsets."""
        return int((self.neighbours < self.sites).sum())

    def for_kernel(self, kernel_size: int) -> Tensor:
        """The (n, kernel_size ** 4) table of a kernel of ``kernel_size`` (odd, at most this map's)."""
        if kernel_size == self.kernel_size:
            return self.neighbours
        if kernel_size > self.kernel_size or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"a kernel map of size {self.kernel_size} serves odd kernel sizes up to it, "
                             f"not {kernel_size}")
        big, shift = self.kernel_size, (self.kernel_size - kernel_size) // 2
        columns = [(((a + shift) * big + b + shift) * big + c + shift) * big + d + shift
                   for a, b, c, d in itertools.product(range(kernel_size), repeat=4)]
        return self.neighbours[:, columns]


def build_kernel_map(keys: Tensor, shape: GridShape, kernel_size: int) -> KernelMap:
    """The kernel map of the sites ``keys`` ((n,) int64, sorted, unique; see :func:`site_keys`) in a
    grid of ``shape`` for a kernel of ``kernel_size`` (odd): for each offset o, every site s whose
    neighbour s + o is a site, found by ``torch.searchsorted`` of the neighbour's key.

    Keys are recomputed in the grid padded by the kernel's radius on every side of the four
    spatial axes, so that a neighbour outside the grid has a key of its own (never a site's) instead
    of aliasing a cell of the next row; the order of the sites is the same. Only half the offsets
    are searched: s + o = s' exactly when s' - o = s, so the pairs of offset -o are those of o with
    input and output exchanged.
    """
    n, device = int(keys.shape[0]), keys.device
    radius = kernel_size // 2
    padded_shape = (shape[0], *(size + 2 * radius for size in shape[1:]))
    padded_keys = site_keys(site_coords(keys, shape) + torch.tensor([0, radius, radius, radius, radius], device=device),
                            padded_shape)
    offsets = kernel_offsets(kernel_size, device=device)
    deltas = (offsets * torch.tensor(_strides(padded_shape)[1:], device=device)).sum(dim=1).tolist()
    sentinel_keys = torch.cat((padded_keys, padded_keys.new_full((1,), -1)))  # position n: never a key
    count = int(offsets.shape[0])
    neighbours = torch.full((count, n), n, dtype=torch.int64, device=device)
    for index in range(count // 2 + 1):  # up to the centre (0, 0, 0, 0); the rest are mirrors
        neighbour_keys = padded_keys + deltas[index]
        position = torch.searchsorted(padded_keys, neighbour_keys)
        found = sentinel_keys[position] == neighbour_keys
        neighbours[index] = torch.where(found, position, n)
        sites = found.nonzero().squeeze(1)
        neighbours[count - 1 - index, position[sites]] = sites
    return KernelMap(kernel_size, neighbours.t().contiguous())


class _SparseConv4d(torch.autograd.Function):
    """Submanifold sparse 4-D convolution with a hand-written backward, vectorised over all sites
    and offsets at once, in one of two orders:

    - gather first (C_in <= C_out): each site's neighbours' inputs are gathered into an
      (n, K, C_in) matrix (zero where there is no neighbour), then one (n, K C_in) x (K C_in, C_out)
      product;
    - multiply first (C_in > C_out): one (n, C_in) x (C_in, K C_out) product gives every site's
      contribution at every offset, then each site gathers and sums its neighbours' contributions.

    Both passes are gathers only (the backward reads the kernel map backwards: see
    :class:`KernelMap`), never scatters, so the results do not depend on the order of atomic
    additions. Each pass holds n K min(C_in, C_out) numbers at a time; only the inputs, the weight
    and the kernel map are kept for the backward pass.
    """

    @staticmethod
    def forward(ctx, features: Tensor, weight: Tensor, bias: Tensor | None, kernel_map: KernelMap) -> Tensor:
        neighbours = kernel_map.for_kernel(weight.shape[-1])
        with torch.autocast(features.device.type, enabled=False):
            out = _conv_forward(features, weight, neighbours)
            if bias is not None:
                out += bias
        ctx.save_for_backward(features, weight, neighbours)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        features, weight, neighbours = ctx.saved_tensors
        want_features, want_weight, want_bias = ctx.needs_input_grad[:3]
        with torch.autocast(grad_out.device.type, enabled=False):
            grad_features, grad_weight = _conv_backward(grad_out.contiguous(), features, weight, neighbours,
                                                        want_features, want_weight)
            grad_bias = grad_out.sum(dim=0) if want_bias and ctx.has_bias else None
        return grad_features, grad_weight, grad_bias, None


def _weight_matrix(weight: Tensor) -> Tensor:
    """(C_out, C_in, k, k, k, k) -> (K, C_in, C_out), K = k^4 offsets in :func:`kernel_offsets` order."""
    return weight.flatten(2).permute(2, 1, 0)


def _padded(values: Tensor) -> Tensor:
    """(n, ...) -> (n + 1, ...) with a zero row n: what a missing neighbour (index n) reads."""
    return torch.cat((values, values.new_zeros(1, *values.shape[1:])))


def _per_offset_rows(neighbours: Tensor) -> Tensor:
    """(n, K) table -> (n K,) rows of an ((n + 1) K, C) per-site-and-offset matrix: row
    neighbours[s, t] * K + t, i.e. the neighbour's entry for that offset."""
    offsets = neighbours.shape[1]
    return (neighbours * offsets + torch.arange(offsets, device=neighbours.device)).flatten()


def _gather_neighbours(values: Tensor, neighbours: Tensor) -> Tensor:
    """(n, C) values, (n, K) table -> (n, K, C): each site's neighbours' values, 0 where none."""
    return _padded(values).index_select(0, neighbours.flatten()).view(*neighbours.shape, values.shape[1])


def _sum_neighbour_entries(per_offset: Tensor, neighbours: Tensor) -> Tensor:
    """(n + 1, K, C) entries of every site at every offset (row n: zeros), (n, K) table -> (n, C):
    for each site s, the sum over offsets t of its neighbour's entry ``per_offset[neighbours[s, t], t]``."""
    n, offsets = neighbours.shape
    rows = per_offset.view(-1, per_offset.shape[2]).index_select(0, _per_offset_rows(neighbours))
    return rows.view(n, offsets, -1).sum(dim=1)


def _conv_forward(features: Tensor, weight: Tensor, neighbours: Tensor) -> Tensor:
    """(n, C_in) -> (n, C_out) without bias; see :class:`_SparseConv4d` for the two orders."""
    n, c_in = features.shape
    c_out, offsets = weight.shape[0], neighbours.shape[1]
    matrix = _weight_matrix(weight)
    if c_in <= c_out:
        return _gather_neighbours(features, neighbours).view(n, offsets * c_in) @ matrix.reshape(offsets * c_in, c_out)
    contributions = features.new_zeros(n + 1, offsets * c_out)  # row n stays zero
    torch.mm(features, matrix.permute(1, 0, 2).reshape(c_in, offsets * c_out), out=contributions[:n])
    return _sum_neighbour_entries(contributions.view(n + 1, offsets, c_out), neighbours)


def _conv_backward(grad_out: Tensor, features: Tensor, weight: Tensor, neighbours: Tensor, want_features: bool,
                   want_weight: bool) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of :func:`_conv_forward` for its features and weight (None where not wanted)."""
    n, c_in = features.shape
    c_out, offsets = weight.shape[0], neighbours.shape[1]
    matrix = _weight_matrix(weight)
    readers = neighbours.flip(1)  # readers[s', t]: the output site that reads s' at offset t
    grad_features = grad_matrix = None
    if c_in <= c_out:
        if want_weight:  # the gathered inputs again, rather than kept from the forward pass
            gathered = _gather_neighbours(features, neighbours).view(n, offsets * c_in)
            grad_matrix = (gathered.t() @ grad_out).view(offsets, c_in, c_out)
        if want_features:
            grad_gathered = grad_out.new_zeros(n + 1, offsets * c_in)  # row n stays zero
            torch.mm(grad_out, matrix.reshape(offsets * c_in, c_out).t(), out=grad_gathered[:n])
            grad_features = _sum_neighbour_entries(grad_gathered.view(n + 1, offsets, c_in), readers)
    else:
        grad_contributions = _gather_neighbours(grad_out, readers).view(n, offsets * c_out)
        if want_weight:
            grad_matrix = (features.t() @ grad_contributions).view(c_in, offsets, c_out).permute(1, 0, 2)
        if want_features:
            grad_features = grad_contributions @ matrix.permute(1, 0, 2).reshape(c_in, offsets * c_out).t()
    grad_weight = None
    if grad_matrix is not None:  # (K, C_in, C_out) -> the weight's layout
        grad_weight = grad_matrix.permute(2, 1, 0).reshape(weight.shape)
    return grad_features, grad_weight


def sparse_conv4d(features: Tensor, weight: Tensor, bias: Tensor | None, kernel_map: KernelMap) -> Tensor:
    """Submanifold sparse 4-D convolution: (n, C_in) features at the kernel map's n sites,
    (C_out, C_in, k, k, k, k) weight (k odd, at most ``kernel_map.kernel_size``), optional (C_out,)
    bias -> (n, C_out) outputs at the same sites, in the features' dtype. Differentiable in the
    features, weight and bias."""
    if features.dim() != 2 or features.shape[0] != kernel_map.sites:
        raise ValueError(f"features must be (sites = {kernel_map.sites}, C_in), got {tuple(features.shape)}")
    if weight.dim() != 6 or weight.shape[1] != features.shape[1] or len(set(weight.shape[2:])) != 1:
        raise ValueError(f"weight must be (C_out, {features.shape[1]}, k, k, k, k), got {tuple(weight.shape)}")
    return _SparseConv4d.apply(features, weight, bias, kernel_map)


def swap_images(weight: Tensor) -> Tensor:
    """(C_out, C_in, k, k, k, k) weight -> the weight of the same convolution run on the pair with
    its two images swapped, expressed in the original order: W'[..., a, b, c, d] = W[..., c, d, a, b].
    Swapping the images of a tensor, convolving with W and swapping back equals convolving with W'."""
    return weight.permute(0, 1, 4, 5, 2, 3)


def block_diagonal(first: Tensor, second: Tensor) -> Tensor:
    """Two (C_out_i, C_in_i, k, k, k, k) weights -> one (C_out_1 + C_out_2, C_in_1 + C_in_2, ...) weight
    that applies ``first`` to the first C_in_1 channels and ``second`` to the others, separately."""
    top = torch.cat((first, first.new_zeros(first.shape[0], second.shape[1], *first.shape[2:])), dim=1)
    bottom = torch.cat((second.new_zeros(second.shape[0], first.shape[1], *second.shape[2:]), second), dim=1)
    return torch.cat((top, bottom), dim=0)


def to_dense(features: Tensor, keys: Tensor, shape: GridShape) -> Tensor:
    """(n, C) features at the sites ``keys`` -> the dense (B, C, hA, wA, hB, wB) tensor that is zero
    off the sites (for checks and the dense comparison; its size grows with (hA wA hB wB))."""
    dense = features.new_zeros(features.shape[1], shape[0] * shape[1] * shape[2] * shape[3] * shape[4])
    dense[:, keys] = features.t()
    return dense.view(features.shape[1], *shape).transpose(0, 1)


def from_dense(dense: Tensor, keys: Tensor) -> Tensor:
    """(B, C, hA, wA, hB, wB) dense tensor -> (n, C) its values at the sites ``keys``."""
    return dense.transpose(0, 1).reshape(dense.shape[1], -1)[:, keys].t()
