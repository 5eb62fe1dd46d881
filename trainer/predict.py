"""Run a trained network on two image files: masks, correspondences and the Eq. 3 score.

Both images (any size) are resized to the checkpoint's ``image_size`` square, as in training;
the network's grid outputs are drawn on the resized images (``pair.png``) and its masks are
upsampled to each original image's size (``masks.png``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from datagen.format.draw import GAP
from datagen.format.imageio import load_rgb, resize_image

from .evaluate import features, run_pair
from .inference import load_for_inference
from .visual import nothing_passes, render_prediction


@dataclass
class Prediction:
    """The network's view of one image pair: outputs (3, h, w) on the CPU (x, y of the
    correspondence in the other image, mask probability) and the Eq. 3 score."""

    src_out: torch.Tensor
    tgt_out: torch.Tensor
    score: float


@torch.no_grad()
def predict_pair(backbone: torch.nn.Module, model: torch.nn.Module, src_image: np.ndarray,
                 tgt_image: np.ndarray) -> Prediction:
    """Outputs and score of one pair of (S, S, 3) uint8 images already at the network's size."""
    src_out, tgt_out, score = run_pair(model, features(backbone, src_image[None]), features(backbone, tgt_image[None]))
    return Prediction(src_out[0].cpu(), tgt_out[0].cpu(), float(score[0]))


def mask_picture(mask: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(h, w) mask probabilities -> (H, W) uint8 greyscale (0..255) of ``size`` = (H, W), bilinear."""
    upsampled = cv2.resize(mask.numpy().astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return np.clip(np.rint(upsampled * 255), 0, 255).astype(np.uint8)


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = GAP) -> np.ndarray:
    """Two (H, W) uint8 pictures on one canvas of height max(H) and width W1 + gap + W2: a white
    gap between them, black (mask 0) below the shorter one."""
    height = max(left.shape[0], right.shape[0])
    canvas = np.zeros((height, left.shape[1] + gap + right.shape[1]), np.uint8)
    canvas[:, left.shape[1]: left.shape[1] + gap] = 255
    canvas[: left.shape[0], : left.shape[1]] = left
    canvas[: right.shape[0], left.shape[1] + gap:] = right
    return canvas


def write_png(path: Path, image: np.ndarray) -> None:
    """Write (H, W) grey or (H, W, 3) RGB uint8 as PNG."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"{path}: cannot encode PNG")
    Path(path).write_bytes(data.tobytes())


def predict_files(image_a, image_b, checkpoint, out_dir, device: str = "auto", n_lines: int = 24) -> dict:
    """Predict on two image files with a checkpoint; writes ``pair.png``, ``masks.png`` and
    ``result.json`` into ``out_dir`` and returns the contents of ``result.json``.

    Raises :class:`datagen.format.imageio.BadInput` for an unreadable image and
    :class:`trainer.loop.ResumeError` for a file that is not a trainer checkpoint (both name the file).
    """
    originals = [load_rgb(image_a), load_rgb(image_b)]  # bad images fail before the checkpoint is read
    config, backbone, model, step, backbone_record = load_for_inference(checkpoint, device)
    resized = [resize_image(image, config.image_size) for image in originals]
    prediction = predict_pair(backbone, model, *resized)
    src_mask, tgt_mask = prediction.src_out[2], prediction.tgt_out[2]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_png(out / "pair.png", render_prediction(resized[0], resized[1], prediction.src_out, prediction.tgt_out,
                                                  n_lines=n_lines))
    write_png(out / "masks.png", side_by_side(mask_picture(src_mask, originals[0].shape[:2]),
                                              mask_picture(tgt_mask, originals[1].shape[:2])))
    result = {
        "score": prediction.score,
        "checkpoint": str(Path(checkpoint).resolve()),
        "step": step,
        "image_size": config.image_size,
        "images": [str(Path(image_a).resolve()), str(Path(image_b).resolve())],
        "image_shapes": [list(image.shape[:2]) for image in originals],
        "mask_mean": [float(src_mask.mean()), float(tgt_mask.mean())],
        "mask_max": [float(src_mask.max()), float(tgt_mask.max())],
        "nothing_passes": nothing_passes(src_mask.numpy(), tgt_mask.numpy()),
        "score_max": (config.grid_size ** 2),
        "backbone": backbone_record,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
