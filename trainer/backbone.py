"""The frozen feature extractor (paper section 3.2): ResNet-50 up to conv4 (``layer3``).

Features have stride 16 and 1024 channels and are L2-normalised over channels. The weights are
MoCo-v2's (800 epochs), as in the paper; :func:`load_backbone_weights` is the only place that loads
them, through :mod:`datagen.format.weights` (:data:`BACKBONE_WEIGHTS`: the search order shared by
every network, ``weights_only=True``: never unpickling arbitrary objects); this module holds the
key mapping of the checkpoint formats it accepts.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from datagen.format.hashing import sha256_file
from datagen.format.imageio import IMAGENET_MEAN, IMAGENET_STD
from datagen.format.weights import WeightsError, WeightsSpec, find_weights, load_weights

STRIDE = 16
CHANNELS = 1024
LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")
"""Children of torchvision's ResNet-50 that make the backbone, in order."""
_WEIGHTED_PREFIXES = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.")
_IGNORED_PREFIXES = ("layer4.", "fc.")
_OPTIONAL_SUFFIX = "num_batches_tracked"
"""BatchNorm counters: absent from older checkpoints, unused in eval mode."""

MOCO_FILE = "moco_v2_800ep_pretrain.pth.tar"
MOCO_TORCHVISION_FILE = "moco_v2_800ep_pretrain_torchvision.pth.tar"
MOCO_URL = "https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar"
ENV_VAR = "SEGSWAP_BACKBONE_WEIGHTS"
RANDOM = "random"
_MOCO_PREFIX = "module.encoder_q."


class BackboneWeightsError(WeightsError, RuntimeError):
    """A backbone weights file is missing, unreadable or not a ResNet-50 checkpoint."""


def normalise(images_uint8) -> torch.Tensor:
    """(B, H, W, 3) uint8 RGB (tensor or numpy) -> (B, 3, H, W) float32, ImageNet mean/std normalised."""
    images = torch.from_numpy(np.ascontiguousarray(images_uint8)) if isinstance(images_uint8, np.ndarray) \
        else images_uint8
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
            or images.shape[-1] != 3:
        raise ValueError(f"normalise expects (B, H, W, 3) uint8 images, got "
                         f"{getattr(images, 'dtype', type(images))} of shape {tuple(getattr(images, 'shape', ()))}")
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


class Backbone(nn.Module):
    """Frozen ResNet-50 conv1..layer3, always in eval mode (BatchNorm uses its running statistics).

    Built with random weights; load real ones with :func:`load_backbone_weights`.
    """

    def __init__(self):
        super().__init__()
        resnet = torchvision.models.resnet50(weights=None)
        for name in LAYERS:
            self.add_module(name, getattr(resnet, name))
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> Backbone:
        """Ignore ``mode``: the backbone stays in eval mode whatever its parent asks."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float, :func:`normalise`d -> (B, 1024, H/16, W/16) float, unit L2 norm over channels."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Backbone expects (B, 3, H, W) images, got shape {tuple(images.shape)}")
        x = images
        for name in LAYERS:
            x = getattr(self, name)(x)
        return F.normalize(x, dim=1)


def _tensor_dict(obj: object) -> dict | None:
    """``obj`` if it is a non-empty dict of str -> tensor (other entries dropped), else None."""
    if not isinstance(obj, dict):
        return None
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return tensors or None


def _extract_state_dict(obj: object, path: Path) -> tuple[dict, str]:
    """(torchvision-named state dict, format name) of a loaded checkpoint, detected by its keys."""
    inner = _tensor_dict(obj.get("state_dict")) if isinstance(obj, dict) else None
    if inner and any(k.startswith(_MOCO_PREFIX) for k in inner):
        return {k[len(_MOCO_PREFIX):]: v for k, v in inner.items() if k.startswith(_MOCO_PREFIX)}, "moco_v2"
    model = _tensor_dict(obj.get("model")) if isinstance(obj, dict) else None
    if model and "conv1.weight" in model:
        return model, "moco_v2"  # the SegSwap authors' convert_torchvision.py output
    plain = inner or _tensor_dict(obj)
    if plain is None:
        raise BackboneWeightsError(f"{path}: holds no tensors keyed by name; this does not look like a "
                                   f"ResNet-50 checkpoint")
    if all(k.startswith("module.") for k in plain):  # saved from DataParallel
        plain = {k[len("module."):]: v for k, v in plain.items()}
    name = path.name.lower()
    timm = path.suffix == ".safetensors" or "timm" in name or name.startswith("pytorch_model")
    return plain, "timm" if timm else "torchvision"


BACKBONE_WEIGHTS = WeightsSpec(
    name="ResNet-50 backbone (MoCo-v2)", file_names=(MOCO_FILE, MOCO_TORCHVISION_FILE), env_var=ENV_VAR,
    option="--backbone-weights", source=f"{MOCO_URL} (the MoCo authors' release)", convert=_extract_state_dict,
    alternatives=f"--backbone-weights {RANDOM} trains without it (for smoke tests only).")
"""The trainer's frozen backbone: MoCo-v2's checkpoint or its torchvision conversion in the caches,
any torchvision / timm ResNet-50 state dict by path; ``convert`` gives (torchvision-named state
dict, format name)."""


def _check_keys(backbone: Backbone, state: dict, path: Path) -> dict:
    """The entries of ``state`` the backbone uses; raise if any used layer is missing or mis-shaped."""
    expected = backbone.state_dict()
    used = {k: v for k, v in state.items() if k.startswith(_WEIGHTED_PREFIXES)}
    missing = [k for k in expected if k not in used and not k.endswith(_OPTIONAL_SUFFIX)]
    unexpected = [k for k in used if k not in expected]
    shapes = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
              for k, v in used.items() if k in expected and v.shape != expected[k].shape]
    problems = [(missing, "missing"), (unexpected, "unexpected"), (shapes, "mis-shaped")]
    if any(keys for keys, _ in problems):
        details = "; ".join(f"{len(keys)} {what} keys, e.g. {', '.join(keys[:4])}" for keys, what in problems if keys)
        raise BackboneWeightsError(f"{path}: this does not look like a ResNet-50 checkpoint ({details})")
    return used


def load_backbone_weights(backbone: Backbone, source: str | os.PathLike) -> dict:
    """Load conv1..layer3 weights from ``source`` (a checkpoint path, or "random") into ``backbone``.

    Formats, told apart by their key names: MoCo-v2's checkpoint ("state_dict" with
    ``module.encoder_q.*``; the MLP head, ``encoder_k`` and the queue are dropped), its torchvision
    conversion ("model"), a torchvision or timm ResNet-50 state dict (``.pth``/``.bin``/``.safetensors``).
    ``layer4.*`` and ``fc.*`` are ignored. Returns ``{"source", "format", "sha256"}`` for the run's record.
    """
    if str(source) == RANDOM:
        warnings.warn("the backbone keeps its RANDOM initialisation (--backbone-weights random): features are "
                      "meaningless and the trained model is only good for smoke tests", stacklevel=2)
        return {"source": RANDOM, "format": RANDOM, "sha256": None}
    path = Path(source).expanduser()
    try:
        state, fmt = load_weights(BACKBONE_WEIGHTS, path)
    except BackboneWeightsError:
        raise
    except WeightsError as error:  # the shared reader's: missing or unreadable file
        raise BackboneWeightsError(str(error)) from None
    used = _check_keys(backbone, state, path)
    backbone.load_state_dict(used, strict=False)
    return {"source": str(path.resolve()), "format": fmt, "sha256": sha256_file(path)}


def find_backbone_weights(explicit: str | None) -> str:
    """Path of the backbone weights (or "random"): ``explicit``, else ``$SEGSWAP_BACKBONE_WEIGHTS``,
    else ``moco_v2_800ep_pretrain.pth.tar`` or its torchvision conversion in the caches
    (:func:`datagen.format.weights.find_weights`, the order shared by every network). "random" in
    the option, or in the environment when no option is given, means no weights file."""
    if explicit == RANDOM or (not explicit and os.environ.get(ENV_VAR) == RANDOM):
        return RANDOM
    try:
        return str(find_weights(BACKBONE_WEIGHTS, explicit))
    except WeightsError as error:
        raise BackboneWeightsError(str(error)) from None


def device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def features(backbone: torch.nn.Module, images_uint8) -> torch.Tensor:
    """(B, H, W, 3) uint8 (numpy or tensor) -> (B, 1024, H/16, W/16) float32 features, on the backbone's device."""
    return backbone(normalise(images_uint8).to(device_of(backbone))).float()
