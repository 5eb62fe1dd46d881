"""Training an AdaIN decoder on a style collection (Huang & Belongie 2017), as the PyTorch
port's ``train.py`` (naoto0804/pytorch-AdaIN).

Each step takes ``batch_size`` content and ``batch_size`` style images, each resized so that
its shorter side is ``size`` (512) and randomly cropped to ``crop`` x ``crop`` (256). With the
frozen VGG encoder ``phi`` (relu1_1 .. relu4_1) and the decoder ``g`` being trained::

    t = AdaIN(phi(c), phi(s))                      # relu4_1, alpha 1
    content loss = MSE(phi(g(t)), t)
    style loss   = sum_i MSE(mean(phi_i(g(t))), mean(phi_i(s)))
                         + MSE(std(phi_i(g(t))), std(phi_i(s)))
    loss = content_weight x content loss + style_weight x style loss

Adam (lr 1e-4) with the inverse-time decay lr = lr0 / (1 + 5e-5 x step), 160000 steps of
batch 8 in the port. The decoder is saved as a plain state dict in the key layout of the
port's ``decoder.pth`` (loadable by :func:`~datagen.style.adain_net.load_decoder`), atomically,
every ``save_every`` steps and at the end, with a preview image next to it and the training
state (``OUT.state.pth``: decoder, Adam moments, steps done, settings) from which ``resume``
continues an interrupted run exactly as if it had not stopped.

All randomness (which images, where to crop, the preview examples, the initial decoder
weights) comes from ``seed``: the images of step ``s`` from ``default_rng([seed, 0, s])`` (so
a resumed run draws what the uninterrupted one would), the rest from their own streams and a
forked torch RNG; nothing global is set.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sys
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datagen.format.atomic import atomic_write
from datagen.format.hashing import sha256_file
from datagen.format.imageio import BadInput, load_rgb
from datagen.style import StyleError, resize, style_image_files
from datagen.style.adain import adain, feature_stats, resolve_device
from datagen.style.adain_net import encoder_layers, load_decoder, load_encoder, make_decoder

MIN_CROP = 16
"""Smallest crop: relu4_1 is 1/8 of it and its statistics need more than one cell."""
MIN_IMAGE_SIDE = 8
"""Training images with a shorter side below this are skipped as unreadable."""
PREVIEW_ROWS = 4
"""Examples (rows of content | style | stylisation) in the preview image."""
PREVIEW_SUFFIX = ".preview.jpg"
PREVIEW_STREAM = 1
"""The preview examples are drawn from ``default_rng([seed, PREVIEW_STREAM])``, apart from
the training stream (:data:`TRAIN_STREAM`)."""
PREVIEW_JPEG_QUALITY = 90
TRAIN_STREAM = 0
"""The images and crops of step ``s`` are drawn from ``default_rng([seed, TRAIN_STREAM, s])``."""
STATE_SUFFIX = ".state.pth"
STATE_FORMAT = 1


class StyleTrainError(StyleError):
    """Training that cannot start or go on (no readable image, bad option, diverged loss);
    the message names the folder, file or option."""


@dataclass(frozen=True)
class DecoderTrainingSettings:
    """The options of a decoder training run (``datagen style train``); the defaults are the
    port's ``train.py`` (``--max_iter``, ``--batch_size``, ``--lr``, ...)."""

    steps: int = 160_000
    """Steps in all (a resumed run goes on up to this many)."""
    batch_size: int = 8
    """Content and style images per step (each)."""
    size: int = 512
    """Each image is resized so that its shorter side is ``size`` ..."""
    crop: int = 256
    """... then randomly cropped to ``crop`` x ``crop``."""
    lr: float = 1e-4
    """Adam learning rate at step 0."""
    lr_decay: float = 5e-5
    """Inverse-time decay: lr / (1 + lr_decay x step) (:func:`learning_rate`)."""
    style_weight: float = 10.0
    content_weight: float = 1.0
    save_every: int = 10_000
    """Save the decoder, preview and training state every this many steps (0: only at the end)."""
    seed: int = 0
    """Seed of the image and crop draws, the preview examples and the initial decoder."""
    device: str = "auto"
    """'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'."""
    workers: int = 4
    """Threads loading the next batch's images during a step (0: none); results do not depend on it."""

    RESUME_FIELDS: ClassVar[tuple[str, ...]] = ("batch_size", "size", "crop", "lr", "lr_decay",
                                                "style_weight", "content_weight", "seed")
    """The fields that decide what the decoder learns: recorded in the training state, and a resume
    must give the same values. The others (how long, how often saved, where, how many threads)
    may change between the parts of a run."""

    def validate(self) -> DecoderTrainingSettings:
        """``self`` if every value is usable, else :class:`StyleTrainError` listing each problem."""
        problems = []
        if self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            problems.append(f"batch size must be >= 1, got {self.batch_size}")
        if self.crop < MIN_CROP:
            problems.append(f"crop must be >= {MIN_CROP}, got {self.crop}")
        if self.size < self.crop:
            problems.append(f"size (shorter side, {self.size}) must be >= crop ({self.crop})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be > 0, got {self.lr}")
        if not (self.lr_decay >= 0 and math.isfinite(self.lr_decay)):
            problems.append(f"lr decay must be >= 0, got {self.lr_decay}")
        for name, value in (("style weight", self.style_weight), ("content weight", self.content_weight)):
            if not (value >= 0 and math.isfinite(value)):
                problems.append(f"{name} must be >= 0, got {value}")
        if self.save_every < 0:
            problems.append(f"save_every must be >= 0 (0: only at the end), got {self.save_every}")
        if self.workers < 0:
            problems.append(f"workers must be >= 0, got {self.workers}")
        if problems:
            raise StyleTrainError("; ".join(problems))
        return self

    def to_dict(self) -> dict:
        """Every field by name (plain numbers and strings)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping) -> DecoderTrainingSettings:
        """Settings from :meth:`to_dict`'s keys (missing ones keep their defaults); ValueError
        naming the keys that are not fields."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown decoder training setting(s): {', '.join(map(str, unknown))}; "
                             f"known: {', '.join(sorted(names))}")
        return cls(**values)

    def resume_dict(self) -> dict:
        """The :data:`RESUME_FIELDS` of :meth:`to_dict`, as the training state records them."""
        values = self.to_dict()
        return {name: values[name] for name in self.RESUME_FIELDS}


DEFAULTS = DecoderTrainingSettings()
"""The port's ``train.py`` defaults."""


# -- losses ------------------------------------------------------------------------------

def content_loss(generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between the relu4_1 features of the decoded image and the AdaIN target ``t``
    (the port's ``calc_content_loss``). ``target`` is a constant: no gradient flows into it."""
    if generated.shape != target.shape:
        raise ValueError(f"content loss: shapes differ, {tuple(generated.shape)} and "
                         f"{tuple(target.shape)}")
    return F.mse_loss(generated, target.detach())


def style_loss(generated_feats, style_feats) -> torch.Tensor:
    """Sum over the layers (relu1_1 .. relu4_1) of MSE(mean) + MSE(std) of the per-sample,
    per-channel statistics (:func:`~datagen.style.adain.feature_stats`) of the decoded
    image's features and the style image's features (the port's ``calc_style_loss``)."""
    generated_feats, style_feats = list(generated_feats), list(style_feats)
    if not generated_feats or len(generated_feats) != len(style_feats):
        raise ValueError(f"style loss: got {len(generated_feats)} generated and "
                         f"{len(style_feats)} style feature maps; they must match and be > 0")
    total = None
    for generated, style in zip(generated_feats, style_feats):
        g_mean, g_std = feature_stats(generated)
        s_mean, s_std = feature_stats(style)
        term = F.mse_loss(g_mean, s_mean.detach()) + F.mse_loss(g_std, s_std.detach())
        total = term if total is None else total + term
    return total


def encode_layers(layers, images: torch.Tensor) -> list[torch.Tensor]:
    """Features [relu1_1, relu2_1, relu3_1, relu4_1] of ``images`` (the port's
    ``encode_with_intermediate``); ``layers`` from :func:`~datagen.style.adain_net.encoder_layers`."""
    feats = []
    x = images
    for layer in layers:
        x = layer(x)
        feats.append(x)
    return feats


def learning_rate(lr: float, lr_decay: float, step: int) -> float:
    """Inverse-time decay of the port: ``lr / (1 + lr_decay * step)``, step counted from 0."""
    return lr / (1.0 + lr_decay * step)


# -- images ------------------------------------------------------------------------------

def resize_shorter_side(image: np.ndarray, size: int, crop: int) -> np.ndarray:
    """``image`` resized (keeping its aspect ratio) so that its shorter side is ``size``; each
    side is at least ``crop``."""
    height, width = image.shape[:2]
    scale = size / min(height, width)
    return resize(image, max(crop, round(height * scale)), max(crop, round(width * scale)))


class CropSampler:
    """Random ``crop`` x ``crop`` crops of the images of one folder (flat, the suffixes of
    :data:`~datagen.style.STYLE_IMAGE_SUFFIXES`), each image resized to a shorter side of
    ``size`` first.

    Making one checks that the folder holds at least one readable image (reading the files in
    name order until one is found), else :class:`StyleTrainError` naming the folder. An image
    that cannot be read later is reported once through ``log`` and replaced by the next
    readable image in name order, so the crops depend only on the draws and the files, not
    on which thread loads them. :meth:`load` is thread-safe.
    """

    def __init__(self, folder, what: str, size: int, crop: int,
                 log: Callable[[str], None] | None = None):
        self.folder, self.what = Path(folder), what
        self.size, self.crop = int(size), int(crop)
        self._log = log
        self._lock = threading.Lock()
        self.bad: dict[int, str] = {}
        try:
            self.files = style_image_files(self.folder)
        except StyleError as error:
            raise StyleTrainError(str(error).replace("style folder", f"{what} folder", 1)) from None
        for index in range(len(self.files)):
            if self._read(index) is not None:
                break
        else:
            self._no_readable_image()

    def __len__(self) -> int:
        return len(self.files)

    def _no_readable_image(self):
        reasons = "; ".join(list(self.bad.values())[:5])
        more = f" and {len(self.bad) - 5} more" if len(self.bad) > 5 else ""
        raise StyleTrainError(f"{self.what} folder {self.folder} holds no readable image "
                              f"({len(self.files)} file(s) tried: {reasons}{more})")

    def _read(self, index: int) -> np.ndarray | None:
        """The image ``index`` resized, or None (and remembered as bad) if it cannot be read."""
        if index in self.bad:
            return None
        path = self.files[index]
        try:
            image = load_rgb(path, min_side=MIN_IMAGE_SIDE)
        except BadInput as error:
            with self._lock:
                new = index not in self.bad
                self.bad[index] = f"{path.name} ({error.reason})"
            if new and self._log is not None:
                self._log(f"{self.what} folder {self.folder}: skipping unreadable image "
                          f"{path.name} ({error.reason})")
            return None
        return resize_shorter_side(image, self.size, self.crop)

    def draw(self, rng: np.random.Generator, n: int) -> list[tuple[int, float, float]]:
        """``n`` crop specifications (image index, vertical and horizontal position in [0, 1))."""
        indices = rng.integers(0, len(self.files), size=n)
        positions = rng.random((n, 2))
        return [(int(i), float(y), float(x)) for i, (y, x) in zip(indices, positions)]

    def load(self, spec: tuple[int, float, float]) -> np.ndarray:
        """The (crop, crop, 3) uint8 RGB crop of a specification from :meth:`draw`."""
        index, y, x = spec
        for offset in range(len(self.files)):
            image = self._read((index + offset) % len(self.files))
            if image is not None:
                break
        else:
            self._no_readable_image()
        height, width = image.shape[:2]
        top = min(int(y * (height - self.crop + 1)), height - self.crop)
        left = min(int(x * (width - self.crop + 1)), width - self.crop)
        return np.ascontiguousarray(image[top:top + self.crop, left:left + self.crop])


class _Inline:
    """An executor that runs each task at once, in the calling thread (``workers=0``)."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as error:  # noqa: BLE001 - re-raised by result()
            future.set_exception(error)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def to_batch(images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """(B, 3, H, W) float32 RGB in [0, 1] on ``device`` from same-size (H, W, 3) uint8 images."""
    batch = torch.from_numpy(np.stack(images)).to(device)
    return batch.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


# -- files -------------------------------------------------------------------------------

def save_decoder(decoder: nn.Module, path) -> None:
    """Write the decoder's state dict (CPU float32 tensors, keys "1.weight" .. "28.bias" as the
    port's ``decoder.pth``) to ``path`` atomically."""
    state = {key: value.detach().to("cpu", torch.float32).clone()
             for key, value in decoder.state_dict().items()}
    atomic_write(Path(path), lambda handle: torch.save(state, handle))


def state_path(out_path) -> Path:
    """Where the training state of a decoder saved at ``out_path`` goes: ``decoder.state.pth``."""
    return Path(out_path).with_suffix(STATE_SUFFIX)


def _state_record(settings: DecoderTrainingSettings, data: Mapping[str, str]) -> dict:
    """What the training state records as ``settings`` and a resume compares: the
    :data:`~DecoderTrainingSettings.RESUME_FIELDS`, then ``data`` (the digests of the content and
    style file lists and of the VGG file)."""
    return {**settings.resume_dict(), **data}


def save_state(path, decoder: nn.Module, optimizer: torch.optim.Optimizer, step: int,
               settings: DecoderTrainingSettings, data: Mapping[str, str]) -> None:
    """Write the training state (plain tensors, numbers and strings: loadable with
    ``weights_only=True``) to ``path`` atomically: ``step`` steps done, with the run's
    ``settings`` and input ``data`` digests (:func:`_state_record`)."""
    decoder_state = {key: value.detach().to("cpu").clone() for key, value in decoder.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    optimizer_state["state"] = {index: {name: value.detach().to("cpu").clone() if torch.is_tensor(value) else value
                                        for name, value in entry.items()}
                                for index, entry in optimizer_state["state"].items()}
    state = {"format": STATE_FORMAT, "step": int(step), "settings": _state_record(settings, data),
             "decoder": decoder_state, "optimizer": optimizer_state}
    atomic_write(Path(path), lambda handle: torch.save(state, handle))


def load_state(path, settings: DecoderTrainingSettings, data: Mapping[str, str]) -> dict:
    """The training state at ``path`` (read with ``weights_only=True``), checked against the
    ``settings`` and input ``data`` digests of the run that wants to continue it."""
    path = Path(path)
    if not path.is_file():
        raise StyleTrainError(f"no training state {path} to resume: a run saves it next to its --out "
                              "every --save-every steps and at the end")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same message
        raise StyleTrainError(f"training state {path} cannot be read ({error})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise StyleTrainError(f"{path} is not a training state of this version (format {STATE_FORMAT})")
    saved = state.get("settings", {})
    differences = [f"{key} {saved.get(key)!r} -> {value!r}"
                   for key, value in _state_record(settings, data).items() if saved.get(key) != value]
    if differences:
        raise StyleTrainError(f"cannot resume from {path}: it was trained with other settings ("
                              + "; ".join(differences) + "); use the same options, or start a new run")
    return state


def _file_list_digest(files) -> str:
    """sha256 of the sorted file names (what the draws index into)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(Path(path).name.encode() + b"\0")
    return digest.hexdigest()[:16]


def preview_path(out_path) -> Path:
    """Where the preview of a decoder saved at ``out_path`` goes: ``decoder.preview.jpg``."""
    return Path(out_path).with_suffix(PREVIEW_SUFFIX)


def preview_grid(contents: list[np.ndarray], styles: list[np.ndarray],
                 outputs: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """One row per example, columns content | style | stylisation, on a white background."""
    rows = len(contents)
    height, width = contents[0].shape[:2]
    grid = np.full((rows * height + (rows + 1) * gap, 3 * width + 4 * gap, 3), 255, np.uint8)
    for r, row in enumerate(zip(contents, styles, outputs)):
        for c, image in enumerate(row):
            top, left = gap + r * (height + gap), gap + c * (width + gap)
            grid[top:top + height, left:left + width] = image[:height, :width]
    return grid


def write_preview(path, grid: np.ndarray) -> None:
    """Write an RGB grid as a JPEG atomically."""
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, PREVIEW_JPEG_QUALITY])
    if not ok:
        raise StyleTrainError(f"cannot encode the preview image {path}")
    atomic_write(Path(path), lambda handle: handle.write(encoded.tobytes()))


# -- training ----------------------------------------------------------------------------

def _with_options(settings: DecoderTrainingSettings | None, options: dict) -> DecoderTrainingSettings:
    """``settings`` (default: :data:`DEFAULTS`) with the fields named in ``options`` replaced;
    TypeError naming an option that is not a field, as a wrong keyword argument would."""
    settings = DEFAULTS if settings is None else settings
    if not isinstance(settings, DecoderTrainingSettings):
        raise TypeError(f"train_decoder: settings must be a DecoderTrainingSettings, got "
                        f"{type(settings).__name__}")
    fields = {field.name for field in dataclasses.fields(DecoderTrainingSettings)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"train_decoder() got unexpected keyword argument(s): {', '.join(unknown)}")
    return dataclasses.replace(settings, **options) if options else settings


def train_decoder(content_dir, style_dir, vgg_path, out_path,
                  settings: DecoderTrainingSettings | None = None, *, decoder_init=None,
                  overwrite: bool = False, resume: bool = False, progress: bool = True,
                  log: Callable[[str], None] | None = None, **options) -> list[float]:
    """Train an AdaIN decoder; returns the total loss of every step.

    ``content_dir``, ``style_dir``: folders of images (see :class:`CropSampler`);
    ``vgg_path``: the port's ``vgg_normalised.pth`` (frozen encoder); ``out_path``: where the
    decoder state dict is saved every ``settings.save_every`` steps (0: only at the end) and after
    the last step, with the preview (:func:`preview_path`) written at each save.
    ``settings``: a :class:`DecoderTrainingSettings` (default: the port's); keyword ``options``
    named as its fields (``steps=``, ``lr=``, ...) replace single values of it, as the command
    line passes them. ``decoder_init``: a ``decoder.pth``-layout file to start from, else a
    decoder initialised from ``settings.seed``. An existing ``out_path`` is refused unless
    ``overwrite`` or it is the ``decoder_init`` file.
    ``resume``: continue from the training state next to ``out_path`` (:func:`state_path`) up
    to ``settings.steps`` steps in all, with the same :data:`~DecoderTrainingSettings.RESUME_FIELDS`,
    images and VGG file; the result equals an uninterrupted run. A non-finite loss stops training
    (nothing is saved at that step) with :class:`StyleTrainError`. ``log`` receives progress
    messages (saves, skipped images).
    Returns the losses of the steps run by this call.
    """
    from tqdm import tqdm

    settings = _with_options(settings, options).validate()
    steps, batch_size, crop, seed = settings.steps, settings.batch_size, settings.crop, settings.seed
    say = log if log is not None else (lambda message: None)
    out_path = Path(out_path)
    init_path = Path(decoder_init) if decoder_init is not None else None
    if resume and init_path is not None:
        raise StyleTrainError("resume (--resume) continues the saved training state; decoder_init "
                              "(--decoder-init) starts a new run: give one of them")
    continuing = resume or (init_path is not None and out_path.exists() and init_path.exists()
                            and os.path.samefile(out_path, init_path))
    if out_path.exists() and not (overwrite or continuing):
        raise StyleTrainError(f"output {out_path} exists: pass overwrite (--overwrite) to "
                              "replace it, resume (--resume) to continue its training, or start "
                              "from it with decoder_init (--decoder-init)")
    if out_path.exists() and out_path.is_dir():
        raise StyleTrainError(f"output {out_path} is a folder, not a file")
    torch_device = resolve_device(settings.device)

    encoder = load_encoder(vgg_path).to(torch_device).eval()
    content = CropSampler(content_dir, "content", settings.size, crop, log=say)
    style = CropSampler(style_dir, "style", settings.size, crop, log=say)
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    layers = encoder_layers(encoder)
    data = {"content_files": _file_list_digest(content.files), "style_files": _file_list_digest(style.files),
            "vgg": sha256_file(vgg_path)[:16]}
    first_step = 0
    state = load_state(state_path(out_path), settings, data) if resume else None
    if state is not None:
        first_step = state["step"]
        if first_step >= steps:
            raise StyleTrainError(f"{state_path(out_path)} has {first_step} steps done, as many as steps "
                                  f"(--steps {steps}): raise it to train further")
        decoder = make_decoder()
        decoder.load_state_dict(state["decoder"])
    elif init_path is not None:
        decoder = load_decoder(init_path)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            decoder = make_decoder()
    decoder = decoder.to(torch_device).train()
    optimizer = torch.optim.Adam(decoder.parameters(), lr=settings.lr)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])  # moves the moments to the decoder's device
        say(f"resuming from {state_path(out_path)} after step {first_step}")
    out_path.parent.mkdir(parents=True, exist_ok=True)

    preview_rng = np.random.default_rng([seed, PREVIEW_STREAM])
    preview_contents = [content.load(spec) for spec in content.draw(preview_rng, PREVIEW_ROWS)]
    preview_styles = [style.load(spec) for spec in style.draw(preview_rng, PREVIEW_ROWS)]

    def save(step: int) -> None:
        save_decoder(decoder, out_path)
        save_state(state_path(out_path), decoder, optimizer, step, settings, data)
        decoder.eval()
        with torch.no_grad():
            c = encoder(to_batch(preview_contents, torch_device))
            mean, std = feature_stats(encoder(to_batch(preview_styles, torch_device)))
            g = decoder(adain(c, mean, std)).clamp_(0, 1)[:, :, :crop, :crop]
        decoder.train()
        outputs = list(np.rint(g.permute(0, 2, 3, 1).cpu().numpy() * 255).astype(np.uint8))
        write_preview(preview_path(out_path), preview_grid(preview_contents, preview_styles, outputs))
        say(f"step {step}: decoder saved to {out_path}, preview {preview_path(out_path)}, "
            f"training state {state_path(out_path)}")

    executor = (ThreadPoolExecutor(settings.workers, thread_name_prefix="adain-load") if settings.workers
                else _Inline())

    def submit(step: int):
        rng = np.random.default_rng([seed, TRAIN_STREAM, step])
        content_specs, style_specs = content.draw(rng, batch_size), style.draw(rng, batch_size)
        return ([executor.submit(content.load, spec) for spec in content_specs],
                [executor.submit(style.load, spec) for spec in style_specs])

    losses: list[float] = []
    bar = tqdm(total=steps, initial=first_step, desc="train AdaIN decoder", unit="step", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    try:
        pending = submit(first_step)
        for step in range(first_step, steps):
            content_futures, style_futures = pending
            contents = to_batch([f.result() for f in content_futures], torch_device)
            styles = to_batch([f.result() for f in style_futures], torch_device)
            if step + 1 < steps:
                pending = submit(step + 1)  # the next batch loads while this one trains
            current_lr = learning_rate(settings.lr, settings.lr_decay, step)
            for group in optimizer.param_groups:
                group["lr"] = current_lr

            with torch.no_grad():
                style_feats = encode_layers(layers, styles)
                content_feat = encoder(contents)
                target = adain(content_feat, *feature_stats(style_feats[-1]))
            generated_feats = encode_layers(layers, decoder(target))
            loss_c = content_loss(generated_feats[-1], target)
            loss_s = style_loss(generated_feats, style_feats)
            loss = settings.content_weight * loss_c + settings.style_weight * loss_s
            optimizer.zero_grad(set_to_none=True)
            loss.backward()

            value, value_c, value_s = (float(x.detach()) for x in (loss, loss_c, loss_s))
            if not math.isfinite(value):
                raise StyleTrainError(f"step {step}: the loss is {value} (content "
                                      f"{value_c}, style {value_s}); training "
                                      f"stopped, {out_path} holds the last saved decoder "
                                      "(try a lower --lr)")
            optimizer.step()
            losses.append(value)
            bar.update(1)
            bar.set_postfix({"loss": f"{value:.4g}", "content": f"{value_c:.4g}",
                             "style": f"{value_s:.4g}", "lr": f"{current_lr:.2e}"}, refresh=False)
            done = step + 1
            if done == steps or (settings.save_every and done % settings.save_every == 0):
                save(done)
    finally:
        bar.close()
        executor.shutdown(wait=True, cancel_futures=True)
    return losses


__all__ = [
    "DEFAULTS", "CropSampler", "DecoderTrainingSettings", "StyleTrainError", "content_loss", "encode_layers",
    "learning_rate", "load_state", "preview_grid", "preview_path", "resize_shorter_side", "save_decoder",
    "save_state", "state_path", "style_loss", "train_decoder",
]
