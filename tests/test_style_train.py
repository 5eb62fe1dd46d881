"""Training an AdaIN decoder (datagen.style.train, ``datagen style train``): the losses by hand,
the image sampler, a few training steps on tiny images with a random-weight VGG saved under
the published keys, the saved decoder and preview, and the command line."""
from __future__ import annotations

import math

import click
import cv2
import numpy as np
import pytest
import torch
from conftest import all_output, run_cli

from datagen.cli import main
from datagen.style import StyleError
from datagen.style.adain_net import load_decoder, make_full_vgg
from datagen.style.train import (
    DEFAULTS,
    PREVIEW_ROWS,
    STATE_FORMAT,
    CropSampler,
    DecoderTrainingSettings,
    StyleTrainError,
    content_loss,
    learning_rate,
    load_state,
    preview_path,
    state_path,
    style_loss,
    train_decoder,
)

SIZE, CROP, BATCH = 48, 32, 2
TINY = dict(batch_size=BATCH, size=SIZE, crop=CROP, progress=False)

# Every option of `datagen style train`, as the brief lists them (plus --content-weight,
# --workers, --overwrite and --no-progress).
TRAIN_OPTIONS = ["--styles", "--content", "--vgg", "--out", "--decoder-init", "--steps", "--batch",
                 "--size", "--crop", "--lr", "--lr-decay", "--style-weight", "--content-weight",
                 "--save-every", "--seed", "--device", "--workers", "--overwrite", "--resume", "--no-progress"]


def _pattern(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    image = np.stack([np.sin(xx / (3 + seed) + yy / 5) * 120 + 128,
                      rng.integers(0, 256, (height, width)),
                      (yy * (4 + seed)) % 256], axis=-1)
    return image.astype(np.uint8)


def _write(path, image: np.ndarray) -> None:
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny content (3 images) and style (2 images) folders and a random-weight VGG file with
    the published key layout (make_full_vgg().state_dict(), as vgg_normalised.pth)."""
    root = tmp_path_factory.mktemp("adain_train")
    content, styles = root / "content", root / "styles"
    content.mkdir()
    styles.mkdir()
    for i in range(3):
        _write(content / f"c{i}.png", _pattern(40 + 8 * i, 64, seed=i))
    _write(styles / "s0.png", np.random.default_rng(7).integers(0, 256, (56, 48, 3), dtype=np.uint8))
    _write(styles / "s1.jpg", (_pattern(48, 72, seed=5) // 2 + 100).astype(np.uint8))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(make_full_vgg().state_dict(), root / "vgg.pth")
    return {"content": content, "styles": styles, "vgg": root / "vgg.pth"}


# -- losses ------------------------------------------------------------------------------

def test_style_loss_is_zero_for_identical_features():
    generator = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, c, s, s, generator=generator) for c, s in ((4, 8), (8, 4), (16, 2))]
    assert style_loss(feats, [f.clone() for f in feats]).item() == 0.0


def test_style_loss_matches_a_hand_computation():
    eps = 1e-5
    # Layer 1: one channel of 4 cells. generated [1, 2, 3, 4]: mean 2.5, unbiased var 5/3;
    # style [0, 0, 0, 2]: mean 0.5, var 1.
    g1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64).view(1, 1, 2, 2)
    s1 = torch.tensor([[0.0, 0.0], [0.0, 2.0]], dtype=torch.float64).view(1, 1, 2, 2)
    layer1 = (2.5 - 0.5) ** 2 + (math.sqrt(5 / 3 + eps) - math.sqrt(1 + eps)) ** 2
    # Layer 2: two channels of 2 cells. generated [0, 2] (mean 1, var 2), [1, 1] (mean 1, var 0);
    # style [1, 1] (mean 1, var 0), [3, 5] (mean 4, var 2). MSE averages over the channels.
    g2 = torch.tensor([[0.0, 2.0], [1.0, 1.0]], dtype=torch.float64).view(1, 2, 1, 2)
    s2 = torch.tensor([[1.0, 1.0], [3.0, 5.0]], dtype=torch.float64).view(1, 2, 1, 2)
    d = math.sqrt(2 + eps) - math.sqrt(eps)
    layer2 = ((1 - 1) ** 2 + (1 - 4) ** 2) / 2 + (d ** 2 + d ** 2) / 2
    assert style_loss([g1], [s1]).item() == pytest.approx(layer1, rel=1e-12)
    assert style_loss([g1, g2], [s1, s2]).item() == pytest.approx(layer1 + layer2, rel=1e-12)
    with pytest.raises(ValueError):
        style_loss([g1, g2], [s1])


def test_content_loss_is_the_mse_and_only_the_generated_side_gets_gradients():
    generator = torch.Generator().manual_seed(1)
    generated = torch.randn(2, 3, 4, 5, generator=generator, requires_grad=True)
    target = torch.randn(2, 3, 4, 5, generator=generator, requires_grad=True)
    loss = content_loss(generated, target)
    assert loss.item() == pytest.approx(((generated - target) ** 2).mean().item(), rel=1e-6)
    loss.backward()
    assert generated.grad is not None and target.grad is None
    with pytest.raises(ValueError):
        content_loss(generated, target[:, :2])


def test_learning_rate_decays_as_inverse_time():
    assert learning_rate(1e-4, 5e-5, 0) == 1e-4
    assert learning_rate(1e-4, 5e-5, 20_000) == pytest.approx(1e-4 / 2)
    assert learning_rate(1e-4, 0.0, 10**6) == 1e-4


# -- settings ----------------------------------------------------------------------------

def test_settings_defaults_are_the_ports_and_the_command_lines():
    assert (DEFAULTS.steps, DEFAULTS.batch_size, DEFAULTS.size, DEFAULTS.crop, DEFAULTS.lr, DEFAULTS.lr_decay,
            DEFAULTS.style_weight, DEFAULTS.content_weight) == (160_000, 8, 512, 256, 1e-4, 5e-5, 10.0, 1.0)
    command = main.commands["style"].commands["train"]
    cli_defaults = {param.name: param.default for param in command.params}
    for field, value in DEFAULTS.to_dict().items():
        assert cli_defaults[field] == value, field


def test_settings_validate_names_every_bad_value():
    assert DEFAULTS.validate() is DEFAULTS
    bad = DecoderTrainingSettings(steps=0, batch_size=0, size=20, crop=8, lr=0.0, lr_decay=math.inf,
                                  style_weight=-1.0, content_weight=math.nan, save_every=-1, workers=-2)
    with pytest.raises(StyleTrainError) as error:
        bad.validate()
    assert str(error.value) == (
        "steps must be >= 1, got 0; batch size must be >= 1, got 0; crop must be >= 16, got 8; "
        "lr must be > 0, got 0.0; lr decay must be >= 0, got inf; style weight must be >= 0, got -1.0; "
        "content weight must be >= 0, got nan; save_every must be >= 0 (0: only at the end), got -1; "
        "workers must be >= 0, got -2")
    with pytest.raises(StyleTrainError, match=r"size \(shorter side, 20\) must be >= crop \(32\)"):
        DecoderTrainingSettings(size=20, crop=32).validate()


def test_settings_round_trip_through_a_dict():
    settings = DecoderTrainingSettings(steps=7, lr=3e-4, device="cpu", workers=0)
    assert DecoderTrainingSettings.from_dict(settings.to_dict()) == settings
    assert DecoderTrainingSettings.from_dict({"seed": 3}) == DecoderTrainingSettings(seed=3)
    with pytest.raises(ValueError, match="unknown decoder training setting.*: batch, vgg"):
        DecoderTrainingSettings.from_dict({"batch": 4, "vgg": "x", "seed": 1})
    assert list(settings.resume_dict()) == list(DecoderTrainingSettings.RESUME_FIELDS)
    assert "steps" not in settings.resume_dict() and "device" not in settings.resume_dict()


def test_train_decoder_refuses_an_unknown_option_before_any_work(tmp_path):
    with pytest.raises(TypeError, match="unexpected keyword argument.*stpes"):
        train_decoder(tmp_path / "c", tmp_path / "s", tmp_path / "vgg.pth", tmp_path / "d.pth", stpes=3)
    with pytest.raises(StyleTrainError, match="steps must be >= 1"):
        train_decoder(tmp_path / "c", tmp_path / "s", tmp_path / "vgg.pth", tmp_path / "d.pth",
                      DecoderTrainingSettings(steps=0))
    assert not any(tmp_path.iterdir())


def test_a_state_of_the_first_format_is_still_resumable(tmp_path):
    # the `settings` record written by format 1 since its start: the fields that shape the decoder,
    # then the digests of the inputs
    data = {"content_files": "c" * 16, "style_files": "s" * 16, "vgg": "v" * 16}
    record = {"batch_size": 2, "size": 48, "crop": 32, "lr": 0.0001, "lr_decay": 5e-05, "style_weight": 10.0,
              "content_weight": 1.0, "seed": 2, **data}
    path = state_path(tmp_path / "decoder.pth")
    torch.save({"format": 1, "step": 3, "settings": record, "decoder": {}, "optimizer": {}}, path)
    assert STATE_FORMAT == 1
    settings = DecoderTrainingSettings(steps=10, batch_size=2, size=48, crop=32, seed=2, device="cpu", workers=0)
    assert load_state(path, settings, data)["step"] == 3
    with pytest.raises(StyleTrainError, match=r"other settings \(seed 2 -> 5; vgg 'vvvv"):
        load_state(path, DecoderTrainingSettings(batch_size=2, size=48, crop=32, seed=5),
                   {**data, "vgg": "w" * 16})


# -- images ------------------------------------------------------------------------------

def test_crops_are_seeded_and_do_not_depend_on_threads(folders):
    sampler = CropSampler(folders["content"], "content", SIZE, CROP)
    specs = sampler.draw(np.random.default_rng(3), 6)
    assert specs == sampler.draw(np.random.default_rng(3), 6)
    crops = [sampler.load(spec) for spec in specs]
    assert all(crop.shape == (CROP, CROP, 3) and crop.dtype == np.uint8 for crop in crops)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        threaded = list(pool.map(sampler.load, specs))
    assert all(np.array_equal(a, b) for a, b in zip(crops, threaded))


def test_an_unreadable_image_is_reported_once_and_replaced(tmp_path):
    _write(tmp_path / "a.png", _pattern(40, 40, seed=1))
    (tmp_path / "b.jpg").write_bytes(b"not an image")
    messages = []
    sampler = CropSampler(tmp_path, "style", SIZE, CROP, log=messages.append)
    good = sampler.load((0, 0.5, 0.5))
    assert np.array_equal(sampler.load((1, 0.5, 0.5)), good)  # b.jpg -> the next readable, a.png
    sampler.load((1, 0.0, 0.0))
    assert len(messages) == 1 and "b.jpg" in messages[0]


def test_a_folder_without_a_readable_image_is_an_error_naming_it(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(StyleError, match=rf"content folder {tmp_path}.*no readable image"):
        CropSampler(tmp_path, "content", SIZE, CROP)


# -- training ----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_few_steps_lower_the_loss_and_save_a_loadable_decoder(folders, tmp_path):
    out = tmp_path / "run" / "decoder.pth"
    messages = []
    losses = train_decoder(folders["content"], folders["styles"], folders["vgg"], out, steps=15,
                           save_every=10, seed=0, workers=0, log=messages.append, **TINY)
    assert len(losses) == 15 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < 0.95 * np.mean(losses[:3]), losses
    assert [m.split(":")[0] for m in messages] == ["step 10", "step 15"]

    decoder = load_decoder(out)  # the key layout of decoder.pth, read with weights_only=True
    assert set(torch.load(out, weights_only=True)) == set(decoder.state_dict())
    preview = cv2.imread(str(preview_path(out)))
    assert preview_path(out).name == "decoder.preview.jpg"
    assert preview.shape == (PREVIEW_ROWS * (CROP + 4) + 4, 3 * CROP + 4 * 4, 3)
    assert sorted(p.name for p in out.parent.iterdir()) == ["decoder.preview.jpg", "decoder.pth",
                                                             "decoder.state.pth"]

    # Starting from the saved decoder continues from its loss level, and may write over it.
    again = train_decoder(folders["content"], folders["styles"], folders["vgg"], out, steps=1,
                          decoder_init=out, seed=0, workers=0, **TINY)
    assert again[0] < losses[0]


@pytest.mark.slow
def test_the_same_seed_gives_the_same_losses_whatever_the_workers(folders, tmp_path):
    runs = [train_decoder(folders["content"], folders["styles"], folders["vgg"],
                          tmp_path / f"w{workers}.pth", steps=2, seed=4, workers=workers, **TINY)
            for workers in (0, 2)]
    assert runs[0] == runs[1]


@pytest.mark.slow
def test_a_resumed_run_equals_an_uninterrupted_one(folders, tmp_path):
    # 2 steps, "interrupted", then resumed to 4: same decoder, to the bit, and same losses as 4
    # steps in one go (the Adam moments, the step of the learning rate and the draws carry on)
    whole = train_decoder(folders["content"], folders["styles"], folders["vgg"], tmp_path / "whole.pth",
                          steps=4, seed=2, workers=0, **TINY)
    first = train_decoder(folders["content"], folders["styles"], folders["vgg"], tmp_path / "parts.pth",
                          steps=2, seed=2, workers=0, **TINY)
    messages = []
    # the settings object and the keywords are the same run: the resume accepts the state
    settings = DecoderTrainingSettings(steps=4, seed=2, workers=0, batch_size=BATCH, size=SIZE, crop=CROP)
    rest = train_decoder(folders["content"], folders["styles"], folders["vgg"], tmp_path / "parts.pth",
                         settings, resume=True, log=messages.append, progress=False)
    assert first + rest == whole
    assert messages[0] == f"resuming from {tmp_path / 'parts.state.pth'} after step 2"
    resumed, uninterrupted = (torch.load(tmp_path / name, weights_only=True) for name in ("parts.pth", "whole.pth"))
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in uninterrupted)
    # a plain restart from the decoder alone (new Adam, learning rate from step 0) differs
    restart = train_decoder(folders["content"], folders["styles"], folders["vgg"], tmp_path / "restart.pth",
                            steps=2, seed=2, workers=0, decoder_init=tmp_path / "parts.pth", **TINY)
    assert restart != whole[2:]


@pytest.mark.slow
def test_resume_refuses_what_would_not_continue_the_run(folders, tmp_path):
    out = tmp_path / "decoder.pth"
    train_decoder(folders["content"], folders["styles"], folders["vgg"], out, steps=2, seed=0, workers=0, **TINY)
    args = (folders["content"], folders["styles"], folders["vgg"], out)
    with pytest.raises(StyleTrainError, match=r"other settings \(lr 0.0001 -> 0.001\)"):
        train_decoder(*args, steps=3, seed=0, workers=0, resume=True, lr=1e-3, **TINY)
    with pytest.raises(StyleTrainError, match="2 steps done, as many as steps"):
        train_decoder(*args, steps=2, seed=0, workers=0, resume=True, **TINY)
    with pytest.raises(StyleTrainError, match="give one of them"):
        train_decoder(*args, steps=3, seed=0, workers=0, resume=True, decoder_init=out, **TINY)
    with pytest.raises(StyleTrainError, match=f"no training state {tmp_path / 'other.state.pth'}"):
        train_decoder(*args[:3], tmp_path / "other.pth", steps=3, seed=0, workers=0, resume=True, **TINY)
    (tmp_path / "decoder.state.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(StyleTrainError, match="cannot be read"):
        train_decoder(*args, steps=3, seed=0, workers=0, resume=True, **TINY)


# -- command line ------------------------------------------------------------------------

def test_style_train_help_lists_every_option():
    result = run_cli(["style", "train", "--help"])
    option_lines = {line.strip().split()[0].rstrip(",") for line in result.output.splitlines()
                    if line.strip().startswith("-")}
    for option in TRAIN_OPTIONS:
        assert option in option_lines, f"{option} not in `datagen style train --help`"
    command = main.commands["style"].commands["train"]
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help, f"{param.opts} has no help"
    assert "style" in run_cli(["--help"]).output


@pytest.mark.slow
def test_cli_trains_and_refuses_to_overwrite(folders, tmp_path):
    out = tmp_path / "decoder.pth"
    args = ["style", "train", "--styles", folders["styles"], "--content", folders["content"],
            "--vgg", folders["vgg"], "--out", out, "--steps", 2, "--batch", BATCH, "--size", SIZE,
            "--crop", CROP, "--workers", 0, "--no-progress", "--device", "cpu"]
    result = run_cli(args)
    assert "2 steps" in result.output and str(out) in result.output
    load_decoder(out)
    refused = run_cli(args, expect=1)
    assert f"output {out} exists" in all_output(refused) and "--resume" in all_output(refused)
    resumed = run_cli([*args[:11], 3, *args[12:], "--resume"])
    assert "1 steps" in resumed.output


def test_cli_content_folder_without_images_fails_naming_it(folders, tmp_path):
    empty = tmp_path / "no_images"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    result = run_cli(["style", "train", "--styles", folders["styles"], "--content", empty,
                      "--vgg", folders["vgg"], "--out", tmp_path / "d.pth", "--no-progress"], expect=1)
    text = all_output(result)
    assert f"content folder {empty}" in text and "no image" in text
    assert not (tmp_path / "d.pth").exists()
