"""The sparse correspondence graph of Eq. 4 (paper section 5), built in time and memory that grow with
the number of images times the neighbours kept (N * k), never with N^2.

Inputs (produced by ``trainer.discovery.pairs``): P unordered image pairs stored once each,

- ``pairs`` (P, 2) int: (i, j), i != j;
- ``out_ij`` (P, 3, h, w) float16/32: the network's output for image i of the pair towards j:
  channels 0, 1 = x, y of the correspondence in image j (normalised to [0, 1], cell centres at
  (col + 0.5) / w), channel 2 = the mask probability of the cell;
- ``out_ji`` (P, 3, h, w): the same for image j towards i.

Vertices
    A vertex is a confident correspondence c = (i, p -> j, q): cell p of image i (its *anchor*,
    whose mask passed ``mask_threshold``) and the cell q of image j that the prediction i -> j sends
    it to, weighted by its confidence (the mask probability at p). Both directed predictions of
    every pair give vertices. Correspondences are rounded to cells as in the authors'
    ``Discovery_3Cycles.Discovery`` (they round ``x * (w - 1)``; here ``floor(x * w)``, the cell whose
    centre is ``(col + 0.5) / w``, which is the inverse of this project's convention). With
    ``merge_cells`` the same correspondence seen from both directions (i, p -> j, q and j, q -> i, p)
    is one vertex, keeping the best confidence (the authors deduplicate per (x1, y1, x2, y2) within
    one pair, of which they keep a single direction).

Edges (weights in [0, 1], distances Euclidean, in cells)
    2-cycle (two correspondences of the same image pair (i, j), whichever direction they came from;
    the authors' ``FullGraph3Cycle.ComputeSimiDecayNeigh``):
        w = conf_c * conf_c' * exp(-(|p - p'| + |q - q'|) / (2 sigma))
    3-cycle (two correspondences c = (i, p -> j, q) and c' = (i, p' -> n, r) sharing image i, j != n,
    closed by the prediction of the pair (j, n), which gives T_jn (j -> n) and T_nj (n -> j)): Eq. 4,
    the authors' ``FullGraph3Cycle.OptimFullGraph``, branch ``i == m`` (``j == m``, ``j == n`` are the
    same with the roles of the two ends swapped; here every vertex takes part through both of its
    images):
        w = conf_c * conf_c' * exp(-|p - p'| / sigma)
            * 0.5 * (exp(-|T_jn(q) - r| / sigma) [* mask_j(q)] + exp(-|q - T_nj(r)| / sigma) [* mask_n(r)])
    the masks (of the prediction j -> n at q and n -> j at r) only with ``mask_in_cycle`` (their
    ``--mask-in-3cycle``). Without a prediction for (j, n) there is no 3-cycle edge. Edges below
    ``edge_threshold`` are dropped (the authors keep A > 0.01).

Differences from the authors' code
    They keep one direction per pair (the one with more confident cells), so their 2-cycle edges
    join correspondences of one directed prediction; here both directions give vertices and 2-cycle
    edges join any two correspondences of the pair. Their loop over pairs of pairs handles the shared
    image in positions (i == m, j == m, j == n) but not i == n, so some 3-cycle edges depend on the
    order of their pair list; here every vertex pair sharing an image is considered once, whatever
    the order or orientation of ``pairs`` (the result does not depend on it).

Scaling
    Every weight is at most exp(-|p - p'| / sigma) (3-cycle) or exp(-|p - p'| / (2 sigma)) (2-cycle),
    so an edge needs |p - p'| <= radius = sigma * ln(1 / edge_threshold) (twice that for 2-cycles):
    only vertices of one anchor image (resp. one pair) in nearby cells can be joined. The build
    buckets each vertex, through each of its two images, by (image, block of ceil(radius / 2) cells)
    and joins each bucket with the buckets within reach (a half-plane of block offsets, so each pair
    is met once), vectorised, in batches of bounded size. The third prediction of a 3-cycle is read
    from a per-image table of the pairs joining two of its partners (sum of degree^2 entries), the
    decays exp(-d / sigma) from a table of the grid's integer offsets. The cost is the number of
    candidate vertex pairs (``GraphStats.n_candidates``): for each image, the vertices it holds
    through its pairs, joined within about twice the disc of the radius. With bounded degree that
    is O(N * k^2 * cells), never an N x N or V x V array; images of very high degree (hubs of the
    retrieval lists) make it grow with their degree squared.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp

SIGMA_PER_CLASS = {"car": 5.0, "airplane": 0.8, "horse": 1.2}
"""The authors' sigma (cells of the 30 x 30 grid) per class of the Internet dataset
(``Discovery_3Cycles.py --sigma 5.0 0.8 1.2`` for Car, Airplane, Horse)."""

DEFAULT_BATCH = 1 << 22
"""Candidate vertex pairs handled per vectorised batch (about 100 bytes each at the peak)."""


@dataclass(frozen=True)
class GraphParams:
    """Settings of the correspondence graph; the defaults are the authors' (``evalInt/``).

    mask_threshold: a cell is a vertex when its mask probability is > this (their ``--conf-th`` 0.85).
    sigma: distance decay in cells (their ``--sigma``: 5.0 Car, 0.8 Airplane, 1.2 Horse; see
        ``SIGMA_PER_CLASS``).
    edge_threshold: edges with a weight below this are dropped (their 0.01).
    two_cycle: edges between correspondences of the same pair (their default; ``--only3cycle`` off).
    three_cycle: edges between correspondences sharing an image, through a third prediction.
    mask_in_cycle: weight the 3-cycle terms by the third prediction's masks (their
        ``--mask-in-3cycle``, off by default).
    merge_cells: one vertex per correspondence (image, cell, partner, partner cell) whichever
        direction predicted it, keeping the best confidence.
    """

    mask_threshold: float = 0.85
    sigma: float = 1.2
    edge_threshold: float = 0.01
    two_cycle: bool = True
    three_cycle: bool = True
    mask_in_cycle: bool = False
    merge_cells: bool = True

    def __post_init__(self) -> None:
        for name in ("mask_threshold", "sigma", "edge_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"GraphParams.{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"GraphParams.{name} must be finite, got {value!r}")
        if not 0.0 <= self.mask_threshold < 1.0:
            raise ValueError(f"GraphParams.mask_threshold must be in [0, 1): a mask probability above which a "
                             f"cell is a vertex, got {self.mask_threshold!r}")
        if self.sigma <= 0:
            raise ValueError(f"GraphParams.sigma must be > 0 (cells), got {self.sigma!r}")
        if not 0.0 < self.edge_threshold < 1.0:
            raise ValueError(f"GraphParams.edge_threshold must be in (0, 1): weights are at most 1, and 0 would "
                             f"join every two vertices sharing an image (a dense graph), got {self.edge_threshold!r}")
        for name in ("two_cycle", "three_cycle", "mask_in_cycle", "merge_cells"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"GraphParams.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def radius(self) -> float:
        """Cells: the largest |p - p'| with exp(-|p - p'| / sigma) >= edge_threshold, i.e.
        sigma * ln(1 / edge_threshold) (5.53 cells with the defaults); no 3-cycle edge joins two
        vertices farther apart in their shared image, no 2-cycle edge two vertices whose distances in
        the two images add up to more than twice this."""
        return float(self.sigma * math.log(1.0 / self.edge_threshold))


@dataclass(frozen=True, eq=False)
class Vertices:
    """V confident correspondences, 1-D arrays of length V.

    image: int32, the anchor image i (whose mask passed the threshold).
    cell: int32, flat cell ``row * w + col`` of i.
    partner: int32, the other image j.
    partner_cell: int32, the cell of j that the prediction i -> j sends ``cell`` to.
    confidence: float32, the mask probability of ``cell`` in the prediction i -> j.
    pair: int64, index of (i, j) in ``pairs``.
    direction: int8, 0 if the vertex came from ``out_ij[pair]`` (i == pairs[pair, 0]), 1 from ``out_ji``.
    grid: (h, w).
    n_nonfinite: confident cells dropped because their correspondence was NaN or infinite.
    n_merged: vertices removed by ``merge_cells`` (seen from both directions).

    The order is canonical, by (image, cell, partner, partner_cell): it does not depend on the order
    or orientation of ``pairs``.
    """

    image: np.ndarray
    cell: np.ndarray
    partner: np.ndarray
    partner_cell: np.ndarray
    confidence: np.ndarray
    pair: np.ndarray
    direction: np.ndarray
    grid: tuple[int, int]
    n_nonfinite: int = 0
    n_merged: int = 0

    def __len__(self) -> int:
        return int(self.image.shape[0])

    @property
    def prediction(self) -> np.ndarray:
        """(V,) int64: the directed prediction each vertex came from, ``2 * pair + direction``."""
        return self.pair.astype(np.int64) * 2 + self.direction

    def take(self, index: np.ndarray) -> Vertices:
        """The vertices at ``index`` (an index or boolean array), same grid and counts."""
        return Vertices(self.image[index], self.cell[index], self.partner[index], self.partner_cell[index],
                        self.confidence[index], self.pair[index], self.direction[index], self.grid,
                        self.n_nonfinite, self.n_merged)


@dataclass(frozen=True)
class GraphStats:
    """Counts of a build.

    n_vertices, n_edges: vertices and undirected edges (``weights.nnz // 2``);
    n_two_cycle_edges, n_three_cycle_edges: the edges of each kind;
    n_pairs, n_active_pairs: pairs given, pairs that gave at least one vertex;
    n_triplets_closed: (anchor i, partners {j, n}) with vertices on (i, j) and (i, n) and a
        prediction for (j, n): the triplets whose 3-cycle edges were looked for;
    n_triplets_open: the same triplets lacking the (j, n) prediction (no 3-cycle edge possible);
    n_candidates: close vertex pairs examined (the build's work);
    n_candidates_missing_third: close vertex pairs sharing an image whose third prediction is missing.
    """

    n_vertices: int = 0
    n_edges: int = 0
    n_two_cycle_edges: int = 0
    n_three_cycle_edges: int = 0
    n_pairs: int = 0
    n_active_pairs: int = 0
    n_triplets_closed: int = 0
    n_triplets_open: int = 0
    n_candidates: int = 0
    n_candidates_missing_third: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class CorrespondenceGraph:
    """Vertices and their symmetric weight matrix.

    weights: scipy.sparse CSR (V, V) float32, symmetric, no self loops, every stored entry
        >= ``params.edge_threshold``; row/column v is ``vertices`` entry v.
    """

    vertices: Vertices
    weights: sp.csr_matrix
    n_images: int
    params: GraphParams
    stats: GraphStats

    @property
    def grid(self) -> tuple[int, int]:
        return self.vertices.grid


# --------------------------------------------------------------------------------------------------
# Edge weights (pure functions)


def _decay(distance: np.ndarray, sigma: float) -> np.ndarray:
    """exp(-distance / sigma); a NaN distance (no prediction) decays to 0."""
    out = np.exp(-np.asarray(distance, dtype=np.float64) / sigma)
    return np.where(np.isnan(out), 0.0, out)


def _norm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return np.hypot(diff[..., 0], diff[..., 1])


def _eq4_from_decays(conf_c, conf_c2, near, forward, backward, mask_forward=None, mask_backward=None) -> np.ndarray:
    """Eq. 4 from its decayed distance terms (float64): the one place the formula is written, used
    by ``eq4_weight`` and by the build (which reads the decays from a table of integer offsets)."""
    if mask_forward is not None:
        forward = forward * np.nan_to_num(np.asarray(mask_forward, dtype=np.float64), nan=0.0)
        backward = backward * np.nan_to_num(np.asarray(mask_backward, dtype=np.float64), nan=0.0)
    conf = np.asarray(conf_c, dtype=np.float64) * np.asarray(conf_c2, dtype=np.float64)
    return conf * near * 0.5 * (forward + backward)


def eq4_weight(conf_c, conf_c2, p, p2, q, r, t_jn_q, t_nj_r, sigma: float, *,
               mask_j_q=None, mask_n_r=None) -> np.ndarray:
    """Eq. 4: the 3-cycle weight between c = (i, p -> j, q) and c' = (i, p' -> n, r), j != n.

    Positions are arrays (..., 2) in cells, any fixed order of the two axes (row, col here):
    p, p2 = p, p' in the shared image i; q in j; r in n; t_jn_q = T_jn(q), the cell of n that the
    prediction j -> n sends q to; t_nj_r = T_nj(r), the cell of j that n -> j sends r to (NaN: no
    prediction, that term is 0). conf_c, conf_c2: the two vertices' confidences (...).
    mask_j_q, mask_n_r: the mask probabilities of j -> n at q and of n -> j at r, given together for
    the ``mask_in_cycle`` variant, omitted otherwise.

        w = conf_c * conf_c2 * exp(-|p - p'| / sigma)
            * 0.5 * (exp(-|T_jn(q) - r| / sigma) [* mask_j(q)] + exp(-|q - T_nj(r)| / sigma) [* mask_n(r)])

    The authors' ``evalInt/FullGraph3Cycle.py``, ``OptimFullGraph``, branch ``i == m``:
    ``A = ComputeTripletDecayNeigh(p, p')`` (exp(-|p - p'| / sigma)), ``A3cycle_n`` (T_jn(q) vs r),
    ``A3cycle_j`` (q vs T_nj(r)), ``A * (A3cycle_n [* mask_j] + A3cycle_j [* mask_n]) * 0.5 * conf1 * conf2``.
    Symmetric in (c, c'). Returns float64 (...).
    """
    if (mask_j_q is None) != (mask_n_r is None):
        raise ValueError("eq4_weight: give both mask_j_q and mask_n_r (mask_in_cycle) or neither")
    return _eq4_from_decays(conf_c, conf_c2, _decay(_norm(p, p2), sigma), _decay(_norm(t_jn_q, r), sigma),
                            _decay(_norm(q, t_nj_r), sigma), mask_j_q, mask_n_r)


def _two_cycle_from_decays(conf_c, conf_c2, decay_p, decay_q) -> np.ndarray:
    """The 2-cycle weight from exp(-|p - p'| / (2 sigma)) and exp(-|q - q'| / (2 sigma)) (float64)."""
    return np.asarray(conf_c, dtype=np.float64) * np.asarray(conf_c2, dtype=np.float64) * decay_p * decay_q


def two_cycle_weight(conf_c, conf_c2, p, p2, q, q2, sigma: float) -> np.ndarray:
    """The 2-cycle weight between two correspondences c = (i, p -> j, q), c' = (i, p' -> j, q') of
    the same image pair (from either directed prediction; positions (..., 2) in cells):

        w = conf_c * conf_c2 * exp(-(|p - p'| + |q - q'|) / (2 sigma))

    The authors' ``evalInt/FullGraph3Cycle.py``, ``ComputeSimiDecayNeigh`` times ``conf[:, None] *
    conf[None, :]`` (the ``if not only3cycle`` block of ``OptimFullGraph``). Returns float64 (...).
    """
    return _two_cycle_from_decays(conf_c, conf_c2, _decay(_norm(p, p2), 2.0 * sigma), _decay(_norm(q, q2), 2.0 * sigma))


# --------------------------------------------------------------------------------------------------
# Inputs


def _check_predictions(pairs, out_ij, out_ji, n_images: int | None = None):
    pairs = np.asarray(pairs)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be (P, 2), got shape {pairs.shape}")
    if pairs.size and not np.issubdtype(pairs.dtype, np.integer):
        raise TypeError(f"pairs must hold integers (image indices), got {pairs.dtype}")
    pairs = pairs.astype(np.int64, copy=False)
    for name, out in (("out_ij", out_ij), ("out_ji", out_ji)):
        if not hasattr(out, "shape") or len(out.shape) != 4 or out.shape[1] != 3:
            raise ValueError(f"{name} must be (P, 3, h, w), got shape {getattr(out, 'shape', None)}")
        if out.shape[0] != pairs.shape[0]:
            raise ValueError(f"{name} has {out.shape[0]} predictions for {pairs.shape[0]} pairs")
        if not np.issubdtype(out.dtype, np.floating):
            raise TypeError(f"{name} must be float16/32, got {out.dtype}")
    if tuple(out_ij.shape) != tuple(out_ji.shape):
        raise ValueError(f"out_ij {tuple(out_ij.shape)} and out_ji {tuple(out_ji.shape)} differ in shape")
    h, w = int(out_ij.shape[2]), int(out_ij.shape[3])
    if h < 1 or w < 1:
        raise ValueError(f"empty grid {(h, w)}")
    if pairs.size:
        if pairs.min() < 0:
            raise ValueError(f"pairs holds a negative image index ({pairs.min()})")
        if n_images is not None and pairs.max() >= n_images:
            raise ValueError(f"pairs holds image {pairs.max()} but n_images is {n_images}")
        same = np.flatnonzero(pairs[:, 0] == pairs[:, 1])
        if same.size:
            raise ValueError(f"pair {same[0]} joins image {pairs[same[0], 0]} to itself")
    return pairs, (h, w)


class _PairIndex:
    """Lookup of the stored pair of two images, in either order (sorted keys, no N x N table)."""

    def __init__(self, pairs: np.ndarray, n_images: int):
        self.pairs = pairs
        self.n_images = max(int(n_images), 1)
        lo, hi = np.minimum(pairs[:, 0], pairs[:, 1]), np.maximum(pairs[:, 0], pairs[:, 1])
        keys = lo * self.n_images + hi
        self.order = np.argsort(keys, kind="stable")
        self.keys = keys[self.order]
        twice = np.flatnonzero(self.keys[1:] == self.keys[:-1])
        if twice.size:
            first = self.order[twice[0]]
            raise ValueError(f"the pair of images {tuple(int(v) for v in pairs[first])} is stored twice "
                             f"(rows {first} and {self.order[twice[0] + 1]}): store each unordered pair once")

    def find(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pair index, found) of the images a, b (arrays); index 0 where not found."""
        if self.keys.size == 0:
            return np.zeros(a.shape, np.int64), np.zeros(a.shape, bool)
        key = np.minimum(a, b).astype(np.int64) * self.n_images + np.maximum(a, b)
        pos = np.minimum(np.searchsorted(self.keys, key), self.keys.size - 1)
        found = self.keys[pos] == key
        return np.where(found, self.order[pos], 0), found


def _to_cell(x: np.ndarray, y: np.ndarray, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns (float, NaN where not finite) of normalised coordinates, clipped to the grid."""
    h, w = grid
    col = np.clip(np.floor(np.asarray(x, dtype=np.float64) * w), 0, w - 1)
    row = np.clip(np.floor(np.asarray(y, dtype=np.float64) * h), 0, h - 1)
    bad = ~(np.isfinite(x) & np.isfinite(y))
    col[bad] = np.nan
    row[bad] = np.nan
    return row, col


def _argsort_rows(columns: list[np.ndarray], radices: list[int]) -> np.ndarray:
    """Stable lexicographic order of rows given as int columns (first = most significant) with
    known value ranges; one int64 key when it fits, np.lexsort otherwise."""
    total = 1
    for radix in radices:
        total *= max(int(radix), 1)
    if total < 2 ** 62:
        key = np.zeros(columns[0].shape, np.int64)
        for column, radix in zip(columns, radices):
            key = key * max(int(radix), 1) + column
        return np.argsort(key, kind="stable")
    return np.lexsort(columns[::-1])


def vertices(pairs, out_ij, out_ji, params: GraphParams | None = None, *, chunk_cells: int = 1 << 24) -> Vertices:
    """The confident correspondences of both directed predictions of every pair.

    pairs (P, 2) int; out_ij, out_ji (P, 3, h, w) float16/32 (numpy arrays or memory maps, read in
    chunks of about ``chunk_cells`` cells). A cell of image i in the prediction i -> j is a vertex when
    its mask > ``params.mask_threshold``; its partner cell is ``floor(x * w), floor(y * h)``, clipped
    to the grid; cells whose correspondence is not finite are dropped (counted in ``n_nonfinite``).
    With ``params.merge_cells`` a correspondence found by both directions is one vertex (the more
    confident one's; on a tie, the one anchored in the lower image index).
    """
    params = GraphParams() if params is None else params
    pairs, grid = _check_predictions(pairs, out_ij, out_ji)
    h, w = grid
    cells = h * w
    n_pairs = pairs.shape[0]
    step = max(1, int(chunk_cells) // cells)
    parts: list[tuple[np.ndarray, ...]] = []
    n_nonfinite = 0
    for direction, out in ((0, out_ij), (1, out_ji)):
        for start in range(0, n_pairs, step):
            # the mask channel only, compared in float32 whatever the storage; x, y read at the confident cells
            mask = np.asarray(out[start:start + step, 2], dtype=np.float32).reshape(-1, cells)
            local, cell = np.nonzero(mask > params.mask_threshold)
            conf = mask[local, cell]
            del mask
            at, r, c = local + start, cell // w, cell % w
            x, y = np.asarray(out[at, 0, r, c], np.float32), np.asarray(out[at, 1, r, c], np.float32)
            row, col = _to_cell(x, y, grid)
            ok = np.isfinite(row)
            n_nonfinite += int((~ok).sum())
            pair = (local[ok] + start).astype(np.int64)
            partner_cell = (row[ok] * w + col[ok]).astype(np.int32)
            parts.append((pair, cell[ok].astype(np.int32), partner_cell, conf[ok].astype(np.float32),
                          np.full(pair.shape, direction, np.int8)))
    if parts:
        pair, cell, partner_cell, conf, direction = (np.concatenate(column) for column in zip(*parts))
    else:
        pair, cell, partner_cell = np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32)
        conf, direction = np.zeros(0, np.float32), np.zeros(0, np.int8)
    first = direction == 0
    image = np.where(first, pairs[pair, 0], pairs[pair, 1]).astype(np.int32)
    partner = np.where(first, pairs[pair, 1], pairs[pair, 0]).astype(np.int32)
    n_merged = 0
    if params.merge_cells and pair.size:
        # the correspondence, whichever way it was predicted: (pair, cell in pairs[pair, 0], cell in pairs[pair, 1])
        cell_a = np.where(first, cell, partner_cell)
        cell_b = np.where(first, partner_cell, cell)
        # best confidence first; on a tie, the vertex anchored in the lower image (independent of the pairs' order)
        key = (pair * cells + cell_a) * cells + cell_b  # < P * cells^2: int64 for any realistic grid
        order = np.lexsort((image, -conf, key))
        key_a, key_b, key_p = cell_a[order], cell_b[order], pair[order]
        head = np.ones(order.size, bool)
        head[1:] = (key_p[1:] != key_p[:-1]) | (key_a[1:] != key_a[:-1]) | (key_b[1:] != key_b[:-1])
        keep = order[head]
        n_merged = int(pair.size - keep.size)
        image, cell, partner, partner_cell = image[keep], cell[keep], partner[keep], partner_cell[keep]
        conf, pair, direction = conf[keep], pair[keep], direction[keep]
    n_img = int(pairs.max()) + 1 if pairs.size else 1
    order = _argsort_rows([image, cell, partner, partner_cell], [n_img, cells, n_img, cells])
    return Vertices(image[order], cell[order], partner[order], partner_cell[order], conf[order], pair[order],
                    direction[order], grid, n_nonfinite, n_merged)


# --------------------------------------------------------------------------------------------------
# Neighbour search


class _BlockJoin:
    """Items (group, row, col) bucketed by (group, block of ``side`` x ``side`` cells), sorted once.

    ``pairs`` yields every unordered pair of items of the same group whose blocks may hold cells
    within ``reach`` (Euclidean, cells) of each other, as positions in the sorted order: a superset
    the caller filters exactly. side = ceil(reach / 2); the block offsets kept are those of a
    half-plane whose nearest cells are within reach (11 offsets for the default 3-cycle reach of
    5.5 cells: about twice the disc's area is examined). Bucket ranges come from a dense table of
    (group, block) starts when it is no larger than the items, from a binary search otherwise."""

    def __init__(self, group: np.ndarray, row: np.ndarray, col: np.ndarray, reach: float, grid: tuple[int, int]):
        h, w = grid
        self.n = n = int(group.shape[0])
        side = max(1, math.ceil(reach / 2))
        self.nby, self.nbx = nby, nbx = -(-h // side), -(-w // side)
        present = np.zeros(int(group.max()) + 1 if n else 1, bool)
        present[group] = True
        rank = np.cumsum(present, dtype=np.int64) - 1
        keyspace = int(present.sum()) * nby * nbx
        by, bx = (row // side).astype(np.int32), (col // side).astype(np.int32)
        key = rank[group] * (nby * nbx) + by.astype(np.int64) * nbx + bx
        del rank, present
        self.order = np.argsort(key, kind="stable")
        self.key = key[self.order]
        del key
        self.by, self.bx = by[self.order], bx[self.order]
        self.start = None
        if keyspace <= 4 * n + (1 << 20):
            self.start = np.zeros(keyspace + 1, np.int64)
            np.cumsum(np.bincount(self.key, minlength=keyspace), out=self.start[1:])

        def gap(d: int) -> int:  # the least distance between cells of two blocks d apart on one axis
            return 0 if d == 0 else (abs(d) - 1) * side + 1

        most = int((reach - 1) // side) + 1 if reach >= 1 else 0
        self.offsets = [(dy, dx) for dy in range(0, min(most, nby - 1) + 1)
                        for dx in range(-min(most, nbx - 1), min(most, nbx - 1) + 1)
                        if (dy > 0 or dx >= 0) and math.hypot(gap(dy), gap(dx)) <= reach + 1e-9]

    def _range(self, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.start is not None:
            return self.start[key], self.start[key + 1]
        return np.searchsorted(self.key, key, side="left"), np.searchsorted(self.key, key, side="right")

    def pairs(self, batch: int, chunk: int = 1 << 21) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(s, t) position arrays, s != t, every unordered close pair once, at most ``batch`` a step."""
        for a0 in range(0, self.n, chunk):
            a1 = min(self.n, a0 + chunk)
            key, by, bx = self.key[a0:a1], self.by[a0:a1], self.bx[a0:a1]
            for dy, dx in self.offsets:
                if (dy, dx) == (0, 0):
                    lo = np.arange(a0 + 1, a1 + 1, dtype=np.int64)  # later items of the same bucket
                    hi = self._range(key)[1]
                else:
                    ty, tx = by + dy, bx + dx
                    inside = (ty < self.nby) & (tx >= 0) & (tx < self.nbx)
                    lo, hi = self._range(np.where(inside, key + (dy * self.nbx + dx), 0))
                    hi = np.where(inside, hi, lo)
                yield from _expand_ranges(a0, lo, hi - lo, batch)


def _expand_ranges(first: int, lo: np.ndarray, count: np.ndarray,
                   batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(s, t) for every s = first + i and t in lo[i] .. lo[i] + count[i] - 1, at most ``batch``
    pairs a step (one item's range is never cut)."""
    cum = np.cumsum(count)
    if cum.size == 0 or cum[-1] == 0:
        return
    n = count.size
    start = 0
    while start < n:
        base = int(cum[start - 1]) if start else 0
        end = max(int(np.searchsorted(cum, base + batch, side="right")), start + 1)
        c = count[start:end]
        total = int(cum[end - 1]) - base
        if total:
            s = np.repeat(np.arange(first + start, first + end, dtype=np.int64), c)
            t = np.repeat(lo[start:end] - (cum[start:end] - c - base), c) + np.arange(total, dtype=np.int64)
            yield s, t
        start = end


def _decay_table(sigma: float, grid: tuple[int, int]) -> tuple[np.ndarray, int, int]:
    """exp(-|(dr, dc)| / sigma) for every offset between two cells of the grid, float64, read at
    ``dr * stride + dc + centre``: all positions are cells, so no exponential is taken per edge."""
    h, w = grid
    dr, dc = np.meshgrid(np.arange(-(h - 1), h), np.arange(-(w - 1), w), indexing="ij")
    table = _decay(np.hypot(dr, dc), sigma).ravel()
    stride = 2 * w - 1
    return table, stride, (h - 1) * stride + (w - 1)


class _Neighbourhoods:
    """The pair list as each image's partners (sorted), and per image i a table of the stored pair
    joining any two of its partners, -1 where there is none: sum over images of degree^2 entries,
    so the third prediction of a 3-cycle is one array read (no N x N table, no search per edge).

    local[pair, side]: the rank of the pair among the partners of pairs[pair, side].
    table[offset[i] + a * degree[i] + b]: the pair of the a-th and b-th partners of i.
    closed / open: triplets (i, {j, n}) with both (i, j), (i, n) active, with / without (j, n)."""

    def __init__(self, pairs: np.ndarray, n_images: int, index: _PairIndex, active: np.ndarray,
                 chunk: int = 1 << 23):
        n_pairs = pairs.shape[0]
        n_images = max(int(n_images), 1)
        rows = np.concatenate([pairs[:, 0], pairs[:, 1]])
        cols = np.concatenate([pairs[:, 1], pairs[:, 0]])
        order = np.argsort(rows * n_images + cols, kind="stable")
        rows, cols = rows[order], cols[order]
        pid = np.concatenate([np.arange(n_pairs)] * 2)[order]
        side = np.repeat(np.arange(2), n_pairs)[order]
        self.degree = np.bincount(rows, minlength=n_images).astype(np.int64)
        indptr = np.concatenate([[0], np.cumsum(self.degree)])
        self.local = np.zeros((n_pairs, 2), np.int32 if n_pairs < 2 ** 30 else np.int64)
        self.local[pid, side] = np.arange(2 * n_pairs) - indptr[rows]
        squares = self.degree ** 2
        cum = np.cumsum(squares)
        self.offset = cum - squares
        pid_dtype = np.int32 if n_pairs < 2 ** 31 - 1 else np.int64
        self.table = np.full(int(cum[-1]) if cum.size else 0, -1, pid_dtype)
        self.closed = self.open = 0
        first = 0
        while first < n_images:
            base = int(cum[first - 1]) if first else 0
            last = max(int(np.searchsorted(cum, base + chunk, side="right")), first + 1)
            count = squares[first:last]
            total = int(count.sum())
            if total:
                image = np.repeat(np.arange(first, last), count)
                within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
                degree = self.degree[image]
                a, b = within // degree, within % degree
                entry_a, entry_b = indptr[image] + a, indptr[image] + b
                third, found = index.find(cols[entry_a], cols[entry_b])
                found &= a != b
                self.table[self.offset[image] + within] = np.where(found, third, -1)
                both = active[pid[entry_a]] & active[pid[entry_b]] & (a < b)
                self.closed += int((both & found).sum())
                self.open += int((both & ~found).sum())
            first = last


def _predict(out_ij, out_ji, pid: np.ndarray, from_first: np.ndarray, row: np.ndarray, col: np.ndarray,
             grid: tuple[int, int], with_mask: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(row, col, finite, mask or None) of the prediction of pair ``pid`` from its first image
    (``out_ij``) where ``from_first``, from its second (``out_ji``) elsewhere, at cell (row, col);
    the predicted cell as in ``vertices`` (0 where the correspondence is not finite)."""
    h, w = grid
    x = np.empty(pid.shape, np.float64)
    y = np.empty(pid.shape, np.float64)
    m = np.empty(pid.shape, np.float32) if with_mask else None
    for out, sel in ((out_ij, from_first), (out_ji, ~from_first)):
        if sel.any():
            p, r, c = pid[sel], row[sel], col[sel]
            x[sel] = out[p, 0, r, c]
            y[sel] = out[p, 1, r, c]
            if with_mask:
                m[sel] = out[p, 2, r, c]
    finite = np.isfinite(x) & np.isfinite(y)
    prow = np.clip(np.floor(np.where(finite, y, 0.0) * h), 0, h - 1).astype(np.int64)
    pcol = np.clip(np.floor(np.where(finite, x, 0.0) * w), 0, w - 1).astype(np.int64)
    return prow, pcol, finite, m


# --------------------------------------------------------------------------------------------------
# Build


def _two_cycle_edges(verts: Vertices, params: GraphParams, batch: int, counts: dict):
    """(a, b, w float32) batches of 2-cycle edges between vertices a != b of the same pair."""
    h, w = verts.grid
    first = verts.direction == 0
    cell_a = np.where(first, verts.cell, verts.partner_cell)  # the cell in pairs[pair, 0]
    cell_b = np.where(first, verts.partner_cell, verts.cell)  # the cell in pairs[pair, 1]
    join = _BlockJoin(verts.pair, cell_a // w, cell_a % w, 2.0 * params.radius, verts.grid)
    order = join.order
    pa = (cell_a[order] // w) * (2 * w - 1) + cell_a[order] % w  # row * stride + col (int32)
    pb = (cell_b[order] // w) * (2 * w - 1) + cell_b[order] % w
    conf = verts.confidence[order]
    del cell_a, cell_b
    half, _, centre = _decay_table(2.0 * params.sigma, verts.grid)  # exp(-d / (2 sigma))
    threshold = np.float32(params.edge_threshold)
    for s, t in join.pairs(batch):
        counts["n_candidates"] += s.size
        weight = _two_cycle_from_decays(conf[s], conf[t], half[pa[s] - pa[t] + centre],
                                        half[pb[s] - pb[t] + centre]).astype(np.float32)
        keep = weight >= threshold
        yield order[s[keep]], order[t[keep]], weight[keep]


def _three_cycle_edges(verts: Vertices, out_ij, out_ji, pairs: np.ndarray, hoods: _Neighbourhoods,
                       params: GraphParams, batch: int, counts: dict):
    """(a, b, w float32) batches of 3-cycle edges (Eq. 4) between vertices sharing an image."""
    h, w = verts.grid
    n = len(verts)
    # every vertex takes part through each of its two images: 2V "incidences" (anchor, cell, other, other cell)
    cell = np.concatenate([verts.cell, verts.partner_cell])
    join = _BlockJoin(np.concatenate([verts.image, verts.partner]), cell // w, cell % w, params.radius, verts.grid)
    order = join.order
    del cell
    stride = 2 * w - 1
    vertex = np.concatenate([np.arange(n, dtype=np.int32 if n < 2 ** 31 - 1 else np.int64)] * 2)[order]
    anchor = np.concatenate([verts.image, verts.partner])[order]
    cell = np.concatenate([verts.cell, verts.partner_cell])[order]
    at = (cell // w) * stride + cell % w  # int32
    del cell
    other = np.concatenate([verts.partner, verts.image])[order]
    other_cell = np.concatenate([verts.partner_cell, verts.cell])[order]
    o_row, o_col = other_cell // w, other_cell % w  # int32
    del other_cell
    side = np.concatenate([verts.direction, 1 - verts.direction])[order]
    local = hoods.local[np.concatenate([verts.pair, verts.pair])[order], side]
    del side
    table_at = hoods.offset[anchor]
    degree = hoods.degree[anchor]  # int64: local * degree may pass 2^31 for a hub
    del anchor
    conf = np.concatenate([verts.confidence] * 2)[order]  # float32; products taken in float64
    decay, _, centre = _decay_table(params.sigma, verts.grid)
    threshold = np.float32(params.edge_threshold)
    for s, t in join.pairs(batch):
        counts["n_candidates"] += s.size
        near = decay[at[s] - at[t] + centre]  # exp(-|p - p'| / sigma)
        bound = conf[s].astype(np.float64) * conf[t] * near  # the weight is at most this
        keep = (bound >= threshold * (1 - 1e-6)) & (local[s] != local[t])  # (the same pair: a 2-cycle)
        s, t, near = s[keep], t[keep], near[keep]
        third = hoods.table[table_at[s] + local[s] * degree[s] + local[t]]  # the pair (j, n), -1: none
        found = third >= 0
        counts["n_candidates_missing_third"] += int(found.size - found.sum())
        s, t, near, third = s[found], t[found], near[found], third[found].astype(np.int64)
        j_first = pairs[third, 0] == other[s]
        q_row, q_col, r_row, r_col = o_row[s], o_col[s], o_row[t], o_col[t]
        with_mask = params.mask_in_cycle
        f_row, f_col, f_ok, mask_j = _predict(out_ij, out_ji, third, j_first, q_row, q_col, verts.grid,
                                              with_mask)  # T_jn(q)
        b_row, b_col, b_ok, mask_n = _predict(out_ij, out_ji, third, ~j_first, r_row, r_col, verts.grid,
                                              with_mask)  # T_nj(r)
        forward = np.where(f_ok, decay[(f_row - r_row) * stride + (f_col - r_col) + centre], 0.0)
        backward = np.where(b_ok, decay[(q_row - b_row) * stride + (q_col - b_col) + centre], 0.0)
        weight = _eq4_from_decays(conf[s], conf[t], near, forward, backward, mask_j, mask_n).astype(np.float32)
        keep = weight >= threshold
        yield vertex[s[keep]], vertex[t[keep]], weight[keep]


def build_graph(pairs, out_ij, out_ji, n_images: int, params: GraphParams | None = None, *,
                batch: int = DEFAULT_BATCH) -> CorrespondenceGraph:
    """The correspondence graph of the predictions (see the module's docstring for the weights).

    pairs (P, 2) int, unordered pairs stored once; out_ij, out_ji (P, 3, h, w) float16/32 (arrays
    or memory maps); n_images: images in the collection (indices of ``pairs`` are below it).
    batch: candidate vertex pairs per vectorised step (memory, not results: about 100 bytes each).

    Returns a ``CorrespondenceGraph``: the ``vertices`` of ``vertices()`` and a symmetric float32
    CSR (V, V) without self loops whose entries are >= ``params.edge_threshold``; counts in ``stats``.
    The result does not depend on the order of ``pairs`` nor on the orientation of each pair.

    Cost: time ~ the candidate vertex pairs (``stats.n_candidates``: for each image, the vertices
    it holds through its pairs, joined within the radius), O(N * k^2 * cells) for bounded degree;
    memory ~ the vertices (about 100 bytes each while joining), the sum over images of degree^2
    (the third-pair table), the edges found (12 bytes each until the one conversion to CSR,
    8 bytes each after) and one batch.
    """
    params = GraphParams() if params is None else params
    if isinstance(n_images, bool) or not isinstance(n_images, (int, np.integer)) or n_images < 0:
        raise ValueError(f"n_images must be a non-negative int, got {n_images!r}")
    if int(batch) < 1:
        raise ValueError(f"batch must be >= 1, got {batch!r}")
    pairs, grid = _check_predictions(pairs, out_ij, out_ji, int(n_images))
    index = _PairIndex(pairs, int(n_images))
    verts = vertices(pairs, out_ij, out_ji, params)
    n = len(verts)
    active = np.zeros(pairs.shape[0], bool)
    active[verts.pair] = True
    hoods = _Neighbourhoods(pairs, int(n_images), index, active)
    counts = {"n_candidates": 0, "n_candidates_missing_third": 0}
    index_dtype = np.int32 if n < 2 ** 31 - 1 else np.int64
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    n_two = n_three = 0
    if params.two_cycle and n:
        for a, b, weight in _two_cycle_edges(verts, params, int(batch), counts):
            found.append((a.astype(index_dtype), b.astype(index_dtype), weight))
            n_two += a.size
    if params.three_cycle and n:
        for a, b, weight in _three_cycle_edges(verts, out_ij, out_ji, pairs, hoods, params, int(batch), counts):
            found.append((a.astype(index_dtype), b.astype(index_dtype), weight))
            n_three += a.size
    del hoods.table
    if found:
        rows = np.concatenate([f[0] for f in found] + [f[1] for f in found])
        cols = np.concatenate([f[1] for f in found] + [f[0] for f in found])
        data = np.concatenate([f[2] for f in found] * 2)
        del found
        weights = sp.coo_matrix((data, (rows, cols)), shape=(n, n))
        del rows, cols, data
        weights = weights.tocsr()
    else:
        weights = sp.csr_matrix((n, n), dtype=np.float32)
    weights.sort_indices()
    stats = GraphStats(n_vertices=n, n_edges=int(weights.nnz // 2), n_two_cycle_edges=int(n_two),
                       n_three_cycle_edges=int(n_three), n_pairs=int(pairs.shape[0]),
                       n_active_pairs=int(active.sum()), n_triplets_closed=int(hoods.closed),
                       n_triplets_open=int(hoods.open), n_candidates=int(counts["n_candidates"]),
                       n_candidates_missing_third=int(counts["n_candidates_missing_third"]))
    return CorrespondenceGraph(verts, weights, int(n_images), params, stats)
