"""trainer.backbone: weights loading (MoCo-v2, torchvision, timm), refusal of bad files, discovery, freezing."""
from __future__ import annotations

import hashlib
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import isolated_home
from official_weights import PicklePayload

from trainer import backbone as bb
from trainer.backbone import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    BackboneWeightsError,
    find_backbone_weights,
    load_backbone_weights,
    normalise,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """ResNet-50 forwards on a busy CPU are many times faster with one intra-op thread; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def resnet50_state() -> dict:
    """A ResNet-50 state dict with random, non-default values: conv1..layer3 in full, plus a few layer4
    and fc entries (which the backbone ignores; the rest of layer4 is left out to keep files small)."""
    torch.manual_seed(123)
    full = torchvision.models.resnet50(weights=None).state_dict()
    keep = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.0.conv1.", "layer4.2.bn3.", "fc.")
    state = {}
    for key, value in full.items():
        if key.startswith(keep):
            if value.is_floating_point():
                value = torch.rand_like(value) + 0.5 if "running_var" in key else torch.randn_like(value) * 0.05
            state[key] = value
    return state


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(7)
    return torch.randn(2, 3, 64, 64)


@pytest.fixture(scope="module")
def shared() -> Backbone:
    """One backbone for the tests where loading must fail (or is "random") and so changes nothing."""
    return Backbone()


@pytest.fixture(scope="module")
def random_features(images) -> torch.Tensor:
    torch.manual_seed(0)
    return Backbone()(images)


def _moco_checkpoint(state: dict) -> dict:
    """MoCo-v2's checkpoint layout: encoder_q (with its MLP head), encoder_k, the queue, an optimizer."""
    body = {k: v for k, v in state.items() if not k.startswith("fc.")}
    sd = {f"module.encoder_q.{k}": v for k, v in body.items()}
    sd.update({"module.encoder_q.fc.0.weight": torch.randn(64, 2048), "module.encoder_q.fc.0.bias": torch.randn(64),
               "module.encoder_q.fc.2.weight": torch.randn(128, 64), "module.encoder_q.fc.2.bias": torch.randn(128)})
    sd.update({f"module.encoder_k.{k}": torch.zeros_like(v) for k, v in list(body.items())[:10]})
    sd.update({"module.queue": torch.randn(128, 32), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    return {"epoch": 800, "arch": "resnet50", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}


def _check_loaded(path: Path, expected_format: str, conv1: torch.Tensor, images, random_features) -> dict:
    torch.manual_seed(0)
    net = Backbone()
    record = load_backbone_weights(net, path)
    assert record["format"] == expected_format
    assert record["source"] == str(path.resolve())
    assert len(record["sha256"]) == 64
    assert torch.equal(net.conv1.weight, conv1)
    assert not torch.allclose(net(images), random_features, atol=1e-3)
    return record


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_moco_v2_checkpoint_loads(tmp_path, resnet50_state, images, random_features, zipfile):
    # the 2020 release predates PyTorch's zip format: the legacy format must load (weights-only) too
    path = tmp_path / bb.MOCO_FILE
    ckpt = _moco_checkpoint(resnet50_state)
    torch.save(ckpt, path, _use_new_zipfile_serialization=zipfile)
    _check_loaded(path, "moco_v2", ckpt["state_dict"]["module.encoder_q.conv1.weight"], images, random_features)


def test_moco_v2_converted_checkpoint_loads(tmp_path, resnet50_state, images, random_features):
    path = tmp_path / bb.MOCO_TORCHVISION_FILE
    sd = dict(resnet50_state)
    sd.update({"fc.0.weight": torch.randn(64, 2048), "fc.2.weight": torch.randn(128, 64)})
    torch.save({"model": sd, "__author__": "MOCO"}, path)
    _check_loaded(path, "moco_v2", resnet50_state["conv1.weight"], images, random_features)


def test_torchvision_state_dict_loads_without_batch_counters(tmp_path, resnet50_state, images, random_features):
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save({k: v for k, v in resnet50_state.items() if not k.endswith("num_batches_tracked")}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # real weights load silently
        record = _check_loaded(path, "torchvision", resnet50_state["conv1.weight"], images, random_features)
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_timm_state_dict_loads(tmp_path, resnet50_state, images, random_features):
    safetensors = pytest.importorskip("safetensors.torch")
    path = tmp_path / "model.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in resnet50_state.items()}, str(path))
    _check_loaded(path, "timm", resnet50_state["conv1.weight"], images, random_features)


def test_timm_pth_state_dict_loads(tmp_path, resnet50_state, images, random_features):
    path = tmp_path / "timm_resnet50.a1_in1k.pth"
    torch.save(resnet50_state, path)
    _check_loaded(path, "timm", resnet50_state["conv1.weight"], images, random_features)


def test_layer4_and_fc_are_ignored(tmp_path, resnet50_state):
    path = tmp_path / "no_head.pth"
    torch.save({k: v for k, v in resnet50_state.items() if not k.startswith(("layer4.", "fc."))}, path)
    net = Backbone()
    load_backbone_weights(net, path)
    assert torch.equal(net.layer3[5].conv3.weight, resnet50_state["layer3.5.conv3.weight"])
    assert not hasattr(net, "layer4") and not hasattr(net, "fc")


def test_resnet18_is_refused_naming_the_file(tmp_path, shared):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    net = shared
    before = net.conv1.weight.clone()
    with pytest.raises(BackboneWeightsError, match="ResNet-50") as info:
        load_backbone_weights(net, path)
    assert str(path) in str(info.value)
    assert "layer1.0.conv1.weight" in str(info.value) or "layer1.0.conv3.weight" in str(info.value)
    assert torch.equal(net.conv1.weight, before), "a refused file must not change the weights"


def test_unrelated_tensors_are_refused(tmp_path, shared):
    path = tmp_path / "unrelated.pt"
    torch.save({"encoder.weight": torch.randn(3, 3), "decoder.bias": torch.randn(3)}, path)
    with pytest.raises(BackboneWeightsError, match="does not look like a ResNet-50") as info:
        load_backbone_weights(shared, path)
    assert str(path) in str(info.value) and "conv1.weight" in str(info.value)


def test_resnet101_extra_blocks_are_refused(tmp_path, shared, resnet50_state):
    path = tmp_path / "resnet101ish.pth"
    state = dict(resnet50_state)
    extra = {k.replace("layer3.5.", "layer3.6."): v for k, v in resnet50_state.items() if k.startswith("layer3.5.")}
    state.update(extra)
    torch.save(state, path)
    with pytest.raises(BackboneWeightsError, match="unexpected"):
        load_backbone_weights(shared, path)


def test_missing_file_is_named(tmp_path, shared):
    path = tmp_path / "nope.pth"
    with pytest.raises(BackboneWeightsError, match="nope.pth"):
        load_backbone_weights(shared, path)


def test_pickled_object_is_never_run(tmp_path, shared):
    # control: the payload does write its marker when unpickled without protection
    control = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(PicklePayload(control)))
    assert control.exists()

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"conv1.weight": torch.zeros(1), "payload": PicklePayload(marker)}, f)
    with pytest.raises(BackboneWeightsError, match="weights-only") as info:
        load_backbone_weights(shared, path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_random_warns_and_is_recorded(shared):
    net = shared
    before = net.conv1.weight.clone()
    with pytest.warns(UserWarning, match="RANDOM"):
        record = load_backbone_weights(net, "random")
    assert record == {"source": "random", "format": "random", "sha256": None}
    assert torch.equal(net.conv1.weight, before)


# --- find_backbone_weights ---------------------------------------------------------------------------

@pytest.fixture
def clean_env(tmp_path, monkeypatch) -> Path:
    """HOME in tmp_path, no XDG_CACHE_HOME / TORCH_HOME / SEGSWAP_BACKBONE_WEIGHTS."""
    return isolated_home(tmp_path, monkeypatch, bb.ENV_VAR)


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_find_explicit(clean_env, tmp_path):
    path = _touch(tmp_path / "w.pth")
    assert find_backbone_weights(str(path)) == str(path)
    assert find_backbone_weights("random") == "random"
    with pytest.raises(BackboneWeightsError, match="missing_weights.pth"):
        find_backbone_weights(str(tmp_path / "missing_weights.pth"))


def test_find_explicit_wins_over_env(clean_env, tmp_path, monkeypatch):
    explicit = _touch(tmp_path / "a.pth")
    monkeypatch.setenv(bb.ENV_VAR, str(_touch(tmp_path / "b.pth")))
    assert find_backbone_weights(str(explicit)) == str(explicit)


def test_find_env_var(clean_env, tmp_path, monkeypatch):
    path = _touch(tmp_path / "env.pth")
    _touch(clean_env / ".cache" / "segswap" / bb.MOCO_FILE)
    monkeypatch.setenv(bb.ENV_VAR, str(path))
    assert find_backbone_weights(None) == str(path)
    monkeypatch.setenv(bb.ENV_VAR, str(tmp_path / "gone.pth"))
    with pytest.raises(BackboneWeightsError, match=f"gone.pth.*{bb.ENV_VAR}"):
        find_backbone_weights(None)


def test_find_home_cache(clean_env):
    path = _touch(clean_env / ".cache" / "segswap" / bb.MOCO_FILE)
    assert find_backbone_weights(None) == str(path)


def test_find_xdg_cache_and_preference(clean_env, tmp_path, monkeypatch):
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    _touch(clean_env / ".cache" / "segswap" / bb.MOCO_FILE)  # ignored: XDG_CACHE_HOME replaces ~/.cache
    converted = _touch(xdg / "torch" / "hub" / "checkpoints" / bb.MOCO_TORCHVISION_FILE)
    assert find_backbone_weights(None) == str(converted)
    original = _touch(xdg / "torch" / "hub" / "checkpoints" / bb.MOCO_FILE)
    assert find_backbone_weights(None) == str(original)


def test_find_torch_home(clean_env, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    _touch(clean_env / ".cache" / "torch" / "hub" / "checkpoints" / bb.MOCO_FILE)  # ignored: TORCH_HOME set
    path = _touch(tmp_path / "th" / "hub" / "checkpoints" / bb.MOCO_TORCHVISION_FILE)
    assert find_backbone_weights(None) == str(path)


def test_find_nothing_explains(clean_env):
    with pytest.raises(BackboneWeightsError) as info:
        find_backbone_weights(None)
    message = str(info.value)
    for needle in (bb.MOCO_FILE, "--backbone-weights", "random", bb.MOCO_URL, bb.ENV_VAR,
                   str(clean_env / ".cache" / "segswap")):
        assert needle in message


# --- the network -----------------------------------------------------------------------------------

def test_output_shape_and_unit_norm():
    with torch.no_grad():
        features = Backbone()(torch.randn(1, 3, 480, 480))
    assert features.shape == (1, 1024, 30, 30)
    assert torch.allclose(features.norm(dim=1), torch.ones(1, 30, 30), atol=1e-5)


def test_frozen_and_always_eval(images):
    net = Backbone()
    assert not any(p.requires_grad for p in net.parameters())
    parent = torch.nn.Sequential(net, torch.nn.Identity())
    parent.train()
    assert parent.training and not net.training
    assert not any(m.training for m in net.modules())
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    parent(images)
    for key, value in net.state_dict().items():
        if key in stats:
            assert torch.equal(value, stats[key]), f"{key} changed during a forward in train mode"


def test_normalise_uint8_numpy_and_tensor():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(2, 5, 4, 3), dtype=np.uint8)
    out = normalise(array)
    assert out.shape == (2, 3, 5, 4) and out.dtype == torch.float32
    expected = (array[1, 2, 3, 0] / 255.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert out[1, 0, 2, 3].item() == pytest.approx(expected, abs=1e-5)
    assert torch.equal(normalise(torch.from_numpy(array)), out)
    with pytest.raises(ValueError, match="uint8"):
        normalise(array.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        normalise(array[0])

