"""Importing the authors' released model (Shen et al.'s SegSwap repository, e.g. ``hard_mining_neg5.pth``).

Their training scripts (``train/Main.py``, ``train/MainHardMining.py``) save
``{"backbone": ..., "encoder": ..., "optimiser": ...}``: the state dict of
``torch.nn.Sequential(conv1, bn1, relu, maxpool, layer1, layer2, layer3)`` cut from torchvision's
ResNet-50 (keys ``0.weight``, ``1.running_mean``, ``4.0.conv1.weight``, ...), that of their
``TransEncoder`` (keys ``net.*``) and Adam's state (not used here). Nothing there is wrapped in
DataParallel, but a ``module.`` prefix on either state dict (a copy saved from a wrapped model) is
accepted. :func:`import_released` turns such a file into a trainer checkpoint that
:func:`trainer.loop.load_for_inference` (so ``trainer eval`` / ``trainer predict``) reads as any other.

Key mapping of the encoder onto :class:`~trainer.models.cross_image.CrossImageTransformer`::

    net.feat_proj.{weight,bias}                                 -> proj.{weight,bias}
    net.encoder_blocks.{i}.layer{j}.inner_encoder_layer.<rest>  -> layers.{k}.<rest>   (type 'I': our S)
    net.encoder_blocks.{i}.layer{j}.cross_encoder_layer.<rest>  -> layers.{k}.<rest>   (type 'C': our C)
    net.final_linear.{weight,bias}                              -> head.{weight,bias}

where block i's layer j has type ``layer_type[2 i + j - 1]`` and k counts the entries of
``layer_type`` before it that are not 'N' (an empty layer, no parameters). ``<rest>`` is the same on
both sides: both are ``nn.TransformerEncoderLayer`` (``self_attn.in_proj_weight``, ...,
``norm2.bias``); theirs is sequence-first and ours batch-first, which changes no parameter. Their
default ``['I', 'C', 'I', 'C', 'I', 'N']`` is our default ``"SCSCS"``. Every key of the file must be
mapped and every key of our network filled, with the same shapes, or the import fails naming them.

A block of two equal types ('II' or 'CC') registers ONE module under both of its names (their
``EncoderLayerBlock`` assigns the same object to ``layer1`` and ``layer2``): the layer is applied
twice with shared weights and the file holds the same tensor under both names. It maps onto two
of our layers holding equal copies, which compute the same thing (the weights are no longer tied
if the network is trained further); two names whose values differ are refused.

The same tensors give the same outputs (checked by ``tests/test_released.py`` against a CPU
restatement of their forward; masks and padding included):

- positions: both use DETR's normalised sine encoding of d_model / 2 features per axis (rows
  ``(i + 1) / (h + 1e-6) * 2 pi``, y first then x), scaled by ``pos_weight`` (0.1) and added to the
  tokens before every self-attention layer, the residual included;
- their self-attention layer runs one ``nn.TransformerEncoderLayer`` over both images' tokens with
  a block mask (a token sees its own image only), their cross-attention layer the same layer with
  the complementary mask; ours computes the same two blocks per image without the full mask;
- features: ``feat_proj`` then ``Dropout2d``; head: 1x1 conv, sigmoid, clamp to [1e-7, 1 - 1e-7].

Not recorded in the file, so taken as their defaults (and ours): ``activation='relu'``,
``feat_weight=1`` (ours has no such weight: only 1 is supported), ``pos_weight=0.1``, dropouts 0.1.
The number of heads cannot be read from the shapes: it comes from ``mode`` (their ``--mode``) or
is given. Hidden tokens differ in one corner only: an image whose tokens are ALL hidden gives NaN
in theirs and is treated as not hidden in ours (their released evaluation hides nothing).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

import torch

from datagen.format.hashing import config_hash, sha256_file
from datagen.format.weights import WeightsError, WeightsSpec, read_weights

from .config import TrainConfig, TransformerConfig

RELEASED_FORMAT = "segswap-released"
"""``format`` of the backbone record of an imported checkpoint."""
DEFAULT_LAYER_TYPE = ("I", "C", "I", "C", "I", "N")
"""Their ``--layer-type`` default: I inner (self) attention, C cross attention, N no layer."""
MODES = {"tiny": (128, 2, 3, 256), "small": (256, 2, 3, 256), "base": (512, 8, 3, 2048), "large": (512, 8, 6, 2048)}
"""Their ``TransEncoder`` modes: (d_model, heads, blocks of two layers, feedforward)."""
RELEASED_FILE = "hard_mining_neg5.pth"
RELEASED_WEIGHTS = WeightsSpec(
    name="SegSwap released model", file_names=(RELEASED_FILE,), env_var="SEGSWAP_RELEASED_WEIGHTS",
    option="trainer import-released IN OUT", torch_hub=False,
    source="the SegSwap authors' release (github.com/XiSHEN0220/SegSwap, model/hard_mining_neg5.pth)")
"""How the released file is read: :func:`datagen.format.weights.read_weights`, weights-only."""

_ENCODER_PREFIX = "net."
_LAYER_KEY = re.compile(r"^net\.encoder_blocks\.(\d+)\.layer([12])\.(inner|cross)_encoder_layer\.(.+)$")
_DIRECT = {"net.feat_proj.": "proj.", "net.final_linear.": "head."}
_ATTRIBUTE = {"I": "inner", "C": "cross"}
_SEQUENTIAL = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3"}
"""Index in their backbone ``nn.Sequential`` -> our Backbone's child (2 relu, 3 maxpool: no parameters)."""
_TORCHVISION = ("conv1", "bn1", "layer1", "layer2", "layer3")
_TORCHVISION_IGNORED = ("layer4.", "fc.")
_OPTIONAL_SUFFIX = "num_batches_tracked"


class ReleasedCheckpointError(WeightsError, ValueError):
    """A file (or state dict) that is not the authors' released model, or not of the asked shape."""


def is_released_checkpoint(obj: object) -> bool:
    """True for what ``torch.load`` gives of one of the authors' checkpoints: a dict whose
    ``encoder`` and ``backbone`` are non-empty dicts of name -> tensor."""
    return isinstance(obj, Mapping) and all(_is_state_dict(obj.get(name)) for name in ("encoder", "backbone"))


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _state_dict(obj: object, what: str) -> dict:
    """``obj`` as a dict of tensors with any DataParallel ``module.`` prefix removed."""
    if not _is_state_dict(obj):
        raise ReleasedCheckpointError(f"the {what} is not a non-empty dict of name -> tensor "
                                      f"(got {type(obj).__name__})")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def normalise_layer_type(layer_type: Sequence[str] | str) -> tuple[str, ...]:
    """Their ``--layer-type`` as a tuple of 'I', 'C', 'N'; also accepts a string ("ICICIN",
    "I,C,I,C,I,N", "I C I C I N") and 'S' for 'I' (our name for self-attention)."""
    items = [c for c in layer_type if c not in " ,"] if isinstance(layer_type, str) else list(layer_type)
    letters = tuple({"S": "I"}.get(str(item).upper(), str(item).upper()) for item in items)
    if not letters or len(letters) % 2 or any(letter not in "ICN" or len(letter) != 1 for letter in letters) \
            or set(letters) == {"N"}:
        raise ReleasedCheckpointError(
            f"layer type must be an even number of I (self-attention), C (cross-attention) and N (none) with at "
            f"least one I or C, two per block as in the authors' --layer-type; got {layer_type!r}")
    return letters


def _limited(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _infer_config(state: dict, letters: tuple[str, ...], kinds: str, first_layer: str | None,
                  mode: str | None, heads: int | None) -> TransformerConfig:
    proj = state.get("net.feat_proj.weight")
    if proj is None or proj.ndim != 4:
        raise ReleasedCheckpointError("the encoder has no net.feat_proj.weight of shape (d_model, feat_dim, 1, 1): "
                                      "missing key net.feat_proj.weight")
    d_model, feat_dim = int(proj.shape[0]), int(proj.shape[1])
    linear1 = state.get(f"{first_layer}.linear1.weight") if first_layer else None
    if linear1 is None or linear1.ndim != 2:
        raise ReleasedCheckpointError(f"the encoder has no {first_layer}.linear1.weight (its first layer, of "
                                      f"layer type {''.join(letters)}): missing key {first_layer}.linear1.weight")
    feedforward = int(linear1.shape[0])
    blocks = len(letters) // 2
    if heads is None:
        if mode not in MODES:
            raise ReleasedCheckpointError(f"the number of heads is not in the file: give the authors' mode "
                                          f"({', '.join(MODES)}) or the heads; got mode {mode!r}")
        want_d, heads, want_blocks, want_ff = MODES[mode]
        found = (d_model, blocks, feedforward)
        if found != (want_d, want_blocks, want_ff):
            raise ReleasedCheckpointError(
                f"mode {mode!r} has d_model {want_d}, {want_blocks} blocks ({2 * want_blocks} layer types), "
                f"feedforward {want_ff}; the file has d_model {d_model}, feedforward {feedforward} and the layer "
                f"type {''.join(letters)} has {blocks} blocks: give the mode it was trained with (or the heads)")
    if heads < 1 or d_model % heads:
        raise ReleasedCheckpointError(f"d_model {d_model} is not divisible by {heads} heads")
    if d_model % 4:
        raise ReleasedCheckpointError(f"d_model {d_model} is not a multiple of 4 (the 2-D sine encoding needs it)")
    return TransformerConfig(feat_dim=feat_dim, d_model=d_model, heads=heads, feedforward=feedforward, layers=kinds)


def map_released_encoder(encoder_state: Mapping, layer_type: Sequence[str] | str = DEFAULT_LAYER_TYPE, *,
                         mode: str | None = "small", heads: int | None = None) -> dict:
    """The full import of their encoder state dict: ``{"state", "config", "mapping", "tied"}`` with
    our state dict, the inferred :class:`TransformerConfig`, their key -> our key, and the pairs of
    our layer indices that were one shared module in theirs. See :func:`released_to_ours`."""
    from .models.cross_image import CrossImageTransformer

    state = _state_dict(encoder_state, "encoder state dict")
    letters = normalise_layer_type(layer_type)
    slots: dict[tuple[int, int], tuple[int, str]] = {}  # (block, layer 1 or 2) -> (our index, I or C)
    for position, letter in enumerate(letters):
        if letter != "N":
            slots[(position // 2, position % 2 + 1)] = (len(slots), letter)
    kinds = "".join("S" if letter == "I" else "C" for letter in letters if letter != "N")
    first = next(iter(sorted(slots)), None)
    first_layer = (f"net.encoder_blocks.{first[0]}.layer{first[1]}.{_ATTRIBUTE[slots[first][1]]}_encoder_layer"
                   if first else None)
    config = _infer_config(state, letters, kinds, first_layer, mode, heads)

    mapping: dict[str, str] = {}
    unexpected: list[str] = []
    for key in state:
        direct = next((prefix for prefix in _DIRECT if key.startswith(prefix)), None)
        match = _LAYER_KEY.match(key)
        if direct is not None:
            mapping[key] = _DIRECT[direct] + key[len(direct):]
        elif match:
            block, layer, attribute, rest = int(match[1]), int(match[2]), match[3], match[4]
            slot = slots.get((block, layer))
            if slot is None:
                there = "has N there" if 2 * block + layer - 1 < len(letters) else f"has no block {block}"
                unexpected.append(f"{key} (layer type {''.join(letters)} {there})")
            elif _ATTRIBUTE[slot[1]] != attribute:
                unexpected.append(f"{key} (layer type {''.join(letters)} has {slot[1]} there)")
            else:
                mapping[key] = f"layers.{slot[0]}.{rest}"
        else:
            unexpected.append(key)

    with torch.device("meta"):  # names and shapes only: no memory, no draw from the random generator
        expected = CrossImageTransformer(config).state_dict()
    ours = {mapping[key]: value for key, value in state.items() if key in mapping}
    unexpected += [f"{key} (-> {mapping[key]})" for key in mapping if mapping[key] not in expected]
    missing = [f"{_theirs(key, slots)} (ours {key})" for key in expected if key not in ours]
    shapes = [f"{key} {tuple(state[key].shape)} (ours {mapping[key]} {tuple(expected[mapping[key]].shape)})"
              for key in mapping if mapping[key] in expected and state[key].shape != expected[mapping[key]].shape]
    problems = [(keys, what) for keys, what in ((missing, "missing"), (unexpected, "unexpected"),
                                                 (shapes, "mis-shaped")) if keys]
    if problems:
        details = "; ".join(f"{len(keys)} {what} key{'s' * (len(keys) > 1)}: {_limited(keys)}"
                            for keys, what in problems)
        raise ReleasedCheckpointError(f"the encoder is not the authors' TransEncoder of layer type "
                                      f"{''.join(letters)} ({details})")

    tied = []
    for block in range(len(letters) // 2):
        pair = slots.get((block, 1)), slots.get((block, 2))
        if pair[0] and pair[1] and pair[0][1] == pair[1][1]:
            tied.append((pair[0][0], pair[1][0]))
            different = [f"layers.{pair[0][0]}.{rest} / layers.{pair[1][0]}.{rest}"
                         for rest in _layer_rests(expected, pair[0][0])
                         if not torch.equal(ours[f"layers.{pair[0][0]}.{rest}"], ours[f"layers.{pair[1][0]}.{rest}"])]
            if different:
                name = f"net.encoder_blocks.{block}.layer1 / layer2"
                raise ReleasedCheckpointError(
                    f"block {block} is {pair[0][1] * 2}: their model holds ONE module under both names {name}, "
                    f"but the file has different values under them ({_limited(different, 3)})")
            ours.update({key: value.clone() for key, value in ours.items() if key.startswith(f"layers.{pair[1][0]}.")})
    return {"state": {key: ours[key] for key in expected}, "config": config, "mapping": mapping, "tied": tied}


def _layer_rests(expected: Mapping, index: int) -> list[str]:
    """The parameter names inside our layer ``index`` (``self_attn.in_proj_weight``, ...)."""
    prefix = f"layers.{index}."
    return [key[len(prefix):] for key in expected if key.startswith(prefix)]


def _theirs(ours_key: str, slots: dict) -> str:
    """Their name of our key ``ours_key``, for the message about a missing key."""
    for theirs, ours in _DIRECT.items():
        if ours_key.startswith(ours):
            return theirs + ours_key[len(ours):]
    index, _, rest = ours_key[len("layers."):].partition(".")
    for (block, layer), (k, letter) in slots.items():
        if str(k) == index:
            return f"net.encoder_blocks.{block}.layer{layer}.{_ATTRIBUTE[letter]}_encoder_layer.{rest}"
    return ours_key


def released_to_ours(encoder_state: Mapping, layer_type: Sequence[str] | str = DEFAULT_LAYER_TYPE, *,
                     mode: str | None = "small", heads: int | None = None) -> tuple[dict, TransformerConfig]:
    """Their ``TransEncoder`` state dict (``param['encoder']``; a ``module.`` prefix is dropped) ->
    (our :class:`CrossImageTransformer` state dict, its :class:`TransformerConfig`).

    ``layer_type``: their ``--layer-type`` (I / C / N, two per block; a string such as "ICICIN" too).
    The heads are ``heads`` when given, else those of their ``mode`` (whose d_model, number of
    blocks and feedforward must then match the file); feat_dim, d_model and feedforward come from
    the shapes. Raises :class:`ReleasedCheckpointError` naming every missing, unexpected or
    mis-shaped key (see the module docstring for the mapping and for shared 'II' / 'CC' blocks).
    """
    imported = map_released_encoder(encoder_state, layer_type, mode=mode, heads=heads)
    return imported["state"], imported["config"]


@cache
def _backbone_shapes() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    from .backbone import Backbone

    with torch.device("meta"):
        return {k: (tuple(v.shape), v.dtype) for k, v in Backbone().state_dict().items()}


def released_backbone_to_ours(backbone_state: Mapping) -> dict:
    """Their backbone state dict (``param['backbone']``: ``nn.Sequential`` indices 0 conv1, 1 bn1,
    4 layer1, 5 layer2, 6 layer3; a ``module.`` prefix is dropped) -> our :class:`~trainer.backbone.Backbone`
    state dict. Keys already named as torchvision's ResNet-50 (``conv1.weight``, ``layer3.5.bn3.bias``)
    are taken as they are, their ``layer4.*`` and ``fc.*`` left out. A missing BatchNorm
    ``num_batches_tracked`` is set to 0 (unused in eval mode); any other missing, unexpected or
    mis-shaped key raises :class:`ReleasedCheckpointError` naming it."""
    state = _state_dict(backbone_state, "backbone state dict")
    expected = _backbone_shapes()
    ours: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in _SEQUENTIAL and rest:
            name = f"{_SEQUENTIAL[head]}.{rest}"
        elif head in _TORCHVISION and rest:
            name = key
        elif key.startswith(_TORCHVISION_IGNORED):
            continue
        else:
            unexpected.append(key)
            continue
        if name in ours:
            unexpected.append(f"{key} (a second value of {name})")
        elif name not in expected:
            unexpected.append(key if name == key else f"{key} (-> {name})")
        else:
            ours[name] = value
    for key, (shape, dtype) in expected.items():
        if key not in ours and key.endswith(_OPTIONAL_SUFFIX):
            ours[key] = torch.zeros(shape, dtype=dtype)
    missing = [key for key in expected if key not in ours]
    shapes = [f"{key} {tuple(v.shape)} (expected {expected[key][0]})" for key, v in ours.items()
              if tuple(v.shape) != expected[key][0]]
    problems = [(keys, what) for keys, what in ((missing, "missing"), (unexpected, "unexpected"),
                                                 (shapes, "mis-shaped")) if keys]
    if problems:
        details = "; ".join(f"{len(keys)} {what} key{'s' * (len(keys) > 1)}: {_limited(keys)}"
                            for keys, what in problems)
        raise ReleasedCheckpointError(f"the backbone is not ResNet-50's conv1..layer3 ({details})")
    return {key: ours[key] for key in expected}


def _file_step(obj: Mapping) -> int:
    """The iteration a released file records, if any (the authors' files record none): 0 otherwise."""
    for name in ("iteration", "iter", "step"):
        value = obj.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return 0


def released_checkpoint(obj: object, *, source: str, sha256: str | None = None, mode: str | None = "small",
                        layer_type: Sequence[str] | str = DEFAULT_LAYER_TYPE, heads: int | None = None,
                        image_size: int = 480) -> tuple[dict, dict]:
    """(trainer checkpoint dict, summary) of the loaded contents ``obj`` of a released file named
    ``source`` (for messages and the backbone record): what :func:`import_released` writes, and what
    a ``--ckpt`` loader may build in memory from the authors' file (``is_released_checkpoint``).

    The checkpoint has the keys :func:`trainer.loop.load_for_inference` reads (format, step, model,
    config, config_hash, backbone, backbone_state) and no optimiser, schedule or random state: it
    cannot be resumed with ``trainer fit --resume`` (which says so). The config is
    :class:`TrainConfig`'s defaults with ``image_size`` and the inferred transformer.

    The summary is plain data: source, sha256, step, config (the transformer's, as a dict),
    layer_type, encoder_keys and backbone_keys (how many were mapped), mapping (their encoder key
    -> ours) and tied_layers (pairs of our layer indices that were one shared module in theirs)."""
    from .checkpoints import CHECKPOINT_FORMAT

    if not is_released_checkpoint(obj):
        found = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
        hint = " (it looks like a trainer checkpoint already)" if isinstance(obj, Mapping) and "model" in obj \
            and "config" in obj else ""
        raise ReleasedCheckpointError(f"{source}: not the authors' released model: expected a dict with 'encoder' "
                                      f"and 'backbone' state dicts, found {found}{hint}")
    try:
        imported = map_released_encoder(obj["encoder"], layer_type, mode=mode, heads=heads)
        backbone_state = released_backbone_to_ours(obj["backbone"])
        config = TrainConfig(image_size=image_size, transformer=imported["config"]).validate()
    except (ReleasedCheckpointError, ValueError) as error:
        raise ReleasedCheckpointError(f"{source}: {error}") from None
    step = _file_step(obj)
    record = {"source": str(source), "format": RELEASED_FORMAT, "sha256": sha256}
    layers = "".join(normalise_layer_type(layer_type))
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "world_size": 1,
        "model": imported["state"],
        "config": config.to_dict(),
        "config_hash": config_hash(config),
        "dataset_fingerprint": None,
        "backbone": record,
        "backbone_state": backbone_state,
        "imported": {"format": RELEASED_FORMAT, "source": str(source), "sha256": sha256, "mode": mode,
                     "heads": config.transformer.heads, "layer_type": layers,
                     "tied_layers": [list(pair) for pair in imported["tied"]]},
    }
    summary = {"source": str(source), "sha256": sha256, "step": step, "config": dataclasses.asdict(config.transformer),
               "layer_type": layers, "encoder_keys": len(imported["mapping"]), "backbone_keys": len(backbone_state),
               "mapping": imported["mapping"], "tied_layers": [list(pair) for pair in imported["tied"]]}
    return checkpoint, summary


def read_released(path) -> object:
    """The contents of a released file, read weights-only (:func:`datagen.format.weights.read_weights`:
    a file holding Python objects other than tensors and plain containers is refused, never run)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ReleasedCheckpointError(f"{path}: no such file (the authors' released model, such as "
                                      f"{RELEASED_FILE}, from {RELEASED_WEIGHTS.source})")
    try:
        return read_weights(RELEASED_WEIGHTS, path)
    except WeightsError as error:
        raise ReleasedCheckpointError(str(error)) from None


def import_released(path, out_path, mode: str | None = "small",
                    layer_type: Sequence[str] | str = DEFAULT_LAYER_TYPE, image_size: int = 480,
                    heads: int | None = None, force: bool = False) -> dict:
    """Convert the authors' released file ``path`` into the trainer checkpoint ``out_path``
    (written atomically; an existing file is replaced only with ``force``), readable by
    :func:`trainer.loop.load_for_inference`. Returns the summary of :func:`released_checkpoint`
    with ``out`` added. Raises :class:`ReleasedCheckpointError` naming the file for anything that
    is not the authors' model of this ``mode`` / ``layer_type`` / ``heads``."""
    from .checkpoints import atomic_save

    path, out_path = Path(path).expanduser(), Path(out_path).expanduser()
    if out_path.exists() and (not force or out_path.resolve() == path.resolve()):
        raise ReleasedCheckpointError(f"{out_path} exists" + (" and is the input" if out_path.resolve() ==
                                                              path.resolve() else ": pass force to replace it"))
    contents = read_released(path)
    digest = sha256_file(path)
    checkpoint, summary = released_checkpoint(contents, source=str(path.resolve()), sha256=digest, mode=mode,
                                              layer_type=layer_type, heads=heads, image_size=image_size)
    atomic_save(checkpoint, out_path)
    return {**summary, "out": str(out_path)}
