"""The ``datagen`` command line: usage errors, help texts, preview, segments, the embedded sample."""
from __future__ import annotations

import json
import re

import click
import pyarrow.parquet as pq
import pytest
from conftest import all_output, build_args, make_runner, run_cli

from datagen.cli import main
from datagen.segments.bank import SegmentBank


@pytest.mark.parametrize("extra, words", [
    (["--segments", "nope"], "--segments"),
    (["--n", "0"], "--n"),
    (["--workers", "0"], "--workers"),
    (["--image-size", "100", "--stride", "16"], "multiple of stride"),
], ids=["unknown_segments", "n_0", "workers_0", "stride_mismatch"])
def test_bad_options_are_usage_errors_before_any_work(tmp_path, extra, words):
    out, manifests = tmp_path / "out", tmp_path / "manifests"
    result = run_cli(build_args(out, manifests=manifests) + extra, expect=2)
    message = all_output(result)
    assert "Usage:" in message and words in message, message
    assert not out.exists() and not manifests.exists()


COMMAND_OPTIONS = {
    "build": ["--segments", "--coco-root", "--coco-split", "--n", "--out", "--seed", "--workers", "--objects",
              "--shard-size", "--blend", "--min-area", "--overwrite", "--manifests-dir", "--no-progress"],
    "verify": ["--quiet"],
    "preview": ["--out", "-n", "--seed", "--fill"],
    "segments scan": ["--source", "--coco-root", "--coco-split", "--min-area", "--out"],
    "segments eval": ["--pred", "--gt", "--json"],
}


def command_of(name: str) -> click.Command:
    command = main
    for word in name.split():
        command = command.commands[word]
    return command


@pytest.mark.parametrize("command", sorted(COMMAND_OPTIONS))
def test_help_documents_every_option(command):
    result = run_cli([*command.split(), "--help"])
    text = result.output
    assert text.startswith("Usage:") and f" {command} " in text.splitlines()[0]
    help_lines = {line.strip().split()[0].rstrip(","): line for line in text.splitlines()
                  if line.strip().startswith("-")}
    for option in COMMAND_OPTIONS[command]:
        assert option in help_lines, f"{option} not in `datagen {command} --help`"
    for param in command_of(command).params:
        if isinstance(param, click.Option) and param.name != "help":
            assert param.help, f"datagen {command} {param.opts[0]} has no help text"
            assert any(opt in text for opt in param.opts), f"{param.opts} missing from the help"


def test_preview_writes_a_page_with_one_image_per_pair(reference, tmp_path):
    page = tmp_path / "x.html"
    result = run_cli(["preview", reference, "--out", page, "-n", "5"])
    assert "5 pairs drawn" in result.output
    html = page.read_text()
    assert len(re.findall(r"<img\b", html)) == 5
    assert all(f"{key}" in html for key in ("000000_000000", "000000_000004"))
    # JPEG thumbnails: a few hundred KB a pair at most (inline PNGs took about 1 MB)
    assert page.stat().st_size < 5 * 300_000, page.stat().st_size


def test_help_lists_every_command_without_cutting_its_description():
    text = run_cli(["--help"]).output
    commands = text.split("Commands:", 1)[1]
    for name in main.commands:
        assert f"  {name} " in commands
    assert "..." not in commands, commands


def test_segments_help_shows_the_group_and_its_subcommands():
    text = run_cli(["segments", "--help"]).output
    assert re.match(r"Usage: \S+ segments \[OPTIONS\] COMMAND", text), text
    assert "scan" in text and "eval" in text


def test_preview_of_a_directory_without_shards_fails(tmp_path):
    result = run_cli(["preview", tmp_path, "--out", tmp_path / "x.html"], expect=1)
    assert "shard-*.tar" in all_output(result) and str(tmp_path) in all_output(result)
    assert not (tmp_path / "x.html").exists()


def test_segments_writes_a_bank(tmp_path):
    out = tmp_path / "bank"
    result = run_cli(["segments", "--out", out])
    summary = json.loads((out / "bank.json").read_text())
    assert summary["segments"] > 0 and summary["images"] == 60
    assert f"{summary['segments']} segments, 60 images, {summary['skipped']} skipped" in result.output
    bank = SegmentBank.load(out)
    assert len(bank) == summary["segments"]
    skipped = pq.read_table(out / "skipped.parquet").to_pylist()
    assert len(skipped) == summary["skipped"] and all(row["reason"] for row in skipped)


def test_build_without_coco_root_says_it_uses_the_embedded_sample(tmp_path):
    result = make_runner().invoke(main, [str(a) for a in build_args(tmp_path / "out", n=2, shard_size=2)],
                                  catch_exceptions=False)
    assert result.exit_code == 0, all_output(result)
    assert "embedded sample" in result.stderr
    assert "embedded sample" not in result.stdout
    assert "2 pairs in 1 shards" in result.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["n_samples"] == 2
    assert manifest["inputs"]["segments"]["options"]["root"].endswith("sample_data/coco")


def test_a_shard_whose_every_attempt_fails_says_why_in_words(tmp_path):
    """At 64 px (a 4 x 4 grid) no pair of the sample has the 9 mask cells a pair needs: the build
    stops, saying so."""
    out = tmp_path / "out"
    result = run_cli(build_args(out, n=2, shard_size=2, extra=["--image-size", "64", "--stride", "16"]), expect=1)
    message = all_output(result)
    assert re.search(r"100 attempts in a row failed; most common: small_mask \d+(, \w+ \d+)*; last: ", message), message
    assert "Traceback" not in message and "[(" not in message


# -- the command line's defaults are the library's -------------------------------------------

CONFIG_FIELDS = {"segments": "segments", "min_area": "min_area", "image_size": "image_size", "stride": "stride",
                 "objects": "objects", "dilation": "dilation_px", "border_crop_prob": "border_crop_prob",
                 "blend": "blend", "style": "style", "jpeg_quality": "jpeg_quality", "shard_size": "shard_size",
                 "rotation": "warp.rotation_deg", "aspect_min": "warp.aspect_min", "tps_prob": "warp.tps_prob",
                 "dilation_shape": "dilation_shape", "tps_jitter": "warp.tps_jitter",
                 "two_object_layout": "warp.two_object_layout", "two_object_gap": "warp.two_object_gap_px"}
"""Option of ``datagen build`` / ``datagen segments scan`` -> the BuildConfig field it sets."""


def typed_defaults() -> dict:
    """Option -> the default of the typed option class (source, style) it fills."""
    import inspect

    from datagen.runner.styling import StyleOptions
    from datagen.segments.coco_source import CocoOptions
    from datagen.segments.lost_source import LostOptions
    from datagen.style.adain import AdainStylizer

    adain_device = inspect.signature(AdainStylizer).parameters["device"].default  # StyleOptions.device None: its own
    return {"coco_root": CocoOptions.root, "coco_split": CocoOptions.split, "images": LostOptions.images_dir,
            "dino_weights": LostOptions.dino_weights, "max_size": LostOptions.max_size,
            "dino_device": LostOptions.device, "device": LostOptions.device, "style_dir": StyleOptions.style_dir,
            "adain_vgg": StyleOptions.vgg_path, "adain_decoder": StyleOptions.decoder_path,
            "style_device": adain_device}


RUN_OPTIONS = {"n": None, "out_dir": None, "seed": 0, "overwrite": False, "no_progress": False,
               "workers": None, "scheduler": None, "manifests_dir": None, "work_dir": None, "break_lock": False}
"""Options of how and where a build runs, with the library's default (``build()``'s; None: the
command's own). ``--workers`` (all cores) and ``--manifests-dir`` (a copy in ./manifests) are the
command's only: the bytes do not depend on either, and a library call starts no processes and
writes no copy unless asked."""


@pytest.mark.parametrize("command", ["build", "segments scan"])
def test_every_option_that_sets_the_config_or_an_option_class_has_its_default(command, monkeypatch):
    import dataclasses

    from datagen.cli import _resolve_style
    from datagen.config import BuildConfig, WarpConfig

    def field_defaults(cls):
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}

    defaults = {**field_defaults(BuildConfig), **{f"warp.{k}": v for k, v in field_defaults(WarpConfig).items()}}
    config, typed = BuildConfig(), typed_defaults()
    params = [p for p in command_of(command).params if isinstance(p, click.Option) and p.name != "help"]
    assert params
    for param in params:
        name = param.name
        if name == "style":  # 'auto': AdaIN when its weights are found, i.e. the config's 'adain'
            assert param.default == "auto"
            monkeypatch.setattr("datagen.style.adain_net.find_adain_weights", lambda *a, **k: None)
            assert _resolve_style(param.default, "styles/") == config.style == "adain"
        elif name in CONFIG_FIELDS:
            value = defaults[CONFIG_FIELDS[name]]
            assert param.default == value, f"--{name} defaults to {param.default!r}, BuildConfig to {value!r}"
        elif name in typed:
            assert param.default == typed[name], (
                f"--{name} defaults to {param.default!r}, its option class to {typed[name]!r}")
        else:
            assert name in RUN_OPTIONS, f"--{name} is neither a config field, a typed option nor a run option"


def test_the_objects_default_is_mix_or_one_for_lost_and_hashes_as_given():
    """--objects' default (None) is resolved by BuildConfig, so the command and the library make
    the same config: 'mix', or '1' for lost, whose images hold one segment each."""
    from datagen.config import BuildConfig
    from datagen.format.hashing import config_hash

    assert BuildConfig().objects == "mix" and BuildConfig(segments="lost").objects == "1"
    assert BuildConfig(objects="2").objects == "2"
    assert config_hash(BuildConfig()) == config_hash(BuildConfig(objects="mix"))
    assert BuildConfig.from_dict(BuildConfig().to_dict()) == BuildConfig()
    with pytest.raises(ValueError, match="one segment per image"):
        BuildConfig(segments="lost", objects="mix").validate()
