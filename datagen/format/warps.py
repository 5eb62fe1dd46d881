"""Warps of a segment from the source image into the target image, and the correspondences
they induce on the network's grid.

Conventions used throughout:

* *continuous pixel coordinates*: an image of width W spans x in [0, W]; the centre of pixel
  column j is at x = j + 0.5. cv2.remap indexes pixel centres at integers, hence the 0.5 shifts
  at that boundary (:func:`remap_maps`).
* *normalised coordinates*: continuous coordinates divided by the image size, in [0, 1].
* a grid of h x w cells has cell centres at ((j + 0.5) / w, (i + 0.5) / h) normalised.

A segment warp is ``target = A(tps_inverse(source))``: an optional thin-plate spline acting on the
normalised source image, then an affine map (aspect, rotation, scale, translation) in pixels. The
TPS is defined by its *backward* map (warped -> original, the map cv2.remap needs), so
target->source is exact and closed-form, and source->target uses the TPS's numerical inverse.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


def tps_kernel(r2: np.ndarray) -> np.ndarray:
    """Thin-plate radial basis U = r^2 log r^2, with U(0) = 0. ``r2`` is the squared distance."""
    r2 = np.maximum(r2, 1e-300)
    return r2 * np.log(r2)


@dataclass(frozen=True)
class ThinPlateSpline:
    """A 2-D thin-plate spline interpolating ``controls[k] -> targets[k]``.

    ``controls`` and ``targets`` are (K, 2) float64 normalised (x, y). Used as the backward map
    of the warp: a point of the warped image at ``controls[k]`` comes from ``targets[k]``.
    """

    controls: np.ndarray
    targets: np.ndarray

    @staticmethod
    def random_grid(rng: np.random.Generator, grid: int, jitter: float) -> ThinPlateSpline:
        """A g x g control grid over [0, 1]^2 whose points move by U[-jitter/g, jitter/g]."""
        axis = np.linspace(0.0, 1.0, grid)
        controls = np.stack(np.meshgrid(axis, axis), axis=-1).reshape(-1, 2)
        moves = rng.uniform(-jitter / grid, jitter / grid, size=controls.shape)
        return ThinPlateSpline(controls, controls + moves)

    @staticmethod
    def random_unfolded(rng: np.random.Generator, grid: int, jitter: float, tries: int = 20):
        """Like :meth:`random_grid`, redrawn until the spline does not fold (about 15 % of 6 x 6
        grids at jitter 0.5 do); None if ``tries`` draws all fold."""
        for _ in range(tries):
            tps = ThinPlateSpline.random_grid(rng, grid, jitter)
            if tps.min_jacobian_determinant() > 0:
                return tps
        return None

    def _coefficients(self) -> np.ndarray:
        """(K + 3, 2) weights then affine part, solving the standard TPS linear system."""
        cached = self.__dict__.get("_coef")
        if cached is not None:
            return cached
        k = len(self.controls)
        d2 = ((self.controls[:, None, :] - self.controls[None, :, :]) ** 2).sum(-1)
        system = np.zeros((k + 3, k + 3))
        system[:k, :k] = tps_kernel(d2)
        system[:k, k] = 1.0
        system[:k, k + 1:] = self.controls
        system[k, :k] = 1.0
        system[k + 1:, :k] = self.controls.T
        rhs = np.zeros((k + 3, 2))
        rhs[:k] = self.targets
        coef = np.linalg.solve(system, rhs)
        object.__setattr__(self, "_coef", coef)
        return coef

    def _float32(self) -> tuple:
        """The float32 terms of :meth:`_evaluate` (cached): control x and y as (K, 1) columns and
        the coefficients (K + 3, 2)."""
        cached = self.__dict__.get("_f32")
        if cached is None:
            controls = self.controls.astype(np.float32)
            cached = (controls[:, :1].copy(), controls[:, 1:].copy(), self._coefficients().astype(np.float32))
            object.__setattr__(self, "_f32", cached)
        return cached

    def _evaluate(self, flat: np.ndarray, with_jacobian: bool):
        """Values (N, 2) and, if asked, Jacobians (N, 2, 2), float64, at (N, 2) points.

        Evaluated in float32 (accurate to ~1e-6 of the image, a few thousandths of a pixel at
        480 px), with (K, N) arrays built from contiguous coordinate rows, logarithms by cv2.log
        (vectorised, faster than np.log and as accurate in float32) and the sums over the K
        controls and the affine part in one np.einsum over a (1 or 3, K + 3, N) block of basis
        functions and their x and y derivatives (one call: its overhead is most of the time of a
        small evaluation, and the Newton inverse makes many). No BLAS, whose rounding can change
        with its thread count (and a build must give the same bytes with any number of workers)."""
        if len(flat) == 0:  # cv2.log returns None for an empty array
            return np.zeros((0, 2)), (np.zeros((0, 2, 2)) if with_jacobian else None)
        controls_x, controls_y, coef = self._float32()
        k = len(controls_x)
        flat = flat.astype(np.float32)
        x, y = np.ascontiguousarray(flat[:, 0]), np.ascontiguousarray(flat[:, 1])
        # rows of the block, against coef's: U_k (K), 1, x, y; then d/dx: dU_k/dx, 0, 1, 0; d/dy: dU_k/dy, 0, 0, 1
        block = np.empty((3 if with_jacobian else 1, k + 3, len(flat)), np.float32)
        dx = controls_x - x  # (K, N): c_k - p
        dy = controls_y - y
        d2 = dx * dx
        d2 += dy * dy
        np.maximum(d2, np.float32(1e-30), out=d2)
        log = cv2.log(d2)
        np.multiply(d2, log, out=block[0, :k])  # U = r^2 log r^2
        block[0, k], block[0, k + 1], block[0, k + 2] = 1.0, x, y
        if with_jacobian:
            # dU/dp = 2 (log r^2 + 1) (p - c_k) = -2 (log r^2 + 1) (c_k - p)
            log += 1.0
            log *= -2.0
            np.multiply(dx, log, out=block[1, :k])
            np.multiply(dy, log, out=block[2, :k])
            block[1:, k:] = 0.0
            block[1, k + 1] = block[2, k + 2] = 1.0
        sums = np.einsum("ki,mkn->min", coef, block).transpose(0, 2, 1).astype(np.float64)  # (m, N, i)
        if not with_jacobian:
            return sums[0], None
        return sums[0], sums[1:].transpose(1, 2, 0)  # J[n, i, j] = d out_i / d in_j

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """Apply the spline to (..., 2) normalised points."""
        value, _ = self._evaluate(points.reshape(-1, 2).astype(np.float64), False)
        return value.reshape(points.shape)

    def jacobian(self, points: np.ndarray) -> np.ndarray:
        """(N, 2, 2) Jacobian d out_i / d in_j at (N, 2) points."""
        return self._evaluate(points.astype(np.float64), True)[1]

    _LATTICE = np.linspace(-0.1, 1.1, 33)

    def _lattice(self):
        """The spline's values (33 * 33, 2) and Jacobians (33 * 33, 2, 2) on a 33 x 33 lattice over
        [-0.1, 1.1]^2 (row-major, x fastest), and the smallest Jacobian determinant there
        (cached; one evaluation gives all three)."""
        cached = self.__dict__.get("_lattice_cache")
        if cached is None:
            lattice = np.stack(np.meshgrid(self._LATTICE, self._LATTICE), axis=-1).reshape(-1, 2)
            image, jac = self._evaluate(lattice, True)
            cached = (image, jac, float(_det(jac).min()))
            object.__setattr__(self, "_lattice_cache", cached)
        return cached

    def min_jacobian_determinant(self) -> float:
        """Smallest det of the Jacobian over the lattice: <= 0 means the spline folds the image
        over itself (not a bijection, so no exact inverse exists)."""
        return self._lattice()[2]

    def _lattice_newton_step(self, points: np.ndarray, target: np.ndarray) -> np.ndarray:
        """(N, 2) Newton steps towards self(p) = ``target`` taken from the lattice point nearest to
        each of ``points``, with the value and Jacobian cached there (no evaluation)."""
        image, jac, _ = self._lattice()
        axis = self._LATTICE
        index = np.rint((points - axis[0]) * (1.0 / (axis[1] - axis[0])))
        np.clip(index, 0, len(axis) - 1, out=index)
        index = index.astype(np.intp)
        node = index[:, 1] * len(axis) + index[:, 0]
        step = _solve2(jac[node], image[node] - target)
        return np.subtract(axis[index], step, out=step)

    def inverse(self, points: np.ndarray, iterations: int = 20) -> np.ndarray:
        """Numerical inverse by Newton's method: p with self(p) = points, for (..., 2) points
        (:meth:`inverse_with_residual` without the residual)."""
        return self.inverse_with_residual(points, iterations)[0]

    def inverse_with_residual(self, points: np.ndarray, iterations: int = 20) -> tuple[np.ndarray, np.ndarray]:
        """Numerical inverse by Newton's method: p with self(p) = points, for (..., 2) points, and
        the residual self(p) - points at the returned p, (..., 2): the round trip, measured by
        the iteration's own last evaluation (no extra one).

        Two steps come from the lattice, with the values and Jacobians cached there: from the
        lattice point nearest to the target (the spline moves points by a few lattice steps at
        most), then from the one nearest to that first estimate. For an unfolded spline the
        iteration then converges to 1e-5 of the image (0.005 px at 480 px) in about two steps,
        and each step only moves the points not yet converged. Callers check the residual."""
        unwarped, residual, _ = self._newton_inverse(points.reshape(-1, 2), iterations)
        return unwarped.reshape(points.shape), residual.reshape(points.shape)

    def _newton_inverse(self, target: np.ndarray, iterations: int = 20,
                        keep_jacobian: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """:meth:`inverse_with_residual` of (N, 2) points, and if asked the Jacobians (N, 2, 2)
        at the returned points (the last evaluation computed them)."""
        target = target.astype(np.float64)
        guess = self._lattice_newton_step(self._lattice_newton_step(target, target), target)
        final_residual = np.zeros_like(target)
        final_jac = np.zeros((len(target), 2, 2)) if keep_jacobian else None
        active = np.arange(len(target))
        for iteration in range(iterations + 1):
            value, jac = self._evaluate(guess[active], True)
            residual = np.subtract(value, target[active], out=value)
            final_residual[active] = residual
            if keep_jacobian:
                final_jac[active] = jac
            size = np.abs(residual)
            moving = (size[:, 0] >= 1e-5) | (size[:, 1] >= 1e-5)
            if not moving.any() or iteration == iterations:
                break
            active = active[moving]
            guess[active] -= _solve2(jac[moving], residual[moving])
        return guess, final_residual, final_jac

    def to_json(self) -> dict:
        return {"controls": self.controls.tolist(), "targets": self.targets.tolist()}

    @staticmethod
    def from_json(data: dict) -> ThinPlateSpline:
        return ThinPlateSpline(np.asarray(data["controls"], float), np.asarray(data["targets"], float))


def _det(jac: np.ndarray) -> np.ndarray:
    """Determinants of (N, 2, 2) matrices."""
    return jac[:, 0, 0] * jac[:, 1, 1] - jac[:, 0, 1] * jac[:, 1, 0]


def _solve2(jac: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """(N, 2) solutions x of jac x = rhs for (N, 2, 2) ``jac``, in closed form: adj(J) rhs / det(J)."""
    inverse_det = 1.0 / _det(jac)
    out = np.empty(rhs.shape)
    np.multiply(jac[:, 1, 1] * rhs[:, 0] - jac[:, 0, 1] * rhs[:, 1], inverse_det, out=out[:, 0])
    np.multiply(jac[:, 0, 0] * rhs[:, 1] - jac[:, 1, 0] * rhs[:, 0], inverse_det, out=out[:, 1])
    return out


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a (3, 3) affine matrix to (..., 2) points."""
    return points @ matrix[:2, :2].T + matrix[:2, 2]


@dataclass(frozen=True)
class SegmentWarp:
    """Where one segment of the source goes in the target.

    ``affine`` (3, 3) maps continuous source pixels (after the TPS) to continuous target pixels;
    ``tps`` (or None) is the backward spline on the normalised source image; ``src_size`` is the
    source image's (width, height) in pixels.
    """

    affine: np.ndarray
    src_size: tuple
    tps: ThinPlateSpline | None = None

    def src_to_tgt(self, points: np.ndarray) -> np.ndarray:
        """(..., 2) continuous source pixels -> continuous target pixels (TPS numerically inverted)."""
        return self.src_to_tgt_checked(points)[0]

    def src_to_tgt_checked(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`src_to_tgt` and its round-trip error tgt_to_src(src_to_tgt(p)) - p, (..., 2)
        source pixels, as the TPS inverse's last Newton evaluation measured it (zeros without a
        TPS: the affine part is inverted exactly)."""
        if self.tps is None:
            return apply_affine(self.affine, points), np.zeros(np.shape(points))
        size = np.asarray(self.src_size, float)
        unwarped, residual = self.tps.inverse_with_residual(points / size)
        return apply_affine(self.affine, unwarped * size), residual * size

    def squares_to_tgt(self, centres: np.ndarray) -> np.ndarray:
        """(4 N, 2) continuous target pixels: the corners of the unit squares (source pixels)
        centred at (N, 2) continuous source pixels ``centres``, four per square, mapped to the
        target. Exact without a TPS; with one, each square goes through the warp's linear map at
        its centre (the spline's numerical inverse there and the inverse of the Jacobian that its
        last Newton step evaluated): a quarter of the inversions of the corners themselves, and
        within 0.5 target px of them at worst, a few thousandths typically (tested), for the
        boxes and regions of interest of a warped segment, which keep a 2-pixel margin."""
        corners = np.array([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]])
        if self.tps is None:
            return apply_affine(self.affine, (centres[:, None, :] + corners).reshape(-1, 2))
        size = np.asarray(self.src_size, float)
        unwarped, _, jac = self.tps._newton_inverse(centres.reshape(-1, 2) / size, keep_jacobian=True)
        # the spline maps unwarped + d to source + J d: a source offset e comes from J^-1 e
        offsets = np.stack([_solve2(jac, np.broadcast_to(corner / size, unwarped.shape)) for corner in corners], 1)
        return apply_affine(self.affine, ((unwarped[:, None, :] + offsets) * size).reshape(-1, 2))

    def inverse_affine(self) -> np.ndarray:
        """``np.linalg.inv(affine)``, (3, 3), computed once (cached, read-only): the builder
        resamples through it and grids the pair with it."""
        cached = self.__dict__.get("_inverse")
        if cached is None:
            cached = np.linalg.inv(self.affine)
            cached.flags.writeable = False
            object.__setattr__(self, "_inverse", cached)
        return cached

    def tgt_to_src(self, points: np.ndarray) -> np.ndarray:
        """(..., 2) continuous target pixels -> continuous source pixels (exact)."""
        points = apply_affine(self.inverse_affine(), points)
        if self.tps is not None:
            size = np.asarray(self.src_size, float)
            points = self.tps(points / size) * size
        return points

    def to_json(self) -> dict:
        return {
            "affine": np.asarray(self.affine).tolist(),
            "src_size": list(self.src_size),
            "tps": None if self.tps is None else self.tps.to_json(),
        }

    @staticmethod
    def from_json(data: dict) -> SegmentWarp:
        tps = None if data.get("tps") is None else ThinPlateSpline.from_json(data["tps"])
        return SegmentWarp(np.asarray(data["affine"], float), tuple(data["src_size"]), tps)


def grid_centres(grid_h: int, grid_w: int) -> np.ndarray:
    """(h, w, 2) normalised (x, y) of the cell centres of an h x w grid."""
    xs = (np.arange(grid_w) + 0.5) / grid_w
    ys = (np.arange(grid_h) + 0.5) / grid_h
    return np.stack(np.meshgrid(xs, ys), axis=-1)


def warp_grid(mapping, grid_shape: tuple, from_size: tuple, to_size: tuple) -> np.ndarray:
    """(h, w, 2) normalised coordinates in the other image of each cell centre of this image.

    ``mapping`` maps (..., 2) continuous pixels of this image (size ``from_size`` = (W, H)) to
    continuous pixels of the other (``to_size``).
    """
    centres = grid_centres(*grid_shape) * np.asarray(from_size, float)
    return mapping(centres) / np.asarray(to_size, float)


def sample_grid(values: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Bilinearly sample (h, w) ``values`` at (H', W', 2) normalised coords (torch grid_sample with
    align_corners=False and zero padding)."""
    return _remap_grid(values, _grid_maps(coords, values.shape))


def _grid_maps(coords: np.ndarray, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """cv2.remap's float32 maps of :func:`sample_grid` for (H', W', 2) normalised ``coords`` into
    an (h, w) grid of ``shape``."""
    h, w = shape
    return (coords[..., 0] * w - 0.5).astype(np.float32), (coords[..., 1] * h - 0.5).astype(np.float32)


def _remap_grid(values: np.ndarray, maps: tuple) -> np.ndarray:
    return cv2.remap(values.astype(np.float32), maps[0], maps[1], cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)


def inside_unit(coords: np.ndarray) -> np.ndarray:
    """(h, w) float mask of coords strictly inside (0, 1)^2."""
    inside = (coords > 0) & (coords < 1)
    if inside.ndim >= 2 and inside.shape[-1] == 2:  # x and y: np.all over the last axis, without its loop
        return (inside[..., 0] & inside[..., 1]).astype(np.float32)
    return np.all(inside, axis=-1).astype(np.float32)


def cycle_consistent_masks(src_mask: np.ndarray, src_to_tgt: np.ndarray, tgt_to_src: np.ndarray):
    """Soft grid masks of the shared region that agree both ways (the released generator's rule).

    ``src_mask`` (h, w) float in [0, 1]: fraction of each source cell covered by the segment.
    A source cell keeps its weight only if it maps into the target, lands in target cells that map
    back into the source mask; the target mask is the result transported back to the target.
    Returns (src_grid_mask, tgt_grid_mask), (h, w) and (h', w') float32 in [0, 1].
    """
    tgt_inside = inside_unit(tgt_to_src)
    src_inside = inside_unit(src_to_tgt)
    into_src = _grid_maps(tgt_to_src, src_mask.shape)  # sampled twice: the maps are made once
    tgt_first = _remap_grid(src_mask, into_src) * tgt_inside
    src_back = sample_grid(tgt_first, src_to_tgt)
    src_final = src_mask * src_back * src_inside
    if src_final.shape != src_mask.shape:  # a mask broadcast against grids of another shape
        into_src = _grid_maps(tgt_to_src, src_final.shape)
    tgt_final = _remap_grid(src_final, into_src) * tgt_inside
    return src_final.astype(np.float32), tgt_final.astype(np.float32)


