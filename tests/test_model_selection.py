"""``trainer fit --val-retrieval``: a retrieval benchmark scored during training, the best step kept."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import all_output, make_runner

from trainer.cli import main
from trainer.loop import load_checkpoint
from trainer.selection import is_better

SAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "datagen/sample_data/coco/train2017/000000000009.jpg"
TINY = ["--image-size", "64", "--positives", "2", "--negatives", "2", "--d-model", "16", "--heads", "2",
        "--feedforward", "16", "--layers", "SC", "--shuffle-buffer", "2", "--workers", "0", "--warmup", "1",
        "--backbone-weights", "random", "--no-progress", "--device", "cpu", "--lr", "0.01"]


def trainer_cli(*args):
    return make_runner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def val_set(reference, tmp_path_factory):
    out = tmp_path_factory.mktemp("val") / "set"
    result = trainer_cli("retrieval-set", "--shards", reference, "--out", out, "--n", 6)
    assert result.exit_code == 0, all_output(result)
    return out


def test_is_better():
    assert is_better(0.2, None) and is_better(0.3, {"value": 0.2, "step": 1})
    assert not is_better(0.2, {"value": 0.2, "step": 1}) and not is_better(float("nan"), None)


@pytest.mark.slow
def test_fit_scores_the_benchmark_keeps_the_best_and_resumes_with_it(reference, val_set, tmp_path):
    run = tmp_path / "run"
    args = ["fit", "--shards", reference, "--out", run, *TINY, "--val-retrieval", val_set / "retrieval.json",
            "--val-every", 2]
    result = trainer_cli(*args, "--steps", 4)
    assert result.exit_code == 0, all_output(result)
    rows = list(csv.DictReader(open(run / "validation.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4] and all(int(r["queries"]) == 6 for r in rows)
    values = [float(r["val_map"]) for r in rows]
    assert all(0 <= v <= 1 for v in values)
    best_step = 2 if values[0] >= values[1] else 4
    assert int(rows[-1]["best_step"]) == best_step and float(rows[-1]["best_map"]) == max(values)
    best = load_checkpoint(run / "best.pt")
    assert best["step"] == best_step and best["validation_best"] == {"value": max(values), "step": best_step}
    results = json.loads((run / "val-retrieval" / "results.json").read_text())
    assert results["run"]["step"] == 4 and results["mean"] == pytest.approx(values[-1])
    assert results["run"]["features"]["computed"] == 0  # the frozen backbone's features were cached at step 2

    # a resume keeps the best so far: a later step replaces best.pt only if it scores higher
    result = trainer_cli(*args, "--steps", 6, "--resume", "--force")  # --steps is part of the config
    assert result.exit_code == 0, all_output(result)
    rows = list(csv.DictReader(open(run / "validation.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    values = [float(r["val_map"]) for r in rows]
    best_step = [2, 4, 6][max(range(3), key=lambda i: (values[i], -i))]
    assert load_checkpoint(run / "best.pt")["step"] == best_step
    assert torch.equal(load_checkpoint(run / "best.pt")["model"]["head.weight"],
                       load_checkpoint(run / "checkpoint.pt")["model"]["head.weight"]) == (best_step == 6)


def test_a_bad_benchmark_is_refused_before_training(reference, tmp_path):
    bad = tmp_path / "retrieval.json"
    bad.write_text(json.dumps({"x": [{"query": ["a.jpg", [0, 0, 1, 1]], "gt": []}]}))
    (tmp_path / "images").mkdir()
    shutil.copy(SAMPLE_IMAGE, tmp_path / "images" / "b.jpg")  # the folder has images, not the one named
    result = trainer_cli("fit", "--shards", reference, "--out", tmp_path / "run", *TINY, "--val-retrieval", bad)
    assert result.exit_code == 2 and "--val-retrieval" in all_output(result) and "a.jpg" in all_output(result)
    assert not (tmp_path / "run").exists()
