"""Finding and reading the pretrained weights files of every network, in one place.

Each network whose weights are downloaded by hand has a :class:`WeightsSpec` (timm's
pretrained-config idea): what the file is, its names, the environment variable and command-line
option that point at it, where to get it, optionally its sha256, and the function that turns the
file's contents into what the network loads (its key mapping). The specs live beside their
networks (``trainer.backbone``, ``datagen.segments.dino``, ``datagen.style.adain_net``); this
module holds the search and the reading they share.

:func:`find_weights` looks in one order for every network:

1. the path given explicitly (a command-line option such as ``--dino-weights``);
2. the path in the spec's environment variable (``$SEGSWAP_DINO_WEIGHTS``, ...);
3. ``${XDG_CACHE_HOME:-~/.cache}/segswap/`` (plus the spec's subfolder, ``adain/`` for AdaIN);
4. torch hub's checkpoints folder (``torch.hub.get_dir()/checkpoints``, by default
   ``$TORCH_HOME/hub/checkpoints`` or ``~/.cache/torch/hub/checkpoints``), where
   ``torch.hub`` downloads put files, for networks whose files torch.hub downloads.

A path given explicitly or by the environment must exist: a missing one is an error naming it,
never silently replaced by a cached file. Within a folder the spec's file names are tried in
their order. :func:`read_weights` is the one reader: safetensors files by their suffix, anything
else with ``torch.load(weights_only=True, map_location="cpu")``, so no file ever runs code when
read. Importing this module does not import torch (data generation workers never load it).
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from datagen.format.hashing import sha256_file

SEGSWAP_CACHE = "segswap"
"""Folder under ``${XDG_CACHE_HOME:-~/.cache}`` where segswap looks for weights files."""


class WeightsError(Exception):
    """A weights file that cannot be found or read; the message names the file, what it is, and
    where to get it and put it."""


class WeightsNotFoundError(WeightsError):
    """No weights file for a spec: none in the caches, or a given path that does not exist.

    ``problem`` is the first sentence alone (what was missing and where it was looked for), for
    callers that report several files in one message."""

    def __init__(self, message: str, problem: str):
        super().__init__(message)
        self.problem = problem


@dataclass(frozen=True)
class WeightsSpec:
    """The weights file of one network: how to find it, read it and map its keys."""

    name: str
    """What the file holds, for messages: "DINO ViT-S/16", "AdaIN decoder"."""
    file_names: tuple[str, ...]
    """Names looked for in each cache folder, in this order; the first is the file to download."""
    env_var: str
    """Environment variable that may give the file's path (``SEGSWAP_DINO_WEIGHTS``)."""
    option: str
    """Command-line option that gives the file's path (``--dino-weights``), for messages."""
    source: str
    """Where to get the file (a URL or a release page), for messages."""
    cache_subdir: str = ""
    """Subfolder of ``~/.cache/segswap`` to look in ("" for the folder itself)."""
    torch_hub: bool = True
    """Also look in torch hub's checkpoints folder. False for files that torch.hub never
    downloads and whose names are too generic to be ours there (``decoder.pth``)."""
    sha256: tuple[tuple[str, str], ...] = ()
    """(file name, sha256 hex digest) pairs: a file of that name must have that digest (a
    download cut short, or another release, is refused). Files of other names are not checked,
    so that converted or retrained files with their own names still load."""
    convert: Callable[[object, Path], object] | None = None
    """``convert(contents, path)``: the file's contents (a dict of tensors, or whatever the
    checkpoint holds) -> what the network's loader takes, typically a state dict with the
    network's key names; raises naming ``path`` when the contents are not this network's.
    None: the contents are used as they are."""
    alternatives: str = ""
    """Sentence appended to the not-found message: what to do without the file."""

    def expected_sha256(self, file_name: str) -> str | None:
        """The recorded sha256 of a file called ``file_name``, or None if none is recorded."""
        return dict(self.sha256).get(file_name)


def segswap_cache_dir() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/segswap`` (an empty ``$XDG_CACHE_HOME`` counts as unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / SEGSWAP_CACHE


def torch_hub_checkpoints() -> Path:
    """torch hub's checkpoints folder, ``torch.hub.get_dir()/checkpoints``: where
    ``torch.hub.load_state_dict_from_url`` saves files (``$TORCH_HOME/hub/checkpoints``, by
    default ``~/.cache/torch/hub/checkpoints``). Imports torch."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def search_dirs(spec: WeightsSpec) -> list[Path]:
    """The folders :func:`find_weights` looks in after the explicit path and the environment,
    in order: the segswap cache (with the spec's subfolder), then torch hub's checkpoints."""
    cache = segswap_cache_dir()
    dirs = [cache / spec.cache_subdir if spec.cache_subdir else cache]
    if spec.torch_hub:
        dirs.append(torch_hub_checkpoints())
    return dirs


def where_to_get(spec: WeightsSpec, dirs: list[Path] | None = None) -> str:
    """The sentence that says where the file comes from and where it goes."""
    dirs = search_dirs(spec) if dirs is None else dirs
    return (f"Download {spec.file_names[0]} from {spec.source} and put it in {dirs[0]}/, "
            f"or pass {spec.option} PATH, or set ${spec.env_var}=PATH.")


def find_weights(spec: WeightsSpec, explicit=None) -> Path:
    """Path of ``spec``'s weights file, in the module's order: ``explicit`` (a path; None or ""
    when not given), ``$<spec.env_var>``, then each of :func:`search_dirs` with each of the spec's
    file names. Raises :class:`WeightsNotFoundError` naming the missing path (for a given one) or
    the files, folders, download address and the ways to point at the file."""
    for value, origin in ((explicit, spec.option), (os.environ.get(spec.env_var), f"${spec.env_var}")):
        if value is not None and str(value) != "":
            path = Path(value).expanduser()
            if path.is_file():
                return path
            problem = f"{spec.name} weights file not found: {path} (given by {origin})"
            raise WeightsNotFoundError(f"{problem}. {where_to_get(spec)}", problem)
    dirs = search_dirs(spec)
    for directory in dirs:
        for name in spec.file_names:
            if (directory / name).is_file():
                return directory / name
    names = " or ".join(spec.file_names)
    problem = (f"no {spec.name} weights found: {names} is in none of {', '.join(map(str, dirs))} "
               f"(looked after {spec.option} and ${spec.env_var})")
    message = f"{problem}. {where_to_get(spec, dirs)}"
    if spec.alternatives:
        message += " " + spec.alternatives
    raise WeightsNotFoundError(message, problem)


def read_weights(spec: WeightsSpec, path) -> object:
    """The contents of the weights file ``path`` of ``spec``'s network, on the CPU.

    ``.safetensors`` files are read with safetensors (a dict of tensors); anything else with
    ``torch.load(weights_only=True, map_location="cpu")``, which refuses files holding Python
    objects other than tensors and plain containers instead of running them. A file named in
    ``spec.sha256`` must have that digest. Raises :class:`WeightsError` naming the file, what it
    should be and where it comes from: a missing file, a wrong digest, or a file that is not a
    weights file.
    """
    path = Path(path).expanduser()
    expected = f"expected: {spec.file_names[0]} or a file of the same network, from {spec.source}"
    if not path.is_file():
        raise WeightsNotFoundError(f"{spec.name} weights file not found: {path}. {where_to_get(spec)}",
                                   f"{spec.name} weights file not found: {path}")
    digest = spec.expected_sha256(path.name)
    if digest is not None:
        actual = sha256_file(path)
        if actual != digest:
            raise WeightsError(f"{path}: sha256 {actual} differs from the published file's {digest} "
                               f"(a download cut short, or another file); {expected}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            raise WeightsError(f"{path}: reading .safetensors files needs the 'safetensors' package "
                               f"(pip install safetensors); {expected}") from error
        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # noqa: BLE001 - any reader error names the file
            raise WeightsError(f"{path}: not a readable safetensors file ({_first_line(error)}); "
                               f"{expected}") from None
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling, zip, OS and torch errors alike
        # torch's own message for a refused pickle suggests weights_only=False: not repeated
        detail = "" if isinstance(error, pickle.UnpicklingError) else f" ({_first_line(error)})"
        raise WeightsError(
            f"{path}: cannot be read as {spec.name} weights: a weights-only torch.load refuses it{detail} "
            f"(not a PyTorch file, cut short, or it holds Python objects other than tensors, which are "
            f"never unpickled here); {expected}") from None


def load_weights(spec: WeightsSpec, path) -> object:
    """:func:`read_weights`, then the spec's ``convert`` (its key mapping) when it has one."""
    path = Path(path).expanduser()
    contents = read_weights(spec, path)
    return contents if spec.convert is None else spec.convert(contents, path)


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
