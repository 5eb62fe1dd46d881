"""datagen.format.device.resolve_device: the one reading of every --device option. CUDA's presence
is simulated, so the tests mean the same on a machine with or without a GPU."""
from __future__ import annotations

import pytest
import torch

from datagen.format.device import resolve_device


@pytest.fixture
def cuda(monkeypatch):
    """Call with the number of CUDA devices the machine should seem to have."""
    def make(count: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    return make


def test_auto_is_cuda_when_present_else_the_cpu(cuda):
    cuda(0)
    assert resolve_device() == torch.device("cpu") and resolve_device("auto") == torch.device("cpu")
    cuda(1)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("count", [0, 2])
def test_named_devices(cuda, count):
    cuda(count)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    if count:
        assert resolve_device("cuda") == torch.device("cuda")
        assert resolve_device("cuda:1") == torch.device("cuda", 1)
        assert resolve_device(torch.device("cuda", 0)) == torch.device("cuda", 0)


@pytest.mark.parametrize("name", ["gpu", "", "cuda:x", "Auto", "meta", "nonsense:0"])
def test_unknown_names_are_refused_by_value(cuda, name):
    cuda(1)
    with pytest.raises(ValueError, match=f"device {name!r}: unknown"):
        resolve_device(name)


def test_cuda_asked_for_and_absent_is_refused(cuda):
    cuda(0)
    for name in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(ValueError, match=rf"device '{name}': CUDA is not available"):
            resolve_device(name)
    cuda(2)
    with pytest.raises(ValueError, match=r"device 'cuda:2': there are only 2 CUDA devices"):
        resolve_device("cuda:2")
