"""Typed configuration of a build, with the paper's defaults.

Everything that changes the bytes of a shard lives in :class:`BuildConfig`; its
:func:`datagen.format.hashing.config_hash` goes into every manifest so two shard sets can be compared.
Paths to inputs are not part of the hash (moving COCO must not change it); they are
recorded beside it in the manifest.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

OBJECT_MODES = ("1", "2", "mix")
BLEND_METHODS = ("poisson", "cv2", "paste")
STYLE_METHODS = ("none", "color", "adain")
DILATION_SHAPES = ("diamond", "disc")
TWO_OBJECT_LAYOUTS = ("fixed", "cut")
ONE_SEGMENT_SOURCES = ("lost",)
"""Sources that find one segment per image: a two-object pair needs two segments of one image, so
their builds make one-object pairs only (``objects`` '1')."""


def options_from(cls, options: Mapping, owner: str):
    """``cls(**options)`` for an options dataclass; an option it does not know is a ValueError
    naming the option, ``owner`` (e.g. "the coco source") and the options it has, rather than
    being dropped."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                         f"of {owner}; its options: {', '.join(known)}")
    return cls(**options)


@dataclass(frozen=True)
class WarpConfig:
    """Random warp of a segment (paper section 3.1, the authors' released generator)."""

    aspect_min: float = 0.7
    """Each axis is scaled by U[aspect_min, aspect_max] before rotation."""
    aspect_max: float = 1.0
    rotation_deg: float = 15.0
    """Rotation angle ~ U[-rotation_deg, rotation_deg] degrees."""
    scale_min: float = 0.2
    """The object's box takes a ratio of its region from linspace(scale_min, scale_max, scale_steps)."""
    scale_max: float = 1.0
    scale_steps: int = 10
    scale_decay: float = 10.0
    """Weights of those ratios are proportional to exp(-k / scale_decay), k = 0..steps-1."""
    two_object_scale_min: float = 0.5
    """scale_min for two-object pairs (the released two-object generator's)."""
    two_object_layout: str = "fixed"
    """Where the two objects of a pair go in the target. 'fixed' (the released two-object
    generator's): one of 16 fixed pairs of regions drawn uniformly, which object goes in which
    region drawn too (:func:`datagen.synth.sampling.two_object_layouts`); 'cut': the target cut
    in two along a random axis at U[0.35, 0.65] of its side."""
    two_object_gap_px: int = 32
    """Pixels between the two regions of a two-object pair where they meet ('fixed': each region
    gives up half of it along the side it shares with the other; 'cut': centred on the cut). The
    default is the released generator's: each region keeps one grid stride (16 px) from the side
    it shares (its ``choice_bbox``), which reproduces all 16 of its boxes."""
    tps_prob: float = 0.5
    tps_grid_sizes: tuple = (4, 6)
    tps_jitter: float = 0.25
    """Control points of a g x g grid move by U[-tps_jitter/g, tps_jitter/g] of the image (x and
    y independently). The default is the authors' ``tps_trans``: a (rand - 0.5) / g move on a
    [-1, 1] grid, half of that in image units."""

    def scale_ratios(self, two_objects: bool = False) -> tuple[list[float], list[float]]:
        """(ratios, probabilities) of the object's size relative to its region."""
        import numpy as np

        low = self.two_object_scale_min if two_objects else self.scale_min
        ratios = np.linspace(low, self.scale_max, self.scale_steps)
        weights = np.exp(-np.arange(self.scale_steps) / self.scale_decay)
        return ratios.tolist(), (weights / weights.sum()).tolist()


@dataclass(frozen=True)
class BuildConfig:
    """How pairs are built and written. Defaults follow the paper and its released code, and are
    the command line's (``datagen build`` reads them from here)."""

    segments: str = "coco"
    """Segment source name (see datagen.segments)."""
    min_area: float = 1024.0
    """Segments with a smaller mask area (pixels at the image's own resolution) are skipped."""
    image_size: int = 480
    """Side of the square source and target images, in pixels."""
    stride: int = 16
    """Correspondence grid stride in pixels: 480 / 16 = a 30 x 30 grid."""
    objects: str | None = None
    """'1' one-object pairs, '2' two-object pairs, 'mix' half and half: in every shard, sample
    ``i`` has one object when ``i`` is even and two when it is odd (the authors train on two sets
    of equal size; :func:`datagen.synth.sampling.objects_for_sample`). None (the default) becomes
    'mix', or '1' for a source of :data:`ONE_SEGMENT_SOURCES` (one segment per image)."""
    dilation_px: int = 20
    """The segment mask is dilated by this many pixels at the source's own resolution."""
    dilation_shape: str = "diamond"
    """Shape of that dilation: 'diamond' (the released generator's: ``dilation_px`` iterations of
    a 3 x 3 cross, i.e. every pixel within L1 distance ``dilation_px``) or 'disc' (within
    Euclidean distance ``dilation_px``)."""
    border_crop_prob: float = 0.2
    """Probability that the source is cropped so that the object touches its nearest border."""
    blend: str = "poisson"
    """'poisson' (our DST solver, same equations as cv2 NORMAL_CLONE), 'cv2' (cv2.seamlessClone), 'paste'."""
    style: str = "adain"
    """'adain' (AdaIN, paper section 3.1: both images of every pair are stylised), 'color'
    (weight-free Lab colour transfer) or 'none'. 'adain' and 'color' need a folder of style
    images (see :class:`datagen.runner.styling.StyleOptions`)."""
    style_alpha_max: float = 1.0
    """Each image's style strength is alpha ~ U[0, style_alpha_max)."""
    style_batch: int = 8
    """Pairs stylised together (2 images each); fixed, so batches and bytes are reproducible."""
    min_mask_cells: float = 9.0
    """Pairs where an object's soft grid mask sums to less than this in either image are
    rejected (each object of a two-object pair, as the released two-object generator does)."""
    max_tps_inverse_error: float = 0.01
    """Max error of the numerical TPS inverse, in grid cells, before the pair is rejected."""
    jpeg_quality: int = 75
    """JPEG quality of the stored images: the released generator's (PIL's default, 75); shards
    are about 40 % smaller than at 90."""
    shard_size: int = 1000
    """Accepted samples per shard (the last shard may hold fewer)."""
    max_attempts: int = 100
    """Attempts per accepted sample before the shard gives up with an error."""
    min_image_side: int = 32
    """Images whose shorter side is smaller than this are rejected as too small."""
    max_image_pixels: int = 100_000_000
    """Images with more pixels than this are rejected as too large."""
    warp: WarpConfig = field(default_factory=WarpConfig)

    def __post_init__(self):
        if self.objects is None:  # resolved here, so that the hash never sees None
            object.__setattr__(self, "objects", "1" if self.segments in ONE_SEGMENT_SOURCES else "mix")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.stride

    def validate(self) -> BuildConfig:
        """Raise ValueError naming the option when a value is out of range."""
        checks = [
            (self.objects in OBJECT_MODES, f"objects must be one of {OBJECT_MODES}, got {self.objects!r}"),
            (self.objects == "1" or self.segments not in ONE_SEGMENT_SOURCES,
             f"objects {self.objects!r}: the {self.segments} source finds one segment per image, and a "
             "two-object pair needs two segments of one image; use objects '1'"),
            (self.blend in BLEND_METHODS, f"blend must be one of {BLEND_METHODS}, got {self.blend!r}"),
            (self.style in STYLE_METHODS, f"style must be one of {STYLE_METHODS}, got {self.style!r}"),
            (0 < self.style_alpha_max <= 1, f"style_alpha_max must be in (0, 1], got {self.style_alpha_max}"),
            (self.style_batch >= 1, f"style_batch must be >= 1, got {self.style_batch}"),
            (self.image_size >= 64, f"image_size must be at least 64, got {self.image_size}"),
            (self.stride >= 1 and self.image_size % self.stride == 0,
             f"image_size ({self.image_size}) must be a multiple of stride ({self.stride})"),
            (self.grid_size >= 4, f"image_size / stride must be at least 4, got {self.grid_size}"),
            (self.dilation_px >= 0, f"dilation_px must be >= 0, got {self.dilation_px}"),
            (self.dilation_shape in DILATION_SHAPES,
             f"dilation_shape must be one of {DILATION_SHAPES}, got {self.dilation_shape!r}"),
            (0 <= self.border_crop_prob <= 1, f"border_crop_prob must be in [0, 1], got {self.border_crop_prob}"),
            (1 <= self.jpeg_quality <= 100, f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}"),
            (self.shard_size >= 1, f"shard_size must be >= 1, got {self.shard_size}"),
            (self.min_area >= 0, f"min_area must be >= 0, got {self.min_area}"),
            (0 < self.warp.aspect_min <= self.warp.aspect_max, "warp.aspect_min must be in (0, aspect_max]"),
            (0 < self.warp.scale_min <= self.warp.scale_max <= 1, "warp scale ratios must be in (0, 1]"),
            (all(g >= 2 for g in self.warp.tps_grid_sizes), "warp.tps_grid_sizes must all be >= 2"),
            (self.warp.tps_jitter >= 0, f"warp.tps_jitter must be >= 0, got {self.warp.tps_jitter}"),
            (0 < self.warp.two_object_scale_min <= self.warp.scale_max,
             "warp.two_object_scale_min must be in (0, scale_max]"),
            (self.warp.two_object_layout in TWO_OBJECT_LAYOUTS,
             f"warp.two_object_layout must be one of {TWO_OBJECT_LAYOUTS}, got {self.warp.two_object_layout!r}"),
            (0 <= self.warp.two_object_gap_px <= self.image_size // 2,
             f"warp.two_object_gap_px must be in [0, image_size / 2], got {self.warp.two_object_gap_px}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BuildConfig:
        data = dict(data)
        warp = dict(data.pop("warp", {}) or {})
        if "tps_grid_sizes" in warp:
            warp["tps_grid_sizes"] = tuple(warp["tps_grid_sizes"])
        return cls(warp=WarpConfig(**warp), **data)


