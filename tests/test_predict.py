"""``trainer predict`` on two images of the embedded sample, and its errors."""
import json
import math
import warnings
from pathlib import Path

import cv2
import pytest
import torch
from conftest import all_output, make_runner

from datagen.format.draw import GAP
from datagen.format.imageio import load_rgb
from trainer.cli import main
from trainer.config import TrainConfig, TransformerConfig
from trainer.loop import FitOptions, Trainer

IMAGES = Path(__file__).resolve().parents[1] / "datagen" / "sample_data" / "coco" / "train2017"
IMAGE_A, IMAGE_B = IMAGES / "000000000009.jpg", IMAGES / "000000000025.jpg"
SMALL = TrainConfig(image_size=96, positives=3, negatives=4, warmup_steps=1, steps=1,
                    transformer=TransformerConfig(d_model=32, heads=2, feedforward=32, layers="SCS"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained small checkpoint (prediction does not need a trained one to be checked)."""
    torch.manual_seed(0)
    options = FitOptions(run_dir=tmp_path_factory.mktemp("predict_run"), device="cpu", workers=0,
                         backbone_weights="random", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Trainer(SMALL, [], options).save()


def predict(*args):
    return make_runner().invoke(main, ["predict", *[str(a) for a in args]])


def test_predict_writes_pictures_and_result(checkpoint, tmp_path):
    out = tmp_path / "out"
    result = predict(IMAGE_A, IMAGE_B, "--ckpt", checkpoint, "--out", out, "--device", "cpu")
    assert result.exit_code == 0, all_output(result)
    assert "score" in result.output

    pair = cv2.imread(str(out / "pair.png"), cv2.IMREAD_UNCHANGED)
    assert pair is not None and pair.shape == (96, 96 + GAP + 96, 3)
    (ha, wa), (hb, wb) = load_rgb(IMAGE_A).shape[:2], load_rgb(IMAGE_B).shape[:2]
    masks = cv2.imread(str(out / "masks.png"), cv2.IMREAD_UNCHANGED)
    assert masks is not None and masks.ndim == 2 and masks.shape == (max(ha, hb), wa + GAP + wb)
    assert masks[:ha, :wa].std() > 0 or masks[:ha, :wa].mean() > 0  # the mask was drawn

    record = json.loads((out / "result.json").read_text())
    assert math.isfinite(record["score"]) and record["step"] == 0
    assert record["checkpoint"] == str(checkpoint.resolve())
    assert record["images"] == [str(IMAGE_A), str(IMAGE_B)]
    assert all(0 <= m <= 1 for m in record["mask_mean"]) and len(record["mask_mean"]) == 2
    assert f"{record['score']:.4f}" in result.output
    assert record["nothing_passes"] == (max(record["mask_max"]) <= 0.5)
    assert ("no cell of either predicted mask passes 0.5" in result.stderr) == record["nothing_passes"]
    assert record["backbone"]["source"] == "random" and "not pre-trained" in result.stderr


def test_a_missing_image_is_an_error_naming_it(checkpoint, tmp_path):
    missing = tmp_path / "no-such-image.jpg"
    result = predict(IMAGE_A, missing, "--ckpt", checkpoint, "--out", tmp_path / "out")
    assert result.exit_code == 1 and "no-such-image.jpg" in all_output(result)
    assert "Traceback" not in all_output(result)
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_a_checkpoint_is_an_error_naming_it(tmp_path):
    for name, content in (("notes.pt", b"not a checkpoint"), ("image.pt", IMAGE_A.read_bytes())):
        path = tmp_path / name
        path.write_bytes(content)
        result = predict(IMAGE_A, IMAGE_B, "--ckpt", path, "--out", tmp_path / "out")
        assert result.exit_code == 1 and name in all_output(result), all_output(result)
    weights_only = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, weights_only)
    result = predict(IMAGE_A, IMAGE_B, "--ckpt", weights_only, "--out", tmp_path / "out")
    assert result.exit_code == 1 and "weights.pt: not a trainer checkpoint" in all_output(result)


def test_predict_help_documents_every_option():
    result = make_runner().invoke(main, ["predict", "--help"])
    assert result.exit_code == 0
    for option in ("IMAGE_A", "IMAGE_B", "--ckpt", "--out", "--lines", "--device", "pair.png", "masks.png",
                   "result.json"):
        assert option in result.output
