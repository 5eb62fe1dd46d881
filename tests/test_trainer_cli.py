"""The ``trainer`` command line as a new user meets it: shard-set forms, early option checks,
run.json, the random-backbone warning, --version, and what the pictures say."""
from __future__ import annotations

import json
import shutil
import time
import warnings

import numpy as np
import pytest
import torch
from conftest import all_output, make_runner

from datagen.format.shards import shard_name
from trainer.cli import main
from trainer.config import TrainConfig, TransformerConfig
from trainer.loop import FitOptions, Trainer, initial_model
from trainer.visual import heat_map, mask_summary, render_prediction

TINY = ["--image-size", "64", "--positives", "2", "--negatives", "2", "--d-model", "16", "--heads", "2",
        "--feedforward", "16", "--layers", "SC", "--shuffle-buffer", "2", "--workers", "0", "--warmup", "1",
        "--backbone-weights", "random", "--no-progress", "--device", "cpu"]


def trainer_cli(*args):
    return make_runner().invoke(main, [str(a) for a in args])


def shard_forms(reference) -> dict:
    return {"folder": reference, "manifest": reference / "manifest.json",
            "pattern": reference / "shard-{000001..000002}.tar", "tar": reference / shard_name(3)}


@pytest.mark.parametrize("form", ["folder", "manifest", "pattern", "tar"])
def test_inspect_accepts_every_shard_set_form(reference, form):
    result = trainer_cli("inspect", shard_forms(reference)[form])
    assert result.exit_code == 0, all_output(result)
    expected = {"folder": 20, "manifest": 20, "pattern": 10, "tar": 5}[form]
    assert f"samples: {expected}" in result.output


@pytest.mark.parametrize("command", [["inspect", "{shards}"], ["fit", "--shards", "{shards}", "--out", "{out}"],
                                     ["eval", "--shards", "{shards}", "--ckpt", "{ckpt}"]])
def test_a_bad_shard_set_is_refused_at_once_naming_the_argument(tmp_path, command):
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"x")
    missing = tmp_path / "no-such-shards"
    args = [a.format(shards=missing, out=tmp_path / "run", ckpt=ckpt) for a in command]
    started = time.perf_counter()
    result = trainer_cli(*args, *(TINY if command[0] == "fit" else []))
    assert result.exit_code == 2, all_output(result)
    message = all_output(result)
    assert str(missing) in message and "brace pattern" in message and "Traceback" not in message
    assert time.perf_counter() - started < 5  # before any network is built
    assert not (tmp_path / "run").exists()


def test_bad_fit_options_are_refused_before_any_slow_work(reference, tmp_path):
    started = time.perf_counter()
    result = trainer_cli("fit", "--shards", reference, "--out", tmp_path / "run", "--positives", "1")
    assert result.exit_code == 2 and "--positives" in all_output(result)
    result = trainer_cli("fit", "--shards", reference, "--out", tmp_path / "run", "--image-size", "100")
    assert result.exit_code == 2 and "--image-size" in all_output(result)
    assert time.perf_counter() - started < 5
    assert not (tmp_path / "run").exists()


def test_fit_writes_run_json_with_no_milestone_by_default_and_warns_once(reference, tmp_path):
    run = tmp_path / "run"
    result = trainer_cli("fit", "--shards", reference, "--out", run, "--steps", "2", *TINY)
    assert result.exit_code == 0, all_output(result)
    assert result.stderr.count("not pre-trained") == 1, result.stderr
    assert "UserWarning" not in all_output(result)
    record = json.loads((run / "run.json").read_text())
    assert record["config"]["milestone"] is None and record["config"]["image_size"] == 64  # no decay
    assert record["config"]["tps_prob"] == 0.5 and record["config"]["tps_grid_sizes"] == [4, 6]
    assert record["backbone"]["source"] == "random"
    assert record["dataset_fingerprint"] == json.loads((reference / "manifest.json").read_text())["fingerprint"]
    assert record["shards_checked"] is True  # the fingerprint it records stands for bytes it checked
    assert (run / "checkpoint.pt").is_file()


def test_fit_refuses_a_manifest_whose_fingerprint_is_not_its_shard_lists_at_once(reference, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(reference, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = "0" * 64
    (shards / "manifest.json").write_text(json.dumps(manifest))
    result = trainer_cli("fit", "--shards", shards, "--out", tmp_path / "run", *TINY)
    assert result.exit_code == 2 and "not that of its shard list" in all_output(result), all_output(result)
    assert not (tmp_path / "run").exists()


def test_a_run_that_fails_before_training_leaves_no_run_json(reference, tmp_path):
    run = tmp_path / "run"
    result = trainer_cli("fit", "--shards", reference, "--out", run, "--resume", *TINY)
    assert result.exit_code == 1 and "no checkpoint" in all_output(result)
    assert not (run / "run.json").exists()


def test_version_and_help_list_every_command_uncut():
    result = trainer_cli("--version")
    assert result.exit_code == 0 and "version" in result.output
    commands = trainer_cli("--help").output.split("Commands:", 1)[1]
    for name in main.commands:
        assert f"  {name} " in commands
    assert "..." not in commands, commands


def captured_fit(monkeypatch) -> dict:
    import trainer.loop

    seen = {}

    def fake_fit(config, shards, options):
        seen.update(config=config, options=options)
        return {"step": 0}

    monkeypatch.setattr(trainer.loop, "fit", fake_fit)
    return seen


def test_the_cpu_preset_sets_defaults_and_given_options_win(reference, tmp_path, monkeypatch):
    seen = captured_fit(monkeypatch)
    base = ["fit", "--shards", reference, "--out", tmp_path / "run", "--backbone-weights", "random", "--no-progress"]
    assert trainer_cli(*base, "--preset", "cpu").exit_code == 0
    config, options = seen["config"], seen["options"]
    assert (config.image_size, config.steps, config.lr, config.warmup_steps, config.transformer.d_model) == \
        (128, 500, 1e-3, 10, 128)
    assert (options.workers, options.image_every, options.checkpoint_every) == (1, 50, 100)
    assert trainer_cli(*base, "--image-size", "96", "--preset", "cpu", "--steps", "7").exit_code == 0
    assert (seen["config"].image_size, seen["config"].steps, seen["config"].lr) == (96, 7, 1e-3)
    assert trainer_cli(*base).exit_code == 0
    assert seen["config"] == TrainConfig(transformer=TransformerConfig())


def test_schedule_tps_and_ablation_options_reach_the_config(reference, tmp_path, monkeypatch):
    seen = captured_fit(monkeypatch)
    base = ["fit", "--shards", reference, "--out", tmp_path / "run", "--backbone-weights", "random", "--no-progress"]
    assert trainer_cli(*base).exit_code == 0
    config = seen["config"]
    assert (config.milestone, config.tps_prob, config.tps_jitter, config.tps_grid_sizes) == (None, 0.5, 0.25, (4, 6))
    assert config.mask_loss and config.transported_mask_loss
    result = trainer_cli(*base, "--milestone", "100000", "--lr-decay", "0.1", "--train-tps-prob", "0",
                         "--train-tps-jitter", "0.5", "--train-tps-grid-sizes", "3,5", "--no-mask-loss",
                         "--no-transported-mask-loss", "--eta", "0")
    assert result.exit_code == 0, all_output(result)
    config = seen["config"]
    assert (config.milestone, config.lr_decay, config.tps_prob, config.tps_jitter, config.tps_grid_sizes) == \
        (100_000, 0.1, 0.0, 0.5, (3, 5))
    assert (config.mask_loss, config.transported_mask_loss, config.eta) == (False, False, 0.0)
    for bad, name in ((["--train-tps-prob", "2"], "--train-tps-prob"),
                      (["--train-tps-grid-sizes", "1,4"], "grid-sizes")):
        result = trainer_cli(*base, *bad)
        assert result.exit_code == 2 and name in all_output(result), all_output(result)


def test_the_initial_network_depends_only_on_the_config(reference, tmp_path):
    """fit() from Python seeds the network itself: two runs of one config start alike, whatever
    the global generator did before, and eval --vs-untrained rebuilds that start."""
    config = TrainConfig(image_size=64, positives=2, negatives=2, seed=3,
                         transformer=TransformerConfig(d_model=16, heads=2, feedforward=16, layers="SC"))
    starts = []
    for noise in (0, 1):
        torch.manual_seed(100 + noise)
        torch.rand(1000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = Trainer(config, reference, FitOptions(run_dir=tmp_path / f"r{noise}", device="cpu",
                                                            backbone_weights="random", progress=False))
        starts.append((trainer.model.state_dict(), trainer.backbone.state_dict()))
    rebuilt = initial_model(config).state_dict()
    for key in starts[0][0]:
        assert torch.equal(starts[0][0][key], starts[1][0][key]) and torch.equal(starts[0][0][key], rebuilt[key]), key
    for key in starts[0][1]:  # a random backbone too
        assert torch.equal(starts[0][1][key], starts[1][1][key]), key
    other = initial_model(TrainConfig(**{**config.__dict__, "seed": 4})).state_dict()
    assert any(not torch.equal(starts[0][0][k], other[k]) for k in other)


@pytest.mark.slow
def test_eval_vs_untrained_prints_both_columns(reference, tmp_path):
    run = tmp_path / "run"
    assert trainer_cli("fit", "--shards", reference, "--out", run, "--steps", "2", *TINY).exit_code == 0
    out = tmp_path / "eval.json"
    result = trainer_cli("eval", "--shards", reference, "--ckpt", run / "checkpoint.pt", "--vs-untrained",
                         "--max-samples", "4", "--no-progress", "--device", "cpu", "--json", out)
    assert result.exit_code == 0, all_output(result)
    assert "trained" in result.output and "untrained" in result.output
    assert "not pre-trained" in all_output(result)
    metrics = json.loads(out.read_text())
    assert metrics["untrained"]["samples"] == metrics["samples"] == 4
    assert metrics["untrained"]["pos_mask_mean"] != metrics["pos_mask_mean"]  # two steps changed the network


# -- pictures ------------------------------------------------------------------------------------

def outputs(mask_value: float, size: int = 4) -> torch.Tensor:
    """(3, size, size) network outputs: identity correspondences, a constant mask."""
    centres = (torch.arange(size) + 0.5) / size
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([xs, ys, torch.full((size, size), mask_value)])


def test_heat_map_shows_soft_masks_below_the_threshold():
    image = np.full((32, 32, 3), 128, np.uint8)
    low, high = np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32)
    low[:2], high[:2] = 0.3, 0.9
    for mask in (low, high):
        picture = heat_map(image, mask)
        assert np.abs(picture[:8].astype(int) - picture[-8:].astype(int)).sum() > 0  # drawn where mask > 0
    assert heat_map(image, high)[:8].mean() > heat_map(image, low)[:8].mean()  # brighter where higher


def test_a_prediction_with_no_cell_above_half_is_still_drawn_and_said():
    image = np.full((64, 64, 3), 128, np.uint8)
    faint = render_prediction(image, image, outputs(0.3), outputs(0.2))
    nothing = render_prediction(image, image, outputs(0.0), outputs(0.0))
    assert np.abs(faint.astype(int) - nothing.astype(int)).sum() > 0
    assert mask_summary(outputs(0.3)[2], outputs(0.2)[2]) == "cells > 0.5: 0 | 0 of 16 (max 0.30 | 0.20)"
    assert mask_summary(outputs(0.7)[2], outputs(0.2)[2]).startswith("cells > 0.5: 16 | 0 of 16")
