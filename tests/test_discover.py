"""Discovery end to end: with oracle predictions on a collection where one object was pasted into
several images, co-segmentation must recover the object and clustering must group it; then
``trainer discover`` and ``discover eval`` as a user runs them."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import all_output, make_runner
from discovery_helpers import oracle_predictions, repeated_object_collection

from trainer.cli import main
from trainer.config import TrainConfig, TransformerConfig
from trainer.discovery.graph import GraphParams
from trainer.discovery.metrics import precision_jaccard
from trainer.discovery.pairs import top_neighbours
from trainer.discovery.run import DiscoverOptions, discover_from_predictions
from trainer.loop import FitOptions, Trainer

COPIES, DISTRACTORS, SIZE = 5, 3, 192
ORACLE_GRAPH = GraphParams(mask_threshold=0.5, sigma=1.2)


@pytest.fixture(scope="module")
def collection(bank):
    return repeated_object_collection(bank, copies=COPIES, distractors=DISTRACTORS, size=SIZE)


@pytest.fixture(scope="module")
def oracle(collection, tmp_path_factory):
    """(image paths, predictions of every pair by the oracle, each image's 3 best partners)."""
    folder = tmp_path_factory.mktemp("collection")
    paths = collection.write(folder / "images")
    n = len(paths)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    predictions = oracle_predictions(collection, pairs)
    return paths, predictions, top_neighbours(n, predictions, 3)


def jaccards(masks: list[np.ndarray], truth: np.ndarray) -> list[float]:
    return [precision_jaccard(mask, t)[1] for mask, t in zip(masks, truth) if t.any()]


def test_cosegmentation_recovers_the_pasted_object(collection, oracle, tmp_path):
    paths, predictions, neighbours = oracle
    options = DiscoverOptions(mode="coseg", k=3, graph=ORACLE_GRAPH, progress=False)
    report = discover_from_predictions(paths, predictions, neighbours, tmp_path, options)
    assert report["graph"]["n_vertices"] > 0 and report["graph"]["n_three_cycle_edges"] > 0
    masks = [cv2.imread(str(tmp_path / "masks" / f"{p.stem}.png"), cv2.IMREAD_GRAYSCALE) > 0 for p in paths]
    found = np.mean(jaccards(masks, collection.truth))
    whole = np.mean(jaccards([np.ones((SIZE, SIZE), bool)] * len(paths), collection.truth))
    centre = np.zeros((SIZE, SIZE), bool)
    centre[SIZE // 4: 3 * SIZE // 4, SIZE // 4: 3 * SIZE // 4] = True
    centred = np.mean(jaccards([centre] * len(paths), collection.truth))
    assert found > 0.6 and found > 2 * max(whole, centred), (found, whole, centred)
    for mask in masks[1 + COPIES:]:  # the distractors hold nothing of it
        assert mask.mean() < 0.05
    overview = cv2.imread(str(tmp_path / "overview.jpg"))
    assert overview is not None and overview.shape[1] == 6 * 192 + 7 * 8  # the images, six a row
    potentials = np.load(tmp_path / "potentials.npy")
    assert potentials.shape == (len(paths), SIZE // 16, SIZE // 16)


def test_clustering_groups_the_repeated_object(collection, oracle, tmp_path):
    paths, predictions, neighbours = oracle
    options = DiscoverOptions(mode="clusters", k=3, graph=ORACLE_GRAPH, n_eigenvectors=3, n_clusters=3,
                              progress=False)
    report = discover_from_predictions(paths, predictions, neighbours, tmp_path, options)
    members = report["clusters"]["members"]
    assert members, report
    biggest = set(members[0]["images"])
    assert len(biggest & set(range(1 + COPIES))) >= 4 and not biggest & set(range(1 + COPIES, len(paths)))
    page = (tmp_path / "clusters" / "index.html").read_text()
    assert page.count("<img") >= 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = TrainConfig(image_size=64, positives=2, negatives=0, steps=1, warmup_steps=1,
                         transformer=TransformerConfig(d_model=16, heads=2, feedforward=16, layers="SC"))
    options = FitOptions(run_dir=tmp_path_factory.mktemp("discover_run"), device="cpu", workers=0,
                         backbone_weights="random", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Trainer(config, [], options).save()


def test_the_command_runs_the_chain_resumes_and_is_evaluated(collection, oracle, checkpoint, tmp_path):
    paths, _, _ = oracle
    images = paths[0].parent
    (images / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "runs" / "thing"
    args = ["discover", "--ckpt", checkpoint, "--images", images, "--out", out, "--size", 64, "--k", 2,
            "--shortlist", 4, "--device", "cpu", "--cache-dir", tmp_path / "cache", "--no-progress"]
    result = make_runner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, all_output(result)
    report = json.loads((out / "report.json").read_text())
    assert set(report["stages"]) >= {"images", "features", "first stage", "pairs", "graph", "eigenvectors", "coseg"}
    assert all("seconds" in s and "peak_rss_mib" in s for s in report["stages"].values())
    assert "broken.jpg" in report["set_aside"] and "broken.jpg" in all_output(result)
    assert sorted(p.name for p in (out / "masks").iterdir()) == sorted(f"{p.stem}.png" for p in paths)
    assert report["pairs"]["computed"] > 0 and report["pairs"]["reused"] == 0
    assert all(len(row) == 2 for row in report["neighbours"])

    again = make_runner().invoke(main, [str(a) for a in args])
    assert again.exit_code == 0, all_output(again)
    rerun = json.loads((out / "report.json").read_text())
    assert rerun["pairs"]["computed"] == 0 and rerun["pairs"]["reused"] == report["pairs"]["pairs"]
    assert rerun["features"]["computed"] == 0

    # discover eval: the Internet dataset's layout, one class
    gt = tmp_path / "gt" / "thing"
    (gt / "GroundTruth").mkdir(parents=True)
    for path, truth in zip(paths, collection.truth):
        (gt / path.name).write_bytes(path.read_bytes())
        cv2.imwrite(str(gt / "GroundTruth" / f"{path.stem}.png"), truth.astype(np.uint8) * 255)
    result = make_runner().invoke(main, ["discover", "eval", "--pred", str(out.parent), "--gt", str(tmp_path / "gt")])
    assert result.exit_code == 0, all_output(result)
    assert "thing" in result.output and " P " in f" {result.output} " and "J" in result.output
