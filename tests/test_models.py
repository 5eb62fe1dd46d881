"""The model registry and the cross-image transformer: shapes, attention masks, positional
encoding, gradients, and that it can fit a tiny batch."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from trainer.config import TrainConfig, TransformerConfig
from trainer.loss import pair_loss
from trainer.models import MODELS, build_model, register
from trainer.models.cross_image import CrossImageTransformer, sine_position_encoding

SMALL = dict(feat_dim=16, d_model=16, heads=2, feedforward=32)
"""A small model with the same structure, for the property tests."""


@pytest.fixture(autouse=True)
def one_thread():
    """Single-threaded torch: these small models run much faster than with contended threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _features(b, c, h, w, seed):
    return F.normalize(torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed)), dim=1)


def _small(layers="SCSCS", seed=0, **overrides):
    torch.manual_seed(seed)
    return CrossImageTransformer(TransformerConfig(**{**SMALL, "layers": layers, **overrides})).eval()


# --- Registry ---

def test_build_model_returns_the_transformer_by_default():
    model = build_model(TrainConfig())
    assert isinstance(model, CrossImageTransformer)
    assert model.proj.in_channels == 1024 and model.proj.out_channels == 256
    assert len(model.layers) == 5 and model.kinds == "SCSCS"
    layer = model.layers[0]
    assert layer.self_attn.num_heads == 2 and layer.linear1.out_features == 256
    assert layer.self_attn.batch_first and not layer.norm_first
    assert model.feat_dropout.p == 0.1 and layer.dropout.p == 0.1


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown architecture 'nope'.*transformer"):
        build_model(TrainConfig(arch="nope"))


def test_register_adds_a_factory_and_refuses_duplicates():
    @register("test-identity")
    def factory(config):
        return torch.nn.Identity()

    try:
        assert isinstance(build_model(TrainConfig(arch="test-identity")), torch.nn.Identity)
        with pytest.raises(ValueError, match="already registered"):
            register("test-identity")(factory)
    finally:
        MODELS.unregister("test-identity")


def test_listing_the_architectures_imports_no_network_module():
    code = ("import sys; from trainer.models import MODELS; import trainer.cli; "
            "assert MODELS.names() == ('ncnet', 'transformer'), MODELS.names(); "
            "assert trainer.cli.ARCHITECTURES == MODELS.names(); "
            "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('trainer.models.')); "
            "assert loaded == [], loaded")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- Shapes and ranges ---

def test_output_shapes_on_30x30_features():
    model = build_model(TrainConfig()).eval()
    with torch.no_grad():
        src_out, tgt_out = model(_features(2, 1024, 30, 30, 0), _features(2, 1024, 30, 30, 1))
    assert src_out.shape == tgt_out.shape == (2, 3, 30, 30)
    assert ((src_out > 0) & (src_out < 1)).all() and ((tgt_out > 0) & (tgt_out < 1)).all()


def test_two_different_grid_sizes():
    model = build_model(TrainConfig()).train()
    src_out, tgt_out = model(_features(2, 1024, 6, 7, 0), _features(2, 1024, 5, 4, 1))
    assert src_out.shape == (2, 3, 6, 7) and tgt_out.shape == (2, 3, 5, 4)
    for out in (src_out, tgt_out):
        assert torch.isfinite(out).all() and (out >= 1e-7).all() and (out <= 1 - 1e-7).all()


def test_bad_inputs_raise_clear_errors():
    model = _small()
    src, tgt = _features(2, 16, 4, 4, 0), _features(2, 16, 3, 5, 1)
    with pytest.raises(ValueError, match="src_feat"):
        model(_features(2, 8, 4, 4, 0), tgt)
    with pytest.raises(ValueError, match="batch sizes"):
        model(src, tgt[:1])
    with pytest.raises(ValueError, match="tgt_hide"):
        model(src, tgt, tgt_hide=torch.zeros(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="src_hide"):
        model(src, tgt, src_hide=torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="layers"):
        CrossImageTransformer(TransformerConfig(**SMALL, layers="SXC"))


# --- Attention masks ---

def _src_change(model, tgt_change, tgt_hide=None):
    """Largest change of the source output when the target features change by ``tgt_change``."""
    src, tgt = _features(2, 16, 4, 5, 0), _features(2, 16, 3, 4, 1)
    with torch.no_grad():
        before, tgt_before = model(src, tgt, tgt_hide=tgt_hide)
        after, tgt_after = model(src, tgt + tgt_change, tgt_hide=tgt_hide)
    return (after - before).abs().max().item(), (tgt_after - tgt_before).abs()


def test_self_attention_layers_do_not_mix_the_images():
    change = torch.randn(2, 16, 3, 4)
    assert _src_change(_small("S"), change)[0] == 0.0
    assert _src_change(_small("SSS"), change)[0] == 0.0
    assert _src_change(_small("SC"), change)[0] > 1e-3


def test_hidden_target_tokens_do_not_reach_the_source():
    model = _small("SCSCS")
    hide = torch.zeros(2, 3, 4, dtype=torch.bool)
    hide[:, 1, 2] = True
    hide[1, 0, :] = True
    hidden_change = torch.zeros(2, 16, 3, 4)
    hidden_change[:, :, 1, 2] = 5.0 * torch.randn(2, 16)
    src_delta, tgt_delta = _src_change(model, hidden_change, tgt_hide=hide)
    assert src_delta < 1e-6
    # Neither do they reach the target's other tokens; the hidden token's own output does change.
    assert tgt_delta[:, :, 1, 2].max() > 1e-3
    tgt_delta[:, :, 1, 2] = 0
    assert tgt_delta.max() < 1e-6
    visible_change = torch.zeros(2, 16, 3, 4)
    visible_change[:, :, 2, 0] = 5.0 * torch.randn(2, 16)
    assert _src_change(model, visible_change, tgt_hide=hide)[0] > 1e-3


def test_hidden_source_tokens_do_not_reach_the_target():
    model = _small("SCSCS")
    src, tgt = _features(1, 16, 4, 5, 0), _features(1, 16, 3, 4, 1)
    hide = torch.zeros(1, 4, 5, dtype=torch.bool)
    hide[0, 3, 4] = True
    moved = src.clone()
    moved[0, :, 3, 4] += 5.0
    with torch.no_grad():
        assert torch.allclose(model(src, tgt, src_hide=hide)[1], model(moved, tgt, src_hide=hide)[1], atol=1e-6)
        assert not torch.allclose(model(src, tgt)[1], model(moved, tgt)[1], atol=1e-3)


@pytest.mark.parametrize("training", [False, True])
def test_a_fully_hidden_image_is_treated_as_not_hidden(training):
    model = _small("SCSCS", dropout=0.0, feat_dropout=0.0).train(training)
    src, tgt = _features(2, 16, 4, 5, 0), _features(2, 16, 3, 4, 1)
    src_hide = torch.zeros(2, 4, 5, dtype=torch.bool)
    src_hide[0] = True  # the whole source of pair 0
    tgt_hide = torch.ones(2, 3, 4, dtype=torch.bool)  # every target
    with torch.set_grad_enabled(training):
        src_out, tgt_out = model(src, tgt, src_hide, tgt_hide)
        assert torch.isfinite(src_out).all() and torch.isfinite(tgt_out).all()
        plain_src, plain_tgt = model(src, tgt)
    assert torch.allclose(src_out, plain_src, atol=1e-6) and torch.allclose(tgt_out, plain_tgt, atol=1e-6)


# --- Positional encoding ---

def test_sine_position_encoding_matches_detr_by_hand():
    h, w, feats = 2, 3, 4  # d_model 8; frequencies 1, 1, 10000^(2/4) = 100, 100
    pos = sine_position_encoding(h, w, feats)
    assert pos.shape == (8, 2, 3)
    for i, j in [(0, 0), (1, 0), (0, 2), (1, 1)]:
        y, x = (i + 1) / h * 2 * math.pi, (j + 1) / w * 2 * math.pi
        expected = [math.sin(y), math.cos(y), math.sin(y / 100), math.cos(y / 100),
                    math.sin(x), math.cos(x), math.sin(x / 100), math.cos(x / 100)]
        assert pos[:, i, j].tolist() == pytest.approx(expected, abs=1e-5)
    # The last row and column sit at 2 pi: sin = 0, cos = 1 at the highest frequency.
    assert pos[0, 1, 2].item() == pytest.approx(0.0, abs=1e-5) and pos[4, 1, 2].item() == pytest.approx(0.0, abs=1e-5)


def _flip_equivariance_gap(model):
    """How far the source output is from flipping with a horizontally flipped source input."""
    src, tgt = _features(1, 16, 4, 5, 0), _features(1, 16, 3, 4, 1)
    with torch.no_grad():
        out = model(src, tgt)[0]
        flipped = model(src.flip(-1), tgt)[0]
    return (flipped - out.flip(-1)).abs().max().item()


def test_positional_encoding_enters_self_attention_layers_only():
    assert _flip_equivariance_gap(_small("C")) < 1e-6  # no positions: C layers ignore token order
    assert _flip_equivariance_gap(_small("S", pos_weight=0.0)) < 1e-6
    assert _flip_equivariance_gap(_small("S")) > 1e-4


# --- Training ---

def test_gradients_reach_the_projection_and_every_layer():
    model = _small("SCSCS").train()
    src_out, tgt_out = model(_features(2, 16, 4, 5, 0), _features(2, 16, 3, 4, 1),
                             tgt_hide=torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0)) > 0.5)
    (src_out * torch.randn_like(src_out)).sum().add((tgt_out * torch.randn_like(tgt_out)).sum()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def _shifted_pair(h, w):
    """Masks of 2 pairs, the target's a one-cell shift of the source's, and their correspondences."""
    src_mask, tgt_mask = torch.zeros(2, 1, h, w), torch.zeros(2, 1, h, w)
    src_mask[0, 0, 1:3, 0:2] = 1
    tgt_mask[0, 0, 1:3, 1:3] = 1  # pair 0: one cell to the right
    src_mask[1, 0, 0:2, 1:4] = 1
    tgt_mask[1, 0, 1:3, 1:4] = 1  # pair 1: one cell down
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cx, cy = (xs + 0.5) / w, (ys + 0.5) / h
    src_to_tgt = torch.stack([torch.stack([cx + 1 / w, cy]), torch.stack([cx, cy + 1 / h])]).clamp(0, 1)
    tgt_to_src = torch.stack([torch.stack([cx - 1 / w, cy]), torch.stack([cx, cy - 1 / h])]).clamp(0, 1)
    return src_mask, tgt_mask, src_to_tgt, tgt_to_src


@pytest.mark.slow
def test_a_tiny_batch_can_be_overfitted():
    torch.manual_seed(0)
    model = CrossImageTransformer(TransformerConfig(d_model=32, feedforward=64, dropout=0.0, feat_dropout=0.0))
    src, tgt = _features(2, 1024, 4, 4, 0), _features(2, 1024, 4, 4, 1)
    truth = _shifted_pair(4, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        out = pair_loss(*model(src, tgt), *truth)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[0] > 1.0
    assert min(losses[-10:]) < 0.15
    assert out["mask_bce"].item() < 0.05


def _full_sequence_forward(model, src_feat, tgt_feat, src_hide, tgt_hide):
    """The model's layers applied the straightforward way: one sequence of both images' tokens
    with an attention mask (S: within an image, C: across), as in the authors' code."""
    from trainer.models.cross_image import _flat_hide, _unhide_fully_hidden

    (batch, _, hs, ws), (_, _, ht, wt) = src_feat.shape, tgt_feat.shape
    tokens = torch.cat((model._tokens(src_feat), model._tokens(tgt_feat)), dim=1)
    pos = torch.cat((model._positions(hs, ws, tokens), model._positions(ht, wt, tokens)), dim=0)
    hide = torch.cat((_unhide_fully_hidden(_flat_hide(src_hide, batch, hs, ws, "s", tokens.device)),
                      _unhide_fully_hidden(_flat_hide(tgt_hide, batch, ht, wt, "t", tokens.device))), dim=1)
    is_src = torch.arange(tokens.shape[1]) < hs * ws
    same_image = is_src[:, None] == is_src[None, :]
    for kind, layer in zip(model.kinds, model.layers):
        if kind == "S":
            tokens = layer(tokens + pos, src_mask=~same_image, src_key_padding_mask=hide)
        else:
            tokens = layer(tokens, src_mask=same_image, src_key_padding_mask=hide)
    return model._head(tokens[:, :hs * ws], hs, ws), model._head(tokens[:, hs * ws:], ht, wt)


@pytest.mark.parametrize("target_grid", [(5, 5), (4, 6)])
def test_block_attention_equals_the_full_masked_sequence(target_grid):
    """Each image's queries attend to one image at a time: the same result as the full
    sequence with an attention mask, at half the cost (equal and different grid sizes)."""
    torch.manual_seed(0)
    model = CrossImageTransformer(TransformerConfig(feat_dim=16, d_model=32, heads=2, feedforward=32)).eval()
    src = torch.randn(2, 16, 5, 5)
    tgt = torch.randn(2, 16, *target_grid)
    tgt_hide = torch.rand(2, *target_grid) < 0.4
    with torch.no_grad():
        fast = model(src, tgt, None, tgt_hide)
        reference = _full_sequence_forward(model, src, tgt, None, tgt_hide)
    for a, b in zip(fast, reference):
        assert torch.allclose(a, b, atol=1e-5)
