"""AdaIN style transfer (Huang & Belongie 2017), as the PyTorch port's ``test.py``:
content and style images resized to a shorter side of 512, relu4_1 features of the
normalised VGG-19, adaptive instance normalisation mixed with the content features by
``alpha``, decoded, clamped to [0, 1].
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from datagen.format.device import resolve_device
from datagen.format.hashing import sha256_file
from datagen.format.imageio import BadInput, load_rgb
from datagen.style import (
    StyleError,
    check_inputs,
    iter_style_images,
    register_stylizer,
    resize,
    shorter_side_size,
    style_set_sha256,
)
from datagen.style.adain_net import find_adain_weights, load_decoder, load_encoder

DEFAULT_SIDE = 512
"""Shorter side of content and style images fed to the networks (the port's
``--content_size`` / ``--style_size``)."""
MIN_SIDE = 16
"""Smallest accepted ``max_side``: relu4_1 is 1/8 of the input, its statistics need > 1 cell."""
CPU_CHANNELS_LAST = True
"""channels_last on the CPU too: oneDNN's convolutions run faster in it on x86
(``benchmarks/bench_style.py`` measures the stylizer)."""


def feature_stats(feat: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel (mean, std) of (B, C, H, W) features, each (B, C, 1, 1).

    As the port's ``calc_mean_std``: variance over the H * W cells with Bessel's correction
    (none when there is a single cell), std = sqrt(var + eps).
    """
    if feat.dim() != 4:
        raise ValueError(f"features must be (B, C, H, W), got shape {tuple(feat.shape)}")
    b, c = feat.shape[:2]
    flat = feat.reshape(b, c, -1)
    var = flat.var(dim=2, unbiased=flat.shape[2] > 1) + eps
    return flat.mean(dim=2).view(b, c, 1, 1), var.sqrt().view(b, c, 1, 1)


def adain(content_feat: torch.Tensor, style_mean: torch.Tensor, style_std: torch.Tensor,
          eps: float = 1e-5) -> torch.Tensor:
    """Adaptive instance normalisation: (B, C, H, W) content features normalised per sample
    and channel (:func:`feature_stats`) and given the style's (B, C, 1, 1) mean and std."""
    content_mean, content_std = feature_stats(content_feat, eps)
    return (content_feat - content_mean) / content_std * style_std + style_mean


@register_stylizer("adain")
class AdainStylizer:
    """AdaIN stylizer over the images of ``style_dir``.

    ``vgg_path`` / ``decoder_path``: the port's ``vgg_normalised.pth`` and ``decoder.pth``
    (or a decoder of the same layout trained on another style collection); None finds them
    with :func:`~datagen.style.adain_net.find_adain_weights`. ``max_side``: the shorter side
    content and style images are resized to before the networks (512 in the port and the
    paper; 0 keeps native sizes), the longer side being capped at 4 x ``max_side``.
    ``batch_size``: most images per forward pass (default: 8 on CUDA, 1 on the CPU, where
    batches are slower); only images of the same resized size are batched together.
    ``precision``: ``auto`` runs bf16 autocast on CUDA (fp16 where bf16 is not supported) with
    deterministic cuDNN and fp32 on the CPU; ``bf16`` asks for bf16 autocast on the CPU too (fast
    on CPUs with AVX-512 BF16; see benchmarks/bench_style.py for the difference it makes to the
    images); ``fp32`` never uses autocast.

    Style statistics (relu4_1 mean and std) are computed once per style image, when first
    used (or all at once by :meth:`precompute`), and cached; only the statistics are kept.
    """

    name = "adain"

    def __init__(self, vgg_path=None, decoder_path=None, style_dir=None, device="auto",
                 max_side: int = DEFAULT_SIDE, batch_size: int | None = None,
                 channels_last: bool | None = None, precision: str = "auto"):
        if style_dir is None:
            raise StyleError("the AdaIN stylizer needs a style folder (style_dir)")
        if max_side and max_side < MIN_SIDE:
            raise StyleError(f"max_side must be 0 (native size) or at least {MIN_SIDE}, "
                             f"got {max_side}")
        if batch_size is not None and batch_size < 1:
            raise StyleError(f"batch_size must be >= 1, got {batch_size}")
        self.vgg_path, self.decoder_path = find_adain_weights(vgg_path, decoder_path)
        self.style_dir = Path(style_dir)
        self.style_paths: list[Path] = [path for path, _ in iter_style_images(style_dir)]
        self.max_side = int(max_side)
        self.device = resolve_device(device)
        # On the CPU one image per forward is faster than batches (benchmarks/bench_style.py
        # measures both); on a GPU batches keep it busy.
        self.batch_size = int(batch_size) if batch_size is not None else (8 if self.device.type == "cuda" else 1)
        cuda = self.device.type == "cuda"
        if precision not in ("auto", "fp32", "bf16"):
            raise StyleError(f"precision must be auto, fp32 or bf16, got {precision!r}")
        if precision == "fp32":
            self.dtype = torch.float32
        elif precision == "bf16" or cuda:
            self.dtype = torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.dtype = torch.float32
        self.channels_last = ((cuda or CPU_CHANNELS_LAST) if channels_last is None
                              else bool(channels_last))
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.encoder = load_encoder(self.vgg_path).eval().to(self.device, memory_format=memory_format)
        self.decoder = load_decoder(self.decoder_path).eval().to(self.device, memory_format=memory_format)
        for parameter in [*self.encoder.parameters(), *self.decoder.parameters()]:
            parameter.requires_grad_(False)
        self._style_stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._description: dict | None = None

    @property
    def n_styles(self) -> int:
        return len(self.style_paths)

    # -- internals -----------------------------------------------------------------------

    def _context(self):
        """Inference mode, autocast and deterministic cuDNN on CUDA; plain inference on the CPU."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.dtype != torch.float32:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.dtype))
        if self.device.type == "cuda":
            stack.enter_context(torch.backends.cudnn.flags(enabled=True, benchmark=False,
                                                           deterministic=True))
        return stack

    def _to_tensor(self, images: list[np.ndarray]) -> torch.Tensor:
        """(B, 3, H, W) float32 in [0, 1] on the device from same-size (H, W, 3) uint8 images."""
        batch = torch.from_numpy(np.stack(images)).to(self.device)
        batch = batch.permute(0, 3, 1, 2).float().div_(255.0)
        if self.channels_last:
            return batch.contiguous(memory_format=torch.channels_last)
        return batch.contiguous()

    def _compute_style(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.style_paths[index]
        try:
            image = load_rgb(path)
        except BadInput as error:
            raise StyleError(f"style image {index} ({error}) could be read when the stylizer "
                             "was made but not now") from None
        image = resize(image, *shorter_side_size(*image.shape[:2], self.max_side))
        with self._context():
            feat = self.encoder(self._to_tensor([image]))
            mean, std = feature_stats(feat.float())
        return mean[0], std[0]

    def style_stats(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each (512, 1, 1) float32 on the device, of the relu4_1 features of
        style image ``index``; computed on first use, then cached."""
        if index not in self._style_stats:
            self._style_stats[index] = self._compute_style(index)
        return self._style_stats[index]

    def precompute(self, indices=None) -> None:
        """Compute (and cache) the statistics of the given style images (default: all)."""
        for index in range(self.n_styles) if indices is None else indices:
            self.style_stats(int(index))

    def _run_batch(self, images: list[np.ndarray], styles: list[int],
                   alphas: list[float]) -> np.ndarray:
        """Same-size resized (h, w, 3) uint8 images -> (B, h, w, 3) float32 in [0, 1]."""
        height, width = images[0].shape[:2]
        means, stds = zip(*(self.style_stats(int(s)) for s in styles))
        with self._context():
            content = self.encoder(self._to_tensor(images)).float()
            alpha = torch.tensor(alphas, dtype=torch.float32, device=self.device).view(-1, 1, 1, 1)
            feat = adain(content, torch.stack(means), torch.stack(stds))
            feat = alpha * feat + (1 - alpha) * content
            if self.channels_last:
                feat = feat.contiguous(memory_format=torch.channels_last)
            decoded = self.decoder(feat).float().clamp_(0, 1)
        # The encoder pools with ceil_mode: the decoded image is 8 * ceil(h / 8) high; its
        # first h rows and w columns are the image.
        decoded = decoded[:, :, :height, :width]
        return decoded.permute(0, 2, 3, 1).cpu().numpy()

    # -- the Stylizer interface ------------------------------------------------------------

    def stylize(self, images: list[np.ndarray], styles: list[int],
                alphas: list[float]) -> list[np.ndarray]:
        """Stylise (H, W, 3) uint8 RGB ``images[i]`` with style ``styles[i]`` at strength
        ``alphas[i]``; returns (H, W, 3) uint8 RGB images of the input sizes."""
        check_inputs(images, styles, alphas, self.n_styles)
        resized = [resize(image, *shorter_side_size(*image.shape[:2], self.max_side))
                   for image in images]
        groups: dict[tuple, list[int]] = {}
        for i, image in enumerate(resized):
            groups.setdefault(image.shape[:2], []).append(i)
        outputs: list[np.ndarray | None] = [None] * len(images)
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                decoded = self._run_batch([resized[i] for i in chunk],
                                          [styles[i] for i in chunk],
                                          [float(alphas[i]) for i in chunk])
                for i, result in zip(chunk, decoded):
                    height, width = images[i].shape[:2]
                    result = resize(np.ascontiguousarray(result), height, width)
                    outputs[i] = np.clip(np.rint(result * 255.0), 0, 255).astype(np.uint8)
        return outputs

    def describe(self) -> dict:
        """Method, weights (path and sha256), style folder, number and hash of the style
        images, device, dtype and the sizes used."""
        if self._description is None:
            self._description = {
                "method": "adain",
                "weights": {
                    "vgg": {"path": str(self.vgg_path), "sha256": sha256_file(self.vgg_path)},
                    "decoder": {"path": str(self.decoder_path),
                                "sha256": sha256_file(self.decoder_path)},
                },
                "style_dir": str(self.style_dir),
                "n_styles": self.n_styles,
                "styles_sha256": style_set_sha256(self.style_paths),
                "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."),
                "channels_last": self.channels_last,
                "max_side": self.max_side,
                "batch_size": self.batch_size,
                "torch": torch.__version__,
            }
        return dict(self._description)
