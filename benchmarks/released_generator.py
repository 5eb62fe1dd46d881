"""The baseline of ``bench_build.py``: the per-pair steps of the authors' released generators
(``data/generate_1obj.py`` and ``data/generate_2obj.py`` of XiSHEN0220/SegSwap), style transfer
left out, timed by stage on the same plans as our builder.

Written here from the released scripts' sequences of operations, with the libraries they call,
so the ratio against our builder is measured in one run on one machine instead of quoted from
another one. Per attempted one-object pair:

* load: PIL decode + RGB conversion of the background (resized to 480 x 480, bilinear) and of
  the source image;
* warp: PIL polygon rasterisation of the segment, ``scipy.ndimage.binary_dilation`` with 20
  iterations at the source's resolution, the border crop (p = 0.2), PIL resizes of the source
  and mask to 480 x 480, then of the object for the aspect ratio, PIL rotation with expansion,
  crop to the mask's box, PIL resize to the drawn ratio of the background;
* blend: ``cv2.seamlessClone(NORMAL_CLONE)`` of the patch into the whole 480 x 480 background;
* correspondences: the 30 x 30 masks by ``F.interpolate``, the two affine maps on the grid,
  and the cycle-consistent masks by three ``F.grid_sample`` calls;
* encode/write: the two images saved as JPEG by PIL (its default quality, 75) and the two
  (3, 30, 30) float32 arrays by ``np.save``, as four files.

A two-object pair composes two segments of one source image with the same per-object steps,
in the order of ``generate_2obj.py``: both polygons rasterised and dilated, the attempt dropped
if the dilated masks overlap, the source and both masks resized to 480 x 480 and gridded, each
object warped (aspect, rotation, crop) and resized into its region of the layout, both cloned
into the background one after the other, the cycle-consistent masks of each object (the
script computes the first object's twice, and so does this), and the attempt dropped after
all that if the objects' grid masks share a cell or one of them covers fewer than 9 cells in
either image; an accepted pair writes the same four files. No border crop.

The choices (source segments, background, aspect, angle, ratio, position, border crop, the
two-object layout) come from our sampler's plan, so both generators do the same pairs; the
released generators have no thin-plate spline in these scripts, so the baseline skips it (ours
pays for it on half the pairs). The released rotation's bug (negative angles become near zero)
is not copied: the drawn angle is used, which costs PIL the same.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from scipy import ndimage

DILATION_ITERATIONS = 20


class ReleasedGeneratorSteps:
    """Executes :class:`datagen.synth.sampling.PairPlan` s (one or two objects) the released generators' way.

    ``annotations``: the COCO instances file of the bank's images (for the polygons the released
    script rasterises); ``bank``: our segment bank (plan rows -> annotation ids, image paths
    relative to ``images``).
    """

    def __init__(self, annotations: Path, images: Path, bank, size: int = 480, stride: int = 16):
        with open(annotations) as handle:
            coco = json.load(handle)
        self.polygons = {a["id"]: a["segmentation"] for a in coco["annotations"]
                         if isinstance(a["segmentation"], list)}
        self.images, self.bank, self.size, self.cells = Path(images), bank, size, size // stride
        centres = (np.arange(self.cells) + 0.5) / self.cells
        self.grid_x, self.grid_y = np.meshgrid(centres, centres)
        self.seconds: dict[str, float] = defaultdict(float)

    def _stopwatch(self):
        """``lap(stage)``: adds the time since the previous lap (or since this call) to ``stage``."""
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            self.seconds[stage] += now - clock
            clock = now

        return lap

    def build(self, plan, out_dir: Path, key: str) -> bool:
        """Attempt one pair; True when it was written (False: rejected, < 9 mask cells or a
        clone that OpenCV refuses; for two objects also overlapping dilated masks or grid masks
        that share a cell). Stage times accumulate in ``self.seconds``."""
        if len(plan.objects) == 2:
            return self._build_two(plan, out_dir, key)
        size, obj = self.size, plan.objects[0]
        row = self.bank.row(obj.segment_row)
        lap = self._stopwatch()

        background = Image.open(self.images / self.bank.image_path(plan.background_image)).convert("RGB")
        background = background.resize((size, size), resample=Image.BILINEAR)
        source = Image.open(self.images / row.image_path).convert("RGB")
        lap("load")

        canvas = Image.new("L", source.size, 0)
        for polygon in self.polygons[row.segment_id]:
            ImageDraw.Draw(canvas).polygon(polygon, outline=1, fill=1)
        mask = ndimage.binary_dilation(np.array(canvas, dtype=bool), iterations=DILATION_ITERATIONS)
        if plan.border_crop:
            source, mask = _crop_to_nearest_border(source, mask)
        source = source.resize((size, size), resample=Image.BILINEAR)
        mask = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), resample=Image.BILINEAR)
        patch, patch_mask, warp = _warp_object(source, mask, obj, (0, 0, size, size))
        lap("warp")

        height, width = patch_mask.shape
        x0 = int(obj.position[0] * (size - width + 1))
        y0 = int(obj.position[1] * (size - height + 1))
        try:
            blended = cv2.seamlessClone(patch, np.array(background), patch_mask,
                                        (x0 + width // 2 - 1, y0 + height // 2 - 1), cv2.NORMAL_CLONE)
        except cv2.error:
            lap("blend")
            return False
        target_mask = np.zeros((size, size), np.uint8)
        target_mask[y0:y0 + height, x0:x0 + width] = patch_mask
        lap("blend")

        src_to_tgt = np.array([[1.0, 0, x0], [0, 1, y0], [0, 0, 1]]) @ warp  # pasted at (x0, y0)
        # the target's grid mask is unused, as in the released script, which computes it too
        masks = [_grid_mask(np.array(mask), self.cells), _grid_mask(target_mask, self.cells)]
        fields = [self._affine_on_grid(src_to_tgt), self._affine_on_grid(np.linalg.inv(src_to_tgt))]
        src_mask, tgt_mask = _cycle_masks(masks[0], *fields)
        lap("correspondences")
        if src_mask.sum() < 9 or tgt_mask.sum() < 9:
            return False

        source.save(out_dir / f"{key}_a.jpg")
        Image.fromarray(blended).save(out_dir / f"{key}_b.jpg")
        for suffix, (x, y), cells in (("a", fields[0], src_mask), ("b", fields[1], tgt_mask)):
            np.save(out_dir / f"{key}_{suffix}.npy", np.stack([x, y, cells]).astype(np.float32))
        lap("encode/write")
        return True

    def _build_two(self, plan, out_dir: Path, key: str) -> bool:
        """:meth:`build` of a two-object plan, as ``generate_2obj.py`` makes a pair."""
        size = self.size
        rows = [self.bank.row(obj.segment_row) for obj in plan.objects]
        lap = self._stopwatch()

        background = Image.open(self.images / self.bank.image_path(plan.background_image)).convert("RGB")
        background = background.resize((size, size), resample=Image.BILINEAR)
        source = Image.open(self.images / rows[0].image_path).convert("RGB")
        lap("load")

        masks = []
        for row in rows:
            canvas = Image.new("L", source.size, 0)
            for polygon in self.polygons[row.segment_id]:
                ImageDraw.Draw(canvas).polygon(polygon, outline=1, fill=1)
            masks.append(ndimage.binary_dilation(np.array(canvas, dtype=bool), iterations=DILATION_ITERATIONS))
        if (masks[0] & masks[1]).any():
            lap("warp")
            return False
        source = source.resize((size, size), resample=Image.BILINEAR)
        masks = [Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), resample=Image.BILINEAR)
                 for mask in masks]
        lap("warp")
        grid_masks = [_grid_mask(np.array(mask), self.cells) for mask in masks]
        lap("correspondences")
        try:
            warped = [_warp_object(source, mask, obj, region)
                      for mask, obj, region in zip(masks, plan.objects, plan.regions)]
        except ValueError:  # a mask gone at 480 px
            lap("warp")
            return False
        lap("warp")

        blended, matrices = np.array(background), []
        try:
            for (patch, patch_mask, chain), obj, region in zip(warped, plan.objects, plan.regions):
                height, width = patch_mask.shape
                x0 = region[0] + int(obj.position[0] * (region[2] - region[0] - width + 1))
                y0 = region[1] + int(obj.position[1] * (region[3] - region[1] - height + 1))
                blended = cv2.seamlessClone(patch, blended, patch_mask,
                                            (x0 + width // 2 - 1, y0 + height // 2 - 1), cv2.NORMAL_CLONE)
                target_mask = np.zeros((size, size), np.uint8)
                target_mask[y0:y0 + height, x0:x0 + width] = patch_mask
                matrices.append(np.array([[1.0, 0, x0], [0, 1, y0], [0, 0, 1]]) @ chain)
        except cv2.error:  # a clone that OpenCV refuses
            lap("blend")
            return False
        lap("blend")

        fields, cycled = [], []
        for k, (grid_mask, matrix) in enumerate(zip(grid_masks, matrices)):
            field = (self._affine_on_grid(matrix), self._affine_on_grid(np.linalg.inv(matrix)))
            src_mask, tgt_mask = _cycle_masks(grid_mask, *field)
            if k == 0:  # the released script runs the first object's twice, the second time on its result
                src_mask, tgt_mask = _cycle_masks(src_mask, *field)
            fields.append(field)
            cycled.append((src_mask, tgt_mask))
        (src1, tgt1), (src2, tgt2) = cycled
        lap("correspondences")
        if (src1 * src2).sum() > 0 or (tgt1 * tgt2).sum() > 0:
            return False
        if min(src1.sum(), src2.sum(), tgt1.sum(), tgt2.sum()) < 9:
            return False
        forward = [fields[0][0][axis] * (src1 > 0) + fields[1][0][axis] * (src2 > 0) for axis in (0, 1)]
        backward = [fields[0][1][axis] * (tgt1 > 0.5) + fields[1][1][axis] * (tgt2 > 0.5) for axis in (0, 1)]
        lap("correspondences")

        source.save(out_dir / f"{key}_a.jpg")
        Image.fromarray(blended).save(out_dir / f"{key}_b.jpg")
        for suffix, (x, y), cells in (("a", forward, src1 + src2), ("b", backward, tgt1 + tgt2)):
            np.save(out_dir / f"{key}_{suffix}.npy", np.stack([x, y, cells]).astype(np.float32))
        lap("encode/write")
        return True

    def _affine_on_grid(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cells, cells) x and y, normalised, of the grid centres mapped by ``matrix`` (pixels)."""
        points = np.vstack([self.grid_x.ravel() * self.size, self.grid_y.ravel() * self.size,
                            np.ones(self.grid_x.size)])
        mapped = matrix @ points / self.size
        return mapped[0].reshape(self.grid_x.shape), mapped[1].reshape(self.grid_x.shape)


def _warp_object(source: Image.Image, mask: Image.Image, obj, region) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One object of a two-object pair warped the released way (``AspectRatio``, ``Rotate``,
    ``cropbb``, ``resize_bbox_bg`` of ``generate_2obj.py``) from the 480 px source and its 480 px
    mask into ``region`` (x0, y0, x1, y1): the patch (h, w, 3) uint8, its mask (h, w) uint8 and
    the (3, 3) map from the source to the patch, in pixels."""
    size = source.size[0]
    new_size = (int(size * obj.aspect_x), int(size * obj.aspect_y))
    patch = source.resize(new_size, resample=Image.BILINEAR)
    patch_mask = mask.resize(new_size, resample=Image.BILINEAR)
    patch = patch.rotate(obj.angle_deg, expand=1)
    patch_mask = patch_mask.rotate(obj.angle_deg, expand=1)
    ys, xs = np.nonzero(np.array(patch_mask) > 128)
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    patch, patch_mask = patch.crop(box), patch_mask.crop(box)
    scale = min((region[2] - region[0]) / patch.size[0], (region[3] - region[1]) / patch.size[1]) * obj.ratio
    scaled = (max(int(patch.size[0] * scale), 1), max(int(patch.size[1] * scale), 1))
    chain = _affine_chain(size, new_size, obj.angle_deg, box, scale, (0, 0))
    return (np.array(patch.resize(scaled, resample=Image.BILINEAR)),
            np.array(patch_mask.resize(scaled, resample=Image.BILINEAR)), chain)


def _affine_chain(size: int, aspect_size, angle_deg: float, box, scale: float, offset) -> np.ndarray:
    """(3, 3) map from the 480 px source to the target in pixels: aspect, rotation with
    expansion (about the top-left corner, then shifted into the expanded canvas), crop, scale,
    paste, composed as the released script composes its matrices."""
    width, height = aspect_size
    aspect = np.diag([width / size, height / size, 1.0])
    theta = np.deg2rad(abs(angle_deg))
    cos, sin = np.cos(theta), np.sin(theta)
    if angle_deg >= 0:
        rotation = np.array([[cos, sin, 0], [-sin, cos, width * sin], [0, 0, 1]])
    else:
        rotation = np.array([[cos, -sin, height * sin], [sin, cos, 0], [0, 0, 1]])
    crop = np.array([[1.0, 0, -box[0]], [0, 1, -box[1]], [0, 0, 1]])
    resize = np.diag([scale, scale, 1.0])
    paste = np.array([[1.0, 0, offset[0]], [0, 1, offset[1]], [0, 0, 1]])
    return paste @ resize @ crop @ rotation @ aspect


def _crop_to_nearest_border(image: Image.Image, mask: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    """Cut the image at the mask box's side nearest to the image border, as the released
    ``crop_fg`` does."""
    ys, xs = np.nonzero(mask)
    left, right, top, bottom = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    width, height = image.size
    side = int(np.argmin([left, width - right, top, height - bottom]))
    if side == 0:
        return image.crop((left, 0, width, height)), mask[:, left:]
    if side == 1:
        return image.crop((0, 0, right, height)), mask[:, :right]
    if side == 2:
        return image.crop((0, top, width, height)), mask[top:, :]
    return image.crop((0, 0, width, bottom)), mask[:bottom, :]


def _grid_mask(mask: np.ndarray, cells: int) -> np.ndarray:
    """(cells, cells) float mask: the uint8 image mask / 255, bilinearly resized by torch."""
    tensor = torch.from_numpy(mask.astype(np.float32) / 255)[None, None]
    return F.interpolate(tensor, size=(cells, cells), mode="bilinear").squeeze().numpy()


def _cycle_masks(src_mask: np.ndarray, src_to_tgt, tgt_to_src) -> tuple[np.ndarray, np.ndarray]:
    """The released cycle-consistent masks: the source mask sampled into the target, back into
    the source, and the surviving source mask into the target again (bilinear grid_sample)."""
    def flow(field):
        x, y = field
        tensor = torch.from_numpy(np.stack([x, y], axis=-1).astype(np.float32))[None]
        inside = (x > 0) & (x < 1) & (y > 0) & (y < 1)
        return (tensor - 0.5) * 2, inside

    def sample(values, grid):
        tensor = torch.from_numpy(values.astype(np.float32))[None, None]
        return F.grid_sample(tensor, grid, mode="bilinear", align_corners=False).squeeze().numpy()

    forward, forward_inside = flow(src_to_tgt)
    backward, backward_inside = flow(tgt_to_src)
    in_target = sample(src_mask, backward) * backward_inside
    src_final = src_mask * sample(in_target, forward) * forward_inside
    tgt_final = sample(src_final, backward) * backward_inside
    return src_final, tgt_final


def released_stylize(encoder, decoder, image_rgb: np.ndarray, style_path: Path, alpha: float) -> np.ndarray:
    """One stylised image the released generator's way (``style_transfer_pil`` and
    ``style_transfer_pil_input``), on the CPU in fp32: the style image read and converted by PIL,
    content and style resized by torchvision to a shorter side of 512 and converted to tensors,
    **both encoded** (the style image again for every image), AdaIN mixed with the content
    features by ``alpha``, decoded, clamped, converted back to PIL and resized (bilinear) to the
    input size. ``encoder``/``decoder``: the AdaIN networks (the encoder up to relu4_1).
    Returns (H, W, 3) uint8 RGB."""
    from torchvision import transforms

    to_tensor = transforms.Compose([transforms.Resize(512), transforms.ToTensor()])
    content_pil = Image.fromarray(image_rgb)
    style_pil = Image.open(style_path).convert("RGB")
    content, style = to_tensor(content_pil)[None], to_tensor(style_pil)[None]
    with torch.no_grad():
        content_feat, style_feat = encoder(content), encoder(style)
        size = content_feat.shape[:2]
        c_mean = content_feat.view(*size, -1).mean(2).view(*size, 1, 1)
        c_std = (content_feat.view(*size, -1).var(2) + 1e-5).sqrt().view(*size, 1, 1)
        s_mean = style_feat.view(*size, -1).mean(2).view(*size, 1, 1)
        s_std = (style_feat.view(*size, -1).var(2) + 1e-5).sqrt().view(*size, 1, 1)
        feat = (content_feat - c_mean) / c_std * s_std + s_mean
        output = decoder(feat * alpha + content_feat * (1 - alpha))
    output = transforms.ToPILImage()(output.clamp(0, 1)[0])
    return np.array(output.resize(content_pil.size, resample=Image.BILINEAR))
