"""Style transfer: the AdaIN operation, the port's networks and weight files, finding the
weights, the AdaIN stylizer (random weights, small images) and the colour fallback.

The published weights cannot be downloaded here: weight files are built with the published
key names and shapes (listed below independently of datagen.style.adain_net) and random values.
"""
from __future__ import annotations

import datetime
import hashlib
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from datagen.style import (
    STYLIZERS,
    StyleError,
    Stylizer,
    load_style_images,
    make_stylizer,
    stylizer_names,
)
from datagen.style.adain import AdainStylizer, adain, feature_stats
from datagen.style.adain_net import (
    StyleWeightsError,
    encoder_layers,
    find_adain_weights,
    load_weights,
    make_decoder,
    make_vgg_encoder,
)
from datagen.style.color import ColorStylizer, to_lab

# (module index, in channels, out channels, kernel) of the convolutions of the port's
# net.vgg (53 modules) and net.decoder (29 modules): the keys of vgg_normalised.pth / decoder.pth.
VGG_CONVS = [(0, 3, 3, 1), (2, 3, 64, 3), (5, 64, 64, 3), (9, 64, 128, 3), (12, 128, 128, 3),
             (16, 128, 256, 3), (19, 256, 256, 3), (22, 256, 256, 3), (25, 256, 256, 3),
             (29, 256, 512, 3), (32, 512, 512, 3), (35, 512, 512, 3), (38, 512, 512, 3),
             (42, 512, 512, 3), (45, 512, 512, 3), (48, 512, 512, 3), (51, 512, 512, 3)]
DECODER_CONVS = [(1, 512, 256, 3), (5, 256, 256, 3), (8, 256, 256, 3), (11, 256, 256, 3),
                 (14, 256, 128, 3), (18, 128, 128, 3), (21, 128, 64, 3), (25, 64, 64, 3),
                 (28, 64, 3, 3)]
SIDE = 32  # max_side of the stylizers under test: relu4_1 is 4 x 4


def random_state_dict(convs, seed: int, last_bias: float = 0.0) -> dict:
    """He-initialised random weights under the published keys."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for n, (index, cin, cout, k) in enumerate(convs):
        std = (2.0 / (cin * k * k)) ** 0.5
        state[f"{index}.weight"] = torch.randn(cout, cin, k, k, generator=generator) * std
        state[f"{index}.bias"] = torch.full((cout,), last_bias if n == len(convs) - 1 else 0.0)
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict:
    """Paths of a full 53-module vgg_normalised.pth and a decoder.pth with random values."""
    folder = tmp_path_factory.mktemp("adain-weights")
    vgg = random_state_dict(VGG_CONVS, seed=0)
    decoder = random_state_dict(DECODER_CONVS, seed=1, last_bias=0.5)
    decoder["28.weight"] *= 0.3  # keep the random decoder's output mostly inside [0, 1]
    torch.save(vgg, folder / "vgg_normalised.pth")
    torch.save(decoder, folder / "decoder.pth")
    return {"vgg": folder / "vgg_normalised.pth", "decoder": folder / "decoder.pth",
            "vgg_state": vgg, "decoder_state": decoder}


def pattern(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random colour image with some structure, (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    small = rng.integers(30, 226, size=(4, 4, 3)).astype(np.uint8)
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    image += rng.integers(-12, 13, size=image.shape).astype(np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_png(path: Path, image: np.ndarray) -> None:
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="module")
def style_dir(tmp_path_factory) -> Path:
    """Three style images of different sizes."""
    folder = tmp_path_factory.mktemp("styles")
    for i, (h, w) in enumerate([(40, 56), (48, 48), (64, 40)]):
        write_png(folder / f"style{i}.png", pattern(h, w, seed=100 + i))
    return folder


@pytest.fixture(scope="module")
def stylizer(weights, style_dir) -> AdainStylizer:
    return AdainStylizer(weights["vgg"], weights["decoder"], style_dir, device="cpu",
                         max_side=SIDE, batch_size=4)


# -- the AdaIN operation ---------------------------------------------------------------------

def test_adain_gives_the_style_statistics():
    generator = torch.Generator().manual_seed(0)
    content = torch.randn(2, 8, 5, 7, generator=generator) * 3 + 1
    style = torch.randn(2, 8, 6, 4, generator=generator) * 0.5 - 2
    style_mean, style_std = feature_stats(style)
    out = adain(content, style_mean, style_std)
    out_mean, out_std = feature_stats(out)
    assert out.shape == content.shape
    torch.testing.assert_close(out_mean, style_mean, atol=1e-4, rtol=0)
    torch.testing.assert_close(out_std, style_std, atol=1e-4, rtol=0)


def test_feature_stats_follow_the_port():
    """calc_mean_std of pytorch-AdaIN: unbiased variance over H * W, std = sqrt(var + eps)."""
    feat = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(1))
    mean, std = feature_stats(feat)
    flat = feat.view(3, 4, -1)
    torch.testing.assert_close(mean, flat.mean(dim=2).view(3, 4, 1, 1))
    torch.testing.assert_close(std, (flat.var(dim=2) + 1e-5).sqrt().view(3, 4, 1, 1))
    one_cell_mean, one_cell_std = feature_stats(feat[:, :, :1, :1])
    assert torch.isfinite(one_cell_std).all() and torch.isfinite(one_cell_mean).all()


# -- networks and weight files -----------------------------------------------------------------

def test_networks_have_the_published_keys():
    encoder_keys = {f"{i}.{p}": (cout, cin, k, k) if p == "weight" else (cout,)
                    for i, cin, cout, k in VGG_CONVS if i < 31 for p in ("weight", "bias")}
    decoder_keys = {f"{i}.{p}": (cout, cin, k, k) if p == "weight" else (cout,)
                    for i, cin, cout, k in DECODER_CONVS for p in ("weight", "bias")}
    encoder, decoder = make_vgg_encoder(), make_decoder()
    assert len(encoder) == 31 and len(decoder) == 29
    assert {k: tuple(v.shape) for k, v in encoder.state_dict().items()} == encoder_keys
    assert {k: tuple(v.shape) for k, v in decoder.state_dict().items()} == decoder_keys
    first = encoder[0]
    assert isinstance(first, torch.nn.Conv2d) and first.kernel_size == (1, 1)
    pools = [m for m in encoder if isinstance(m, torch.nn.MaxPool2d)]
    assert len(pools) == 3 and all(p.ceil_mode for p in pools)


def test_encoder_and_decoder_load_the_published_files(weights):
    encoder = load_weights(make_vgg_encoder(), weights["vgg"], "encoder")
    decoder = load_weights(make_decoder(), weights["decoder"], "decoder")
    assert torch.equal(encoder[0].weight, weights["vgg_state"]["0.weight"])
    assert torch.equal(encoder[29].bias, weights["vgg_state"]["29.bias"])
    assert torch.equal(decoder[28].weight, weights["decoder_state"]["28.weight"])
    with torch.inference_mode():
        x = torch.rand(1, 3, 20, 28)
        feat = encoder(x)
        staged = x
        for stage in encoder_layers(encoder):
            staged = stage(staged)
        assert feat.shape == (1, 512, 3, 4)  # ceil_mode pooling: ceil(20 / 8), ceil(28 / 8)
        torch.testing.assert_close(staged, feat)
        assert decoder(feat).shape == (1, 3, 24, 32)


def test_wrapped_decoder_checkpoints_load(weights, tmp_path):
    state = weights["decoder_state"]
    variants = {
        "iter.pth": {"decoder": state, "iter": 160000},
        "state_dict.pth": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
        "model.pth": {"model": {f"decoder.{k}": v for k, v in state.items()}, "epoch": 3},
    }
    for name, checkpoint in variants.items():
        torch.save(checkpoint, tmp_path / name)
        decoder = load_weights(make_decoder(), tmp_path / name, "decoder")
        assert torch.equal(decoder[1].weight, state["1.weight"]), name


def test_wrong_weight_files_are_refused(weights, tmp_path):
    resnet = tmp_path / "resnet18.pth"  # the start of torchvision's resnet18 state dict
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64),
                "bn1.bias": torch.zeros(64), "bn1.running_mean": torch.zeros(64),
                "bn1.running_var": torch.ones(64), "bn1.num_batches_tracked": torch.tensor(0),
                "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3),
                "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}, resnet)
    with pytest.raises(StyleWeightsError, match="not an AdaIN VGG encoder") as error:
        load_weights(make_vgg_encoder(), resnet, "encoder")
    assert str(resnet) in str(error.value) and "conv1.weight" in str(error.value)

    with pytest.raises(StyleWeightsError, match="not an AdaIN VGG encoder") as error:
        load_weights(make_vgg_encoder(), weights["decoder"], "encoder")
    assert str(weights["decoder"]) in str(error.value) and "0.weight" in str(error.value)

    with pytest.raises(StyleWeightsError, match="not an AdaIN decoder") as error:
        load_weights(make_decoder(), weights["vgg"], "decoder")
    assert str(weights["vgg"]) in str(error.value)

    bad_shape = dict(weights["vgg_state"])
    bad_shape["2.weight"] = torch.zeros(32, 3, 3, 3)
    torch.save(bad_shape, tmp_path / "bad_shape.pth")
    with pytest.raises(StyleWeightsError, match=r"wrong shapes 2\.weight \(32, 3, 3, 3\)"):
        load_weights(make_vgg_encoder(), tmp_path / "bad_shape.pth", "encoder")

    (tmp_path / "garbage.pth").write_bytes(b"not a torch file at all")
    torch.save({"when": datetime.date(2022, 6, 1)}, tmp_path / "pickled_object.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    for name in ("garbage.pth", "pickled_object.pth", "tensor.pth", "missing.pth"):
        with pytest.raises(StyleWeightsError) as error:
            load_weights(make_decoder(), tmp_path / name, "decoder")
        assert name in str(error.value)


# -- finding the weights -----------------------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No AdaIN env vars, HOME in tmp_path, no XDG_CACHE_HOME."""
    monkeypatch.delenv("SEGSWAP_ADAIN_VGG", raising=False)
    monkeypatch.delenv("SEGSWAP_ADAIN_DECODER", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def test_missing_weights_message(clean_env, tmp_path):
    with pytest.raises(StyleWeightsError) as error:
        find_adain_weights()
    message = str(error.value)
    for needle in ("vgg_normalised.pth", "decoder.pth", "pytorch-AdaIN", "--style color",
                   "--style none", "SEGSWAP_ADAIN_VGG", "SEGSWAP_ADAIN_DECODER",
                   str(tmp_path / "home" / ".cache" / "segswap" / "adain")):
        assert needle in message, (needle, message)


def test_weights_are_found_in_order(clean_env, tmp_path):
    cache = tmp_path / "home" / ".cache" / "segswap" / "adain"
    cache.mkdir(parents=True)
    (cache / "vgg_normalised.pth").write_bytes(b"v")
    (cache / "decoder.pth").write_bytes(b"d")
    assert find_adain_weights() == (cache / "vgg_normalised.pth", cache / "decoder.pth")

    xdg = tmp_path / "xdg" / "segswap" / "adain"
    xdg.mkdir(parents=True)
    (xdg / "vgg_normalised.pth").write_bytes(b"v")
    (xdg / "decoder.pth").write_bytes(b"d")
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert find_adain_weights() == (xdg / "vgg_normalised.pth", xdg / "decoder.pth")

    (tmp_path / "my_decoder.pth").write_bytes(b"d")
    clean_env.setenv("SEGSWAP_ADAIN_DECODER", str(tmp_path / "my_decoder.pth"))
    assert find_adain_weights() == (xdg / "vgg_normalised.pth", tmp_path / "my_decoder.pth")
    assert find_adain_weights(decoder=cache / "decoder.pth") == (
        xdg / "vgg_normalised.pth", cache / "decoder.pth")

    clean_env.setenv("SEGSWAP_ADAIN_VGG", str(tmp_path / "nowhere.pth"))
    with pytest.raises(StyleWeightsError, match="nowhere.pth"):
        find_adain_weights()
    with pytest.raises(StyleWeightsError, match="given.pth"):
        find_adain_weights(vgg=tmp_path / "given.pth")


# -- registry and style folders ------------------------------------------------------------------

def test_registry(style_dir):
    assert {"adain", "color"} <= set(stylizer_names()) and "none" not in STYLIZERS
    with pytest.raises(ValueError, match="adain.*color"):
        make_stylizer("gatys")
    with pytest.raises(ValueError, match="none"):
        make_stylizer("none")
    colour = make_stylizer("color", style_dir=style_dir)
    assert isinstance(colour, ColorStylizer) and isinstance(colour, Stylizer)


def test_package_import_does_not_import_torch():
    code = "import sys, datagen.style; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_style_folders(tmp_path, style_dir):
    images = load_style_images(style_dir)
    assert [p.name for p, _ in images] == ["style0.png", "style1.png", "style2.png"]
    assert images[2][1].shape == (64, 40, 3) and images[2][1].dtype == np.uint8

    with pytest.raises(StyleError, match="does not exist"):
        load_style_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(StyleError, match="empty.*no image file"):
        load_style_images(tmp_path / "empty")

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_png(mixed / "b.PNG", pattern(40, 40, 1))
    (mixed / "a_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (mixed / "c_empty.webp").write_bytes(b"")
    with pytest.warns(UserWarning, match="a_broken.jpg.*c_empty.webp"):
        images = load_style_images(mixed)
    assert [p.name for p, _ in images] == ["b.PNG"]
    (mixed / "b.PNG").unlink()
    with pytest.raises(StyleError, match="no readable image"):
        load_style_images(mixed)


# -- the AdaIN stylizer --------------------------------------------------------------------------

def test_adain_stylizer_output(stylizer):
    images = [pattern(48, 48, 1), pattern(40, 56, 2), pattern(48, 48, 3)]
    out = stylizer.stylize(images, [0, 2, 1], [0.9, 0.5, 1.0])
    assert [o.shape for o in out] == [i.shape for i in images]
    assert all(o.dtype == np.uint8 for o in out)
    again = stylizer.stylize(images, [0, 2, 1], [0.9, 0.5, 1.0])
    assert all(a.tobytes() == b.tobytes() for a, b in zip(out, again))
    # Batching by size does not change an image's result.
    alone = stylizer.stylize(images[1:2], [2], [0.5])[0]
    assert np.abs(alone.astype(int) - out[1]).max() <= 1


def test_adain_alpha(stylizer):
    image = pattern(48, 48, 4)
    styled = stylizer.stylize([image] * 3, [0, 1, 2], [0.95] * 3)
    assert len({o.tobytes() for o in styled}) == 3, "the style choice has no effect"
    plain = stylizer.stylize([image] * 3, [0, 1, 2], [0.0] * 3)
    assert plain[0].tobytes() == plain[1].tobytes() == plain[2].tobytes()
    # alpha = 0 is the decoded content features.
    with torch.inference_mode():
        x = torch.from_numpy(cv2.resize(image, (SIDE, SIDE), interpolation=cv2.INTER_AREA))
        x = x.permute(2, 0, 1)[None].float() / 255
        decoded = stylizer.decoder(stylizer.encoder(x)).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    expected = cv2.resize(decoded, (48, 48), interpolation=cv2.INTER_LINEAR) * 255
    assert np.abs(plain[0] - expected).max() <= 1.0


class CountingEncoder(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.batch_sizes = []

    def forward(self, x):
        self.batch_sizes.append(x.shape[0])
        return self.encoder(x)


def test_adain_style_statistics_are_computed_once(weights, style_dir):
    stylizer = AdainStylizer(weights["vgg"], weights["decoder"], style_dir, device="cpu",
                             max_side=SIDE, batch_size=8)
    counting = stylizer.encoder = CountingEncoder(stylizer.encoder)
    images = [pattern(32, 32, i) for i in range(4)]
    first = stylizer.stylize(images, [0, 1, 0, 1], [0.8] * 4)
    assert counting.batch_sizes == [1, 1, 4]  # style 0, style 1, then the 4 contents together
    second = stylizer.stylize([images[1], images[0], images[3], images[2]], [1, 0, 1, 0], [0.8] * 4)
    assert counting.batch_sizes == [1, 1, 4, 4]
    assert first[0].tobytes() == second[1].tobytes()
    stylizer.precompute()
    assert counting.batch_sizes == [1, 1, 4, 4, 1]  # only style 2 was left


def test_adain_stylizer_describe_and_errors(stylizer, weights, style_dir):
    description = stylizer.describe()
    assert description["method"] == "adain" and description["n_styles"] == 3
    assert description["weights"]["vgg"]["sha256"] == hashlib.sha256(
        weights["vgg"].read_bytes()).hexdigest()
    assert description["device"] == "cpu" and description["dtype"] == "float32"
    assert description["style_dir"] == str(style_dir)
    with pytest.raises(ValueError, match="style index 3"):
        stylizer.stylize([pattern(32, 32, 0)], [3], [0.5])
    with pytest.raises(ValueError, match=r"alpha 1\.5"):
        stylizer.stylize([pattern(32, 32, 0)], [0], [1.5])
    with pytest.raises(ValueError, match="uint8"):
        stylizer.stylize([np.zeros((32, 32, 3), np.float32)], [0], [0.5])
    with pytest.raises(StyleWeightsError, match="not an AdaIN"):
        AdainStylizer(weights["decoder"], weights["decoder"], style_dir, device="cpu")


# -- the colour fallback -------------------------------------------------------------------------

def lab_mean_std(image):
    lab = to_lab(image).reshape(-1, 3)
    return lab.mean(axis=0), lab.std(axis=0)


def test_color_stylizer(tmp_path):
    rng = np.random.default_rng(7)
    style = np.clip(rng.normal((150, 110, 90), (18, 14, 12), size=(48, 64, 3)), 0, 255)
    folder = tmp_path / "colour-styles"
    folder.mkdir()
    write_png(folder / "s.png", style.astype(np.uint8))
    write_png(folder / "t.png", pattern(40, 40, 9))
    stylizer = make_stylizer("color", style_dir=folder)
    assert stylizer.n_styles == 2
    assert stylizer.describe()["method"] == "color" and "fallback" in stylizer.describe()["description"]

    content = pattern(56, 72, 5)
    out = stylizer.stylize([content], [0], [1.0])[0]
    assert out.shape == content.shape and out.dtype == np.uint8
    out_mean, out_std = lab_mean_std(out)
    style_mean, style_std = lab_mean_std(style.astype(np.uint8))
    assert np.abs(out_mean - style_mean).max() < 2, (out_mean, style_mean)
    assert np.abs(out_std - style_std).max() < 2, (out_std, style_std)

    same = stylizer.stylize([content, content], [0, 1], [0.0, 0.0])
    assert all(np.abs(s.astype(int) - content).max() <= 1 for s in same)
    halfway = stylizer.stylize([content], [0], [0.5])[0]
    assert halfway.tobytes() == stylizer.stylize([content], [0], [0.5])[0].tobytes()
    assert not np.array_equal(halfway, out)
