"""The fast bilateral solver: grid, bistochastisation and linear system against their definitions,
the solve on real photographs, and bad input."""
import cv2
import numpy as np
import pytest
from scipy import ndimage
from scipy.sparse import diags
from scipy.sparse.linalg import cg, spsolve
from skimage import data

from datagen.segments.bilateral import (
    BilateralGrid,
    SolverConfig,
    bilateral_solve,
    bistochastize,
    build_system,
    conjugate_gradient,
    rgb_to_yuv,
    solve,
)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def blocky(mask: np.ndarray, block: int = 16) -> np.ndarray:
    """The mask seen at ``block``-pixel resolution (majority per block), upsampled nearest."""
    height, width = mask.shape
    small = cv2.resize(mask.astype(np.float32), (width // block, height // block), interpolation=cv2.INTER_AREA)
    return cv2.resize((small > 0.5).astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0


def retina_and_disc():
    """The retina photograph at 480 px and its fundus disc: everything brighter than the black
    surround (red > 40), a clean colour threshold."""
    image = cv2.resize(data.retina(), (480, 480), interpolation=cv2.INTER_AREA)
    return image, image[..., 0] > 40


def coffee_and_crema():
    """The coffee photograph and the crema in the cup: saturated orange (HSV hue 10-22 on
    OpenCV's 0-180 scale, saturation > 170, value > 150), the component under the cup's centre,
    holes filled. Its rim against the white cup is a real colour edge."""
    image = data.coffee()
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(int)
    orange = (hsv[..., 0] >= 10) & (hsv[..., 0] <= 22) & (hsv[..., 1] > 170) & (hsv[..., 2] > 150)
    labels, _ = ndimage.label(orange)
    return image, ndimage.binary_fill_holes(labels == labels[150, 290])


def horse_and_silhouette():
    """scikit-image's binary horse (black on white) as an RGB image, and the horse."""
    horse = data.horse()
    return np.repeat(np.where(horse, 255, 0).astype(np.uint8)[..., None], 3, axis=2), ~horse


@pytest.fixture(scope="module")
def small_image():
    """A 24 x 20 image of a few flat colours with noise: many occupied cells, many neighbours."""
    rng = np.random.default_rng(0)
    palette = np.array([[200, 40, 40], [30, 30, 30], [220, 220, 210], [60, 140, 60]])
    image = palette[rng.integers(0, 4, (24, 20))] + rng.integers(-12, 13, (24, 20, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


# --- colour and grid --------------------------------------------------------------------------

def test_rgb_to_yuv_is_full_range_bt601():
    rgb = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 0, 255], [10, 200, 90]]], np.uint8)
    r, g, b = rgb[0].astype(float).T
    y = 0.299 * r + 0.587 * g + 0.114 * b
    expected = np.stack([y, 128 + 0.5 * (b - y) / (1 - 0.114), 128 + 0.5 * (r - y) / (1 - 0.299)], axis=1)
    yuv = rgb_to_yuv(rgb)
    assert yuv.dtype == np.float32 and yuv.shape == rgb.shape
    np.testing.assert_allclose(yuv[0], expected, atol=2e-3)
    np.testing.assert_allclose(yuv[0, :2], [[0, 128, 128], [255, 128, 128]], atol=1e-3)


def pixel_cells(image: np.ndarray, sigma_spatial: float, sigma_luma: float, sigma_chroma: float) -> np.ndarray:
    """(H * W, 5) the definition's cell of each pixel: floor of (x, y, Y, U, V) / sigmas."""
    height, width = image.shape[:2]
    rows, cols = np.indices((height, width))
    yuv = rgb_to_yuv(image).astype(np.float64)
    cells = np.stack([cols / sigma_spatial, rows / sigma_spatial, yuv[..., 0] / sigma_luma,
                      yuv[..., 1] / sigma_chroma, yuv[..., 2] / sigma_chroma], axis=-1)
    return np.floor(cells).astype(int).reshape(-1, 5)


@pytest.mark.parametrize("case", ["noisy colours", "long strip", "fine colour cells"])
def test_grid_matches_its_definition(small_image, case):
    if case == "noisy colours":
        image, sigmas = small_image, (4.0, 16.0, 8.0)
    elif case == "long strip":  # 300 cells in a row: a base-255 packing of coordinates would alias
        image, sigmas = np.full((3, 300, 3), 90, np.uint8), (1.0, 16.0, 8.0)
    else:  # over 2**31 cells in all: 64-bit keys
        image, sigmas = small_image, (4.0, 0.5, 0.5)
    grid = BilateralGrid(image, *sigmas)
    cells = pixel_cells(image, *sigmas)
    distinct = sorted(set(map(tuple, cells)))
    assert grid.nvertices == len(distinct) and grid.npixels == cells.shape[0]
    assert sorted(map(tuple, grid.coords)) == distinct
    np.testing.assert_array_equal(grid.coords[grid.vertex_of_pixel], cells)

    # blur: 2 x 5 on the diagonal, 1 between cells one step apart along exactly one dimension
    l1 = np.abs(grid.coords[:, None, :] - grid.coords[None, :, :]).sum(axis=-1)
    expected_blur = np.where(l1 == 1, 1.0, 0.0) + 10.0 * np.eye(grid.nvertices)
    np.testing.assert_array_equal(grid.blur_matrix.toarray(), expected_blur)
    vector = np.random.default_rng(1).random(grid.nvertices)
    np.testing.assert_allclose(grid.blur(vector), expected_blur @ vector)

    # splat sums the pixels of each cell; slice reads each pixel's cell
    values = np.random.default_rng(2).random(image.shape[:2])
    index = {cell: i for i, cell in enumerate(map(tuple, grid.coords))}
    sums = np.zeros(grid.nvertices)
    for cell, value in zip(map(tuple, cells), values.ravel()):
        sums[index[cell]] += value
    np.testing.assert_allclose(grid.splat(values), sums)
    np.testing.assert_allclose(grid.splat_matrix() @ values.ravel(), sums)
    np.testing.assert_array_equal(grid.pixel_counts(), grid.splat(np.ones(image.shape[:2])))
    sliced = grid.slice(vector)
    assert sliced.shape == image.shape[:2]
    np.testing.assert_array_equal(sliced.ravel(), [vector[index[cell]] for cell in map(tuple, cells)])


def test_bistochastize_normalises_the_blur(small_image):
    grid = BilateralGrid(small_image, 4.0, 16.0, 8.0)
    counts = grid.pixel_counts()
    for iterations in (10, 60):
        n, m = bistochastize(grid, iterations)
        assert (n > 0).all()
        np.testing.assert_allclose(m, n * (grid.blur_matrix @ n), rtol=1e-12)
    # converged: diag(n) B diag(n) has row sums equal to each vertex's pixel count
    np.testing.assert_allclose(m, counts, rtol=1e-9)
    n, m = bistochastize(grid, 0)
    np.testing.assert_array_equal(n, np.ones(grid.nvertices))


# --- the linear system ------------------------------------------------------------------------

def test_system_matches_its_definition(small_image):
    rng = np.random.default_rng(3)
    target, confidence = rng.random((24, 20)), rng.random((24, 20)) * 2
    config = SolverConfig(sigma_spatial=4.0, lam=3.0, bistochastize_iterations=7)
    system = build_system(small_image, target, confidence, config)
    grid = system.grid
    n, m = bistochastize(grid, 7)
    splat = grid.splat_matrix().toarray()
    blur = grid.blur_matrix.toarray()
    smoothness = np.diag(m) - np.diag(n) @ blur @ np.diag(n)
    expected = 3.0 * smoothness + np.diag(splat @ confidence.ravel())
    np.testing.assert_allclose(system.matrix.toarray(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(system.rhs, splat @ (confidence * target).ravel(), rtol=1e-12)
    np.testing.assert_allclose(smoothness.sum(axis=1), 0, atol=1e-9)  # a graph Laplacian
    np.testing.assert_allclose(system.preconditioner, 1 / np.diag(expected), rtol=1e-12)
    np.testing.assert_allclose(system.initial, system.rhs / (splat @ confidence.ravel()), rtol=1e-12)


def test_solution_satisfies_the_linear_system():
    image, crema = coffee_and_crema()
    image = cv2.resize(image, (300, 200), interpolation=cv2.INTER_AREA)  # a small system: the direct solve is quick
    target = blocky(cv2.resize(crema.astype(np.uint8), (300, 200), interpolation=cv2.INTER_NEAREST) > 0, 8)
    target = target.astype(np.float32)
    system = build_system(image, target)
    norm_b = np.linalg.norm(system.rhs)

    # the default 25 iterations: the output is the vertex solution sliced, close to the exact one
    values = solve(system)
    output = bilateral_solve(image, target)
    assert output.dtype == np.float32 and output.shape == target.shape
    np.testing.assert_array_equal(output, system.grid.slice(values).astype(np.float32))
    exact = spsolve(system.matrix.tocsc(), system.rhs)
    assert np.linalg.norm(system.matrix @ exact - system.rhs) < 1e-10 * norm_b
    assert np.abs(values - exact).max() < 0.05
    assert np.abs(values - system.initial).max() > 0.1  # and far from where CG started

    # iterated to a tight tolerance, CG reaches A y = b
    tight = SolverConfig(iterations=1000, cg_tol=1e-10)
    values = solve(system, tight)
    assert np.linalg.norm(system.matrix @ values - system.rhs) <= 1e-10 * norm_b
    np.testing.assert_allclose(values, exact, atol=1e-8)
    np.testing.assert_allclose(bilateral_solve(image, target, config=tight), system.grid.slice(exact), atol=1e-6)
    assert exact.min() >= -1e-9 and exact.max() <= 1 + 1e-9  # the target's range (maximum principle)


def test_conjugate_gradient_follows_scipy():
    """Our CG loop takes the iterates of ``scipy.sparse.linalg.cg`` and stops at the tolerance."""
    image, disc = retina_and_disc()
    image = cv2.resize(image, (200, 200), interpolation=cv2.INTER_AREA)
    target = blocky(cv2.resize(disc.astype(np.uint8), (200, 200), interpolation=cv2.INTER_NEAREST) > 0, 8)
    system = build_system(image, target.astype(np.float64))
    preconditioner = diags(system.preconditioner)
    for iterations in (1, 5, 25):
        ours, run = conjugate_gradient(system.matrix, system.rhs, system.initial, system.preconditioner,
                                       iterations, 1e-5)
        theirs, _ = cg(system.matrix, system.rhs, x0=system.initial, M=preconditioner, rtol=1e-5, atol=0.0,
                       maxiter=iterations)
        assert run == iterations
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)
    ours, run = conjugate_gradient(system.matrix, system.rhs, system.initial, system.preconditioner, 10_000, 1e-6)
    residual = np.linalg.norm(system.matrix @ ours - system.rhs)
    assert 25 < run < 10_000 and residual <= 1e-6 * np.linalg.norm(system.rhs)
    # started at the solution, it stops at once
    again, run = conjugate_gradient(system.matrix, system.rhs, ours, system.preconditioner, 10, 1e-6)
    assert run == 0 and np.array_equal(again, ours)


# --- behaviour on images ----------------------------------------------------------------------

@pytest.mark.parametrize("make", [retina_and_disc, coffee_and_crema, horse_and_silhouette],
                         ids=["retina disc", "coffee crema", "horse silhouette"])
def test_refines_a_blocky_mask_towards_the_object(make):
    image, careful = make()
    coarse = blocky(careful)
    refined = bilateral_solve(image, coarse.astype(np.float32)) > 0.5
    before, after = iou(coarse, careful), iou(refined, careful)
    assert after > before + 0.03, (before, after)
    assert after > 0.94, (before, after)


def test_constant_image_leaves_a_constant_mask_unchanged():
    image = np.full((64, 80, 3), (120, 60, 200), np.uint8)
    for value in (0.0, 0.3, 1.0):
        target = np.full((64, 80), value, np.float32)
        confidence = np.random.default_rng(4).random((64, 80)) + 0.1
        for weights in (None, confidence):
            np.testing.assert_allclose(bilateral_solve(image, target, weights), value, atol=1e-6)


def test_constant_mask_stays_constant_on_a_photograph():
    image = cv2.resize(data.astronaut(), (160, 160), interpolation=cv2.INTER_AREA)
    confidence = np.random.default_rng(5).random((160, 160))
    out = bilateral_solve(image, np.full((160, 160), 0.7), confidence)
    np.testing.assert_allclose(out, 0.7, atol=1e-6)


def test_confidence_pins_the_target():
    """Where confidence is high the output follows the target; where it is zero it is filled in
    from confident pixels of the same colour."""
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, 32:] = 255  # black left half, white right half
    target = np.zeros((64, 64))
    target[:, 32:] = 1.0
    confidence = np.ones((64, 64))
    confidence[:, 24:40] = 0.0  # nothing known near the edge
    wrong = target.copy()
    wrong[:, 24:40] = 1 - wrong[:, 24:40]  # and what is there is wrong
    out = bilateral_solve(image, wrong, confidence)
    assert np.abs(out - target).max() < 0.05


def test_bool_target_and_confidence_are_accepted():
    image, disc = retina_and_disc()
    as_float = bilateral_solve(image, disc.astype(np.float64), np.ones(disc.shape, np.float32))
    np.testing.assert_array_equal(bilateral_solve(image, disc, np.ones(disc.shape, bool)), as_float)


# --- bad input --------------------------------------------------------------------------------

GOOD_IMAGE = np.zeros((8, 10, 3), np.uint8)
GOOD_PLANE = np.zeros((8, 10), np.float32)
BAD_CALLS = {
    "reference float": ((GOOD_IMAGE.astype(np.float32), GOOD_PLANE, None), TypeError, "reference_rgb"),
    "reference grey": ((GOOD_IMAGE[..., 0], GOOD_PLANE, None), ValueError, "reference_rgb"),
    "reference empty": ((GOOD_IMAGE[:0], GOOD_PLANE[:0], None), ValueError, "reference_rgb"),
    "reference list": ((GOOD_IMAGE.tolist(), GOOD_PLANE, None), TypeError, "reference_rgb"),
    "target shape": ((GOOD_IMAGE, GOOD_PLANE[:, :9], None), ValueError, "target"),
    "target uint8": ((GOOD_IMAGE, GOOD_PLANE.astype(np.uint8), None), TypeError, "target"),
    "target nan": ((GOOD_IMAGE, np.full((8, 10), np.nan), None), ValueError, "target"),
    "confidence shape": ((GOOD_IMAGE, GOOD_PLANE, np.ones((10, 8))), ValueError, "confidence"),
    "confidence int": ((GOOD_IMAGE, GOOD_PLANE, np.ones((8, 10), int)), TypeError, "confidence"),
    "confidence negative": ((GOOD_IMAGE, GOOD_PLANE, np.full((8, 10), -1.0)), ValueError, "confidence"),
    "confidence inf": ((GOOD_IMAGE, GOOD_PLANE, np.full((8, 10), np.inf)), ValueError, "confidence"),
    "confidence zero": ((GOOD_IMAGE, GOOD_PLANE, np.zeros((8, 10))), ValueError, "confidence"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_input_names_the_argument(case):
    args, error, name = BAD_CALLS[case]
    with pytest.raises(error, match=name):
        bilateral_solve(*args)


@pytest.mark.parametrize("field, value", [("sigma_spatial", 0), ("sigma_luma", -1.0), ("lam", float("nan")),
                                          ("iterations", -1), ("iterations", 2.5),
                                          ("bistochastize_iterations", True), ("cg_tol", 0.0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SolverConfig(**{field: value})


def test_defaults_are_the_reference_notebooks():
    config = SolverConfig()
    assert (config.sigma_spatial, config.sigma_luma, config.sigma_chroma, config.lam, config.iterations,
            config.bistochastize_iterations, config.cg_tol, config.a_diag_min) == (16, 16, 8, 256, 25, 10, 1e-5, 1e-5)
    assert bilateral_solve.__defaults__ == (None, config)

