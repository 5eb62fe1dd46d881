"""Images and regions at the network's resolution, backbone features, and one query scored
against many candidates in batches.

Every image, query or database, goes through the same normalisation (ImageNet mean and std,
:func:`trainer.backbone.normalise`); the authors' place-recognition script normalised database
images differently from queries, which this module cannot do.

- A database image is resized to the retrieval resolution (width x height, multiples of 16),
  aspect ratio not kept, as the authors do (640 x 640 for Brueghel, 640 x 480 for places).
- A query is a whole image, prepared like a database image (its region is every cell), or an
  image and a box. With ``box_side`` unset the box is taken on the image prepared like a
  database image (the same scale as the candidates); with ``box_side`` set, the authors'
  Brueghel protocol: the image is rescaled so that the box's longer side is ``box_side`` pixels
  (each side rounded to whole cells), then a window of the resolution is cut around the box
  (shifted to stay inside the image). The region mask is the box's cells grown by one cell.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from ..backbone import STRIDE, device_of, features
from .scoring import box_cell_mask, score_pairs, self_consistent_mask


@dataclass(frozen=True)
class Resolution:
    """Width and height, in pixels, of the images the network sees (multiples of the stride)."""

    width: int
    height: int

    def __post_init__(self):
        for name, value in (("width", self.width), ("height", self.height)):
            if not isinstance(value, int) or value < STRIDE or value % STRIDE:
                raise ValueError(f"resolution {name} must be a multiple of {STRIDE} of at least {STRIDE}, "
                                 f"got {value!r}")

    @classmethod
    def parse(cls, text: str) -> Resolution:
        """'640' (square) or '640x480' (width x height)."""
        parts = str(text).lower().split("x")
        try:
            numbers = [int(part) for part in parts]
        except ValueError:
            raise ValueError(f"resolution must be N or WxH in pixels, such as 640 or 640x480, got {text!r}") from None
        if len(numbers) not in (1, 2):
            raise ValueError(f"resolution must be N or WxH in pixels, such as 640 or 640x480, got {text!r}")
        return cls(numbers[0], numbers[-1])

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) cells of the backbone's features."""
        return self.height // STRIDE, self.width // STRIDE

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def resize_to(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8: bilinear, area averaging when shrinking by 1.5x
    or more along an axis (bilinear aliases there)."""
    shrink = image.shape[1] >= 1.5 * width or image.shape[0] >= 1.5 * height
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def database_view(image: np.ndarray, resolution: Resolution) -> np.ndarray:
    """A database image as the network sees it: (height, width, 3) uint8."""
    return resize_to(image, resolution.width, resolution.height)


def query_view(image: np.ndarray, box, resolution: Resolution, box_side: int | None = None
               ) -> tuple[np.ndarray, tuple[float, float, float, float] | None]:
    """A query as the network sees it: ((height, width, 3) uint8, its box in those pixels or None).

    ``box`` [x1, y1, x2, y2] in pixels of ``image`` or None (the whole image); see the module
    docstring for ``box_side``.
    """
    height, width = image.shape[:2]
    if box is None:
        return database_view(image, resolution), None
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise ValueError(f"box {list(box)} is not inside the {width}x{height} image")
    if box_side is None:
        sx, sy = resolution.width / width, resolution.height / height
        return database_view(image, resolution), (x1 * sx, y1 * sy, x2 * sx, y2 * sy)
    ratio = max(x2 - x1, y2 - y1) / box_side
    new_box_w = max(int(round((x2 - x1) / ratio / STRIDE)), 1) * STRIDE
    new_box_h = max(int(round((y2 - y1) / ratio / STRIDE)), 1) * STRIDE
    scale_x, scale_y = new_box_w / (x2 - x1), new_box_h / (y2 - y1)
    new_w = max(int(round(width * scale_x)), resolution.width)
    new_h = max(int(round(height * scale_y)), resolution.height)
    scale_x, scale_y = new_w / width, new_h / height
    resized = resize_to(image, new_w, new_h)
    bx1, by1, bx2, by2 = x1 * scale_x, y1 * scale_y, x2 * scale_x, y2 * scale_y
    left = int(round((bx1 + bx2) / 2 - resolution.width / 2))
    top = int(round((by1 + by2) / 2 - resolution.height / 2))
    left = min(max(left, 0), new_w - resolution.width)
    top = min(max(top, 0), new_h - resolution.height)
    crop = resized[top: top + resolution.height, left: left + resolution.width]
    return np.ascontiguousarray(crop), (bx1 - left, by1 - top, bx2 - left, by2 - top)


def region_mask(box, resolution: Resolution) -> torch.Tensor:
    """(h, w) float 0/1 region of a query: the box's cells grown by one, or every cell."""
    if box is None:
        return torch.ones(resolution.grid)
    return box_cell_mask(box, (resolution.width, resolution.height), resolution.grid, dilate=1)


class PairScorer:
    """A network with its backbone, scoring one query at a time against batches of candidates.

    ``score``: 'eq3' or 'released' (:mod:`trainer.retrieval.scoring`). Candidate features come in
    as (n, C, h, w) float16 or float32 arrays (the feature cache's rows) and are moved to the
    network's device batch by batch, so only one batch is ever there.
    """

    def __init__(self, backbone: torch.nn.Module, model: torch.nn.Module, score: str = "eq3", batch: int = 32):
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        self.backbone, self.model, self.score, self.batch = backbone, model.eval(), score, batch
        self.device = device_of(backbone)

    def query_features(self, view: np.ndarray) -> torch.Tensor:
        """(1, C, h, w) features of a prepared query view."""
        return features(self.backbone, view[None])

    @torch.no_grad()
    def query_region(self, query_feat: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """The region mask the score uses: the box's cells for 'eq3', made self-consistent for
        'released' (the authors run the query against itself first)."""
        region = region.to(self.device)
        if self.score != "released":
            return region
        self_out, self_other = self.model(query_feat, query_feat)
        return self_consistent_mask(region, self_out[0].float(), self_other[0].float())

    @torch.no_grad()
    def outputs(self, query_feat: torch.Tensor, cand_feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's (n, 3, h, w) outputs for the query against n candidates' features."""
        cand_feat = torch.as_tensor(cand_feat).to(self.device, torch.float32)
        query = query_feat.expand(len(cand_feat), -1, -1, -1)
        query_out, cand_out = self.model(query, cand_feat)
        return query_out.float(), cand_out.float()

    @torch.no_grad()
    def score_batches(self, query_feat: torch.Tensor, region: torch.Tensor,
                      candidate_batches: Iterable[np.ndarray | torch.Tensor]
                      ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """For each batch of candidate features, in order: scores (n,) float32 and the boxes
        (n, 4) float32 of the region each candidate's predicted mask covers (:func:`mask_box`)."""
        for cand_feat in candidate_batches:
            cand_feat = torch.as_tensor(cand_feat).to(self.device, torch.float32)
            if not len(cand_feat):
                continue
            query_out, cand_out = self.outputs(query_feat, cand_feat)
            query = query_feat.expand(len(cand_feat), -1, -1, -1)
            scores = score_pairs(self.score, region, query_out, cand_out, query, cand_feat)
            yield scores.float().cpu().numpy(), mask_box(cand_out[:, 2]).cpu().numpy()


def mask_box(masks: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(B, h, w) mask probabilities -> (B, 4) boxes [x1, y1, x2, y2] normalised to [0, 1] of the
    image: the cells above ``threshold``, or the single best cell when none passes."""
    batch, h, w = masks.shape
    passing = masks > threshold
    best = masks.flatten(1).argmax(dim=1)
    none = ~passing.flatten(1).any(dim=1)
    passing[none] = False
    passing.view(batch, -1)[none, best[none]] = True
    rows, cols = passing.any(dim=2), passing.any(dim=1)
    index_h, index_w = torch.arange(h, device=masks.device), torch.arange(w, device=masks.device)
    top = torch.where(rows, index_h, h).min(dim=1).values
    bottom = torch.where(rows, index_h, -1).max(dim=1).values + 1
    left = torch.where(cols, index_w, w).min(dim=1).values
    right = torch.where(cols, index_w, -1).max(dim=1).values + 1
    return torch.stack([left / w, top / h, right / w, bottom / h], dim=1).float()
