"""Blending a warped segment into the target image, on the segment's region only.

Three methods share one signature, :func:`blend` (and :func:`blend_into`, in place):

* ``cv2``: ``cv2.seamlessClone(..., NORMAL_CLONE)``, the authors' choice.
* ``poisson`` (default): the same equations as OpenCV's NORMAL_CLONE (guidance = source gradients
  inside the 3-pixel-eroded mask, target gradients outside, Dirichlet boundary on the mask's
  bounding box) solved with scipy's DST-I. It gives the same image as OpenCV's solver (mean
  absolute difference well under one grey level, tested) several times faster (README, Speed).
* ``paste``: copy the pixels under the mask (used by tests: colours are then exact).
"""
from __future__ import annotations

import functools

import cv2
import numpy as np
from scipy import fft

_ERODE_KERNEL = np.ones((3, 3), np.uint8)


def _clone_box(mask: np.ndarray) -> tuple[np.ndarray, tuple] | tuple[None, None]:
    """OpenCV's preparation: zero the mask's 1-pixel border, then take its bounding rectangle.

    Returns (mask with border cleared, (x, y, w, h)) or (None, None) for an empty mask.
    """
    cleared = np.zeros_like(mask)
    cleared[1:-1, 1:-1] = mask[1:-1, 1:-1]
    x, y, w, h = cv2.boundingRect(cleared)
    if w == 0 or h == 0:
        return None, None
    return cleared, (x, y, w, h)


def _poisson_interior(patch: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Solve NORMAL_CLONE on one rectangle. All inputs cover the same (h, w) region;
    ``patch``/``target`` (h, w, 3) uint8, ``mask`` (h, w) uint8 0/255. Returns the result inside
    the boundary ring, (h - 2, w - 2, 3) uint8 (the ring keeps the target's values).

    The guidance field is G = grad(target) + m * grad(patch - target) with m the eroded mask and
    forward differences (OpenCV's). Writing the result as target + u, u vanishes on the boundary
    ring and solves the 5-point Laplace equation  lap(u) = div(m * grad(patch - target)),
    diagonalised by the DST-I: u = idst(dst(rhs) / eigenvalues), in float32.

    The right-hand side is integers: differences of differences of 8-bit values, masked, within
    +-2040. It is computed exactly in int16 on the three interleaved channels (a quarter of
    the memory traffic of float32 planes, OpenCV's SIMD loops) and converted to float32 as is:
    the same values as float32 arithmetic gives."""
    inner = cv2.erode(mask, _ERODE_KERNEL, iterations=3, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    h, w = mask.shape
    eigenvalues = _laplacian_eigenvalues(h - 2, w - 2)
    delta = cv2.subtract(patch, target, dtype=cv2.CV_16S)  # (h, w, 3) within +-255
    flux_x = cv2.subtract(delta[:, 1:], delta[:, :-1])  # within +-510
    flux_x = cv2.bitwise_and(flux_x, flux_x, mask=inner[:, :-1])  # zero outside the eroded mask
    flux_y = cv2.subtract(delta[1:], delta[:-1])
    flux_y = cv2.bitwise_and(flux_y, flux_y, mask=inner[:-1])
    rhs = cv2.subtract(flux_x[1:-1, 1:], flux_x[1:-1, :-1])
    rhs = cv2.add(rhs, flux_y[1:, 1:-1])
    rhs = cv2.subtract(rhs, flux_y[:-1, 1:-1])  # within +-2040: no int16 saturation anywhere
    corrections = []
    for plane in cv2.split(rhs):  # one (h - 2, w - 2) float32 plane per channel
        spectrum = _dst1_ortho(plane.astype(np.float32))
        spectrum /= eigenvalues
        corrections.append(_dst1_ortho(spectrum))  # the orthonormal DST-I is its own inverse
    # target + u, rounded half to even and saturated to 0..255 like np.clip(np.rint(.)), in one pass
    return cv2.add(target[1:-1, 1:-1], cv2.merge(corrections), dtype=cv2.CV_8U)


def _scipy_dst1_ortho(array: np.ndarray) -> np.ndarray:
    """The orthonormal 2-D DST-I of a C-contiguous float32 array, in place (``array`` is
    overwritten), as scipy.fft gives it: ``idstn`` of type 1 is the same transform."""
    return fft.dstn(array, type=1, norm="ortho", workers=1, overwrite_x=True)


def _pocketfft_dst1_ortho(array: np.ndarray) -> np.ndarray:
    """:func:`_scipy_dst1_ortho` by the pocketfft call that scipy.fft.dstn makes (transform type 1,
    both axes, normalisation 1 / sqrt(N), in place, one thread), without the dispatch layers
    around it: about 15 us a call, six calls a blend."""
    return _pocketfft.dst(array, 1, (0, 1), 1, array, 1, None)


def _pick_dst1_ortho():
    """The direct pocketfft call where this scipy has it and it gives scipy.fft.dstn's bits, in
    place, on test arrays (odd, even and fast sizes); scipy.fft.dstn otherwise."""
    if _pocketfft is None:
        return _scipy_dst1_ortho
    rng = np.random.default_rng(0)
    try:
        for shape in ((5, 7), (16, 9), (31, 24), (63, 80)):
            values = rng.integers(-2040, 2041, shape).astype(np.float32)
            expected = _scipy_dst1_ortho(values.copy())
            got = values.copy()
            if _pocketfft_dst1_ortho(got) is not got or got.tobytes() != expected.tobytes():
                return _scipy_dst1_ortho
    except Exception:  # noqa: BLE001 - scipy's private module changed: the public call
        return _scipy_dst1_ortho
    return _pocketfft_dst1_ortho


try:  # scipy's own binding of pocketfft (private: checked by _pick_dst1_ortho before it is used)
    from scipy.fft._pocketfft import pypocketfft as _pocketfft
except ImportError:  # pragma: no cover - another scipy layout
    _pocketfft = None
_dst1_ortho = _pick_dst1_ortho()


def _laplacian_eigenvalues(rows: int, cols: int) -> np.ndarray:
    """(rows, cols) float32 eigenvalues of the 5-point Laplacian with zero Dirichlet boundary,
    in the order of scipy's DST-I coefficients: 2 cos(pi i / (rows + 1)) + 2 cos(pi j / (cols + 1)) - 4."""
    return np.add.outer(_axis_eigenvalues(rows), _axis_eigenvalues(cols))


@functools.lru_cache(maxsize=256)
def _axis_eigenvalues(n: int) -> np.ndarray:
    """(n,) float32 2 cos(pi i / (n + 1)) - 2, i = 1..n: one axis's part of :func:`_laplacian_eigenvalues`
    (cached, read-only: the solver's boxes come in a few fast FFT sizes)."""
    values = (2 * np.cos(np.pi * np.arange(1, n + 1) / (n + 1)) - 2).astype(np.float32)
    values.flags.writeable = False
    return values


def _fast_span(start: int, length: int, limit: int) -> tuple[int, int]:
    """Grow [start, start + length) inside [0, limit) so that length - 1 is a fast FFT size
    (DST-I of n points runs a real FFT of 2 (n + 1), n = length - 2). Keeps the span if none fits.

    Fast means 5-smooth (``real=True``): pocketfft's radix-7 and -11 passes are slower, so the
    11-smooth sizes of the complex default cost more on the usual boxes."""
    wanted = fft.next_fast_len(length - 1, real=True) + 1
    if wanted > limit:
        return start, length
    new_start = min(max(0, start - (wanted - length) // 2), limit - wanted)
    return new_start, wanted


def blend(method: str, patch: np.ndarray, mask: np.ndarray, target: np.ndarray, origin: tuple) -> np.ndarray:
    """Blend ``patch`` (h, w, 3) uint8 RGB under ``mask`` (h, w) uint8 0/255 into ``target``
    (H, W, 3) uint8 with the patch's top-left pixel at ``origin`` (x, y). The patch rectangle
    must lie inside the target. Returns a new target image; only the mask's bounding box changes.
    """
    out = target.copy()
    blend_into(method, patch, mask, out, origin)
    return out


def blend_into(method: str, patch: np.ndarray, mask: np.ndarray, target: np.ndarray, origin: tuple) -> None:
    """:func:`blend` in place: changes ``target`` (only the mask's bounding box), for a caller
    that owns it (the pair builder's background), without a copy of the whole image."""
    if method not in ("poisson", "cv2", "paste"):
        raise ValueError(f"unknown blend method {method!r}; choose poisson, cv2 or paste")
    x0, y0 = origin
    h, w = mask.shape
    if x0 < 0 or y0 < 0 or x0 + w > target.shape[1] or y0 + h > target.shape[0]:
        raise ValueError(f"patch at {origin} of size {w}x{h} leaves the {target.shape[1]}x{target.shape[0]} target")
    if method == "paste":
        region = target[y0:y0 + h, x0:x0 + w]
        region[mask > 0] = patch[mask > 0]
        return
    cleared, box = _clone_box(mask)
    if box is None:
        return
    bx, by, bw, bh = box
    if method == "cv2":
        centre = (x0 + bx + bw // 2, y0 + by + bh // 2)
        target[...] = cv2.seamlessClone(patch, target, cleared, centre, cv2.NORMAL_CLONE)
        return
    if bw < 3 or bh < 3:
        return
    # Solve on the mask's box grown to a fast FFT size; the boundary ring comes from the target.
    gx, gw = _fast_span(x0 + bx, bw, target.shape[1])
    gy, gh = _fast_span(y0 + by, bh, target.shape[0])
    region = target[gy:gy + gh, gx:gx + gw]
    full_patch = region.copy()
    full_mask = np.zeros((gh, gw), np.uint8)
    inside = (slice(y0 + by - gy, y0 + by - gy + bh), slice(x0 + bx - gx, x0 + bx - gx + bw))
    full_patch[inside] = patch[by:by + bh, bx:bx + bw]
    full_mask[inside] = cleared[by:by + bh, bx:bx + bw]
    region[1:-1, 1:-1] = _poisson_interior(full_patch, region, full_mask)
