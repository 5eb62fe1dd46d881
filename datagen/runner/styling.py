"""The style step of a build: its typed options, the stylizer they make, and a shard's styles
(drawn per pair, sent to the stylizer in batches, collected when the batch is written).

:class:`StyleOptions` are not hashed into the config: what they resolve to (the style images'
and the weights' checksums) is part of the build's inputs (:mod:`datagen.runner.inputs`).
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from datagen.config import BuildConfig, options_from
from datagen.runner.worker_state import STATE
from datagen.style import NO_STYLE, StyleError, stylizer_class
from datagen.style.pipeline import LocalStyler


@dataclass(frozen=True)
class StyleOptions:
    """Options of the stylizer of ``config.style``; None leaves the stylizer's own default.

    style_dir: folder of style images (the paper: the Brueghel paintings; adain and color need it).
    vgg_path, decoder_path: AdaIN weights (default: ``$SEGSWAP_ADAIN_VGG`` / ``$SEGSWAP_ADAIN_DECODER``,
    then ``~/.cache/segswap/adain/``). device: of the AdaIN networks ('auto': CUDA when present).
    max_side, batch_size, channels_last, precision: how AdaIN runs (see
    :class:`datagen.style.adain.AdainStylizer`). An option the chosen method does not take (e.g.
    ``device`` with 'color') is an error, not dropped.
    """

    style_dir: Path | str | None = None
    vgg_path: Path | str | None = None
    decoder_path: Path | str | None = None
    device: str | None = None
    max_side: int | None = None
    batch_size: int | None = None
    channels_last: bool | None = None
    precision: str | None = None

    @classmethod
    def of(cls, options: Mapping) -> StyleOptions:
        """From keyword options; an unknown one is a ValueError naming it."""
        return options_from(cls, options, "the style")

    def given(self) -> dict:
        """The options that are set (not None), by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class StyleSpec:
    """Where a build's stylizer comes from: its :class:`StyleOptions` (a mapping of them is
    accepted and checked). Picklable: shard tasks carry it to the workers."""

    options: StyleOptions = StyleOptions()

    def __post_init__(self):
        if isinstance(self.options, Mapping):
            object.__setattr__(self, "options", StyleOptions.of(self.options))
        elif not isinstance(self.options, StyleOptions):
            raise TypeError(f"StyleSpec options must be StyleOptions or a mapping, got {type(self.options).__name__}")

    def make(self, config: BuildConfig):
        """The stylizer of ``config.style``, or None for 'none'. Made once per process (see
        :mod:`datagen.runner.worker_state`): the build's own check and an in-process shard share
        one, and a worker's shards share theirs."""
        if config.style == NO_STYLE:
            return None
        options = self.options.given()
        if self.options.style_dir is None:
            raise StyleError(f"style {config.style!r} needs a folder of style images: StyleOptions(style_dir=...) "
                             "(the paper: the Brueghel paintings); or BuildConfig(style='none')")
        _check_options_apply(config.style, options)
        return STATE.stylizer(config.style, options)

    def styler(self, config: BuildConfig) -> LocalStyler | None:
        """This process's stylizer on a background thread, or None for 'none'."""
        stylizer = self.make(config)
        return None if stylizer is None else LocalStyler(stylizer)


def _check_options_apply(method: str, options: dict) -> None:
    """StyleError naming the options that the stylizer of ``method`` does not take."""
    parameters = inspect.signature(stylizer_class(method)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    extra = sorted(set(options) - set(parameters))
    if extra:
        raise StyleError(f"style option{'s' if len(extra) > 1 else ''} {', '.join(extra)} "
                         f"{'do' if len(extra) > 1 else 'does'} not apply to style {method!r} "
                         f"(its options: {', '.join(parameters)})")


def serve_style(stylizer, workers: int, serve: bool | None) -> bool:
    """Whether the workers share this process's stylizer through a
    :class:`~datagen.style.pipeline.StyleServer`: ``serve`` if given, else when there are several
    workers and the stylizer is on a GPU."""
    if stylizer is None or workers <= 1:
        return False
    if serve is not None:
        return serve
    device = getattr(stylizer, "device", None)
    return getattr(device, "type", None) == "cuda"


def draw_style(rng, styler, config: BuildConfig) -> dict:
    """Style image and strength of each image of a pair, drawn after the pair's plan so that the
    pair itself is the same with or without a style."""
    names = styler.style_names
    choice = {"method": config.style}
    for side in ("src", "tgt"):
        index = int(rng.integers(styler.n_styles))
        choice[side] = {"style": index, "name": names[index] if names else None,
                        "alpha": float(rng.random() * config.style_alpha_max)}
    return choice


def submit_style(styler, samples: list):
    """Start stylising both images of every sample (one request); None when there is nothing to do."""
    if styler is None or not samples:
        return None
    images = [image for sample in samples for image in (sample.src_image, sample.tgt_image)]
    styles = [sample.meta["style"][side]["style"] for sample in samples for side in ("src", "tgt")]
    alphas = [sample.meta["style"][side]["alpha"] for sample in samples for side in ("src", "tgt")]
    return styler.submit(images, styles, alphas)


def collect_style(job, samples: list) -> None:
    """Fill ``src_style_image``/``tgt_style_image`` of ``samples`` from their finished job."""
    if job is None:
        return
    stylised = job.result()
    for k, sample in enumerate(samples):
        sample.src_style_image, sample.tgt_style_image = stylised[2 * k], stylised[2 * k + 1]
