"""Importing the authors' released model (trainer.released).

Their code builds CUDA masks (torch.cuda.BoolTensor) and cannot run on the CPU as it is, and their
weights cannot be downloaded here. So this file restates their network on the CPU: the same
module tree and attribute names (TransEncoder.net: feat_proj, drop_feat, encoder_blocks[i].layer1 /
layer2 holding inner_encoder_layer or cross_encoder_layer, final_linear), sequence-first
nn.TransformerEncoderLayer run over BOTH images' tokens with block attention masks, DETR's
cumsum-based sine encoding. Its state dicts have their key names; filled with random values they
check the key mapping and that our network computes the same outputs from the same tensors.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision
from official_weights import PicklePayload
from torch import nn

from trainer.backbone import LAYERS, Backbone
from trainer.config import TrainConfig, TransformerConfig
from trainer.inference import load_for_inference
from trainer.models.cross_image import CrossImageTransformer
from trainer.released import (
    RELEASED_FORMAT,
    ReleasedCheckpointError,
    import_released,
    is_released_checkpoint,
    map_released_encoder,
    normalise_layer_type,
    released_backbone_to_ours,
    released_checkpoint,
    released_to_ours,
)

ATOL = 1e-5

# -- their network, restated on the CPU ------------------------------------------------------


def detr_sine(batch: int, h: int, w: int, num_feats: int) -> torch.Tensor:
    """DETR's normalised sine encoding, computed as DETR does (cumulative sums of an all-ones
    mask): (B, 2 num_feats, h, w), y features first."""
    ones = torch.ones(batch, h, w)
    rows, cols = ones.cumsum(1), ones.cumsum(2)
    rows = rows / (rows[:, -1:, :] + 1e-6) * 2 * math.pi
    cols = cols / (cols[:, :, -1:] + 1e-6) * 2 * math.pi
    index = torch.arange(num_feats, dtype=torch.float32)
    dim_t = 10000 ** (2 * torch.div(index, 2, rounding_mode="floor") / num_feats)

    def interleave(values):
        angles = values[..., None] / dim_t
        return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=4).flatten(3)

    return torch.cat((interleave(rows), interleave(cols)), dim=3).permute(0, 3, 1, 2)


def _both(layer: nn.TransformerEncoderLayer, x, y, x_hide, y_hide, same_image: bool, add=None):
    """One sequence-first layer over the tokens of both images, (B, C, h, w) each; attention only
    within an image (same_image) or only across the two; hide masks (B, 1, h, w), True = hidden."""
    (b, c, hx, wx), (_, _, hy, wy) = x.shape, y.shape
    nx, ny = hx * wx, hy * wy
    if add is not None:
        x, y = add(x), add(y)
    tokens = torch.cat((x.flatten(2).permute(2, 0, 1), y.flatten(2).permute(2, 0, 1)), dim=0)
    x_hide = torch.zeros(b, nx, dtype=torch.bool) if x_hide is None else x_hide.flatten(1)
    y_hide = torch.zeros(b, ny, dtype=torch.bool) if y_hide is None else y_hide.flatten(1)
    blocked = torch.full((nx + ny, nx + ny), same_image, dtype=torch.bool)  # True: may not attend
    blocked[:nx, :nx] = not same_image
    blocked[nx:, nx:] = not same_image
    out = layer(tokens, src_mask=blocked, src_key_padding_mask=torch.cat((x_hide, y_hide), dim=1))
    out_x = out[:nx].permute(1, 2, 0).reshape(b, c, hx, wx)
    out_y = out[nx:].permute(1, 2, 0).reshape(b, c, hy, wy)
    return out_x, out_y, x_hide.view(b, 1, hx, wx), y_hide.view(b, 1, hy, wy)


class InnerLayer(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward, pos_weight=0.1, feat_weight=1.0):
        super().__init__()
        self.pos_weight, self.feat_weight = pos_weight, feat_weight
        self.inner_encoder_layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, 0.1, "relu")

    def forward(self, x, y, x_hide=None, y_hide=None):
        def add(feat):
            b, c, h, w = feat.shape
            return self.feat_weight * feat + self.pos_weight * detr_sine(b, h, w, c // 2)

        return _both(self.inner_encoder_layer, x, y, x_hide, y_hide, same_image=True, add=add)


class CrossLayer(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward):
        super().__init__()
        self.cross_encoder_layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, 0.1, "relu")

    def forward(self, x, y, x_hide=None, y_hide=None):
        return _both(self.cross_encoder_layer, x, y, x_hide, y_hide, same_image=False)


class EmptyLayer(nn.Module):
    def forward(self, x, y, x_hide=None, y_hide=None):
        return x, y, x_hide, y_hide


class Block(nn.Module):
    """Two layers; as theirs, ONE module object serves both when the two types are equal."""

    def __init__(self, d_model, nhead, dim_feedforward, types):
        super().__init__()
        inner, cross = InnerLayer(d_model, nhead, dim_feedforward), CrossLayer(d_model, nhead, dim_feedforward)
        pick = {"I": lambda: inner, "C": lambda: cross, "N": EmptyLayer}
        self.layer1, self.layer2 = pick[types[0]](), pick[types[1]]()

    def forward(self, x, y, x_hide, y_hide):
        return self.layer2(*self.layer1(x, y, x_hide, y_hide))


class Encoder(nn.Module):
    def __init__(self, feat_dim, d_model, nhead, blocks, dim_feedforward, layer_type):
        super().__init__()
        self.feat_proj = nn.Conv2d(feat_dim, d_model, kernel_size=1)
        self.drop_feat = nn.Dropout2d(0.1)
        self.encoder_blocks = nn.ModuleList(Block(d_model, nhead, dim_feedforward, layer_type[2 * i:2 * i + 2])
                                            for i in range(blocks))
        self.final_linear = nn.Conv2d(d_model, 3, kernel_size=1)

    def forward(self, x, y, x_hide=None, y_hide=None):
        x, y = self.drop_feat(self.feat_proj(x)), self.drop_feat(self.feat_proj(y))
        for block in self.encoder_blocks:
            x, y, x_hide, y_hide = block(x, y, x_hide, y_hide)
        return tuple(torch.sigmoid(self.final_linear(f)).clamp(1e-7, 1 - 1e-7) for f in (x, y))


class TransEncoder(nn.Module):
    SIZES = {"small": (256, 2, 3, 256), "base": (512, 8, 3, 2048)}

    def __init__(self, feat_dim=1024, mode="small", layer_type=("I", "C", "I", "C", "I", "N"), sizes=None):
        super().__init__()
        d_model, nhead, blocks, dim_feedforward = sizes or self.SIZES[mode]
        self.net = Encoder(feat_dim, d_model, nhead, blocks, dim_feedforward, layer_type)

    def forward(self, x, y, x_hide=None, y_hide=None):
        return self.net(x, y, x_hide, y_hide)


def randomised(module: nn.Module, seed: int, std: float = 0.3) -> nn.Module:
    """Every parameter and BatchNorm statistic drawn from a seeded generator, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                values = torch.randn(tensor.shape, generator=generator) * std
                tensor.copy_(values.abs() + 0.5 if name.endswith("running_var") else values)
    return module.eval()


def small_theirs(layer_type="ICICIN", seed: int = 0) -> TransEncoder:
    """feat_dim 32, d_model 16, 2 heads, feedforward 32, three blocks."""
    return randomised(TransEncoder(32, layer_type=tuple(layer_type), sizes=(16, 2, 3, 32)), seed)


def their_backbone() -> nn.Sequential:
    resnet = torchvision.models.resnet50(weights=None)
    return randomised(nn.Sequential(*(getattr(resnet, name) for name in LAYERS)), seed=7, std=0.05)


def ours_from(state: dict, layer_type="ICICIN", **kwargs) -> CrossImageTransformer:
    mapped, config = released_to_ours(state, tuple(layer_type), **kwargs)
    model = CrossImageTransformer(config)
    model.load_state_dict(mapped)
    return model.eval()


def features(batch, channels, h, w, seed):
    return F.normalize(torch.randn(batch, channels, h, w, generator=torch.Generator().manual_seed(seed)), dim=1)


def assert_same_outputs(theirs, ours, src, tgt, src_hide=None, tgt_hide=None):
    with torch.no_grad():
        expected = theirs(src, tgt, None if src_hide is None else src_hide[:, None],
                          None if tgt_hide is None else tgt_hide[:, None])
        got = ours(src, tgt, src_hide, tgt_hide)
    for name, e, g in zip(("src", "tgt"), expected, got):
        assert e.shape == g.shape, name
        assert torch.allclose(e, g, atol=ATOL, rtol=0), f"{name}: max difference {(e - g).abs().max():.2e}"


# -- the key mapping ---------------------------------------------------------------------------


def test_full_size_small_mode_maps_every_key_onto_our_default_network():
    state = TransEncoder(1024, "small").state_dict()
    imported = map_released_encoder(state)
    assert imported["config"] == TransformerConfig()
    assert set(imported["mapping"]) == set(state)  # every key mapped
    assert list(imported["state"]) == list(CrossImageTransformer().state_dict())  # none missing
    assert len(state) == 4 + 5 * 12
    assert imported["tied"] == []
    expected = {
        "net.feat_proj.weight": "proj.weight",
        "net.final_linear.bias": "head.bias",
        "net.encoder_blocks.0.layer1.inner_encoder_layer.self_attn.in_proj_weight": "layers.0.self_attn.in_proj_weight",
        "net.encoder_blocks.0.layer2.cross_encoder_layer.linear1.weight": "layers.1.linear1.weight",
        "net.encoder_blocks.1.layer1.inner_encoder_layer.self_attn.out_proj.bias": "layers.2.self_attn.out_proj.bias",
        "net.encoder_blocks.1.layer2.cross_encoder_layer.norm2.weight": "layers.3.norm2.weight",
        "net.encoder_blocks.2.layer1.inner_encoder_layer.linear2.bias": "layers.4.linear2.bias",
    }
    assert {k: imported["mapping"][k] for k in expected} == expected
    for theirs, ours in imported["mapping"].items():
        assert imported["state"][ours] is state[theirs] or torch.equal(imported["state"][ours], state[theirs])


def test_layer_type_forms():
    assert normalise_layer_type(("I", "C", "I", "C", "I", "N")) == tuple("ICICIN")
    assert normalise_layer_type("ICICIN") == normalise_layer_type("I,C,I,C,I,N") == normalise_layer_type("SCSCSN")
    assert normalise_layer_type("i c i c i n") == tuple("ICICIN")
    for bad in ("ICICI", "ICXCIN", "NN", "", ("IC", "N")):
        with pytest.raises(ReleasedCheckpointError, match="layer type"):
            normalise_layer_type(bad)


def test_mode_gives_the_heads_and_must_match_the_shapes():
    state = TransEncoder(1024, "small").state_dict()
    with pytest.raises(ReleasedCheckpointError, match="mode 'base'"):
        released_to_ours(state, mode="base")
    with pytest.raises(ReleasedCheckpointError, match="heads"):
        released_to_ours(state, mode=None)
    assert released_to_ours(state, mode=None, heads=4)[1] == TransformerConfig(heads=4)
    base = TransEncoder(1024, "base").state_dict()
    assert released_to_ours(base, mode="base")[1] == TransformerConfig(d_model=512, heads=8, feedforward=2048)


def test_a_missing_or_unexpected_key_is_named():
    state = dict(TransEncoder(1024, "small").state_dict())
    missing = dict(state)
    del missing["net.encoder_blocks.1.layer2.cross_encoder_layer.norm1.bias"]
    name = r"net\.encoder_blocks\.1\.layer2\.cross_encoder_layer\.norm1\.bias"
    with pytest.raises(ReleasedCheckpointError, match=rf"1 missing key: {name} \(ours layers\.3\.norm1\.bias\)"):
        released_to_ours(missing)
    extra = {**state, "net.extra.weight": torch.zeros(1)}
    with pytest.raises(ReleasedCheckpointError, match=r"1 unexpected key: net\.extra\.weight"):
        released_to_ours(extra)
    # the file's layer types differ from the ones given: keys where the given type has N, or the other kind
    with pytest.raises(ReleasedCheckpointError, match=r"net\.encoder_blocks\.2\.layer1\.inner_encoder_layer\.\S+ "
                                                      r"\(layer type ICICNN has N there\)"):
        released_to_ours(state, "ICICNN", mode="small")
    beyond = {**state, "net.encoder_blocks.3.layer1.inner_encoder_layer.norm1.bias": torch.zeros(256)}
    with pytest.raises(ReleasedCheckpointError, match=r"layer1\.inner_encoder_layer\.norm1\.bias \(layer type "
                                                      r"ICICIN has no block 3\)"):
        released_to_ours(beyond)
    with pytest.raises(ReleasedCheckpointError, match=r"missing keys: net\.encoder_blocks\.2\.layer2\."
                                                      r"cross_encoder_layer"):
        released_to_ours(state, "ICICIC", mode="small")
    shaped = {**state, "net.final_linear.weight": torch.zeros(4, 256, 1, 1)}
    with pytest.raises(ReleasedCheckpointError, match=r"mis-shaped key: net\.final_linear\.weight"):
        released_to_ours(shaped)


def test_a_dataparallel_prefix_is_accepted():
    state = TransEncoder(1024, "small").state_dict()
    plain, config = released_to_ours(state)
    wrapped, wrapped_config = released_to_ours({f"module.{k}": v for k, v in state.items()})
    assert config == wrapped_config and list(plain) == list(wrapped)


# -- the same outputs --------------------------------------------------------------------------


@pytest.mark.parametrize("grids", [((6, 6), (6, 6)), ((30, 40), (30, 40)), ((5, 7), (4, 9))],
                         ids=["square", "30x40", "different-grids"])
def test_our_network_computes_their_outputs(grids):
    theirs = small_theirs()
    ours = ours_from(theirs.state_dict(), heads=2, mode=None)
    (hs, ws), (ht, wt) = grids
    assert_same_outputs(theirs, ours, features(2, 32, hs, ws, 1), features(2, 32, ht, wt, 2))


def test_hidden_tokens_are_hidden_alike():
    theirs = small_theirs(seed=3)
    ours = ours_from(theirs.state_dict(), heads=2, mode=None)
    generator = torch.Generator().manual_seed(4)
    src_hide = torch.rand(2, 5, 6, generator=generator) < 0.3
    tgt_hide = torch.rand(2, 6, 4, generator=generator) < 0.5
    src_hide[:, 0, 0] = tgt_hide[:, 0, 0] = False  # never a fully hidden image (NaN in theirs)
    assert_same_outputs(theirs, ours, features(2, 32, 5, 6, 5), features(2, 32, 6, 4, 6), src_hide, tgt_hide)


def test_a_shared_block_becomes_two_equal_layers():
    layer_type = "ICCCIN"  # block 1 is CC: one module under both names
    theirs = small_theirs(layer_type, seed=5)
    state = theirs.state_dict()
    first = "net.encoder_blocks.1.layer1.cross_encoder_layer.linear1.weight"
    assert torch.equal(state[first], state[first.replace("layer1", "layer2")])
    imported = map_released_encoder(state, layer_type, mode=None, heads=2)
    assert imported["tied"] == [(2, 3)]
    assert imported["config"].layers == "SCCCS"
    ours = ours_from(state, layer_type, heads=2, mode=None)
    assert ours.layers[2].linear1.weight.data_ptr() != ours.layers[3].linear1.weight.data_ptr()
    assert_same_outputs(theirs, ours, features(2, 32, 6, 5, 7), features(2, 32, 4, 7, 8))

    differing = dict(state)
    differing[first.replace("layer1", "layer2")] = state[first] + 1
    with pytest.raises(ReleasedCheckpointError, match="different values"):
        released_to_ours(differing, layer_type, mode=None, heads=2)


def test_empty_layers_anywhere_are_skipped():
    layer_type = "INCNIC"
    theirs = small_theirs(layer_type, seed=6)
    ours = ours_from(theirs.state_dict(), layer_type, heads=2, mode=None)
    assert ours.config.layers == "SCSC"
    assert_same_outputs(theirs, ours, features(2, 32, 4, 6, 9), features(2, 32, 4, 6, 10))


def test_backbone_mapping():
    sequential = their_backbone()
    state = sequential.state_dict()
    assert "0.weight" in state and "4.0.conv1.weight" in state and "6.5.bn3.running_var" in state
    ours = released_backbone_to_ours(state)
    backbone = Backbone()
    backbone.load_state_dict(ours)  # strict
    image = torch.randn(1, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(backbone(image), F.normalize(sequential(image), dim=1), atol=ATOL)

    named = {f"{LAYERS[int(k.split('.')[0])]}.{k.split('.', 1)[1]}": v for k, v in state.items()}
    named["fc.weight"] = torch.zeros(1000, 2048)  # a whole torchvision ResNet-50: layer4 / fc are left out
    named = {k: v for k, v in named.items() if not k.endswith("num_batches_tracked")}  # optional
    assert list(released_backbone_to_ours(named)) == list(ours)
    assert all(torch.equal(released_backbone_to_ours({f"module.{k}": v for k, v in state.items()})[k], v)
               for k, v in ours.items())
    with pytest.raises(ReleasedCheckpointError, match=r"unexpected key: 7\.0\.conv1\.weight"):
        released_backbone_to_ours({**state, "7.0.conv1.weight": torch.zeros(1)})
    missing = dict(state)
    del missing["5.1.conv2.weight"]
    with pytest.raises(ReleasedCheckpointError, match=r"missing key: layer2\.1\.conv2\.weight"):
        released_backbone_to_ours(missing)


# -- the released file -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def released():
    """(contents of a released file with full-size networks and random values, their encoder)."""
    theirs = randomised(TransEncoder(1024, "small"), seed=11, std=0.05)
    optimiser = {"state": {}, "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.999), "params": [0, 1]}]}
    return {"backbone": their_backbone().state_dict(), "encoder": theirs.state_dict(),
            "optimiser": optimiser}, theirs


@pytest.mark.slow
def test_imported_checkpoint_loads_for_inference_with_their_outputs(tmp_path, released):
    contents, theirs = released
    path = tmp_path / "hard_mining_neg5.pth"
    torch.save(contents, path)
    summary = import_released(path, tmp_path / "imported.pt")
    assert summary["config"] == dataclasses.asdict(TransformerConfig())
    json.dumps(summary)  # plain data, for the command line
    assert summary["encoder_keys"] == len(contents["encoder"])
    assert summary["step"] == 0 and len(summary["sha256"]) == 64

    loaded = load_for_inference(tmp_path / "imported.pt", device="cpu")
    assert loaded.config == TrainConfig()
    assert loaded.step == 0
    assert loaded.backbone_record == {"source": str(path.resolve()), "format": RELEASED_FORMAT,
                                      "sha256": summary["sha256"]}
    assert not loaded.model.training and not loaded.backbone.training
    assert_same_outputs(theirs, loaded.model, features(2, 1024, 6, 8, 12), features(2, 1024, 5, 7, 13))
    sequential = their_backbone()
    sequential.load_state_dict(contents["backbone"])
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(loaded.backbone(image), F.normalize(sequential(image), dim=1), atol=ATOL)

    # an existing output is replaced only when asked; never the input
    with pytest.raises(ReleasedCheckpointError, match="exists"):
        import_released(path, tmp_path / "imported.pt")
    import_released(path, tmp_path / "imported.pt", force=True)
    with pytest.raises(ReleasedCheckpointError, match="is the input"):
        import_released(path, path, force=True)


@pytest.mark.slow
def test_a_dataparallel_file_imports(tmp_path, released):
    contents, theirs = released
    wrapped = {name: {f"module.{k}": v for k, v in contents[name].items()} for name in ("backbone", "encoder")}
    path = tmp_path / "wrapped.pth"
    torch.save(wrapped, path)
    import_released(path, tmp_path / "imported.pt")
    loaded = load_for_inference(tmp_path / "imported.pt", device="cpu")
    assert_same_outputs(theirs, loaded.model, features(1, 1024, 4, 4, 14), features(1, 1024, 4, 4, 15))


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_a_file_with_a_missing_or_extra_key_is_refused_naming_it(tmp_path, released, change):
    contents, _ = released
    encoder = dict(contents["encoder"])
    key = "net.encoder_blocks.0.layer2.cross_encoder_layer.linear2.weight"
    if change == "missing":
        del encoder[key]
    else:
        key = "net.encoder_blocks.0.layer1.inner_encoder_layer.extra"
        encoder[key] = torch.zeros(1)
    path = tmp_path / f"{change}.pth"
    torch.save({**contents, "encoder": encoder}, path)
    with pytest.raises(ReleasedCheckpointError, match="unexpected" if change == "extra" else "missing") as info:
        import_released(path, tmp_path / "out.pt")
    assert str(path.resolve()) in str(info.value) and key in str(info.value)
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "out.pt.tmp").exists()


def test_a_pickle_payload_is_refused_and_never_run(tmp_path):
    control = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(PicklePayload(control)))
    assert control.exists()

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"encoder": {"net.feat_proj.weight": torch.zeros(1)}, "backbone": {"0.weight": torch.zeros(1)},
                "payload": PicklePayload(marker)}, path)
    with pytest.raises(ReleasedCheckpointError, match="weights-only") as info:
        import_released(path, tmp_path / "out.pt")
    assert str(path) in str(info.value)
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


def test_other_files_are_refused_naming_them(tmp_path):
    with pytest.raises(ReleasedCheckpointError, match="nope.pth: no such file"):
        import_released(tmp_path / "nope.pth", tmp_path / "out.pt")
    path = tmp_path / "trainer.pt"
    torch.save({"format": 1, "model": {"proj.weight": torch.zeros(1)}, "config": {}}, path)
    with pytest.raises(ReleasedCheckpointError, match=r"trainer\.pt: not the authors' released model.*"
                                                      r"looks like a trainer checkpoint"):
        import_released(path, tmp_path / "out.pt")


def test_is_released_checkpoint(released):
    contents, _ = released
    assert is_released_checkpoint(contents)
    assert not is_released_checkpoint({"encoder": {}, "backbone": contents["backbone"]})
    assert not is_released_checkpoint({"encoder": contents["encoder"]})
    assert not is_released_checkpoint({"model": contents["encoder"], "config": {}})
    assert not is_released_checkpoint([contents])


def test_released_checkpoint_in_memory_and_its_errors_name_the_source(released):
    contents, _ = released
    checkpoint, summary = released_checkpoint(contents, source="mem.pth", sha256=None)
    assert set(checkpoint) >= {"format", "step", "model", "config", "config_hash", "backbone", "backbone_state"}
    assert checkpoint["backbone"]["source"] == "mem.pth" and summary["tied_layers"] == []
    with pytest.raises(ReleasedCheckpointError, match=r"mem\.pth: mode 'base'"):
        released_checkpoint(contents, source="mem.pth", mode="base")
    with pytest.raises(ReleasedCheckpointError, match=r"mem\.pth: .*image-size must be a multiple"):
        released_checkpoint(contents, source="mem.pth", image_size=481)


def test_the_import_released_command_writes_a_checkpoint_and_names_a_bad_file(tmp_path, released):
    from conftest import all_output, make_runner

    from trainer.cli import main

    contents, theirs = released
    path = tmp_path / "hard_mining_neg5.pth"
    torch.save(contents, path)
    result = make_runner().invoke(main, ["import-released", str(path), str(tmp_path / "imported.pt")])
    assert result.exit_code == 0, all_output(result)
    assert '"encoder_keys": 64' in result.output and "written to" in result.output
    loaded = load_for_inference(tmp_path / "imported.pt", device="cpu")
    assert_same_outputs(theirs, loaded.model, features(1, 1024, 3, 4, 16), features(1, 1024, 4, 3, 17))

    broken = tmp_path / "notes.pth"
    broken.write_bytes(b"not a checkpoint")
    result = make_runner().invoke(main, ["import-released", str(broken), str(tmp_path / "other.pt")])
    assert result.exit_code == 1 and "notes.pth" in all_output(result) and "Traceback" not in all_output(result)
    assert not (tmp_path / "other.pt").exists()


def test_the_authors_file_is_read_directly_behind_ckpt(tmp_path, released):
    contents, theirs = released
    path = tmp_path / "hard_mining_neg5.pth"
    torch.save(contents, path)
    loaded = load_for_inference(path, device="cpu")
    assert loaded.config == TrainConfig() and loaded.backbone_record["format"] == RELEASED_FORMAT
    assert_same_outputs(theirs, loaded.model, features(1, 1024, 3, 5, 18), features(1, 1024, 4, 4, 19))
    damaged = dict(contents, encoder={k: v for k, v in contents["encoder"].items() if "final_linear" not in k})
    torch.save(damaged, tmp_path / "damaged.pth")
    from trainer.loop import ResumeError

    with pytest.raises(ResumeError, match=r"damaged\.pth: the authors' released file, but.*final_linear"):
        load_for_inference(tmp_path / "damaged.pth", device="cpu")
