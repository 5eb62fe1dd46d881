"""The pair builder: executes a :class:`~datagen.synth.sampling.PairPlan` into a :class:`PairSample`.

Paper section 3.1: a segment (dilated) is cut from the source image, warped (aspect, rotation,
scale, optional thin-plate spline), blended into a background image that contains none of its
category, and the correspondences of the composed warp are recorded on the network's grid in
both directions, with cycle-consistent soft masks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from datagen import __version__
from datagen.config import BuildConfig
from datagen.format.grids import grids_from_warps
from datagen.format.imageio import BadInput, load_rgb, resize_image
from datagen.format.schema import PairSample
from datagen.format.warps import SegmentWarp, ThinPlateSpline
from datagen.synth.blend import blend_into
from datagen.synth.geometry import mask_boundary, place_in_region, roi_resampler, rotation_aspect_matrix
from datagen.synth.memory import keep_freed_memory
from datagen.synth.sampling import ObjectPlan, PairPlan


class Rejected(Exception):
    """An attempted pair that is dropped; ``reason`` is a short code, ``detail`` a message."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class StageTimer:
    """Seconds spent per stage, accumulated over many pairs (for benchmarks and logs)."""

    seconds: dict = field(default_factory=dict)

    def add(self, stage: str, start: float) -> float:
        """Add the time since ``start`` to ``stage``; returns now, the next stage's start."""
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - start
        return now


def dilate(mask: np.ndarray, radius: int, shape: str = "diamond") -> np.ndarray:
    """Dilate a (H, W) 0/1 uint8 mask by ``radius`` pixels, working on the mask's box only.

    ``shape`` 'diamond' (the released generator's ``binary_dilation`` with ``radius`` iterations
    of a 3 x 3 cross): every pixel within L1 distance ``radius`` of the mask, from OpenCV's exact
    L1 distance transform (one pass instead of ``radius``; tested equal to the iterated cross).
    'disc': within Euclidean distance ``radius``, through the distance transform with OpenCV's
    5 x 5 approximation."""
    if radius <= 0:
        return mask
    if shape not in ("diamond", "disc"):
        raise ValueError(f"unknown dilation shape {shape!r}; choose diamond or disc")
    x, y, w, h = cv2.boundingRect(mask)
    x0, y0 = max(0, x - radius), max(0, y - radius)
    x1, y1 = min(mask.shape[1], x + w + radius), min(mask.shape[0], y + h + radius)
    out = mask.copy()
    if shape == "diamond":
        distance = cv2.distanceTransform(1 - mask[y0:y1, x0:x1], cv2.DIST_L1, 3)
    else:
        distance = cv2.distanceTransform(1 - mask[y0:y1, x0:x1], cv2.DIST_L2, cv2.DIST_MASK_5)
    out[y0:y1, x0:x1] = distance <= radius
    return out


def border_crop_box(mask: np.ndarray) -> tuple:
    """(x0, y0, x1, y1) crop of the image so that the mask touches its nearest border."""
    height, width = mask.shape
    x, y, w, h = cv2.boundingRect(mask)
    gaps = [x, width - (x + w), y, height - (y + h)]
    side = int(np.argmin(gaps))  # left, right, top, bottom
    box = [0, 0, width, height]  # x0, y0, x1, y1
    box[(0, 2, 1, 3)[side]] = (x, x + w, y, y + h)[side]
    return tuple(box)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A (H, W) uint8 0/1 mask resized to (size, size) uint8 0/1: 1 where its bilinear
    interpolation is at least 1/2. Interpolated as 0/255 in OpenCV's fixed-point uint8
    arithmetic (faster than in float), which decides within 0.001 of 1/2 (tested). Not on the
    0/1 values themselves: OpenCV's uint8 path loses their precision."""
    resized = cv2.resize(mask * np.uint8(255), (size, size), interpolation=cv2.INTER_LINEAR)
    return cv2.threshold(resized, 127, 1, cv2.THRESH_BINARY)[1]


def make_warp(obj: ObjectPlan, boundary: np.ndarray, src_size: tuple, region: tuple,
              config: BuildConfig) -> tuple[SegmentWarp, np.ndarray]:
    """The composed warp of one segment (aspect, rotation, optional TPS, scale into its region).

    ``boundary`` (N, 2) continuous source pixels on the segment's outline; ``src_size`` (W, H).
    Returns the warp and the outline in target pixels.
    """
    tps = None
    if obj.tps_grid:
        rng = np.random.default_rng(obj.tps_seed)
        tps = ThinPlateSpline.random_unfolded(rng, obj.tps_grid, config.warp.tps_jitter)
        if tps is None:
            raise Rejected("tps_folded", f"20 draws of a {obj.tps_grid}x{obj.tps_grid} spline all fold")
    shape = rotation_aspect_matrix(obj.angle_deg, obj.aspect_x, obj.aspect_y)
    return place_in_region(shape, boundary, tps, src_size, region, obj.ratio, obj.position)


class PairBuilder:
    """Builds pairs from plans; holds the bank, image root and config of one worker."""

    def __init__(self, bank, image_root, config: BuildConfig):
        self.bank = bank
        self.image_root = image_root
        self.config = config
        self.timer = StageTimer()
        keep_freed_memory()  # this process builds pairs: reuse freed memory (see datagen.synth.memory)

    def _load(self, image_id: int) -> np.ndarray:
        """The image as (H, W, 3) uint8 RGB, checked against its declared size."""
        try:
            return load_rgb(Path(self.image_root) / self.bank.image_path(image_id),
                            min_side=self.config.min_image_side, max_pixels=self.config.max_image_pixels,
                            expected_size=self.bank.image_size(image_id))
        except BadInput as error:
            raise Rejected("bad_image", str(error)) from error

    def build(self, plan: PairPlan, key: str) -> PairSample:
        """Execute ``plan``; raises :class:`Rejected` for a pair that must be dropped.

        Masks, warps and correspondences come first, from the bank's masks alone: every check
        that can reject a pair is made before any image is decoded (few one-object attempts are
        rejected, most two-object ones: their segments touch, or their grid masks share a cell)."""
        config, size = self.config, self.config.image_size
        start = time.perf_counter()
        masks = self._dilated_masks(plan)
        height, width = masks[0].shape  # the source's declared size, checked when it is loaded
        crop = border_crop_box(masks[0]) if plan.border_crop else (0, 0, width, height)
        x0, y0, x1, y1 = crop
        object_masks = [resize_mask(mask[y0:y1, x0:x1], size) for mask in masks]
        if len(masks) == 2 and np.any(dilate(object_masks[0], 1) & object_masks[1]):
            raise Rejected("masks_touch", "the two source segments touch after resizing")
        src_mask = object_masks[0].copy()  # 0/1: object 1's id where it is
        for k, object_mask in enumerate(object_masks[1:], 1):
            np.copyto(src_mask, np.uint8(k + 1), where=object_mask > 0)

        warps, placements, tgt_mask = [], [], np.zeros((size, size), np.uint8)
        for k, (obj, region, object_mask) in enumerate(zip(plan.objects, plan.regions, object_masks)):
            if not object_mask.any():
                segment = self.bank.segment_ids[obj.segment_row]
                raise Rejected("empty_segment", f"segment {segment} vanishes at {size} px")
            warp, outline = make_warp(obj, mask_boundary(object_mask), (size, size), region, config)
            roi = self._roi(outline)
            resample = roi_resampler(warp, roi)
            patch_mask = resample(object_mask * 255, cv2.BORDER_CONSTANT)
            patch_mask = cv2.threshold(patch_mask, 127, 255, cv2.THRESH_BINARY)[1]  # >= 128 -> 255, else 0
            patch_mask[[0, -1], :] = 0
            patch_mask[:, [0, -1]] = 0
            placed = tgt_mask[roi[1]:roi[3], roi[0]:roi[2]]
            if k > 0 and np.any(dilate((placed > 0).astype(np.uint8), 1) & (patch_mask > 0)):  # k = 0: none placed
                raise Rejected("masks_touch", "the two warped segments touch in the target")
            np.copyto(placed, np.uint8(k + 1), where=patch_mask > 0)
            warps.append(warp)
            placements.append((resample, patch_mask, roi[:2]))
        start = self.timer.add("warp", start)

        grids = self._grids(warps, src_mask)
        start = self.timer.add("correspondences", start)

        source = self._load(plan.source_image)
        src_image = resize_image(source[y0:y1, x0:x1], size)
        tgt_image = resize_image(self._load(plan.background_image), size)
        start = self.timer.add("load", start)
        for resample, patch_mask, origin in placements:
            patch = resample(src_image, cv2.BORDER_REPLICATE)
            start = self.timer.add("warp", start)
            blend_into(config.blend, patch, patch_mask, tgt_image, origin)  # the builder's own image
            start = self.timer.add("blend", start)
        meta = self._meta(plan, key, crop, warps)
        return PairSample(key=key, src_image=src_image, tgt_image=tgt_image, src_mask=src_mask,
                          tgt_mask=tgt_mask, meta=meta, **grids)

    def _grids(self, warps: list, src_mask: np.ndarray) -> dict:
        """The pair's grid fields (:func:`~datagen.format.grids.grids_from_warps`), after the
        released generator's checks: each object's grid mask covers ``min_mask_cells`` in both
        images, and the two objects' grid masks share no cell in either image (a cell where both
        are non-zero); a pair that fails one, or whose TPS inverse is off, is rejected.

        Two objects are gridded one at a time (the same arithmetic as grids_from_warps, which
        loops over them), for the checks; the pair's fields are then theirs put together: with
        no shared cell, grids_from_warps's sum of the masks and its choice of flow per cell come
        down to taking, in each cell, the one object present (tested equal)."""
        config, size = self.config, self.config.image_size
        grid_shape = (config.grid_size, config.grid_size)
        if len(warps) == 1:
            per_object = [grids_from_warps(warps, src_mask, grid_shape, (size, size))]
        else:
            per_object = [grids_from_warps([warp], (src_mask == k + 1).view(np.uint8), grid_shape, (size, size))
                          for k, warp in enumerate(warps)]
        round_trip = max(grids.pop("round_trip_cells") for grids in per_object)
        if round_trip > config.max_tps_inverse_error:
            raise Rejected("tps_not_invertible", f"the thin-plate spline's numerical inverse is off by "
                           f"{round_trip:.3g} cells")
        for k, grids in enumerate(per_object):
            for side in ("src", "tgt"):
                cells = float(grids[f"{side}_grid_mask"].sum())
                if cells < config.min_mask_cells:
                    which = f"object {k + 1}'s " if len(per_object) > 1 else ""
                    raise Rejected("small_mask", f"{which}{side} grid mask covers {cells:.1f} cells "
                                   f"(< {config.min_mask_cells})")
        if len(per_object) == 1:
            return per_object[0]
        first, second = per_object
        for side in ("src", "tgt"):
            shared = int(np.count_nonzero((first[f"{side}_grid_mask"] > 0) & (second[f"{side}_grid_mask"] > 0)))
            if shared:
                raise Rejected("masks_share_cell", f"the two objects' {side} grid masks share {shared} cell(s)")
        merged = {}
        for side, flow in (("src", "src_to_tgt"), ("tgt", "tgt_to_src")):
            in_second = second[f"{side}_grid_mask"] > 0
            merged[flow] = np.where(in_second[..., None], second[flow], first[flow])
            merged[f"{side}_grid_mask"] = first[f"{side}_grid_mask"] + second[f"{side}_grid_mask"]
        return merged

    def _dilated_masks(self, plan: PairPlan) -> list:
        """The plan's segment masks at the source's resolution, dilated; rejects touching pairs."""
        # the bank decodes RLE in Fortran order; one C-order copy spares every OpenCV call its own
        masks = [dilate(np.ascontiguousarray(self.bank.mask(obj.segment_row)), self.config.dilation_px,
                        self.config.dilation_shape) for obj in plan.objects]
        if len(masks) == 2 and np.any(dilate(masks[0], 1) & masks[1]):
            raise Rejected("masks_touch", "the two dilated source segments touch")
        return masks

    def _meta(self, plan: PairPlan, key: str, crop: tuple, warps: list) -> dict:
        """The sample's JSON: ids, paths, the crop, and each object's parameters and warp."""
        config, size = self.config, self.config.image_size
        return {
            "key": key,
            "datagen_version": __version__,
            "image_size": [size, size],
            "grid": [config.grid_size, config.grid_size],
            "stride": config.stride,
            "blend": config.blend,
            "style": config.style,
            "source_image": {"id": plan.source_image, "path": self.bank.image_path(plan.source_image),
                             "crop": [int(v) for v in crop]},
            "background_image": {"id": plan.background_image, "path": self.bank.image_path(plan.background_image)},
            "objects": [
                {
                    "id": k + 1,
                    "segment_id": int(self.bank.segment_ids[obj.segment_row]),
                    "category_id": int(self.bank.category_ids[obj.segment_row]),
                    "category": self.bank.category_name(int(self.bank.category_ids[obj.segment_row])),
                    "params": {"aspect": [obj.aspect_x, obj.aspect_y], "angle_deg": obj.angle_deg,
                               "ratio": obj.ratio, "position": list(obj.position), "tps_grid": obj.tps_grid},
                    "region": list(region),
                    "warp": warp.to_json(),
                }
                for k, (obj, region, warp) in enumerate(zip(plan.objects, plan.regions, warps))
            ],
        }

    def _roi(self, outline: np.ndarray) -> tuple:
        """Target rectangle (x0, y0, x1, y1) covering the warped outline (N, 2) plus a 2-pixel margin."""
        size = self.config.image_size
        x0, y0 = np.floor(outline.min(0)).astype(int) - 2
        x1, y1 = np.ceil(outline.max(0)).astype(int) + 2
        return (max(0, x0), max(0, y0), min(size, x1), min(size, y1))
