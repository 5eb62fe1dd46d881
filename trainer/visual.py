"""Pictures of what a network predicts, drawn with datagen's preview (the same look as the data).

A prediction's masks are soft: a network early in training, or a pair with nothing in common,
may have no cell above 0.5. The pictures therefore show the mask probabilities as a heat map
over each image (so something is always drawn), outline the cells above the threshold, and say
in the label how many cells pass it and the highest value.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from datagen.format.draw import render_pair
from datagen.format.schema import PairSample

THRESHOLD = 0.5
HEAT_ALPHA = 0.55
"""Weight of the heat map over the image."""


def heat_map(image: np.ndarray, probability: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB: ``image`` under the inferno colour map (black 0 -> yellow 1) of the
    (h, w) mask probabilities in [0, 1], upsampled bilinearly to the image's size."""
    height, width = image.shape[:2]
    upsampled = cv2.resize(np.asarray(probability, np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    levels = np.clip(np.rint(upsampled * 255), 0, 255).astype(np.uint8)
    colours = cv2.applyColorMap(levels, cv2.COLORMAP_INFERNO)[:, :, ::-1]
    return cv2.addWeighted(image, 1 - HEAT_ALPHA, np.ascontiguousarray(colours), HEAT_ALPHA, 0)


def mask_summary(src_mask, tgt_mask, threshold: float = THRESHOLD) -> str:
    """'cells > 0.5: 12 | 0 of 900 (max 0.81 | 0.43)' for two (h, w) mask probability grids."""
    src_mask, tgt_mask = np.asarray(src_mask, np.float32), np.asarray(tgt_mask, np.float32)
    return (f"cells > {threshold:g}: {int((src_mask > threshold).sum())} | {int((tgt_mask > threshold).sum())} "
            f"of {src_mask.size} (max {float(src_mask.max()):.2f} | {float(tgt_mask.max()):.2f})")


def nothing_passes(src_mask, tgt_mask, threshold: float = THRESHOLD) -> bool:
    """True when no cell of either mask passes ``threshold``: a thresholded picture would be empty."""
    return not (np.asarray(src_mask) > threshold).any() and not (np.asarray(tgt_mask) > threshold).any()


def prediction_sample(src_image: np.ndarray, tgt_image: np.ndarray, src_out: torch.Tensor,
                      tgt_out: torch.Tensor, key: str = "prediction") -> PairSample:
    """A PairSample holding a prediction: images (H, W, 3) uint8; outputs (3, h, w) with x, y of
    the correspondence in the other image (normalised) and the mask probability. Pixel masks
    are the predicted masks upsampled and thresholded at 0.5."""

    def pixel_mask(out, image):
        probability = cv2.resize(out[2].numpy(), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
        return (probability > THRESHOLD).astype(np.uint8)

    return PairSample(key=key, src_image=src_image, tgt_image=tgt_image,
                      src_mask=pixel_mask(src_out, src_image), tgt_mask=pixel_mask(tgt_out, tgt_image),
                      src_grid_mask=src_out[2].numpy(), tgt_grid_mask=tgt_out[2].numpy(),
                      src_to_tgt=src_out[:2].permute(1, 2, 0).numpy(), tgt_to_src=tgt_out[:2].permute(1, 2, 0).numpy(),
                      meta={"objects": []})


def render_prediction(src_image: np.ndarray, tgt_image: np.ndarray, src_out: torch.Tensor,
                      tgt_out: torch.Tensor, n_lines: int = 24) -> np.ndarray:
    """(H, 2W + gap, 3) uint8 RGB: both images under heat maps of their predicted masks, the
    cells above 0.5 outlined, correspondence lines from source cells above 0.5, and a label with
    :func:`mask_summary`."""
    src_out, tgt_out = src_out.float(), tgt_out.float()
    sample = prediction_sample(heat_map(src_image, src_out[2].numpy()), heat_map(tgt_image, tgt_out[2].numpy()),
                               src_out, tgt_out, key=mask_summary(src_out[2].numpy(), tgt_out[2].numpy()))
    return render_pair(sample, n_lines=n_lines)
