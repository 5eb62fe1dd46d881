"""A small collection where one object was pasted into several images, made with datagen's pair
builder, and the predictions a perfect network would make on it (its ground-truth
correspondences standing in for the network's)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from datagen.config import BuildConfig
from datagen.format.imageio import load_rgb, resize_image
from datagen.synth.pairs import PairBuilder, Rejected
from datagen.synth.sampling import Sampler, attempt_rng
from trainer.discovery.pairs import Predictions

SAMPLE = Path(__file__).resolve().parents[1] / "datagen" / "sample_data" / "coco"


@dataclass
class Collection:
    """``images`` (N, S, S, 3) uint8; ``truth`` (N, S, S) bool, the pasted object (image 0: the
    source it was cut from; then its copies; then distractors without it); ``to_source`` (N, h, w,
    2) each cell's place in the source image (x, y in [0, 1]) and ``on_object`` (N, h, w) float
    grid masks, for the oracle."""

    images: np.ndarray
    truth: np.ndarray
    to_source: np.ndarray
    on_object: np.ndarray
    source_to: np.ndarray
    """(N, h, w, 2): for each image, where each source cell lands in it (x, y in [0, 1])."""

    @property
    def names(self) -> list[str]:
        return [f"img{i:02d}.jpg" for i in range(len(self.images))]

    def write(self, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, image in zip(self.names, self.images):
            cv2.imwrite(str(folder / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
            paths.append(folder / name)
        return paths


def repeated_object_collection(bank, copies: int = 5, distractors: int = 3, size: int = 128,
                               seed: int = 0) -> Collection:
    """One segment of the sample pasted (each time with its own warp) into ``copies`` backgrounds
    that hold no annotation of its category, plus ``distractors`` other backgrounds."""
    config = BuildConfig(image_size=size, style="none")
    sampler, builder = Sampler(bank, config), PairBuilder(bank, SAMPLE / "train2017", config)
    attempt = 0
    while True:  # the first plan whose segment is large enough to be kept
        first = dataclasses.replace(sampler.plan(attempt_rng(seed, 0, attempt), 1), border_crop=False)
        attempt += 1
        try:
            builder.build(first, "first")
            break
        except Rejected:
            continue
    category = int(bank.category_ids[first.objects[0].segment_row])
    backgrounds = [int(i) for i in bank.images.image_ids
                   if int(i) != first.source_image and category not in bank.annotated_categories_of_image(int(i))]
    samples, used = [], []
    for number, background in enumerate(backgrounds, start=attempt):
        if len(samples) == copies:
            break
        warp = sampler.plan(attempt_rng(seed, 1, number), 1).objects[0]  # a warp of its own
        plan = dataclasses.replace(first, background_image=background, border_crop=False,
                                   objects=(dataclasses.replace(warp, segment_row=first.objects[0].segment_row),))
        try:
            samples.append(builder.build(plan, f"copy{len(samples)}"))
        except Rejected:
            continue
        used.append(background)
    if len(samples) < copies:
        raise ValueError(f"only {len(samples)} copies of the object could be made")
    others = [i for i in backgrounds if i not in used]
    backgrounds = [resize_image(load_rgb(SAMPLE / "train2017" / bank.image_path(i)), size)
                   for i in others[:distractors]]
    h = w = config.grid_size
    xs, ys = (np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h
    identity = np.stack(np.meshgrid(xs, ys), axis=-1).astype(np.float32)
    source = samples[0]
    images = [source.src_image] + [s.tgt_image for s in samples] + backgrounds
    truth = [source.src_mask > 0] + [s.tgt_mask > 0 for s in samples] + [np.zeros((size, size), bool)] * len(
        backgrounds)
    to_source = [identity] + [s.tgt_to_src for s in samples] + [identity] * len(backgrounds)
    source_to = [identity] + [s.src_to_tgt for s in samples] + [identity] * len(backgrounds)
    on_source = np.asarray(source.src_grid_mask, np.float32)
    on_object = [on_source] + [np.asarray(s.tgt_grid_mask, np.float32) for s in samples] + [
        np.zeros((h, w), np.float32)] * len(backgrounds)
    return Collection(np.stack(images), np.stack(truth), np.stack(to_source).astype(np.float32),
                      np.stack(on_object), np.stack(source_to).astype(np.float32))


def _sample(field: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Bilinear samples of an (h, w, c) grid field at (..., 2) points in [0, 1] (cell centres at
    (i + 0.5) / w, as the shards'), zeros outside."""
    values = torch.from_numpy(np.ascontiguousarray(field.transpose(2, 0, 1)))[None].float()
    grid = torch.from_numpy(points.reshape(1, -1, 1, 2)).float() * 2 - 1
    sampled = F.grid_sample(values, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return sampled[0, :, :, 0].T.reshape(*points.shape[:-1], field.shape[2]).numpy()


def oracle_output(collection: Collection, a: int, b: int) -> np.ndarray:
    """(3, h, w): a perfect network's output for image ``a`` towards image ``b``: each cell of the
    object sent through the source to where it lies in ``b``, the mask 1 where the object is in
    both (zero for a distractor)."""
    at_source = collection.to_source[a]  # (h, w, 2): each cell's place in the source
    in_b = at_source if b == 0 else _sample(collection.source_to[b], at_source)
    on_source = _sample(collection.on_object[0][..., None], at_source)[..., 0]
    on_b = _sample(collection.on_object[b][..., None], in_b)[..., 0]
    mask = collection.on_object[a] * (on_source > 0.5) * (on_b > 0.5)
    return np.concatenate([np.clip(in_b, 0, 1).transpose(2, 0, 1), mask[None]]).astype(np.float32)


def oracle_predictions(collection: Collection, pairs) -> Predictions:
    """Predictions of ``pairs`` ((P, 2), i < j) by the oracle, scores = the mean of the masks."""
    out_ij = np.stack([oracle_output(collection, i, j) for i, j in pairs]).astype(np.float16)
    out_ji = np.stack([oracle_output(collection, j, i) for i, j in pairs]).astype(np.float16)
    scores = np.stack([out_ij[:, 2].reshape(len(pairs), -1).sum(1), out_ji[:, 2].reshape(len(pairs), -1).sum(1)],
                      axis=1).astype(np.float32)
    return Predictions(np.asarray(pairs, np.int32), out_ij, out_ji, scores)
