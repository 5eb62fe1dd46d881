"""Style transfer inside ``datagen build``: stylised fields added, pairs themselves unchanged."""
import json

import cv2
import numpy as np
import pytest
import torch
from conftest import all_output, build_args, output_files, run_cli
from skimage import data

from datagen.cli import SAMPLE_ROOT
from datagen.config import BuildConfig
from datagen.runner.run import SourceSpec, StyleSpec, build
from datagen.style.adain_net import make_decoder, make_full_vgg
from trainer.data import iter_samples


@pytest.fixture(scope="module")
def style_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("styles")
    for name, image in (("astronaut", data.astronaut()), ("coffee", data.coffee()), ("chelsea", data.chelsea())):
        cv2.imwrite(str(folder / f"{name}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return folder


@pytest.fixture(scope="module")
def color_build(style_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("color") / "out"
    run_cli(build_args(out, extra=("--style", "color", "--style-dir", style_dir)))
    return out


def test_stylised_pairs_keep_their_masks_and_correspondences(reference, color_build):
    plain, stylised = list(iter_samples(reference)), list(iter_samples(color_build))
    assert [s.key for s in plain] == [s.key for s in stylised]
    for a, b in zip(plain, stylised):
        assert b.src_style_image is not None and b.tgt_style_image is not None
        assert a.src_style_image is None
        assert np.array_equal(a.src_image, b.src_image) and np.array_equal(a.tgt_image, b.tgt_image)
        assert np.array_equal(a.src_mask, b.src_mask) and np.array_equal(a.tgt_mask, b.tgt_mask)
        assert np.array_equal(a.src_to_tgt, b.src_to_tgt) and np.array_equal(a.tgt_grid_mask, b.tgt_grid_mask)
        assert b.src_style_image.shape == b.src_image.shape
        alpha = b.meta["style"]["src"]["alpha"]
        difference = np.abs(b.src_style_image.astype(int) - b.src_image.astype(int)).mean()
        assert difference > 1.0 or alpha < 0.1  # the style really changes the image
        assert b.meta["style"]["method"] == "color" and 0 <= alpha < 1


@pytest.mark.slow
def test_the_same_seed_gives_the_same_stylised_bytes(color_build, style_dir, tmp_path):
    again = tmp_path / "again"
    run_cli(build_args(again, extra=("--style", "color", "--style-dir", style_dir)))
    assert output_files(again) == output_files(color_build)


def test_the_manifest_records_the_colour_fallback(color_build):
    manifest = json.loads((color_build / "manifest.json").read_text())
    assert manifest["config"]["style"] == "color"
    assert manifest["inputs"]["style"]["method"] == "color"
    assert manifest["inputs"]["style"]["n_styles"] == 3


def test_style_auto_without_weights_names_the_files_and_the_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("SEGSWAP_ADAIN_VGG", raising=False)
    monkeypatch.delenv("SEGSWAP_ADAIN_DECODER", raising=False)
    args = [a for a in build_args(tmp_path / "out") if a not in ("--style", "none")]
    result = run_cli(args, expect=2)
    text = all_output(result)
    assert "vgg_normalised.pth" in text and "decoder.pth" in text
    assert "--style color" in text and "--style none" in text
    assert not (tmp_path / "out").exists()


def test_a_style_needs_a_style_folder(tmp_path):
    result = run_cli(build_args(tmp_path / "out", extra=("--style", "color")), expect=2)
    assert "--style-dir" in all_output(result)


def test_adain_build_with_published_key_names(style_dir, tmp_path):
    """The AdaIN path end to end, with weight files laid out as the published ones (random values)."""
    torch.manual_seed(0)
    vgg, decoder = tmp_path / "vgg_normalised.pth", tmp_path / "decoder.pth"
    torch.save(make_full_vgg().state_dict(), vgg)
    torch.save(make_decoder().state_dict(), decoder)
    style = StyleSpec({"style_dir": style_dir, "vgg_path": vgg, "decoder_path": decoder, "device": "cpu",
                       "max_side": 32})
    spec = SourceSpec("coco", {"root": SAMPLE_ROOT, "split": "train2017"})
    config = BuildConfig(style="adain", shard_size=3, style_batch=2)
    manifest = build(config, spec, 3, tmp_path / "out", style=style, show_progress=False, log=lambda m: None)
    assert manifest["inputs"]["style"]["method"] == "adain"
    samples = list(iter_samples(tmp_path / "out"))
    assert len(samples) == 3 and all(s.tgt_style_image.shape == (480, 480, 3) for s in samples)
