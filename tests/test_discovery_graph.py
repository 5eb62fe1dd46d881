"""The sparse correspondence graph of Eq. 4 (trainer.discovery.graph) and its eigenvectors
(trainer.discovery.spectral): hand-checked weights, a brute-force O(V^2) re-statement of the
graph, planted clusters, and counts that grow linearly with the number of images."""
from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
import scipy.sparse as sp

from trainer.discovery.graph import (
    GraphParams,
    build_graph,
    eq4_weight,
    two_cycle_weight,
    vertices,
)
from trainer.discovery.spectral import (
    DENSE_LIMIT,
    authors_energy_sign,
    image_potentials,
    leading_eigenvectors,
    vertex_embedding,
)

# --------------------------------------------------------------------------------------------------
# helpers


def blank(n_pairs: int, grid=(5, 6), dtype=np.float32):
    """Predictions with every mask 0 and every cell sent to the same cell of the other image."""
    h, w = grid
    out = np.zeros((n_pairs, 3, h, w), dtype)
    out[:, 0] = ((np.arange(w) + 0.5) / w)[None, None, :]
    out[:, 1] = ((np.arange(h) + 0.5) / h)[None, :, None]
    return out, out.copy()


def put(out, pair: int, src, dst, mask: float) -> None:
    """Cell src = (row, col) of the pair's prediction goes to cell dst of the other image."""
    h, w = out.shape[2:]
    out[pair, 0, src[0], src[1]] = (dst[1] + 0.5) / w
    out[pair, 1, src[0], src[1]] = (dst[0] + 0.5) / h
    out[pair, 2, src[0], src[1]] = mask


def random_instance(seed: int, n_images=6, n_pairs=10, grid=(5, 6)):
    """Random pairs (some stored as (j, i)), random masks, and correspondences that move each image
    by its own random offset plus up to 1.5 cells of noise (so that many cycles nearly close), some
    falling outside the grid (clipped)."""
    rng = np.random.default_rng(seed)
    all_pairs = list(combinations(range(n_images), 2))
    chosen = rng.choice(len(all_pairs), size=n_pairs, replace=False)
    pairs = np.array([all_pairs[c] for c in chosen])
    flip = rng.random(n_pairs) < 0.5
    pairs[flip] = pairs[flip][:, ::-1]
    h, w = grid
    offset = rng.uniform(-0.3, 0.3, size=(n_images, 2)) * (h, w)
    rows, cols = np.mgrid[0:h, 0:w]
    out = []
    for src, dst in ((pairs[:, 0], pairs[:, 1]), (pairs[:, 1], pairs[:, 0])):
        o = np.empty((n_pairs, 3, h, w), np.float32)
        shift = offset[dst] - offset[src]
        noise = rng.uniform(-1.5, 1.5, size=(2, n_pairs, h, w))
        o[:, 0] = (cols[None] + shift[:, 1, None, None] + noise[0] + 0.5) / w
        o[:, 1] = (rows[None] + shift[:, 0, None, None] + noise[1] + 0.5) / h
        o[:, 2] = rng.random((n_pairs, h, w))
        out.append(o)
    return pairs, out[0], out[1]


def cell_of(x: float, y: float, grid):
    h, w = grid
    return min(max(math.floor(y * h), 0), h - 1), min(max(math.floor(x * w), 0), w - 1)


def brute_force_weights(graph, pairs, out_ij, out_ji, params: GraphParams) -> np.ndarray:
    """Dense (V, V): every pair of vertices, weights restated from the definition with loops."""
    verts = graph.vertices
    h, w = verts.grid
    stored = {}
    for index, (a, b) in enumerate(pairs):
        stored[(int(a), int(b))] = (out_ij[index], out_ji[index])
        stored[(int(b), int(a))] = (out_ji[index], out_ij[index])

    def predict(src: int, dst: int, cell: int):
        out = stored[(src, dst)][0]
        r, c = divmod(cell, w)
        return cell_of(float(out[0, r, c]), float(out[1, r, c]), (h, w)), float(out[2, r, c])

    def dist(a, b):
        return math.hypot(a[0] - b[0], a[1] - b[1])

    def rc(cell):
        return divmod(int(cell), w)

    n = len(verts)
    dense = np.zeros((n, n), np.float32)
    s = params.sigma
    for u in range(n):
        ends_u = {int(verts.image[u]): int(verts.cell[u]), int(verts.partner[u]): int(verts.partner_cell[u])}
        for v in range(u + 1, n):
            ends_v = {int(verts.image[v]): int(verts.cell[v]), int(verts.partner[v]): int(verts.partner_cell[v])}
            shared = set(ends_u) & set(ends_v)
            cu, cv = float(verts.confidence[u]), float(verts.confidence[v])
            if len(shared) == 2:
                if not params.two_cycle:
                    continue
                a, b = sorted(shared)
                d = dist(rc(ends_u[a]), rc(ends_v[a])) + dist(rc(ends_u[b]), rc(ends_v[b]))
                weight = cu * cv * math.exp(-d / 2 / s)
            elif len(shared) == 1:
                if not params.three_cycle:
                    continue
                (i,) = shared
                (j,) = set(ends_u) - shared
                (m,) = set(ends_v) - shared
                if (j, m) not in stored:
                    continue
                p, p2, q, r = rc(ends_u[i]), rc(ends_v[i]), ends_u[j], ends_v[m]
                t_jn_q, mask_j = predict(j, m, q)
                t_nj_r, mask_n = predict(m, j, r)
                forward = math.exp(-dist(t_jn_q, rc(r)) / s)
                backward = math.exp(-dist(rc(q), t_nj_r) / s)
                if params.mask_in_cycle:
                    forward, backward = forward * mask_j, backward * mask_n
                weight = cu * cv * math.exp(-dist(p, p2) / s) * 0.5 * (forward + backward)
            else:
                continue
            weight = np.float32(weight)
            if weight >= np.float32(params.edge_threshold):
                dense[u, v] = dense[v, u] = weight
    return dense


def brute_force_vertices(pairs, out_ij, out_ji, params: GraphParams, grid):
    h, w = grid
    found = {}
    for index, (a, b) in enumerate(pairs):
        for src, dst, out in ((int(a), int(b), out_ij[index]), (int(b), int(a), out_ji[index])):
            for r in range(h):
                for c in range(w):
                    conf = float(out[2, r, c])
                    if conf > params.mask_threshold:
                        q = cell_of(float(out[0, r, c]), float(out[1, r, c]), grid)
                        corr = (src, r * w + c, dst, q[0] * w + q[1])
                        key = tuple(sorted([(src, corr[1]), (dst, corr[3])])) if params.merge_cells else corr
                        best = found.get(key)
                        if best is None or (conf, -src) > (best[4], -best[0]):
                            found[key] = (*corr, np.float32(conf))
    return sorted(found.values())


def ring_instance(n_images: int, k: int, grid=(12, 12), seed=0, n_planted: int | None = None):
    """Each image picks k neighbours within a window of the ring (so triangles exist at any N);
    every third image holds a 4 x 4 object whose correspondences are consistent. With n_planted,
    images 0 .. n_planted - 1 hold it instead and pick their neighbours among themselves (a
    retrieval that works: one well-connected cluster)."""
    rng = np.random.default_rng(seed)
    h, w = grid
    chosen = set()
    for i in range(n_images):
        if n_planted is not None and i < n_planted:
            picks = rng.choice(np.delete(np.arange(n_planted), i), size=k, replace=False)
        else:
            picks = (i + rng.choice(np.arange(1, 2 * k + 1), size=k, replace=False)) % n_images
        chosen.update((min(i, int(j)), max(i, int(j))) for j in picks)
    pairs = np.array(sorted(chosen))
    corner = rng.integers(0, h - 4, size=(n_images, 2))
    planted = np.arange(n_images) % 3 == 0 if n_planted is None else np.arange(n_images) < n_planted
    outs = []
    for direction in range(2):
        out = rng.random((len(pairs), 3, h, w)).astype(np.float32)
        out[:, 2] *= 0.9  # about 6% of the cells pass 0.85 by chance, with random correspondences
        for index, (a, b) in enumerate(pairs):
            src, dst = (a, b) if direction == 0 else (b, a)
            if planted[src] and planted[dst]:
                for dr in range(4):
                    for dc in range(4):
                        put(out, index, corner[src] + (dr, dc), corner[dst] + (dr, dc), 0.95)
        outs.append(out)
    return pairs, outs[0], outs[1]


# --------------------------------------------------------------------------------------------------
# parameters and weights


def test_params_defaults_and_validation():
    params = GraphParams()
    assert (params.mask_threshold, params.sigma, params.edge_threshold) == (0.85, 1.2, 0.01)
    assert params.two_cycle and params.three_cycle and params.merge_cells and not params.mask_in_cycle
    assert params.radius == pytest.approx(1.2 * math.log(100))
    assert math.exp(-params.radius / params.sigma) == pytest.approx(params.edge_threshold)
    for bad in ({"mask_threshold": 1.0}, {"mask_threshold": -0.1}, {"sigma": 0}, {"sigma": float("nan")},
                {"edge_threshold": 0.0}, {"edge_threshold": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GraphParams(**bad)
    with pytest.raises(TypeError, match="merge_cells"):
        GraphParams(merge_cells="yes")
    with pytest.raises(TypeError, match="sigma"):
        GraphParams(sigma="1")


def test_eq4_weight_hand_computed():
    # |p - p'| = 5 (3-4-5), |T_jn(q) - r| = 3, |q - T_nj(r)| = 0, sigma 2, confidences 0.9 and 0.8:
    # 0.72 * exp(-2.5) * 0.5 * (exp(-1.5) + exp(0))
    args = dict(conf_c=0.9, conf_c2=0.8, p=(0, 0), p2=(3, 4), q=(1, 1), r=(2, 2), t_jn_q=(2, 5), t_nj_r=(1, 1),
                sigma=2.0)
    assert eq4_weight(**args) == pytest.approx(0.036144229504547876, rel=1e-12)
    # mask_in_cycle, mask_j(q) = 0.5, mask_n(r) = 0.25: 0.72 * exp(-2.5) * 0.5 * (exp(-1.5) * 0.5 + 1 * 0.25)
    assert eq4_weight(**args, mask_j_q=0.5, mask_n_r=0.25) == pytest.approx(0.010684464876123043, rel=1e-12)
    # symmetric in the two vertices: swap c and c' (and so T_jn with T_nj)
    swapped = dict(conf_c=0.8, conf_c2=0.9, p=(3, 4), p2=(0, 0), q=(2, 2), r=(1, 1), t_jn_q=(1, 1), t_nj_r=(2, 5),
                   sigma=2.0)
    assert eq4_weight(**swapped) == pytest.approx(eq4_weight(**args), rel=1e-12)
    assert eq4_weight(**swapped, mask_j_q=0.25, mask_n_r=0.5) == pytest.approx(0.010684464876123043, rel=1e-12)
    # vectorised, and a missing prediction (NaN) contributes 0
    many = eq4_weight(np.full(2, 0.9), np.full(2, 0.8), np.zeros((2, 2)), [[3, 4], [3, 4]], [[1, 1]] * 2,
                      [[2, 2]] * 2, [[2, 5], [np.nan, np.nan]], [[1, 1]] * 2, 2.0)
    assert many[0] == pytest.approx(0.036144229504547876)
    assert many[1] == pytest.approx(0.72 * math.exp(-2.5) * 0.5)
    with pytest.raises(ValueError, match="both"):
        eq4_weight(**args, mask_j_q=0.5)
    # 2-cycle: |p - p'| = 3, |q - q'| = 5, sigma 2: 0.72 * exp(-8 / 4)
    assert two_cycle_weight(0.9, 0.8, (0, 0), (0, 3), (2, 2), (6, 5), 2.0) == pytest.approx(0.09744140393036115)


# --------------------------------------------------------------------------------------------------
# vertices


def test_vertices_threshold_both_directions_and_merge():
    out_ij, out_ji = blank(1)
    put(out_ij, 0, (0, 0), (1, 1), 0.9)  # image 3, cell 0 -> image 7, cell 7
    put(out_ij, 0, (0, 1), (2, 2), 0.85)  # at the threshold: not a vertex (> is required)
    put(out_ji, 0, (1, 1), (0, 0), 0.95)  # the same correspondence seen from image 7, more confident
    put(out_ji, 0, (4, 5), (3, 3), 0.99)  # another one from image 7
    pairs = np.array([[3, 7]])
    merged = vertices(pairs, out_ij, out_ji, GraphParams())
    assert merged.n_merged == 1
    assert [tuple(int(a[v]) for a in (merged.image, merged.cell, merged.partner, merged.partner_cell))
            for v in range(len(merged))] == [(7, 7, 3, 0), (7, 29, 3, 21)]
    np.testing.assert_allclose(merged.confidence, [0.95, 0.99], rtol=1e-6)
    assert merged.direction.tolist() == [1, 1] and merged.pair.tolist() == [0, 0]
    assert merged.prediction.tolist() == [1, 1]
    separate = vertices(pairs, out_ij, out_ji, GraphParams(merge_cells=False))
    assert len(separate) == 3 and separate.n_merged == 0
    assert separate.image.tolist() == [3, 7, 7] and separate.direction.tolist() == [0, 1, 1]
    # float16 input, and a NaN correspondence is dropped and counted
    out_ij[0, 0, 0, 0] = np.nan
    half = vertices(pairs, out_ij.astype(np.float16), out_ji.astype(np.float16), GraphParams(merge_cells=False))
    # (float16's 0.85 is 0.8501, above the threshold: the stored value is compared, not the intended one)
    assert half.cell.tolist() == [1, 7, 29] and half.n_nonfinite == 1


def test_vertices_match_brute_force():
    for merge in (True, False):
        params = GraphParams(mask_threshold=0.6, merge_cells=merge)
        pairs, out_ij, out_ji = random_instance(3)
        # a few correspondences predicted both ways, so that merging has something to do
        for index in range(len(pairs)):
            put(out_ij, index, (1, 1), (2, 3), 0.7)
            put(out_ji, index, (2, 3), (1, 1), 0.8)
        verts = vertices(pairs, out_ij, out_ji, params)
        got = [(int(verts.image[v]), int(verts.cell[v]), int(verts.partner[v]), int(verts.partner_cell[v]),
                np.float32(verts.confidence[v])) for v in range(len(verts))]
        assert got == brute_force_vertices(pairs, out_ij, out_ji, params, (5, 6))


# --------------------------------------------------------------------------------------------------
# the graph


@pytest.mark.parametrize("reach", [0.5, 1.0, 2.5, 5.53, 11.05, 40.0])
def test_block_join_finds_every_close_pair_once(reach):
    from trainer.discovery.graph import _BlockJoin

    rng = np.random.default_rng(int(reach * 10))
    grid = (13, 17)
    group = rng.integers(0, 4, 600)
    row, col = rng.integers(0, grid[0], 600), rng.integers(0, grid[1], 600)
    expected = {(a, b) for a in range(600) for b in range(a + 1, 600)
                if group[a] == group[b] and math.hypot(row[a] - row[b], col[a] - col[b]) <= reach}
    join = _BlockJoin(group, row, col, reach, grid)
    for dense_table in (True, False):  # bucket ranges from the dense table, or by binary search
        if not dense_table:
            join.start = None
        found = []
        for s, t in join.pairs(batch=50, chunk=64):
            a, b = join.order[s], join.order[t]
            close = (group[a] == group[b]) & (np.hypot(row[a] - row[b], col[a] - col[b]) <= reach)
            assert np.all(group[a] == group[b])
            found += [(min(x, y), max(x, y)) for x, y in zip(a[close].tolist(), b[close].tolist())]
        assert len(found) == len(set(found)) and set(found) == expected


def three_image_instance(with_third: bool):
    """Images 0, 1, 2; one confident correspondence in 0 -> 1 and one in 0 -> 2, and (if with_third)
    the prediction of (1, 2) closing the cycle, 1 cell off in one direction."""
    pairs = [[0, 1], [2, 0]] + ([[1, 2]] if with_third else [])
    out_ij, out_ji = blank(len(pairs))
    put(out_ij, 0, (2, 2), (1, 1), 0.9)  # c = (0, p=(2, 2) -> 1, q=(1, 1)), conf 0.9
    put(out_ji, 1, (2, 3), (3, 4), 0.95)  # c' = (0, p'=(2, 3) -> 2, r=(3, 4)), conf 0.95 (pair stored as (2, 0))
    if with_third:
        put(out_ij, 2, (1, 1), (3, 4), 0.3)  # T_12(q) = r exactly, mask 0.3
        put(out_ji, 2, (3, 4), (1, 2), 0.2)  # T_21(r) = (1, 2): one cell from q, mask 0.2
    return np.array(pairs), out_ij, out_ji


def test_three_cycle_edge_matches_eq4_and_needs_the_third_prediction():
    pairs, out_ij, out_ji = three_image_instance(True)
    for mask_in_cycle in (False, True):
        params = GraphParams(mask_in_cycle=mask_in_cycle, two_cycle=False)
        graph = build_graph(pairs, out_ij, out_ji, 3, params)
        verts = graph.vertices
        assert len(verts) == 2 and verts.image.tolist() == [0, 0] and verts.partner.tolist() == [1, 2]
        masks = {"mask_j_q": 0.3, "mask_n_r": 0.2} if mask_in_cycle else {}
        expected = eq4_weight(0.9, 0.95, (2, 2), (2, 3), (1, 1), (3, 4), (3, 4), (1, 2), 1.2, **masks)
        assert graph.weights[0, 1] == pytest.approx(expected, rel=1e-6)
        assert graph.weights[1, 0] == graph.weights[0, 1]
        assert graph.stats.n_three_cycle_edges == 1 and graph.stats.n_triplets_closed == 1
    pairs, out_ij, out_ji = three_image_instance(False)
    graph = build_graph(pairs, out_ij, out_ji, 3)
    assert len(graph.vertices) == 2 and graph.weights.nnz == 0
    assert graph.stats.n_triplets_closed == 0 and graph.stats.n_triplets_open == 1
    assert graph.stats.n_candidates_missing_third == 1


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("mask_in_cycle", [False, True])
@pytest.mark.parametrize("grid, sigma, mask_threshold", [((5, 6), 1.5, 0.55), ((14, 17), 0.8, 0.9)],
                         ids=["one-block", "many-blocks"])
def test_build_matches_brute_force_and_is_order_independent(merge, mask_in_cycle, grid, sigma, mask_threshold):
    # (5, 6): the neighbour blocks (5 cells for 3-cycles) cover the grid; (14, 17): blocks of 3 (3-cycle)
    # and 5 cells (2-cycle), so the block join has to find every close pair across block borders
    params = GraphParams(mask_threshold=mask_threshold, sigma=sigma, edge_threshold=0.05, merge_cells=merge,
                         mask_in_cycle=mask_in_cycle)
    pairs, out_ij, out_ji = random_instance(11 + merge + 2 * mask_in_cycle, grid=grid)
    graph = build_graph(pairs, out_ij, out_ji, 6, params, batch=7)  # tiny batches: the cutting is exercised
    weights = graph.weights
    assert isinstance(weights, sp.csr_matrix) and weights.dtype == np.float32
    assert weights.shape == (len(graph.vertices),) * 2
    assert (weights != weights.T).nnz == 0
    assert weights.diagonal().max(initial=0) == 0
    assert weights.data.min() >= np.float32(params.edge_threshold)
    dense = brute_force_weights(graph, pairs, out_ij, out_ji, params)
    assert graph.stats.n_three_cycle_edges > 20 and graph.stats.n_two_cycle_edges > 20  # not vacuous
    np.testing.assert_array_equal(weights.toarray() != 0, dense != 0)
    np.testing.assert_allclose(weights.toarray(), dense, rtol=1e-6, atol=0)
    assert graph.stats.n_edges == weights.nnz // 2 == (graph.stats.n_two_cycle_edges
                                                       + graph.stats.n_three_cycle_edges)
    # the same pairs in another order, some stored the other way round
    rng = np.random.default_rng(0)
    order = rng.permutation(len(pairs))
    flip = rng.random(len(pairs)) < 0.5
    pairs2 = pairs[order].copy()
    pairs2[flip] = pairs2[flip][:, ::-1]
    a, b = out_ij[order], out_ji[order]
    out_ij2, out_ji2 = np.where(flip[:, None, None, None], b, a), np.where(flip[:, None, None, None], a, b)
    other = build_graph(pairs2, out_ij2, out_ji2, 6, params)
    for name in ("image", "cell", "partner", "partner_cell", "confidence"):
        np.testing.assert_array_equal(getattr(other.vertices, name), getattr(graph.vertices, name))
    assert (other.weights != graph.weights).nnz == 0


def test_build_cycle_switches_and_bad_inputs():
    pairs, out_ij, out_ji = random_instance(5)
    params = GraphParams(mask_threshold=0.5, sigma=1.5, edge_threshold=0.05)
    full = build_graph(pairs, out_ij, out_ji, 6, params)
    only_two = build_graph(pairs, out_ij, out_ji, 6, GraphParams(**{**params.__dict__, "three_cycle": False}))
    only_three = build_graph(pairs, out_ij, out_ji, 6, GraphParams(**{**params.__dict__, "two_cycle": False}))
    assert only_two.stats.n_three_cycle_edges == 0 and only_three.stats.n_two_cycle_edges == 0
    assert (only_two.weights + only_three.weights != full.weights).nnz == 0
    empty = build_graph(np.zeros((0, 2), int), np.zeros((0, 3, 4, 4)), np.zeros((0, 3, 4, 4)), 5)
    assert len(empty.vertices) == 0 and empty.weights.shape == (0, 0)
    with pytest.raises(ValueError, match="stored twice"):
        build_graph(np.array([[0, 1], [1, 0]]), *blank(2), 2)
    with pytest.raises(ValueError, match="itself"):
        build_graph(np.array([[1, 1]]), *blank(1), 2)
    with pytest.raises(ValueError, match="n_images"):
        build_graph(np.array([[0, 4]]), *blank(1), 3)
    with pytest.raises(ValueError, match=r"\(P, 3, h, w\)"):
        build_graph(np.array([[0, 1]]), np.zeros((1, 2, 4, 4)), np.zeros((1, 2, 4, 4)), 2)
    with pytest.raises(ValueError, match="predictions for"):
        build_graph(np.array([[0, 1]]), *blank(2), 2)


def test_counts_grow_linearly_with_images():
    params = GraphParams()
    small = build_graph(*ring_instance(150, 4), 150, params).stats
    large = build_graph(*ring_instance(300, 4), 300, params).stats
    assert small.n_three_cycle_edges > 100 and small.n_two_cycle_edges > 100
    for name in ("n_pairs", "n_vertices", "n_edges", "n_two_cycle_edges", "n_three_cycle_edges",
                 "n_triplets_closed", "n_candidates"):
        ratio = getattr(large, name) / getattr(small, name)
        assert 1.7 < ratio < 2.3, (name, getattr(small, name), getattr(large, name))


# --------------------------------------------------------------------------------------------------
# eigenvectors and potentials


def planted_matrix(n: int, block: np.ndarray, seed=0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, n, 6 * n)
    cols = rng.integers(0, n, 6 * n)
    data = rng.uniform(0.01, 0.05, rows.size)
    inner = np.array([(a, b) for a in block for b in block if a != b])
    rows = np.concatenate([rows, inner[:, 0]])
    cols = np.concatenate([cols, inner[:, 1]])
    data = np.concatenate([data, rng.uniform(0.5, 1.0, len(inner))])
    matrix = sp.coo_matrix((data, (rows, cols)), shape=(n, n)).tocsr()
    matrix = matrix + matrix.T
    matrix.setdiag(0)
    matrix.eliminate_zeros()
    return matrix.astype(np.float32)


@pytest.mark.parametrize("n", [300, 3000])  # dense below DENSE_LIMIT, ARPACK above
def test_leading_eigenvector_finds_planted_block(n):
    rng = np.random.default_rng(1)
    block = np.sort(rng.choice(n, 40, replace=False))
    matrix = planted_matrix(n, block)
    values, vectors = leading_eigenvectors(matrix, k=1, seed=0)
    assert values.shape == (1,) and vectors.shape == (n, 1)
    top = np.sort(np.argsort(-vectors[:, 0])[:40])
    np.testing.assert_array_equal(top, block)
    assert vectors[:, 0].sum() >= 0
    assert authors_energy_sign(matrix, vectors[:, 0]) == 1 and authors_energy_sign(matrix, -vectors[:, 0]) == -1
    assert values[0] == pytest.approx(sp.linalg.eigsh(matrix.astype(np.float64), k=1, which="LA")[0][0], rel=1e-6)
    # several vectors, decreasing, orthonormal, each summing to >= 0; lobpcg agrees on the first
    values, vectors = leading_eigenvectors(matrix, k=4, seed=0)
    assert np.all(np.diff(values) <= 1e-9)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(4), atol=1e-6)
    assert np.all(vectors.sum(axis=0) >= 0)
    if n > DENSE_LIMIT:
        lob_values, lob_vectors = leading_eigenvectors(matrix, k=2, method="lobpcg", tol=1e-8, maxiter=500)
        assert lob_values[0] == pytest.approx(values[0], rel=1e-5)
        assert abs(lob_vectors[:, 0] @ vectors[:, 0]) == pytest.approx(1.0, abs=1e-5)


def test_leading_eigenvectors_edge_cases():
    values, vectors = leading_eigenvectors(sp.csr_matrix((0, 0), dtype=np.float32), k=3)
    assert values.shape == (0,) and vectors.shape == (0, 0)
    values, vectors = leading_eigenvectors(sp.csr_matrix((1, 1), dtype=np.float32), k=3)
    assert values.shape == (1,) and vectors.shape == (1, 1)
    # two components: a strong triangle and a weak edge; the first vector lives on the triangle
    matrix = sp.lil_matrix((5, 5))
    for a, b, weight in ((0, 1, 1.0), (1, 2, 1.0), (0, 2, 1.0), (3, 4, 0.1)):
        matrix[a, b] = matrix[b, a] = weight
    values, vectors = leading_eigenvectors(matrix.tocsr(), k=2)
    assert values[0] == pytest.approx(2.0) and np.allclose(vectors[3:, 0], 0)
    assert np.all(vectors[:3, 0] > 0)
    big = sp.identity(DENSE_LIMIT + 10, format="csr")
    with pytest.raises(ValueError, match="dense"):
        leading_eigenvectors(big, k=DENSE_LIMIT + 9)
    with pytest.raises(ValueError, match="k must"):
        leading_eigenvectors(big, k=0)
    embedding = vertex_embedding(np.array([[3.0, 4.0], [0.0, 0.0]]), values=[1.0, 2.0])
    np.testing.assert_allclose(embedding, [[3 / math.hypot(3, 8), 8 / math.hypot(3, 8)], [0, 0]])


def test_eigenvector_of_a_built_graph_marks_the_planted_object():
    pairs, out_ij, out_ji = ring_instance(120, 4, n_planted=12)
    graph = build_graph(pairs, out_ij, out_ji, 120)
    values, vectors = leading_eigenvectors(graph.weights, k=1)
    planted = graph.vertices.confidence == np.float32(0.95)
    top = np.argsort(-vectors[:, 0])[:int(planted.sum())]
    assert planted[top].mean() > 0.9


def test_image_potentials_sum_per_image_and_cell():
    pairs = np.array([[0, 1], [1, 2]])
    out_ij, out_ji = blank(2, grid=(3, 4))
    put(out_ij, 0, (0, 0), (1, 1), 0.9)  # anchor image 0, cell 0 -> image 1, cell 5
    put(out_ji, 0, (1, 1), (0, 1), 0.9)  # anchor image 1, cell 5 -> image 0, cell 1
    put(out_ij, 1, (1, 1), (2, 3), 0.9)  # anchor image 1, cell 5 -> image 2, cell 11
    put(out_ij, 1, (2, 0), (0, 0), 0.9)  # anchor image 1, cell 8 -> image 2, cell 0
    graph = build_graph(pairs, out_ij, out_ji, 4)
    verts = graph.vertices
    assert verts.image.tolist() == [0, 1, 1, 1] and verts.cell.tolist() == [0, 5, 5, 8]
    vector = np.array([0.5, 0.25, 0.125, -1.0])
    pot = image_potentials(graph, vector, 4, (3, 4))
    assert pot.shape == (4, 3, 4) and pot.dtype == np.float32
    expected = np.zeros((4, 12), np.float32)
    expected[0, 0] = 0.5
    expected[1, 5] = 0.375
    np.testing.assert_array_equal(pot.reshape(4, 12), expected)  # image 1 cell 8 is -1: clipped
    both = image_potentials(graph, vector, ends="both").reshape(4, 12)
    expected[1, 5] += 0.5
    expected[0, 1] += 0.25
    expected[2, 11] += 0.125
    np.testing.assert_array_equal(both, expected)  # image 2 cell 0 gets -1: clipped
    with pytest.raises(ValueError, match="entries"):
        image_potentials(graph, vector[:3])
