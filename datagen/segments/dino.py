"""DINO ViT-S/16 (Caron et al. 2021) through timm, for LOST: finding and loading its weights, and
the keys of its last attention block on images of any size.

The network is timm's ``vit_small_patch16_224`` (:func:`dino_vit_class`: timm's
VisionTransformer with that architecture, no classifier, any input size) whose position
embeddings are interpolated to the image's grid exactly as DINO's own ``interpolate_pos_encoding``
does (:func:`dino_pos_embed`). The official DINO backbone file ``dino_deitsmall16_pretrain.pth``
has exactly timm's key names (``cls_token``, ``pos_embed`` (1, 197, 384), ``patch_embed.proj.*``,
``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``, ``norm.*``), so it loads
without renaming; so do timm's own files (``.pth``/``.bin``/``.safetensors``). The file is found
and read by :mod:`datagen.format.weights` (:data:`DINO_WEIGHTS`: one search order for every
network, ``torch.load(weights_only=True)`` only); this module holds its key mapping.

timm's own resampling (``dynamic_img_size=True``: bicubic with antialiasing, to an output size)
differs from DINO's (torch's plain bicubic with a scale factor of (grid + 0.1) / 14) by 2-6 % of
the embedding's norm, which would make the features differ from the reference LOST code's; hence
the override.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from datagen.format.device import resolve_device as resolve_device  # the name LOST's source imports
from datagen.format.imageio import IMAGENET_MEAN, IMAGENET_STD
from datagen.format.weights import WeightsError, WeightsSpec, find_weights, load_weights, search_dirs

ARCH = "vit_small_patch16_224"
PATCH = 16
DIM = 384
HEADS = 6
DINO_FILE = "dino_deitsmall16_pretrain.pth"
DINO_URL = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"
DINO_ENV = "SEGSWAP_DINO_WEIGHTS"

CONTAINERS = ("teacher", "state_dict", "model", "student")
"""A checkpoint dict without tensors at its top level is unwrapped to the first of these keys
that holds them (DINO's full training checkpoints keep "teacher" and "student"; the teacher is
the network DINO evaluates)."""
WRAPPER = "module."
"""Key prefix removed when every key has it (DistributedDataParallel)."""
BACKBONE = "backbone."
"""DINO's MultiCropWrapper: when keys have this prefix, only those are kept (not its "head.")."""
DROPPED = ("head.", "fc_norm.")
"""Keys of heads LOST does not use: DINO's projection head, a timm classifier."""


class DinoWeightsError(WeightsError, ValueError):
    """DINO weights that cannot be found or used; the message names the file and what to do."""


def dino_cache_dirs() -> list[Path]:
    """Where :func:`find_dino_weights` looks after ``--dino-weights`` and ``$SEGSWAP_DINO_WEIGHTS``:
    ``${XDG_CACHE_HOME:-~/.cache}/segswap``, then torch hub's checkpoints folder (by default
    ``~/.cache/torch/hub/checkpoints``, where ``torch.hub.load('facebookresearch/dino:main',
    'dino_vits16')`` saves the file); see :func:`datagen.format.weights.find_weights`."""
    return search_dirs(DINO_WEIGHTS)


def find_dino_weights(explicit=None) -> Path:
    """Path of the DINO ViT-S/16 weights: ``explicit`` (``--dino-weights``), else
    ``$SEGSWAP_DINO_WEIGHTS``, else ``dino_deitsmall16_pretrain.pth`` in :func:`dino_cache_dirs`
    (:func:`datagen.format.weights.find_weights`, the order shared by every network).

    A path given explicitly or by the environment must exist (it is not replaced by a cached
    file). Raises :class:`DinoWeightsError` naming the file, its URL and where to put it.
    """
    try:
        return find_weights(DINO_WEIGHTS, explicit)
    except WeightsError as error:
        raise DinoWeightsError(str(error)) from None


VIT_S16 = dict(patch_size=PATCH, embed_dim=DIM, depth=12, num_heads=HEADS)
"""timm's ``vit_small_patch16_224`` architecture (its ``model_args``)."""


def dino_pos_embed(pos_embed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """DINO's ``interpolate_pos_encoding``: (1, 1 + N, D) embeddings of a sqrt(N) x sqrt(N) grid
    -> (1, 1 + rows * cols, D) for a rows x cols grid (CLS first, then patches row-major).

    Bicubic (torch, align_corners=False) with scale factors ((rows + 0.1) / sqrt(N),
    (cols + 0.1) / sqrt(N)) — the 0.1 avoids floating-point rounding of the output size — and
    unchanged when the grid is the training grid.
    """
    patches = pos_embed.shape[1] - 1
    side = int(math.sqrt(patches))
    if rows == cols == side:
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = nn.functional.interpolate(grid.float(), scale_factor=((rows + 0.1) / side, (cols + 0.1) / side),
                                     mode="bicubic")
    if grid.shape[-2:] != (rows, cols):
        raise ValueError(f"position embeddings interpolated to {tuple(grid.shape[-2:])}, not {(rows, cols)}")
    grid = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


@functools.cache
def dino_vit_class() -> type:
    """``DinoViT``: timm's VisionTransformer taking (B, 3, 16 h, 16 w) images of any h, w, with
    DINO's position-embedding interpolation (:func:`dino_pos_embed`). Made on first use, so that
    importing this module does not import timm (seconds)."""
    from timm.models.vision_transformer import VisionTransformer

    class DinoViT(VisionTransformer):
        def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
            batch, rows, cols, dim = x.shape  # patch tokens, as timm's dynamic_img_size gives them
            tokens = torch.cat([self.cls_token.expand(batch, -1, -1), x.reshape(batch, -1, dim)], dim=1)
            return self.pos_drop(tokens + dino_pos_embed(self.pos_embed, rows, cols))

    return DinoViT


def make_vit() -> nn.Module:
    """DINO's ViT-S/16 (timm's ``vit_small_patch16_224``) with random weights, no classifier, any
    input size multiple of 16, in eval mode and frozen. Never downloads anything."""
    model = dino_vit_class()(num_classes=0, dynamic_img_size=True, **VIT_S16)
    return model.eval().requires_grad_(False)


def _is_state(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def dino_state_dict(checkpoint, path) -> dict:
    """The ViT state dict inside a loaded checkpoint (see :data:`CONTAINERS`, :data:`WRAPPER`,
    :data:`BACKBONE`, :data:`DROPPED`); :class:`DinoWeightsError` naming ``path`` if there is none."""
    state = checkpoint
    if not _is_state(state):
        inner = [checkpoint[k] for k in CONTAINERS if isinstance(checkpoint, dict) and _is_state(checkpoint.get(k))]
        if not inner:
            what = (f"a dict with keys {', '.join(map(str, list(checkpoint)[:8]))}"
                    if isinstance(checkpoint, dict) else f"a {type(checkpoint).__name__}")
            raise DinoWeightsError(f"{path}: not a ViT state dict: the file holds {what}, and no state dict "
                                   f"under {', '.join(map(repr, CONTAINERS))}")
        state = inner[0]
    state = {str(k): v for k, v in state.items()}
    if all(k.startswith(WRAPPER) for k in state):
        state = {k[len(WRAPPER):]: v for k, v in state.items()}
    backbone = {k[len(BACKBONE):]: v for k, v in state.items() if k.startswith(BACKBONE)}
    state = backbone or state
    return {k: v for k, v in state.items() if not k.startswith(DROPPED)}


DINO_WEIGHTS = WeightsSpec(
    name="DINO ViT-S/16", file_names=(DINO_FILE,), env_var=DINO_ENV, option="--dino-weights",
    source=DINO_URL, convert=dino_state_dict)
"""LOST's backbone: the official file (or timm's files of the same network, given by path),
its state dict taken out by :func:`dino_state_dict`."""


def load_state(model: nn.Module, state: dict, path) -> nn.Module:
    """Load ``state`` into ``model`` (in place; returns it). Every key of the model must be there
    with its shape and float, and no other key may be: else :class:`DinoWeightsError` listing the
    missing, unexpected and mis-shaped keys and naming ``path``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    wrong += [f"{k} ({state[k].dtype}, expected float)" for k in expected
              if k in state and not state[k].is_floating_point()]
    problems = [f"{len(keys)} {what} key(s): {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                for keys, what in ((missing, "missing"), (unexpected, "unexpected"), (wrong, "wrong"))
                if keys]
    if problems:
        raise DinoWeightsError(f"{path}: not DINO ViT-S/16 ({ARCH}) weights: {'; '.join(problems)}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model


def load_dino(path, device="cpu") -> nn.Module:
    """:func:`make_vit` with the weights of file ``path`` (official DINO or timm layout), on ``device``."""
    path = Path(path)
    try:
        state = load_weights(DINO_WEIGHTS, path)
    except DinoWeightsError:
        raise
    except WeightsError as error:  # the shared reader's: missing or unreadable file
        raise DinoWeightsError(str(error)) from None
    return load_state(make_vit(), state, path).to(device)


def padded_grid(height: int, width: int) -> tuple[int, int]:
    """(h, w) patch grid of an image of ``height`` x ``width`` pixels padded to multiples of 16."""
    return -(-height // PATCH), -(-width // PATCH)


def image_batch(images: list[np.ndarray], device="cpu") -> torch.Tensor:
    """Same-size (H, W, 3) uint8 RGB images -> (B, 3, 16h, 16w) float32, ImageNet-normalised, then
    padded with zeros (the mean colour) on the right and bottom to multiples of 16, as LOST does."""
    height, width = images[0].shape[:2]
    if any(image.shape != images[0].shape for image in images):
        raise ValueError("image_batch needs images of one size")
    batch = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1)
    h, w = padded_grid(height, width)
    padded = torch.zeros((len(images), 3, h * PATCH, w * PATCH), device=batch.device)
    padded[:, :, :height, :width] = (batch - mean) / std
    return padded


@torch.no_grad()
def last_keys(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Keys of the last block's attention: (B, 3, 16h, 16w) -> (B, h * w, 384) float32, the heads'
    keys concatenated (head-major), the CLS token dropped.

    Captured by a hook on ``blocks[-1].attn.qkv`` (output (B, 1 + h * w, 3 * 384), laid out as
    (3, heads, head_dim)), so it does not depend on how timm computes the attention itself.
    """
    captured = {}
    qkv_layer = model.blocks[-1].attn.qkv
    handle = qkv_layer.register_forward_hook(lambda module, inputs, output: captured.setdefault("qkv", output))
    try:
        model.forward_features(batch)
    finally:
        handle.remove()
    qkv = captured["qkv"]
    batch_size, tokens, _ = qkv.shape
    heads = model.blocks[-1].attn.num_heads
    keys = qkv.reshape(batch_size, tokens, 3, heads, -1)[:, :, 1]  # (B, N, heads, head_dim)
    prefix = getattr(model, "num_prefix_tokens", 1)
    return keys.reshape(batch_size, tokens, -1)[:, prefix:].float()
