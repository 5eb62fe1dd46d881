"""Leading eigenvectors of the sparse correspondence graph and the foreground potentials they give.

The authors (``evalInt/FullGraph3Cycle.py``, ``TopEigen``) take the top eigenvector of the graph
with ``scipy.sparse.linalg.eigsh(graph, k=1, which='LM', v0=ones)`` and choose its sign by an
"energy" test; ``evalInt/VisEigen.py`` then sums the vector's entries per image cell (mode
``sum``). Here the same with k vectors (for clustering), never a dense V x V matrix above
``DENSE_LIMIT`` vertices.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from scipy.sparse.linalg import ArpackNoConvergence, eigsh, lobpcg

from trainer.discovery.graph import CorrespondenceGraph, Vertices

DENSE_LIMIT = 500
"""Up to this many vertices the eigenvectors come from a dense ``scipy.linalg.eigh`` (exact, and
ARPACK needs k < V anyway); above it only sparse solvers are used."""


def _start_vector(n: int, seed: int) -> np.ndarray:
    """Deterministic positive start: ones (the authors' v0) plus a small seeded perturbation, so that
    the start is not orthogonal to an eigenvector by symmetry."""
    rng = np.random.default_rng(seed)
    return 1.0 + 0.01 * rng.random(n)


def _orient(vectors: np.ndarray) -> np.ndarray:
    """Flip each column so that its entries sum to >= 0; a column summing to (numerically) 0 is
    turned so that its entry of largest magnitude is positive."""
    for col in range(vectors.shape[1]):
        v = vectors[:, col]
        total = v.sum()
        scale = np.abs(v).sum()
        if abs(total) <= 1e-9 * max(scale, 1e-300):
            flip = v[np.argmax(np.abs(v))] < 0 if v.size else False
        else:
            flip = total < 0
        if flip:
            vectors[:, col] = -v
    return vectors


def _lobpcg(weights: sp.csr_matrix, k: int, seed: int, start: np.ndarray | None, tol: float | None,
            maxiter: int | None) -> tuple[np.ndarray, np.ndarray]:
    n = weights.shape[0]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k))
    x[:, 0] = _start_vector(n, seed)
    if start is not None and start.size:
        x[:, :start.shape[1]] = start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "not reaching the requested tolerance": reported by values
        values, vectors = lobpcg(weights, x, largest=True, tol=tol, maxiter=maxiter or 200)
    return values, vectors


def leading_eigenvectors(weights, k: int = 1, seed: int = 0, *, method: str = "auto", tol: float = 0.0,
                         maxiter: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k algebraically largest eigenpairs of a symmetric (V, V) sparse weight matrix.

    Returns (values (k',), vectors (V, k')) float64, values in decreasing order, k' = min(k, V)
    (0 for an empty graph). Each vector is flipped so that its entries sum to >= 0.

    method: ``"auto"`` (dense ``scipy.linalg.eigh`` up to ``DENSE_LIMIT`` vertices, else ``"eigsh"``),
    ``"dense"``, ``"eigsh"`` (ARPACK Lanczos on the sparse matrix, ``which='LA'``, deterministic
    ``v0`` from ``seed``; if it does not converge within ``maxiter``, LOBPCG continues from the
    vectors it had) or ``"lobpcg"`` (block method: sparse-times-block products, memory about
    6 * V * k floats against ARPACK's V * max(2k + 1, 20); useful when k is large and the graph
    is huge, at the price of a looser convergence). ``tol``: ARPACK's (0 = machine precision).

    'LA' rather than the authors' 'LM': for a non-negative matrix the largest-magnitude eigenvalue
    is its spectral radius, which is also the largest algebraic one (Perron-Frobenius), so k = 1
    agrees with theirs; for k > 1, 'LA' keeps the cluster-like vectors instead of the large negative
    ones (anti-clusters) 'LM' would mix in.

    Sign: for the first vector, the Perron vector of the dominant component is non-negative, so
    "sum >= 0" picks the same sign as the authors' energy test (``authors_energy_sign``), which
    compares the Rayleigh quotient of the top-positive and top-negative entry sets; they can only
    disagree for an eigenvalue shared by several components (an arbitrary mix, where no sign is
    meaningful). Disconnected graphs are fine: the first vector lives on the component of largest
    spectral radius (zero elsewhere), later vectors on the next ones; isolated vertices get 0.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if method not in ("auto", "dense", "eigsh", "lobpcg"):
        raise ValueError(f"method must be auto, dense, eigsh or lobpcg, got {method!r}")
    weights = sp.csr_matrix(weights)
    if weights.ndim != 2 or weights.shape[0] != weights.shape[1]:
        raise ValueError(f"weights must be square, got shape {weights.shape}")
    n = weights.shape[0]
    kk = min(int(k), n)
    if n == 0:
        return np.zeros(0), np.zeros((0, 0))
    if method == "auto":
        method = "dense" if n <= DENSE_LIMIT else "eigsh"
    if method == "dense":
        if n > DENSE_LIMIT:
            raise ValueError(f"method='dense' is for graphs of at most {DENSE_LIMIT} vertices, this one has {n}")
        values, vectors = scipy.linalg.eigh(weights.toarray().astype(np.float64), subset_by_index=(n - kk, n - 1))
        values, vectors = values[::-1], vectors[:, ::-1]
        return values.copy(), _orient(np.ascontiguousarray(vectors))
    if kk >= n - 1:
        raise ValueError(f"{kk} eigenvectors of a {n}-vertex graph need a dense solve "
                         f"(sparse solvers need k < V - 1); use at most {n - 2}")
    # float64 values on the same index arrays (no copy of the indices)
    matrix = sp.csr_matrix((weights.data.astype(np.float64), weights.indices, weights.indptr), shape=weights.shape)
    if method == "eigsh":
        try:
            values, vectors = eigsh(matrix, k=kk, which="LA", v0=_start_vector(n, seed), tol=tol, maxiter=maxiter)
        except ArpackNoConvergence as error:
            values, vectors = _lobpcg(matrix, kk, seed, error.eigenvectors, None, maxiter)
    else:
        values, vectors = _lobpcg(matrix, kk, seed, None, tol or None, maxiter)
    order = np.argsort(-values, kind="stable")
    return np.asarray(values[order], np.float64), _orient(np.ascontiguousarray(vectors[:, order], np.float64))


def authors_energy_sign(weights, vector: np.ndarray, space_log: float = 1.1) -> int:
    """+1 or -1: the sign the authors give the top eigenvector (``FullGraph3Cycle.TopEigen``).

    For prefix sizes m on their log grid (round(space_log ** c), and V), the energy of the set S
    of the m largest entries, 1_S' W 1_S / m, against that of the m smallest; +1 if the best
    positive energy is >= the best negative one. Computed from the edges in O(nnz + V log V)
    instead of one product per prefix.
    """
    weights = sp.coo_matrix(weights)
    vector = np.asarray(vector, dtype=np.float64).ravel()
    n = vector.size
    if n == 0:
        return 1
    grid, pts, count = [], 1, 1
    while pts < n:
        if pts - 1 not in grid:
            grid.append(pts - 1)
        pts = int(round(space_log ** count))
        count += 1
    grid.append(n - 1)
    sizes = np.asarray(grid, np.int64) + 1

    def energies(order: np.ndarray) -> np.ndarray:
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(n)
        enters = np.maximum(rank[weights.row], rank[weights.col])  # the prefix size at which the edge is inside - 1
        inside = np.cumsum(np.bincount(enters, weights=weights.data.astype(np.float64), minlength=n))
        return inside[sizes - 1] / sizes

    ascending = np.argsort(vector, kind="stable")
    positive, negative = energies(ascending[::-1]), energies(ascending)
    return 1 if positive.max() >= negative.max() else -1


def image_potentials(graph: CorrespondenceGraph | Vertices, vector: np.ndarray, n_images: int | None = None,
                     grid: tuple[int, int] | None = None, *, ends: str = "anchor") -> np.ndarray:
    """Foreground potentials (n_images, h, w) float32: the vector's entries summed per (image, cell).

    vector (V,): one value per vertex (an eigenvector). ``ends="anchor"``: each vertex adds to its
    anchor cell (image, cell), where its mask passed; ``"both"``: also to its partner cell, as the
    authors' ``VisEigen.update_mask`` (mode ``sum``) adds to both ends of their one-direction
    vertices. Sums below 0 are clipped to 0. n_images and grid default to the graph's.
    """
    verts = graph.vertices if isinstance(graph, CorrespondenceGraph) else graph
    if n_images is None:
        if not isinstance(graph, CorrespondenceGraph):
            raise ValueError("n_images is needed when potentials are made from Vertices")
        n_images = graph.n_images
    grid = verts.grid if grid is None else tuple(grid)
    if tuple(grid) != tuple(verts.grid):
        raise ValueError(f"grid {grid} differs from the vertices' {verts.grid}")
    if ends not in ("anchor", "both"):
        raise ValueError(f"ends must be 'anchor' or 'both', got {ends!r}")
    vector = np.asarray(vector, dtype=np.float64).ravel()
    if vector.size != len(verts):
        raise ValueError(f"vector has {vector.size} entries for {len(verts)} vertices")
    h, w = grid
    cells = h * w
    if len(verts) and int(max(verts.image.max(), verts.partner.max())) >= n_images:
        raise ValueError(f"vertices reach image {int(max(verts.image.max(), verts.partner.max()))}, "
                         f"n_images is {n_images}")
    size = int(n_images) * cells
    total = np.bincount(verts.image.astype(np.int64) * cells + verts.cell, weights=vector, minlength=size)
    if ends == "both":
        total += np.bincount(verts.partner.astype(np.int64) * cells + verts.partner_cell, weights=vector,
                             minlength=size)
    return np.clip(total, 0.0, None).astype(np.float32).reshape(int(n_images), h, w)


def vertex_embedding(vectors: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
    """Rows of (V, k) eigenvectors (columns scaled by ``values`` if given) normalised to unit length,
    for K-means on vertices; all-zero rows (vertices outside every vector's support) stay zero."""
    emb = np.asarray(vectors, dtype=np.float64)
    if emb.ndim != 2:
        raise ValueError(f"vectors must be (V, k), got shape {emb.shape}")
    if values is not None:
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.size != emb.shape[1]:
            raise ValueError(f"{values.size} values for {emb.shape[1]} vectors")
        emb = emb * values[None, :]
    norm = np.linalg.norm(emb, axis=1, keepdims=True)
    return np.divide(emb, norm, out=np.zeros_like(emb), where=norm > 0)
