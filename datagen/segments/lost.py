"""LOST (Siméoni et al., BMVC 2021): one object of an image from its self-supervised patch features.

With F the (N, d) patch features (DINO's last-layer keys) and A = F Fᵀ their similarities:

1. degree(p) = number of positive entries of row p of A, the diagonal excluded: how many patches
   look like p. Objects cover fewer patches than the background, so the *seed* is the patch of
   lowest degree (ties: the lowest index).
2. Among the k patches of lowest degree (the seed first), those positively correlated with the
   seed are kept; their summed similarity rows, thresholded at 0, give a map whose 4-connected
   component containing the seed is the coarse object mask. LOST's box is its bounding box.

The seed's own map value is the sum of positive similarities, so it is in the map unless its
feature is zero (then the mask is the seed alone).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

K_PATCHES = 100


@dataclass(frozen=True)
class LostResult:
    """LOST's answer on an (h, w) patch grid.

    seed: row-major index of the seed patch. mask: (h, w) bool coarse object mask. score: LOST's
    score, ``1 - degree(seed) / (N - 1)``, the fraction of the other patches that are *not*
    positively correlated with the seed, in [0, 1] (higher: a more distinctive seed). degree: the
    seed's degree. similar: indices of the kept low-degree patches (the seed among them).
    """

    seed: int
    mask: np.ndarray
    score: float
    degree: int
    similar: tuple

    @property
    def box(self) -> tuple[int, int, int, int]:
        """LOST's box (x0, y0, x1, y1) in patches, x1/y1 exclusive: the mask's bounding box."""
        ys, xs = np.nonzero(self.mask)
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def degrees(similarity: torch.Tensor) -> torch.Tensor:
    """(N, N) similarity -> (N,) int64: positive entries of each row, the diagonal excluded."""
    positive = similarity > 0
    return positive.sum(dim=1) - positive.diagonal().long()


def lost(features, grid: tuple[int, int], k: int = K_PATCHES) -> LostResult:
    """LOST on ``features`` ((h * w, d) float, tensor on any device or numpy, row-major over the
    ``grid`` (h, w) of patches); ``k`` low-degree patches are considered for the seed expansion."""
    features = torch.as_tensor(features).float()
    height, width = grid
    count = features.shape[0]
    if features.ndim != 2 or count != height * width:
        raise ValueError(f"features must be (h * w, d) = ({height * width}, d), got {tuple(features.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    similarity = features @ features.T
    degree = degrees(similarity)
    order = torch.argsort(degree, stable=True)  # ascending degree, ties by index
    seed = int(order[0])
    candidates = order[:k]
    similar = candidates[similarity[seed, candidates] > 0]
    attention_map = similarity[similar].sum(dim=0).reshape(height, width)
    positive = (attention_map > 0).cpu().numpy()
    labels, _ = ndimage.label(positive)  # 4-connectivity
    seed_yx = divmod(seed, width)
    if labels[seed_yx] == 0:
        mask = np.zeros((height, width), bool)
        mask[seed_yx] = True
    else:
        mask = labels == labels[seed_yx]
    seed_degree = int(degree[seed])
    return LostResult(seed=seed, mask=mask, score=1.0 - seed_degree / max(count - 1, 1), degree=seed_degree,
                      similar=tuple(int(i) for i in similar.cpu()))
