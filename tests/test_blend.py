"""Blending: the fast DST solver solves OpenCV's NORMAL_CLONE equations."""
import cv2
import numpy as np
import pytest
from skimage import data

from datagen.synth.blend import blend, blend_into


@pytest.fixture(scope="module")
def images():
    target = cv2.resize(data.astronaut(), (480, 480), interpolation=cv2.INTER_AREA)
    patch = cv2.resize(data.coffee(), (220, 180), interpolation=cv2.INTER_AREA)
    mask = np.zeros((180, 220), np.uint8)
    cv2.ellipse(mask, (110, 90), (95, 75), 25, 0, 360, 255, -1)
    return target, patch, mask


@pytest.mark.parametrize("origin", [(130, 150), (0, 0), (260, 300)])
def test_poisson_matches_cv2_seamless_clone(images, origin):
    target, patch, mask = images
    ours = blend("poisson", patch, mask, target, origin).astype(int)
    theirs = blend("cv2", patch, mask, target, origin).astype(int)
    x0, y0 = origin
    box = (slice(y0, y0 + 180), slice(x0, x0 + 220))
    assert np.abs(ours[box] - theirs[box]).mean() < 1.5  # grey levels, over the patch's box
    inner = cv2.erode(mask, np.ones((9, 9), np.uint8)) > 0
    assert np.abs(ours[box][inner] - theirs[box][inner]).mean() < 1.5


def test_poisson_keeps_the_patch_gradients_and_the_target_outside(images):
    target, patch, mask = images
    out = blend("poisson", patch, mask, target, (130, 150))
    inner = cv2.erode(mask, np.ones((9, 9), np.uint8)) > 0
    region = out[150:330, 130:350].astype(float)
    # inside the mask the result is the patch up to a smooth offset: gradients match
    grad_out = np.diff(region, axis=1)[inner[:, 1:] & inner[:, :-1]]
    grad_patch = np.diff(patch.astype(float), axis=1)[inner[:, 1:] & inner[:, :-1]]
    grad_target = np.diff(target[150:330, 130:350].astype(float), axis=1)[inner[:, 1:] & inner[:, :-1]]
    assert np.abs(grad_out - grad_patch).mean() < 2.0  # rounding and clipping at 0 / 255 only
    assert np.abs(grad_target - grad_patch).mean() > 5 * np.abs(grad_out - grad_patch).mean()
    # the colours themselves are not simply pasted: they adapt to the target
    assert np.abs(region[inner] - patch[inner]).mean() > 3.0
    # far from the patch, nothing changes
    untouched = np.ones(out.shape[:2], bool)
    untouched[140:340, 120:360] = False
    assert np.array_equal(out[untouched], target[untouched])


def test_paste_copies_exactly_the_masked_pixels(images):
    target, patch, mask = images
    out = blend("paste", patch, mask, target, (10, 20))
    region = out[20:200, 10:230]
    assert np.array_equal(region[mask > 0], patch[mask > 0])
    assert np.array_equal(region[mask == 0], target[20:200, 10:230][mask == 0])


def test_patch_outside_the_target_is_refused(images):
    target, patch, mask = images
    with pytest.raises(ValueError, match="leaves"):
        blend("poisson", patch, mask, target, (400, 400))


def test_dst_solver_solves_the_normal_clone_equations_exactly():
    """On a small rectangle, the DST solution equals a direct sparse solve of the same system
    (5-point Laplacian of u = div(m grad(patch - target)), u = 0 on the boundary ring), up to the
    final rounding to uint8."""
    from scipy.sparse import diags, identity, kron
    from scipy.sparse.linalg import spsolve

    from datagen.synth.blend import _poisson_interior

    rng = np.random.default_rng(0)
    h, w = 23, 31
    target = cv2.GaussianBlur(rng.integers(60, 190, (h, w, 3)).astype(np.uint8), (5, 5), 0)
    patch = cv2.GaussianBlur(rng.integers(40, 210, (h, w, 3)).astype(np.uint8), (5, 5), 0)
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (15, 11), (12, 8), 0, 0, 360, 255, -1)
    m = cv2.erode(mask, np.ones((3, 3), np.uint8), iterations=3, borderType=cv2.BORDER_CONSTANT, borderValue=0) > 0
    delta = patch.astype(float) - target
    flux_x = m[:, :-1, None] * np.diff(delta, axis=1)
    flux_y = m[:-1, :, None] * np.diff(delta, axis=0)
    rhs = np.diff(flux_x[1:-1], axis=1) + np.diff(flux_y[:, 1:-1], axis=0)  # (h - 2, w - 2, 3)
    second = lambda n: diags([1.0, -2.0, 1.0], [-1, 0, 1], shape=(n, n))  # noqa: E731
    laplacian = (kron(identity(h - 2), second(w - 2)) + kron(second(h - 2), identity(w - 2))).tocsc()
    expected = target.astype(float)
    for c in range(3):
        expected[1:-1, 1:-1, c] += spsolve(laplacian, rhs[..., c].ravel()).reshape(h - 2, w - 2)
    expected = np.clip(np.rint(expected), 0, 255)
    ours = target.copy()
    ours[1:-1, 1:-1] = _poisson_interior(patch, target, mask)
    assert np.abs(ours.astype(int) - expected).max() <= 1
    assert np.abs(ours.astype(int) - expected).mean() < 0.01
    assert np.abs(ours.astype(int) - target).max() > 10  # the patch did change the region


@pytest.mark.parametrize("method", ["poisson", "cv2", "paste"])
def test_blend_into_changes_the_target_in_place_as_blend_returns_it(images, method):
    target, patch, mask = images
    expected = blend(method, patch, mask, target, (130, 150))
    assert not np.array_equal(expected, target)
    changed = target.copy()
    assert blend_into(method, patch, mask, changed, (130, 150)) is None
    np.testing.assert_array_equal(changed, expected)
