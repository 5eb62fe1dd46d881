"""The AdaIN networks (Huang & Belongie 2017) in the layout of the PyTorch port
naoto0804/pytorch-AdaIN (``net.vgg``, ``net.decoder``), and the loading of its published
weights ``vgg_normalised.pth`` and ``decoder.pth``.

Both networks are ``nn.Sequential``; their state-dict keys are ``"{module index}.weight"`` /
``"{module index}.bias"`` of the convolutions, exactly as in the port's files, so the files
load without renaming. The files are found and read by :mod:`datagen.format.weights`
(:data:`ADAIN_VGG_WEIGHTS`, :data:`ADAIN_DECODER_WEIGHTS`: one search order for every network,
``torch.load(weights_only=True)`` only); this module unwraps and checks their state dicts.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from datagen.format.weights import (
    WeightsError,
    WeightsNotFoundError,
    WeightsSpec,
    find_weights,
    search_dirs,
)
from datagen.format.weights import (
    load_weights as load_weights_file,
)
from datagen.style import StyleError

VGG_FILE = "vgg_normalised.pth"
DECODER_FILE = "decoder.pth"
RELEASE_URL = "https://github.com/naoto0804/pytorch-AdaIN/releases/tag/v0.0.0"
VGG_ENV = "SEGSWAP_ADAIN_VGG"
DECODER_ENV = "SEGSWAP_ADAIN_DECODER"

FULL_VGG_MODULES = 53
"""Modules of the port's full ``net.vgg`` (up to relu5_4); its file has keys up to "51.*"."""
ENCODER_MODULES = 31
"""The encoder is the full VGG truncated to its first 31 modules (up to relu4_1)."""
ENCODER_SLICES = {"relu1_1": (0, 4), "relu2_1": (4, 11), "relu3_1": (11, 18), "relu4_1": (18, 31)}
"""Module index ranges of the encoder's stages, as ``Net.enc_1`` .. ``enc_4`` of the port."""

CHECKPOINT_CONTAINERS = ("state_dict", "decoder", "model", "encoder", "vgg")
"""A checkpoint that is a dict holding one of these keys (tried in this order) whose value is a
dict of tensors is unwrapped to that dict (e.g. ``{"decoder": state_dict, "iter": 160000}``)."""
STRIPPED_PREFIXES = ("module.", "decoder.", "encoder.", "vgg.")
"""Key prefixes removed when every key of the state dict has them (DataParallel, a whole
``Net``'s state dict restricted to one part)."""


class StyleWeightsError(StyleError, WeightsError):
    """AdaIN weights that cannot be found or used; the message names the files and what to do."""


def _conv_block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.ReflectionPad2d((1, 1, 1, 1)), nn.Conv2d(cin, cout, (3, 3)), nn.ReLU()]


def _pool() -> nn.Module:
    return nn.MaxPool2d((2, 2), (2, 2), (0, 0), ceil_mode=True)


def make_full_vgg() -> nn.Sequential:
    """The port's full ``net.vgg`` (53 modules, up to relu5_4), the layout of ``vgg_normalised.pth``.

    Input (B, 3, H, W) RGB in [0, 1]: the first 1x1 convolution does the Caffe preprocessing
    (RGB -> BGR, x 255, mean subtraction), it is part of the weights.
    """
    layers: list[nn.Module] = [nn.Conv2d(3, 3, (1, 1))]
    channels = 3
    for stage, (width, repeats) in enumerate(((64, 2), (128, 2), (256, 4), (512, 4), (512, 4))):
        if stage > 0:
            layers.append(_pool())
        for _ in range(repeats):
            layers += _conv_block(channels, width)
            channels = width
    assert len(layers) == FULL_VGG_MODULES
    return nn.Sequential(*layers)


def make_vgg_encoder() -> nn.Sequential:
    """The port's ``net.vgg`` truncated to its first 31 modules: (B, 3, H, W) RGB in [0, 1] ->
    (B, 512, ceil(H / 8), ceil(W / 8)) relu4_1 features. Keys are those of ``vgg_normalised.pth``."""
    return nn.Sequential(*list(make_full_vgg().children())[:ENCODER_MODULES])


def make_decoder() -> nn.Sequential:
    """The port's ``net.decoder``: (B, 512, h, w) features -> (B, 3, 8h, 8w) RGB (about [0, 1],
    unclamped). Keys are those of ``decoder.pth`` ("1.weight", "5.weight", ... "28.bias")."""
    up = lambda: nn.Upsample(scale_factor=2, mode="nearest")  # noqa: E731
    layers: list[nn.Module] = []
    layers += _conv_block(512, 256) + [up()]
    layers += _conv_block(256, 256) + _conv_block(256, 256) + _conv_block(256, 256)
    layers += _conv_block(256, 128) + [up()]
    layers += _conv_block(128, 128) + _conv_block(128, 64) + [up()]
    layers += _conv_block(64, 64) + _conv_block(64, 3)[:2]  # no ReLU after the last conv
    return nn.Sequential(*layers)


def encoder_layers(encoder: nn.Sequential) -> list[nn.Sequential]:
    """The encoder's four stages [relu1_1, relu2_1, relu3_1, relu4_1] (modules [:4], [4:11],
    [11:18], [18:31]), sharing the encoder's modules; applied in turn they give the features
    of the style loss."""
    modules = list(encoder.children())
    if len(modules) < ENCODER_MODULES:
        raise ValueError(f"encoder has {len(modules)} modules, expected at least {ENCODER_MODULES}")
    return [nn.Sequential(*modules[a:b]) for a, b in ENCODER_SLICES.values()]


def _describe_what(what: str) -> str:
    return {"encoder": f"AdaIN VGG encoder ({VGG_FILE})",
            "decoder": f"AdaIN decoder ({DECODER_FILE})"}.get(what, what)


def _unwrapper(what: str):
    """``convert`` of a spec: :func:`_unwrap` for ``what``."""
    return lambda checkpoint, path: _unwrap(checkpoint, path, what)


def _list(keys, limit: int = 8) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _unwrap(checkpoint, path: Path, what: str) -> dict:
    """The state dict inside a loaded checkpoint (see CHECKPOINT_CONTAINERS, STRIPPED_PREFIXES)."""
    if not isinstance(checkpoint, dict):
        raise StyleWeightsError(f"{path}: this is not an {_describe_what(what)}: the file holds a "
                                f"{type(checkpoint).__name__}, not a state dict")
    state = checkpoint
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        for key in CHECKPOINT_CONTAINERS:
            inner = checkpoint.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor)
                                                         for v in inner.values()):
                state = inner
                break
        else:
            raise StyleWeightsError(
                f"{path}: this is not an {_describe_what(what)}: a dict with keys "
                f"{_list(map(str, checkpoint))} that is neither a state dict nor holds one under "
                f"{', '.join(repr(k) for k in CHECKPOINT_CONTAINERS)}")
    state = {str(k): v for k, v in state.items()}
    for prefix in STRIPPED_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


_SUBDIR = "adain"
"""AdaIN's files are looked for in ``~/.cache/segswap/adain/``; torch.hub never downloads them,
and ``decoder.pth`` is too generic a name to be taken from its checkpoints folder."""
ADAIN_VGG_WEIGHTS = WeightsSpec(
    name="AdaIN VGG encoder", file_names=(VGG_FILE,), env_var=VGG_ENV, option="--adain-vgg",
    source=f"the pytorch-AdaIN release, {RELEASE_URL}", cache_subdir=_SUBDIR, torch_hub=False,
    convert=_unwrapper("encoder"))
"""The port's normalised VGG-19 (the encoder, truncated to relu4_1 when loaded)."""
ADAIN_DECODER_WEIGHTS = WeightsSpec(
    name="AdaIN decoder", file_names=(DECODER_FILE,), env_var=DECODER_ENV, option="--adain-decoder",
    source=f"the pytorch-AdaIN release, {RELEASE_URL}", cache_subdir=_SUBDIR,
    torch_hub=False, convert=_unwrapper("decoder"))
"""The port's decoder, or one trained on a style collection (``datagen style train``)."""
ADAIN_WEIGHTS = {"encoder": ADAIN_VGG_WEIGHTS, "decoder": ADAIN_DECODER_WEIGHTS}


def load_weights(module: nn.Module, path, what: str) -> nn.Module:
    """Load the state dict of file ``path`` into ``module`` (in place; returns it).

    ``what`` is ``"encoder"`` or ``"decoder"`` (used in messages). The file may be a plain
    state dict, or a dict holding one under "state_dict", "decoder", "model", "encoder" or
    "vgg" (a decoder trained on a style collection may be saved that way); keys prefixed
    with "module.", "decoder.", "encoder." or "vgg." (all of them) are accepted. Keys of a
    ``nn.Sequential`` module numbered at or beyond its length are ignored (so the full
    53-module ``vgg_normalised.pth`` loads into the 31-module encoder); every key of
    ``module`` must be present with its shape, and no other key may be. Anything else raises
    :class:`StyleWeightsError` naming the file and the offending keys.
    """
    if what not in ADAIN_WEIGHTS:
        raise ValueError(f"what must be one of {', '.join(ADAIN_WEIGHTS)}, got {what!r}")
    path = Path(path)
    try:
        state = load_weights_file(ADAIN_WEIGHTS[what], path)
    except StyleWeightsError:
        raise
    except WeightsError as error:  # the shared reader's: missing or unreadable file
        raise StyleWeightsError(str(error)) from None
    expected = module.state_dict()
    if isinstance(module, nn.Sequential):
        length = len(module)
        state = {k: v for k, v in state.items()
                 if not (re.match(r"^\d+\.", k) and int(k.split(".")[0]) >= length)}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_list(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes {_list(wrong)}")
    if problems:
        raise StyleWeightsError(f"{path}: this is not an {_describe_what(what)}: "
                                f"{'; '.join(problems)}")
    not_float = [k for k, v in state.items() if not v.is_floating_point()]
    if not_float:
        raise StyleWeightsError(f"{path}: this is not an {_describe_what(what)}: "
                                f"non-float tensors {_list(not_float)}")
    module.load_state_dict(state, strict=True)
    return module


def load_encoder(path) -> nn.Sequential:
    """:func:`make_vgg_encoder` with the weights of ``vgg_normalised.pth`` at ``path``."""
    return load_weights(make_vgg_encoder(), path, "encoder")


def load_decoder(path) -> nn.Sequential:
    """:func:`make_decoder` with the weights of a ``decoder.pth``-layout file at ``path``."""
    return load_weights(make_decoder(), path, "decoder")


def adain_cache_dir() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/segswap/adain``: where the weights are looked for last."""
    return search_dirs(ADAIN_VGG_WEIGHTS)[0]


def find_adain_weights(vgg=None, decoder=None) -> tuple[Path, Path]:
    """(vgg_path, decoder_path) of the AdaIN weights.

    Each is looked for in the order every network's weights are
    (:func:`datagen.format.weights.find_weights`): the explicit argument; the environment variable
    ``SEGSWAP_ADAIN_VGG`` / ``SEGSWAP_ADAIN_DECODER``; the file ``vgg_normalised.pth`` /
    ``decoder.pth`` of :func:`adain_cache_dir` (not torch hub's folder, see :data:`_SUBDIR`). A
    path given explicitly or by an environment variable must exist (it is not silently replaced
    by the cache). Raises :class:`StyleWeightsError` saying what is missing (both files at once),
    where the files come from, where to put them, and the alternatives ``--style color`` and
    ``--style none``.
    """
    cache = adain_cache_dir()
    found: list[Path] = []
    problems: list[str] = []
    for spec, given in ((ADAIN_VGG_WEIGHTS, vgg), (ADAIN_DECODER_WEIGHTS, decoder)):
        try:
            found.append(find_weights(spec, given))
        except WeightsNotFoundError as error:
            problems.append(error.problem)
    if problems:
        raise StyleWeightsError(
            "AdaIN style transfer needs two weight files: " + "; ".join(problems) + ".\n"
            f"Download {VGG_FILE} and {DECODER_FILE} from the pytorch-AdaIN release "
            f"({RELEASE_URL}) and put them in {cache}/ (or point ${VGG_ENV} and "
            f"${DECODER_ENV} at them).\n"
            "Alternatives: --style color (a weight-free colour transfer, recorded in the "
            "manifest) or --style none (no style transfer).")
    return found[0], found[1]
