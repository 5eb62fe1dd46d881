"""One mask per image from its foreground potential: the potential seeds GrabCut (paper section 5.2).

The potential of an image is a (h, w) grid of non-negative scores (the graph's eigenvector summed
over the vertices that fall in each cell; zero where no vertex falls). It is upsampled bilinearly
to the image (half-pixel centres, as ``torch.nn.functional.interpolate(..., align_corners=False)``
and :func:`trainer.visual.heat_map`) and turned into GrabCut's four labels
(:func:`grabcut_seed`):

- ``cv2.GC_FGD`` (1), definite foreground: potential above ``fg_ratio`` times its maximum;
- ``cv2.GC_PR_FGD`` (3), probable foreground: positive potential up to that threshold;
- ``cv2.GC_PR_BGD`` (2), probable background: the ring that a ``dilate`` x ``dilate`` square
  dilation adds around the positive support;
- ``cv2.GC_BGD`` (0), definite background: everything else.

GrabCut (``iterations`` rounds, ``cv2.GC_INIT_WITH_MASK``) then returns the pixels labelled
``GC_FGD`` or ``GC_PR_FGD`` as the mask (:func:`cosegment`).

Differences from the authors' release (``evalInt/Discovery_3Cycles.py``, ``soft2binarymask``),
all on edge cases: a pixel exactly at the threshold is probable foreground here (there it keeps
the definite-background label); GrabCut's random state is seeded here (``cv2.setRNGSeed``), so a
mask does not depend on what ran before it; and where GrabCut cannot run (no background sample:
the potential is positive on the whole image) the seed's foreground is returned and flagged,
where the release stops with OpenCV's assertion.
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np

GC_LABEL_NAMES = {cv2.GC_BGD: "GC_BGD", cv2.GC_FGD: "GC_FGD", cv2.GC_PR_BGD: "GC_PR_BGD",
                  cv2.GC_PR_FGD: "GC_PR_FGD"}
"""cv2's names of GrabCut's labels: 0 definite background, 1 definite foreground, 2 probable
background, 3 probable foreground."""

FOREGROUND_LABELS = (cv2.GC_FGD, cv2.GC_PR_FGD)
BACKGROUND_LABELS = (cv2.GC_BGD, cv2.GC_PR_BGD)


@dataclasses.dataclass(frozen=True)
class CosegOptions:
    """Settings of :func:`cosegment`; the defaults are the authors' (``--fg-th 0.6 --dilate 10``,
    5 GrabCut iterations). ``seed`` seeds OpenCV's random state before each GrabCut."""

    fg_ratio: float = 0.6
    dilate: int = 10
    iterations: int = 5
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= float(self.fg_ratio) <= 1.0:
            raise ValueError(f"fg_ratio must be in [0, 1], got {self.fg_ratio}")
        if isinstance(self.dilate, bool) or not isinstance(self.dilate, (int, np.integer)) or self.dilate < 0:
            raise ValueError(f"dilate must be an integer >= 0, got {self.dilate!r}")
        if (isinstance(self.iterations, bool) or not isinstance(self.iterations, (int, np.integer))
                or self.iterations < 1):
            raise ValueError(f"iterations must be an integer >= 1, got {self.iterations!r}")

    def run(self, image: np.ndarray, potential: np.ndarray) -> CosegResult:
        """:func:`cosegment` with these settings."""
        return cosegment(image, potential, **dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class CosegResult:
    """What :func:`cosegment` found for one image.

    ``mask``: (H, W) bool foreground. ``grabcut``: True when GrabCut ran; False when the mask is
    the seed's foreground (``GC_FGD`` or ``GC_PR_FGD`` labels) because GrabCut could not run,
    ``note`` then says why (``None`` otherwise). A potential with no positive value gives an empty
    mask, ``grabcut`` False and a note.
    """

    mask: np.ndarray
    grabcut: bool
    note: str | None = None


def _check_potential(potential) -> np.ndarray:
    potential = np.asarray(potential)
    if potential.ndim != 2 or potential.size == 0:
        raise ValueError(f"potential must be a non-empty (h, w) array, got shape {potential.shape}")
    if not np.issubdtype(potential.dtype, np.number) or np.issubdtype(potential.dtype, np.complexfloating):
        raise ValueError(f"potential must hold real numbers, got {potential.dtype}")
    potential = potential.astype(np.float32)
    if not np.isfinite(potential).all():
        raise ValueError("potential holds NaN or infinite values")
    return potential


def grabcut_seed(potential: np.ndarray, fg_ratio: float = 0.6, dilate: int = 10) -> np.ndarray:
    """(H, W) uint8 GrabCut labels of a (H, W) potential (already at the image's size).

    With ``top = potential.max()``: ``GC_FGD`` (1) where ``potential > fg_ratio * top``;
    ``GC_PR_FGD`` (3) where ``0 < potential <= fg_ratio * top``; ``GC_PR_BGD`` (2) on the ring that
    ``cv2.dilate`` with a ``dilate`` x ``dilate`` square (anchor at its centre, so for an even side
    the ring reaches one pixel further right and down than left and up) adds to the positive
    support; ``GC_BGD`` (0) elsewhere. ``dilate`` of 0 or 1 gives no ring. A potential with no
    positive value gives all ``GC_BGD``. Negative values count as zero.
    """
    CosegOptions(fg_ratio=fg_ratio, dilate=dilate)  # validates
    potential = _check_potential(potential)
    labels = np.full(potential.shape, cv2.GC_BGD, np.uint8)
    positive = potential > 0
    if not positive.any():
        return labels
    if dilate > 1:
        grown = cv2.dilate(positive.astype(np.uint8), np.ones((dilate, dilate), np.uint8)).astype(bool)
        labels[grown & ~positive] = cv2.GC_PR_BGD
    threshold = np.float32(fg_ratio) * potential.max()
    labels[positive] = cv2.GC_PR_FGD
    labels[potential > threshold] = cv2.GC_FGD
    return labels


def upsample(potential: np.ndarray, height: int, width: int) -> np.ndarray:
    """(height, width) float32: the (h, w) potential upsampled bilinearly (half-pixel centres)."""
    potential = _check_potential(potential)
    return cv2.resize(potential, (int(width), int(height)), interpolation=cv2.INTER_LINEAR)


def cosegment(image: np.ndarray, potential: np.ndarray, fg_ratio: float = 0.6, dilate: int = 10,
              iterations: int = 5, seed: int = 0) -> CosegResult:
    """The foreground of ``image`` ((H, W, 3) uint8 RGB) that its (h, w) ``potential`` points at.

    The potential is upsampled bilinearly to (H, W), seeded with :func:`grabcut_seed` and refined
    by ``iterations`` rounds of ``cv2.grabCut`` (on the image in BGR order, as OpenCV expects;
    GrabCut's colour models are learnt from the image, so the order only matters for agreement
    with other code). OpenCV's random state (used by GrabCut's k-means initialisation) is set with
    ``cv2.setRNGSeed(seed)`` just before, so the result depends only on the inputs; this resets
    the calling thread's OpenCV RNG as a side effect.

    Returns a :class:`CosegResult`; where GrabCut cannot run (no positive potential: empty mask;
    no background or no foreground sample; OpenCV refusing the input) its ``grabcut`` is False,
    its mask the seed's foreground and its ``note`` the reason.
    """
    CosegOptions(fg_ratio=fg_ratio, dilate=dilate, iterations=iterations, seed=seed)  # validates
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) == 0:
        raise ValueError(f"image must be a non-empty (H, W, 3) uint8 RGB array, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    labels = grabcut_seed(upsample(potential, height, width), fg_ratio, dilate)
    seed_foreground = np.isin(labels, FOREGROUND_LABELS)
    if not seed_foreground.any():
        return CosegResult(seed_foreground, False, "no positive potential: empty mask")
    if not np.isin(labels, BACKGROUND_LABELS).any():
        return CosegResult(seed_foreground, False,
                           "no background sample (the potential is positive on the whole image): "
                           "GrabCut cannot run, the seed's foreground is kept")
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    work = labels.copy()
    background_model = np.zeros((1, 65), np.float64)
    foreground_model = np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(int(seed))
    try:
        cv2.grabCut(bgr, work, None, background_model, foreground_model, int(iterations), cv2.GC_INIT_WITH_MASK)
    except cv2.error as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        return CosegResult(seed_foreground, False, f"GrabCut failed ({reason}): the seed's foreground is kept")
    return CosegResult(np.isin(work, FOREGROUND_LABELS), True, None)
