"""Pictures of what a network predicts, drawn with datagen's preview (the same look as the data)."""
from __future__ import annotations

import cv2
import numpy as np
import torch

from datagen.preview import render_pair
from datagen.schema import PairSample


def prediction_sample(src_image: np.ndarray, tgt_image: np.ndarray, src_out: torch.Tensor,
                      tgt_out: torch.Tensor, key: str = "prediction") -> PairSample:
    """A PairSample holding a prediction: images (H, W, 3) uint8; outputs (3, h, w) with x, y of
    the correspondence in the other image (normalised) and the mask probability. Pixel masks
    are the predicted masks upsampled and thresholded at 0.5."""

    def pixel_mask(out, image):
        probability = cv2.resize(out[2].numpy(), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
        return (probability > 0.5).astype(np.uint8)

    return PairSample(key=key, src_image=src_image, tgt_image=tgt_image,
                      src_mask=pixel_mask(src_out, src_image), tgt_mask=pixel_mask(tgt_out, tgt_image),
                      src_grid_mask=src_out[2].numpy(), tgt_grid_mask=tgt_out[2].numpy(),
                      src_to_tgt=src_out[:2].permute(1, 2, 0).numpy(), tgt_to_src=tgt_out[:2].permute(1, 2, 0).numpy(),
                      meta={"objects": []})


def render_prediction(src_image: np.ndarray, tgt_image: np.ndarray, src_out: torch.Tensor,
                      tgt_out: torch.Tensor, n_lines: int = 24) -> np.ndarray:
    """(H, 2W + gap, 3) uint8 RGB: both images with predicted masks and correspondence lines."""
    return render_pair(prediction_sample(src_image, tgt_image, src_out, tgt_out), n_lines=n_lines)
