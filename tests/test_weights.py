"""datagen.format.weights: the one search order for weights files (explicit path, environment
variable, the segswap cache, torch hub's checkpoints folder) and the one reader, which refuses
anything but weights. No real weights: files are made in tmp_path, HOME and the cache variables
point there."""
from __future__ import annotations

import hashlib
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import isolated_home
from official_weights import PicklePayload

from datagen.format.weights import (
    WeightsError,
    WeightsNotFoundError,
    WeightsSpec,
    find_weights,
    load_weights,
    read_weights,
    search_dirs,
)

SPEC = WeightsSpec(name="Test network", file_names=("net.pth", "net_converted.pth"), env_var="SEGSWAP_TEST_WEIGHTS",
                   option="--test-weights", source="https://example.org/net.pth")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """HOME in tmp_path; no XDG_CACHE_HOME, TORCH_HOME or the spec's variable."""
    return isolated_home(tmp_path, monkeypatch, SPEC.env_var)


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def cache(home: Path) -> Path:
    return home / ".cache" / "segswap"


def hub(home: Path) -> Path:
    return home / ".cache" / "torch" / "hub" / "checkpoints"


def test_search_folders_are_the_segswap_cache_then_torch_hub(home):
    assert search_dirs(SPEC) == [cache(home), hub(home)]


def test_explicit_then_env_then_cache_then_hub(home, tmp_path, monkeypatch):
    with pytest.raises(WeightsNotFoundError):
        find_weights(SPEC)
    in_hub = touch(hub(home) / "net.pth")
    assert find_weights(SPEC) == in_hub
    in_cache = touch(cache(home) / "net.pth")
    assert find_weights(SPEC) == in_cache
    from_env = touch(tmp_path / "env.pth")
    monkeypatch.setenv(SPEC.env_var, str(from_env))
    assert find_weights(SPEC) == from_env
    explicit = touch(tmp_path / "explicit.pth")
    assert find_weights(SPEC, explicit) == explicit
    assert find_weights(SPEC, str(explicit)) == explicit


def test_empty_values_count_as_not_given(home, monkeypatch):
    in_cache = touch(cache(home) / "net.pth")
    monkeypatch.setenv(SPEC.env_var, "")
    assert find_weights(SPEC, "") == in_cache


def test_a_given_path_that_does_not_exist_is_an_error_not_a_fallback(home, tmp_path, monkeypatch):
    touch(cache(home) / "net.pth")
    with pytest.raises(WeightsNotFoundError, match="missing.pth.*--test-weights") as error:
        find_weights(SPEC, tmp_path / "missing.pth")
    assert "https://example.org/net.pth" in str(error.value)
    monkeypatch.setenv(SPEC.env_var, str(tmp_path / "gone.pth"))
    with pytest.raises(WeightsNotFoundError, match=r"gone.pth.*\$SEGSWAP_TEST_WEIGHTS"):
        find_weights(SPEC)


def test_folders_before_file_names(home):
    converted_in_cache = touch(cache(home) / "net_converted.pth")
    touch(hub(home) / "net.pth")
    assert find_weights(SPEC) == converted_in_cache
    original_in_cache = touch(cache(home) / "net.pth")
    assert find_weights(SPEC) == original_in_cache


def test_xdg_cache_home_and_torch_home_move_the_folders(home, tmp_path, monkeypatch):
    touch(cache(home) / "net.pth")  # ignored: XDG_CACHE_HOME replaces ~/.cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert search_dirs(SPEC) == [tmp_path / "xdg" / "segswap", tmp_path / "th" / "hub" / "checkpoints"]
    in_hub = touch(tmp_path / "th" / "hub" / "checkpoints" / "net.pth")
    assert find_weights(SPEC) == in_hub


def test_subfolder_and_no_torch_hub(home):
    spec = WeightsSpec(name="Other", file_names=("decoder.pth",), env_var="SEGSWAP_TEST_WEIGHTS",
                       option="--other", source="a release", cache_subdir="other", torch_hub=False)
    assert search_dirs(spec) == [cache(home) / "other"]
    touch(hub(home) / "decoder.pth")
    touch(cache(home) / "decoder.pth")
    with pytest.raises(WeightsNotFoundError):
        find_weights(spec)
    inside = touch(cache(home) / "other" / "decoder.pth")
    assert find_weights(spec) == inside


def test_nothing_found_says_what_where_and_how(home):
    spec = replace(SPEC, alternatives="--test-weights none runs without it.")
    with pytest.raises(WeightsNotFoundError) as error:
        find_weights(spec)
    message = str(error.value)
    for needle in ("Test network", "net.pth", "net_converted.pth", "https://example.org/net.pth", "--test-weights",
                   "$SEGSWAP_TEST_WEIGHTS", str(cache(home)), str(hub(home)), "runs without it"):
        assert needle in message, (needle, message)
    assert error.value.problem in message and "https://" not in error.value.problem


def test_the_networks_share_the_order(home, tmp_path, monkeypatch):
    """The three networks' finders are the shared search: the cache before torch hub, the
    environment before both (DINO looked in torch hub first before they were unified)."""
    from datagen.segments.dino import DINO_ENV, DINO_FILE, find_dino_weights
    from datagen.style.adain_net import DECODER_FILE, VGG_FILE, find_adain_weights
    from trainer.backbone import ENV_VAR, MOCO_FILE, find_backbone_weights

    for name in (DINO_ENV, ENV_VAR, "SEGSWAP_ADAIN_VGG", "SEGSWAP_ADAIN_DECODER"):
        monkeypatch.delenv(name, raising=False)
    for name in (DINO_FILE, MOCO_FILE):
        touch(hub(home) / name)
    assert find_dino_weights() == hub(home) / DINO_FILE
    assert find_backbone_weights(None) == str(hub(home) / MOCO_FILE)
    for name in (DINO_FILE, MOCO_FILE):
        touch(cache(home) / name)
    assert find_dino_weights() == cache(home) / DINO_FILE
    assert find_backbone_weights(None) == str(cache(home) / MOCO_FILE)
    monkeypatch.setenv(DINO_ENV, str(touch(tmp_path / "dino.pth")))
    assert find_dino_weights() == tmp_path / "dino.pth"

    adain = [touch(cache(home) / "adain" / name) for name in (VGG_FILE, DECODER_FILE)]
    assert find_adain_weights() == tuple(adain)
    monkeypatch.setenv("SEGSWAP_ADAIN_DECODER", str(touch(tmp_path / "mine.pth")))
    assert find_adain_weights() == (adain[0], tmp_path / "mine.pth")


# -- reading ----------------------------------------------------------------------------------------

def test_reads_a_state_dict_on_the_cpu_and_converts_it(tmp_path):
    path = tmp_path / "net.pth"
    torch.save({"model": {"layer.weight": torch.arange(6.0).view(2, 3)}, "epoch": 3}, path)
    contents = read_weights(SPEC, path)
    assert torch.equal(contents["model"]["layer.weight"], torch.arange(6.0).view(2, 3)) and contents["epoch"] == 3
    spec = replace(SPEC, convert=lambda checkpoint, where: (checkpoint["model"], where))
    state, where = load_weights(spec, path)
    assert list(state) == ["layer.weight"] and where == path
    assert load_weights(SPEC, path).keys() == {"model", "epoch"}


def test_reads_safetensors(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    path = tmp_path / "model.safetensors"
    safetensors.save_file({"w": torch.ones(2, 2)}, str(path))
    assert torch.equal(read_weights(SPEC, path)["w"], torch.ones(2, 2))
    bad = touch(tmp_path / "bad.safetensors", b"\x00" * 20)
    with pytest.raises(WeightsError, match="bad.safetensors"):
        read_weights(SPEC, bad)


def test_files_that_are_not_weights_are_refused_naming_the_file_and_what_it_should_be(tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(PicklePayload(control)))
    assert control.exists()  # the payload does run when unpickled without protection

    marker = tmp_path / "marker"
    torch.save({"w": torch.zeros(1), "payload": PicklePayload(marker)}, tmp_path / "evil.pth")
    touch(tmp_path / "text.pth", b"not a torch file at all")
    touch(tmp_path / "empty.pth", b"")
    for name in ("evil.pth", "text.pth", "empty.pth"):
        with pytest.raises(WeightsError) as error:
            read_weights(SPEC, tmp_path / name)
        message = str(error.value)
        assert str(tmp_path / name) in message and "weights-only" in message, message
        assert "Test network" in message and "https://example.org/net.pth" in message, message
        assert "weights_only=False" not in message
    assert not marker.exists()


def test_a_missing_file_is_named_with_where_to_put_it(home, tmp_path):
    with pytest.raises(WeightsNotFoundError) as error:
        read_weights(SPEC, tmp_path / "nowhere.pth")
    message = str(error.value)
    assert str(tmp_path / "nowhere.pth") in message and str(cache(home)) in message and "--test-weights" in message
    with pytest.raises(WeightsNotFoundError, match="a_folder"):
        read_weights(SPEC, (tmp_path / "a_folder").mkdir() or tmp_path / "a_folder")


def test_a_recorded_sha256_is_checked_for_files_of_that_name(tmp_path):
    good = tmp_path / "good" / "net.pth"
    good.parent.mkdir()
    torch.save({"w": torch.ones(3)}, good)
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    spec = replace(SPEC, sha256=(("net.pth", digest),))
    assert torch.equal(read_weights(spec, good)["w"], torch.ones(3))

    other = tmp_path / "other" / "net.pth"
    other.parent.mkdir()
    torch.save({"w": torch.zeros(3)}, other)
    with pytest.raises(WeightsError, match=f"{other}: sha256 .* differs .*{digest}"):
        read_weights(spec, other)
    renamed = tmp_path / "other" / "my_net.pth"  # a file of another name is not checked
    other.rename(renamed)
    assert torch.equal(read_weights(spec, renamed)["w"], torch.zeros(3))


def test_importing_the_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, datagen.format.weights, datagen.format.device; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
