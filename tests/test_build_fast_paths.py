"""The pair builder's shortcuts give the bytes and values of the plain computations they replace:
tar headers from a template (``TarInfo.tobuf``), cached ``.npy`` headers (``numpy.save``), the
Poisson right-hand side in int16 (float32 arithmetic), cached grid cell centres (``warp_grid``),
the sampler's scale choices as arrays (``WarpConfig.scale_ratios``)."""
from __future__ import annotations

import io
import tarfile

import cv2
import numpy as np
import pytest

from datagen.config import BuildConfig, WarpConfig
from datagen.format.grids import cell_centres
from datagen.format.schema import encode_npy
from datagen.format.shards import _PATCHABLE, _tobuf_header, member_header
from datagen.format.warps import warp_grid


def test_member_headers_are_tobuf_headers():
    assert _PATCHABLE, "this Python's tarfile header layout no longer matches the template"
    rng = np.random.default_rng(0)
    names = ["000000_000000.json", "000012_000345.src.gridmask.npy", "k" * 99, "k" * 100,
             "\u00e9t\u00e9.jpg", "bad\udcffname.png", "a/" * 60 + "x.jpg", "k" * 101, ""]
    names += ["".join(rng.choice(list("ab_.09/"), rng.integers(1, 120))) for _ in range(300)]
    sizes = [0, 1, 511, 512, 60_000, 8 ** 11 - 1, 8 ** 11, 8 ** 11 + 7]
    for name in names:
        for size in sizes + [int(rng.integers(0, 1 << 40))]:
            try:
                expected = _tobuf_header(name, size)
            except ValueError as error:
                with pytest.raises(ValueError, match=str(error)):
                    member_header(name, size)
                continue
            assert member_header(name, size) == expected, (name, size)


def test_tobuf_header_is_what_tarfile_writes():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("000001_000002.tgt.mask.png")
        info.size, info.mtime, info.mode, info.uname, info.gname = 3, 0, 0o444, "datagen", "datagen"
        tar.addfile(info, io.BytesIO(b"abc"))
    assert buffer.getvalue()[:512] == member_header("000001_000002.tgt.mask.png", 3)


def _saved(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize("array", [
    np.linspace(0, 1, 900).reshape(30, 30).astype(np.float16),
    np.linspace(0, 1, 1800).reshape(30, 30, 2).astype(np.float16),
    np.arange(7, dtype=">f4"), np.zeros((0, 3)), np.arange(30.0).reshape(5, 6).T, np.arange(16.0).reshape(4, 4)[::2],
    np.float32(3.0), np.zeros((1, 50, 50), np.float16)[:, :1, :1], np.array([b"ab"], "S2"),
    np.zeros(3, [("a", "<f4"), ("b", "u1")]), np.array(["xy"], "U2"), np.array([True, False]),
])
def test_encode_npy_is_numpy_save(array):
    assert encode_npy(array) == _saved(array)
    assert encode_npy(array) == _saved(array)  # the second time from the cached header


def _float32_rhs(patch, target, mask):
    """The Poisson right-hand side as the solver computed it before, in float32 planes."""
    inner = cv2.erode(mask, np.ones((3, 3), np.uint8), iterations=3, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    weight = (inner > 0).astype(np.float32)
    planes = []
    for patch_c, target_c in zip(cv2.split(patch), cv2.split(target)):
        delta = cv2.subtract(patch_c, target_c, dtype=cv2.CV_32F)
        flux_x = (delta[:, 1:] - delta[:, :-1]) * weight[:, :-1]
        flux_y = (delta[1:] - delta[:-1]) * weight[:-1]
        planes.append(flux_x[1:-1, 1:] - flux_x[1:-1, :-1] + flux_y[1:, 1:-1] - flux_y[:-1, 1:-1])
    return planes


def test_poisson_solve_with_the_int16_right_hand_side_is_the_float32_one(monkeypatch):
    """Extreme inputs (0/255 checkerboards: the largest differences) and random ones: the right-hand
    side that reaches the DST, and so the blended pixels, are the float32 computation's."""
    from datagen.synth import blend

    rng = np.random.default_rng(3)
    cases = []
    for h, w in ((5, 5), (9, 40), (64, 33), (120, 97)):
        board = (np.indices((h, w)).sum(0) % 2 * 255).astype(np.uint8)
        cases.append((np.dstack([board] * 3), np.dstack([255 - board] * 3), np.full((h, w), 255, np.uint8)))
        cases.append((rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                      (rng.random((h, w)) < 0.7).astype(np.uint8) * 255))
    seen = []
    transform = blend._dst1_ortho

    def recording(x):
        seen.append(x.copy())
        return transform(x)

    monkeypatch.setattr(blend, "_dst1_ortho", recording)
    for patch, target, mask in cases:
        seen.clear()
        blend._poisson_interior(patch, target, mask)
        expected = _float32_rhs(patch, target, mask)
        assert len(seen) == 6  # forward, then inverse, per channel
        for got, want in zip(seen[::2], expected):
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, want)
        assert max(np.abs(plane).max() for plane in expected) <= 2040


def test_the_dst_is_scipy_fft_dstn_and_idstn():
    """The solver's DST-I (the direct pocketfft call where it checks out) gives scipy.fft's bits,
    forward and inverse, in place."""
    from scipy import fft

    from datagen.synth.blend import _dst1_ortho

    rng = np.random.default_rng(5)
    for shape in ((1, 1), (3, 200), (59, 44), (161, 239), (255, 255)):
        values = rng.integers(-2040, 2041, shape).astype(np.float32)
        forward = _dst1_ortho(values.copy())
        assert forward.tobytes() == fft.dstn(values, type=1, norm="ortho", workers=1).tobytes()
        inverse = _dst1_ortho(forward.copy())
        assert inverse.tobytes() == fft.idstn(forward, type=1, norm="ortho", workers=1).tobytes()
        spectrum = values.copy()
        assert _dst1_ortho(spectrum) is spectrum


def test_laplacian_eigenvalues_are_the_outer_sum():
    from datagen.synth.blend import _laplacian_eigenvalues

    rows, cols = 25, 38
    eig_y = 2 * np.cos(np.pi * np.arange(1, rows + 1) / (rows + 1)) - 2
    eig_x = 2 * np.cos(np.pi * np.arange(1, cols + 1) / (cols + 1)) - 2
    expected = np.add.outer(eig_y.astype(np.float32), eig_x.astype(np.float32))
    for _ in range(2):  # computed, then from the cache
        got = _laplacian_eigenvalues(rows, cols)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("grid_shape, size", [((30, 30), (480, 480)), ((15, 20), (400, 300)), ((7, 9), (61, 53))])
def test_cell_centres_are_warp_grid_centres(grid_shape, size):
    expected = warp_grid(lambda p: p, grid_shape, size, (1, 1))
    np.testing.assert_array_equal(cell_centres(grid_shape, size), expected)
    assert not cell_centres(grid_shape, size).flags.writeable


def test_sampler_scale_choices_are_the_configs():
    from datagen.synth.sampling import Sampler

    class Bank:
        category_ids = np.array([1, 2])
        image_ids = np.array([10, 11])
        images = type("Images", (), {"image_ids": np.array([10, 11])})()

        def categories_of_image(self, image_id):
            return frozenset()

    warp = WarpConfig()
    sampler = Sampler(Bank(), BuildConfig(warp=warp))
    for two in (False, True):
        ratios, probs = warp.scale_ratios(two)
        assert sampler._scales[two][0].tolist() == ratios and sampler._scales[two][1].tolist() == probs


def test_inverse_affine_is_numpy_inverse_and_cached():
    from datagen.format.warps import SegmentWarp

    affine = np.array([[0.8, 0.3, 12.5], [-0.2, 1.1, -4.0], [0.0, 0.0, 1.0]])
    warp = SegmentWarp(affine, (480, 480))
    np.testing.assert_array_equal(warp.inverse_affine(), np.linalg.inv(affine))
    assert warp.inverse_affine() is warp.inverse_affine() and not warp.inverse_affine().flags.writeable
    points = np.array([[10.0, 20.0], [300.5, 0.25]])
    np.testing.assert_array_equal(warp.tgt_to_src(points), points @ np.linalg.inv(affine)[:2, :2].T
                                  + np.linalg.inv(affine)[:2, 2])
    assert warp == SegmentWarp(affine, (480, 480))  # the cache is no field


@pytest.mark.parametrize("size, grid", [((480, 480), (30, 30)), ((480, 480), (60, 60)), ((480, 480), (480, 480)),
                                        ((480, 480), (30, 60)), ((512, 256), (32, 32)), ((64, 64), (1, 1)),
                                        ((480, 480), (24, 24)), ((100, 90), (7, 9)), ((256, 256), (1, 1))])
def test_cell_coverage_is_inter_area(size, grid):
    from datagen.format.grids import cell_coverage

    rng = np.random.default_rng(1)
    smooth = cv2.GaussianBlur(rng.random(size).astype(np.float32), (31, 31), 0)
    for inside in (np.zeros(size, bool), np.ones(size, bool), rng.random(size) < 0.03, smooth > 0.5):
        expected = cv2.resize(inside.astype(np.float32), grid[::-1], interpolation=cv2.INTER_AREA)
        got = cell_coverage(inside, grid)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)
