"""The fast bilateral solver (Barron & Poole, ECCV 2016), for refining a coarse mask on its image.

Given a reference image, a target (e.g. a coarse mask upsampled to the image) and a per-pixel
confidence, the solver finds the edge-aware smoothing of the target that stays close to it where
the confidence is high. Everything happens on a *bilateral grid*: each pixel falls into one
vertex, the integer cell ``(x / s_spatial, y / s_spatial, Y / s_luma, U / s_chroma,
V / s_chroma)`` of its position and its YUV colour (units: pixels and grey levels 0-255, floored).
Only occupied vertices are kept. With

* ``S`` the splat matrix (vertices x pixels, one 1 per pixel at its vertex; ``slice`` is ``S.T``),
* ``B`` the blur: ``2 * 5`` on the diagonal and 1 between vertices one cell apart along one of
  the five dimensions,
* ``n``, ``m`` the bistochastisation vectors, ``m = n * (B n)`` close to the pixel count
  ``S 1`` of each vertex (so that ``diag(n) B diag(n)`` is nearly doubly stochastic),

the vertex values ``y`` approximately solve ::

    A y = b,   A = lam * (diag(m) - diag(n) B diag(n)) + diag(S c),   b = S (c * t)

(``t`` the target, ``c`` the confidence), by conjugate gradients with a Jacobi preconditioner
started from ``b / (S c)``, and the output is ``S.T y``. ``diag(m) - diag(n) B diag(n)`` is a
graph Laplacian (its rows sum to zero), so a constant target stays constant and an exact
solution keeps the target's range.

This is the algorithm of the authors' reference Python notebook (the one LOST and TokenCut use),
with the same defaults: s_spatial 16, s_luma 16, s_chroma 8, lam 256, 10 bistochastisation
iterations, 25 CG iterations at relative tolerance 1e-5, preconditioner diagonal floored at
1e-5. Differences: vertex coordinates are packed with a per-dimension radix that leaves room
for the -1/+1 neighbours (the notebook's base-255 hash can alias for very wide images), splat
and slice are ``np.bincount`` and indexing rather than sparse products (same values, faster),
vertices without confidence start CG at the confidence-weighted mean of the target instead of
0/0, and CG is a short loop with scipy's iterates but no BLAS calls (see
:func:`conjugate_gradient`). OpenCV's
``ximgproc.fastBilateralSolverFilter`` would do the same job but the PyPI wheels are built
without Eigen, which it needs.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import sparse

#: full-range BT.601 RGB -> YUV (JPEG's YCbCr, as in the reference), chroma offset by 128
RGB_TO_YUV = np.array([[0.299, 0.587, 0.114],
                       [-0.168736, -0.331264, 0.5],
                       [0.5, -0.418688, -0.081312]], np.float32)
YUV_OFFSET = np.array([0.0, 128.0, 128.0], np.float32)
_YUV_AFFINE = np.hstack((RGB_TO_YUV, YUV_OFFSET[:, None]))


@dataclass(frozen=True)
class SolverConfig:
    """Parameters of :func:`bilateral_solve` (defaults: the reference notebook's, as LOST uses).

    sigma_spatial: grid cell size in pixels along x and y.
    sigma_luma, sigma_chroma: grid cell size in grey levels (0-255) along Y and along U, V.
    lam: weight of the smoothness term against the confidence-weighted data term.
    iterations: conjugate-gradient iterations at most.
    bistochastize_iterations: iterations of the bistochastisation (Sinkhorn-like) update.
    cg_tol: CG stops when the residual is below ``cg_tol * |b|``.
    a_diag_min: floor of A's diagonal in the Jacobi preconditioner.
    """
    sigma_spatial: float = 16.0
    sigma_luma: float = 16.0
    sigma_chroma: float = 8.0
    lam: float = 256.0
    iterations: int = 25
    bistochastize_iterations: int = 10
    cg_tol: float = 1e-5
    a_diag_min: float = 1e-5

    def __post_init__(self):
        for name in ("sigma_spatial", "sigma_luma", "sigma_chroma", "lam", "cg_tol", "a_diag_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (np.isfinite(value) and value > 0):
                raise ValueError(f"SolverConfig.{name} must be a finite number > 0, got {value!r}")
        for name in ("iterations", "bistochastize_iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"SolverConfig.{name} must be an integer >= 0, got {value!r}")


def rgb_to_yuv(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) float32 YUV: Y in [0, 255], U and V in [0.5, 255.5]."""
    return cv2.transform(rgb.astype(np.float32), _YUV_AFFINE)


class BilateralGrid:
    """The occupied vertices of an image's 5-D bilateral grid, with splat, blur and slice.

    Attributes: ``shape`` (H, W); ``npixels`` H * W; ``nvertices`` V; ``vertex_of_pixel``
    (H * W,) int64, the vertex of each pixel in row-major order; ``coords`` (V, 5) int64, each
    vertex's integer cell (x, y, luma, U, V); ``blur_matrix`` (V, V) CSR, ``B`` above.
    """

    def __init__(self, reference_rgb: np.ndarray, sigma_spatial: float = 16.0,
                 sigma_luma: float = 16.0, sigma_chroma: float = 8.0):
        _check_reference(reference_rgb)
        height, width = reference_rgb.shape[:2]
        # integer cells, truncated as in the reference (all coordinates are >= 0)
        cell_x = (np.arange(width) / sigma_spatial).astype(np.int64)
        cell_y = (np.arange(height) / sigma_spatial).astype(np.int64)
        sigmas = (sigma_luma, sigma_chroma, sigma_chroma)
        yuv = cv2.split(rgb_to_yuv(reference_rgb))
        # Y, U, V lie in [0, 256): their cells in [0, 256 / sigma]
        high = np.array([cell_x[-1], cell_y[-1]] + [int(256.0 // sigma) for sigma in sigmas])
        # mixed radix with room for the -1 and +1 neighbours of every cell: no aliasing
        radix = high + 3
        cells = math.prod(int(r) for r in radix)
        if cells >= 2**63:
            raise ValueError(f"the bilateral grid of a {width}x{height} image with sigmas {sigma_spatial}, "
                             f"{sigma_luma}, {sigma_chroma} has too many cells ({cells:.3g}) to index")
        strides = np.concatenate(([1], np.cumprod(radix[:-1])))
        key_type = np.int32 if cells < 2**31 else np.int64
        keys = np.full((height, width), strides.sum(), key_type)  # every coordinate shifted by +1
        keys += (cell_x * strides[0]).astype(key_type)[None, :]
        keys += (cell_y * strides[1]).astype(key_type)[:, None]
        for channel, sigma, stride in zip(yuv, sigmas, strides[2:]):
            keys += (channel / np.float32(sigma)).astype(key_type) * key_type(stride)
        unique_keys, inverse = np.unique(keys.reshape(-1), return_inverse=True)

        self.shape = (height, width)
        self.npixels = height * width
        self.nvertices = len(unique_keys)
        self.vertex_of_pixel = inverse.reshape(-1)
        self.coords = (unique_keys[:, None].astype(np.int64) // strides) % radix - 1
        self._counts = None
        self.blur_matrix = _blur_matrix(unique_keys, strides.astype(key_type))

    def splat(self, values: np.ndarray) -> np.ndarray:
        """Sum pixel values per vertex: (H, W) or (H * W,) -> (V,) float64 (``S @ values``)."""
        values = np.asarray(values, np.float64).reshape(-1)
        if values.size != self.npixels:
            raise ValueError(f"splat expects {self.npixels} pixel values, got {values.size}")
        return np.bincount(self.vertex_of_pixel, weights=values, minlength=self.nvertices)

    def pixel_counts(self) -> np.ndarray:
        """(V,) float64, how many pixels each vertex holds (``S @ 1``)."""
        if self._counts is None:
            self._counts = np.bincount(self.vertex_of_pixel, minlength=self.nvertices).astype(np.float64)
        return self._counts

    def blur(self, vertex_values: np.ndarray) -> np.ndarray:
        """(V,) -> (V,): ``B @ vertex_values`` (10 x itself + its 1-cell neighbours' values)."""
        return self.blur_matrix @ vertex_values

    def slice(self, vertex_values: np.ndarray) -> np.ndarray:
        """Read each pixel's vertex value: (V,) -> (H, W), same dtype (``S.T @ vertex_values``)."""
        vertex_values = np.asarray(vertex_values)
        if vertex_values.shape != (self.nvertices,):
            raise ValueError(f"slice expects shape ({self.nvertices},), got {vertex_values.shape}")
        return vertex_values[self.vertex_of_pixel].reshape(self.shape)

    def splat_matrix(self) -> sparse.csr_matrix:
        """(V, H * W) CSR ``S``, for checks; :meth:`splat` and :meth:`slice` do not build it."""
        ones = np.ones(self.npixels)
        return sparse.csr_matrix((ones, (self.vertex_of_pixel, np.arange(self.npixels))),
                                 shape=(self.nvertices, self.npixels))


def _blur_matrix(sorted_keys: np.ndarray, strides: np.ndarray) -> sparse.csr_matrix:
    """``B`` for vertices with the given sorted packed keys: 2 * dims on the diagonal, 1 between
    vertices whose keys differ by one stride (one cell along one dimension)."""
    count = len(sorted_keys)
    sources, targets = [], []
    for stride in strides:
        neighbour = sorted_keys + stride
        position = np.minimum(np.searchsorted(sorted_keys, neighbour), count - 1)
        found = np.flatnonzero(sorted_keys[position] == neighbour)
        sources.append(found)
        targets.append(position[found])
    sources = np.concatenate(sources)
    targets = np.concatenate(targets)
    diagonal = np.arange(count)
    rows = np.concatenate((diagonal, sources, targets))
    cols = np.concatenate((diagonal, targets, sources))
    data = np.concatenate((np.full(count, 2.0 * len(strides)), np.ones(2 * len(sources))))
    return sparse.csr_matrix((data, (rows, cols)), shape=(count, count))


def bistochastize(grid: BilateralGrid, iterations: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Normalise the grid's blur (Barron & Poole, supplement, algorithm 1).

    Returns ``(n, m)``, both (V,) float64: ``n`` the scaling such that ``diag(n) B diag(n)``
    has row sums ``m = n * (B n)`` close to the pixel counts ``S 1`` (closer with more
    iterations); ``m`` is recomputed from the final ``n`` so the smoothness matrix
    ``diag(m) - diag(n) B diag(n)`` has rows summing to exactly zero.
    """
    counts = grid.pixel_counts()
    n = np.ones(grid.nvertices)
    for _ in range(iterations):
        n = np.sqrt(n * counts / grid.blur(n))
    return n, n * grid.blur(n)


@dataclass
class BilateralSystem:
    """The linear system of one solve, in vertex space (V vertices).

    grid: the image's bilateral grid; matrix: (V, V) CSR ``A``; rhs: (V,) ``b``;
    initial: (V,) CG start; preconditioner: (V,) inverse of A's floored diagonal.
    """
    grid: BilateralGrid
    matrix: sparse.csr_matrix
    rhs: np.ndarray
    initial: np.ndarray
    preconditioner: np.ndarray


def build_system(reference_rgb: np.ndarray, target: np.ndarray, confidence: np.ndarray | None = None,
                 config: SolverConfig = SolverConfig()) -> BilateralSystem:
    """Set up ``A y = b`` for :func:`bilateral_solve`'s arguments (checked as there)."""
    target, confidence = _check_inputs(reference_rgb, target, confidence)
    grid = BilateralGrid(reference_rgb, config.sigma_spatial, config.sigma_luma, config.sigma_chroma)
    n, m = bistochastize(grid, config.bistochastize_iterations)
    scale = sparse.diags(n)
    smoothness = sparse.diags(m) - scale @ grid.blur_matrix @ scale
    weight = grid.splat(confidence)
    matrix = (config.lam * smoothness + sparse.diags(weight)).tocsr()
    rhs = grid.splat(confidence * target)
    has_weight = weight > 0
    initial = np.full(grid.nvertices, rhs.sum() / weight.sum())
    initial[has_weight] = rhs[has_weight] / weight[has_weight]
    preconditioner = 1.0 / np.maximum(matrix.diagonal(), config.a_diag_min)
    return BilateralSystem(grid, matrix, rhs, initial, preconditioner)


def solve(system: BilateralSystem, config: SolverConfig = SolverConfig()) -> np.ndarray:
    """Jacobi-preconditioned CG on ``system``: (V,) float64 vertex values ``y``.

    Stops after ``config.iterations`` iterations or when ``|A y - b| <= config.cg_tol * |b|``.
    """
    values, _ = conjugate_gradient(system.matrix, system.rhs, system.initial, system.preconditioner,
                                   config.iterations, config.cg_tol)
    return values


def conjugate_gradient(matrix: sparse.csr_matrix, rhs: np.ndarray, initial: np.ndarray,
                       inverse_diagonal: np.ndarray, iterations: int, rtol: float) -> tuple[np.ndarray, int]:
    """Preconditioned conjugate gradients for symmetric positive (semi-)definite ``matrix`` (V, V),
    preconditioner ``diag(inverse_diagonal)``: the iterates of ``scipy.sparse.linalg.cg`` with
    ``rtol``, ``atol=0``, ``maxiter=iterations``. Returns ((V,) solution, iterations run).

    Written out rather than calling scipy's because its vector products go through BLAS, whose
    threads make short vector products slow and erratic on a machine where other jobs run
    (``benchmarks/bench_bilateral.py``); ``np.einsum`` sums products without BLAS.
    """
    values = np.array(initial, np.float64)
    residual = rhs - matrix @ values
    threshold = rtol * np.sqrt(_dot(rhs, rhs))
    direction = rho_previous = None
    for iteration in range(iterations):
        if np.sqrt(_dot(residual, residual)) <= threshold:
            return values, iteration
        preconditioned = inverse_diagonal * residual
        rho = _dot(residual, preconditioned)
        if direction is None:
            direction = preconditioned
        else:
            direction = preconditioned + (rho / rho_previous) * direction
        product = matrix @ direction
        curvature = _dot(direction, product)
        if curvature <= 0:  # only on a breakdown: nothing left to minimise along this direction
            return values, iteration
        step = rho / curvature
        values += step * direction
        residual -= step * product
        rho_previous = rho
    return values, iterations


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.einsum("i,i->", a, b))


def bilateral_solve(reference_rgb: np.ndarray, target: np.ndarray, confidence: np.ndarray | None = None,
                    config: SolverConfig = SolverConfig()) -> np.ndarray:
    """Refine ``target`` on the edges of ``reference_rgb`` with the fast bilateral solver.

    reference_rgb: (H, W, 3) uint8 RGB. target: (H, W) float (or bool) in [0, 1], e.g. a coarse
    mask upsampled to the image. confidence: (H, W) float (or bool) >= 0, not zero everywhere;
    None means ones. Returns (H, W) float32, the solver's refined target, not clipped (an exact
    solve stays within the target's range; 25 CG iterations can overshoot it by a hair).
    """
    system = build_system(reference_rgb, target, confidence, config)
    return system.grid.slice(solve(system, config)).astype(np.float32)


def _check_reference(reference_rgb) -> None:
    if not isinstance(reference_rgb, np.ndarray):
        raise TypeError(f"reference_rgb must be a numpy array, got {type(reference_rgb).__name__}")
    if reference_rgb.ndim != 3 or reference_rgb.shape[2] != 3:
        raise ValueError(f"reference_rgb must have shape (H, W, 3), got {reference_rgb.shape}")
    if reference_rgb.dtype != np.uint8:
        raise TypeError(f"reference_rgb must be uint8 RGB, got dtype {reference_rgb.dtype}")
    if reference_rgb.shape[0] == 0 or reference_rgb.shape[1] == 0:
        raise ValueError(f"reference_rgb is empty: shape {reference_rgb.shape}")


def _check_plane(name: str, plane, shape: tuple[int, int]) -> np.ndarray:
    """A per-pixel float or bool array of ``shape``, finite, as float64."""
    if not isinstance(plane, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(plane).__name__}")
    if plane.shape != shape:
        raise ValueError(f"{name} must have the reference image's shape {shape}, got {plane.shape}")
    if not (np.issubdtype(plane.dtype, np.floating) or plane.dtype == np.bool_):
        raise TypeError(f"{name} must be float (or bool) in [0, 1], got dtype {plane.dtype}")
    plane = plane.astype(np.float64)
    if not np.isfinite(plane).all():
        raise ValueError(f"{name} has NaN or infinite values")
    return plane


def _check_inputs(reference_rgb, target, confidence) -> tuple[np.ndarray, np.ndarray]:
    _check_reference(reference_rgb)
    shape = reference_rgb.shape[:2]
    target = _check_plane("target", target, shape)
    if confidence is None:
        return target, np.ones(shape)
    confidence = _check_plane("confidence", confidence, shape)
    if (confidence < 0).any():
        raise ValueError("confidence must be >= 0 everywhere")
    if not confidence.any():
        raise ValueError("confidence is zero everywhere: the solve has no data")
    return target, confidence
