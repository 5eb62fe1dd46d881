"""The one reading of a ``--device`` option, for every command that runs a network.

Importing this module does not import torch; :func:`resolve_device` does.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_TYPES = ("cpu", "cuda", "mps")
"""Device types accepted besides "auto"."""


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The torch device that ``name`` asks for, checked to exist.

    ``"auto"``: CUDA (its current device) when available, else the CPU. ``"cpu"``, ``"cuda"``,
    ``"cuda:N"``, ``"mps"`` or a ``torch.device`` of those types: that device, which must be
    present (``cuda:N`` needs more than N CUDA devices). Anything else, or a device that is not
    there, raises ValueError naming the value asked for: a run never falls back to another device
    than the one asked for.
    """
    import torch

    if isinstance(name, str) and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = name if isinstance(name, torch.device) else torch.device(str(name))
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise ValueError(f"device {str(name)!r}: unknown; use 'auto' (CUDA when available, else the "
                         f"CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(name)!r}: CUDA is not available on this machine "
                             f"(use 'cpu' or 'auto')")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {str(name)!r}: there {'is' if count == 1 else 'are'} only "
                             f"{count} CUDA device{'s' if count != 1 else ''} (cuda:0 .. cuda:{count - 1})")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {str(name)!r}: MPS is not available on this machine (use 'cpu' or 'auto')")
    return device
