"""DINO ViT-S/16 weights and features (datagen.segments.dino); nothing is downloaded: state dicts with the
official key names get random values."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from official_weights import official_state

from datagen.segments.dino import (
    DINO_ENV,
    DINO_FILE,
    DINO_URL,
    IMAGENET_MEAN,
    DinoWeightsError,
    dino_pos_embed,
    find_dino_weights,
    image_batch,
    last_keys,
    load_dino,
    make_vit,
)


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dino") / DINO_FILE
    state = official_state()
    torch.save(state, path)
    return path, state


def assert_loaded(model, state: dict) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key].cpu(), value), key


@pytest.mark.slow
def test_official_key_names_load_into_the_timm_vit(official_file):
    path, state = official_file
    assert_loaded(load_dino(path), state)


@pytest.mark.slow
@pytest.mark.parametrize("wrap", ["teacher_student", "module_prefix", "timm_with_classifier"])
def test_wrapped_checkpoints_load(tmp_path, wrap):
    state = official_state(seed=1)
    if wrap == "teacher_student":  # DINO's full checkpoint: the teacher is the one evaluated
        checkpoint = {"student": {f"module.backbone.{k}": v + 1 for k, v in state.items()},
                      "teacher": {**{f"backbone.{k}": v for k, v in state.items()},
                                  "head.mlp.0.weight": torch.zeros(2048, 384),
                                  "head.last_layer.weight_g": torch.ones(1)},
                      "epoch": 100, "args": "not a tensor"}
    elif wrap == "module_prefix":
        checkpoint = {f"module.{k}": v for k, v in state.items()}
    else:  # timm's own state dict of a classifier: head.* is dropped
        checkpoint = {**state, "head.weight": torch.zeros(1000, 384), "head.bias": torch.zeros(1000)}
    path = tmp_path / "weights.pth"
    torch.save(checkpoint, path)
    assert_loaded(load_dino(path), state)


def test_safetensors_file_loads(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    state = official_state(seed=2)
    path = tmp_path / "model.safetensors"
    safetensors.save_file(state, str(path))
    assert_loaded(load_dino(path), state)


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path):
    state = official_state()
    del state["blocks.3.attn.qkv.weight"]
    state["blocks.12.norm1.weight"] = torch.zeros(384)
    state["pos_embed"] = torch.zeros(1, 50, 384)
    path = tmp_path / "other.pth"
    torch.save(state, path)
    with pytest.raises(DinoWeightsError) as error:
        load_dino(path)
    message = str(error.value)
    assert str(path) in message
    for part in ("missing key(s): blocks.3.attn.qkv.weight", "unexpected key(s): blocks.12.norm1.weight",
                 "pos_embed (1, 50, 384) (expected (1, 197, 384))"):
        assert part in message, message


@pytest.mark.parametrize("content", [b"not a torch file", "pickle"])
def test_files_that_are_not_weights_are_refused_naming_the_file(tmp_path, content):
    path = tmp_path / "bad.pth"
    if content == "pickle":
        torch.save({"not": "tensors"}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(DinoWeightsError, match=str(path)):
        load_dino(path)


def test_weights_are_found_explicitly_then_by_env_then_in_the_caches(tmp_path, monkeypatch):
    monkeypatch.delenv(DINO_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(DinoWeightsError) as error:
        find_dino_weights()
    message = str(error.value)
    assert DINO_FILE in message and DINO_URL in message and str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "--dino-weights" in message and DINO_ENV in message

    cached = tmp_path / "torch" / "hub" / "checkpoints" / DINO_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert find_dino_weights() == cached
    other = tmp_path / "other.pth"
    other.write_bytes(b"y")
    monkeypatch.setenv(DINO_ENV, str(other))
    assert find_dino_weights() == other
    assert find_dino_weights(cached) == cached
    with pytest.raises(DinoWeightsError, match="missing.pth.*--dino-weights"):
        find_dino_weights(tmp_path / "missing.pth")
    monkeypatch.setenv(DINO_ENV, str(tmp_path / "gone.pth"))
    with pytest.raises(DinoWeightsError, match=f"gone.pth.*{DINO_ENV}"):
        find_dino_weights()


def test_images_are_normalised_and_padded_to_multiples_of_16():
    mean_colour = np.round(np.array(IMAGENET_MEAN) * 255).astype(np.uint8)
    image = np.tile(mean_colour, (50, 70, 1))
    image[0, 0] = 255
    batch = image_batch([image, image])
    assert batch.shape == (2, 3, 64, 80)
    assert batch[:, :, 50:].abs().max() == 0 and batch[:, :, :, 70:].abs().max() == 0  # zero padding
    assert batch[0, :, 1:50, 1:70].abs().max() < 0.01  # the mean colour is ~0
    assert batch[0, 0, 0, 0] == pytest.approx((1 - 0.485) / 0.229)
    with pytest.raises(ValueError, match="one size"):
        image_batch([image, image[:48]])


def test_last_keys_are_the_keys_of_the_last_block_for_a_size_not_multiple_of_16():
    model = make_vit()
    qkv = model.blocks[-1].attn.qkv
    with torch.no_grad():  # output = bias: q = 1, k = 0..383 (head-major), v = -1
        qkv.weight.zero_()
        qkv.bias.copy_(torch.cat([torch.ones(384), torch.arange(384.0), -torch.ones(384)]))
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    keys = last_keys(model, image_batch([image]))
    assert keys.shape == (1, 4 * 5, 384)  # CLS dropped, a 4 x 5 grid of patches
    assert torch.equal(keys[0], torch.arange(384.0).expand(20, 384))


def test_last_keys_depend_on_the_image_and_not_on_the_batch():
    model = make_vit()
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (48, 32, 3), dtype=np.uint8) for _ in range(2)]
    together = last_keys(model, image_batch(images))
    alone = last_keys(model, image_batch(images[1:]))
    assert together.shape == (2, 3 * 2, 384)
    torch.testing.assert_close(together[1], alone[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(together[0], together[1])


def reference_interpolate_pos_encoding(pos_embed, height, width, patch=16):
    """DINO's VisionTransformer.interpolate_pos_encoding (facebookresearch/dino, vision_transformer.py)
    for an input of height x width pixels, as written there."""
    import math

    N = pos_embed.shape[1] - 1
    if (height // patch) * (width // patch) == N and height == width:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0 = height // patch  # DINO names the rows "w" (B, nc, w, h = x.shape)
    h0 = width // patch
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = torch.nn.functional.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), mode="bicubic")
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


@pytest.mark.parametrize("rows, cols", [(30, 40), (4, 5), (14, 14), (23, 14)])
def test_position_embeddings_are_interpolated_as_dino_does(rows, cols):
    pos_embed = torch.randn(1, 197, 384)
    ours = dino_pos_embed(pos_embed, rows, cols)
    assert ours.shape == (1, 1 + rows * cols, 384)
    torch.testing.assert_close(ours, reference_interpolate_pos_encoding(pos_embed, 16 * rows, 16 * cols))


def test_the_network_adds_dinos_position_embeddings():
    """With every block switched off, the keys of the last block are a linear map of the patch
    tokens plus DINO's interpolated position embeddings: check it on a 3 x 5 grid."""
    model = make_vit()
    torch.manual_seed(0)
    with torch.no_grad():
        model.pos_embed.normal_()
        for block in model.blocks:  # residual branches output zero: tokens pass through unchanged
            block.attn.proj.weight.zero_(), block.attn.proj.bias.zero_()
            block.mlp.fc2.weight.zero_(), block.mlp.fc2.bias.zero_()
        qkv, norm = model.blocks[-1].attn.qkv, model.blocks[-1].norm1
        qkv.weight.zero_(), qkv.bias.zero_()
        qkv.weight[384:768] = torch.eye(384)  # keys = norm1(tokens)
    batch = torch.zeros(1, 3, 48, 80)  # zero image: patch tokens are the patch-embedding bias
    keys = last_keys(model, batch)
    tokens = model.patch_embed.proj.bias + dino_pos_embed(model.pos_embed, 3, 5)[0, 1:]
    torch.testing.assert_close(keys[0], norm(tokens), atol=1e-5, rtol=1e-5)
