"""``trainer retrieve`` and the benchmarks end to end, on a small retrieval set built from shards
whose every answer is known.

The network is a parameter-free nearest-neighbour matcher registered for these tests: each cell
is sent to the most similar cell of the other image, with a mask that grows with that
similarity. On a query that is an exact copy of one database image, that image scores the
region's full size and every other image less, so the true match is known; what is checked is
everything around the network: images, features and their cache, batches, candidates, scores,
ranks, metrics, files, pictures, and what is set aside.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.io
import torch
import torch.nn.functional as F
from conftest import REFERENCE_N, all_output, make_runner
from torch import nn

from trainer.cli import main
from trainer.config import TrainConfig
from trainer.loop import FitOptions, Trainer
from trainer.models import MODELS, register

SIZE = 64


class NearestNeighbourMatcher(nn.Module):
    """Sends every cell to the centre of its most similar cell in the other image; the mask is
    (similarity - 0.5) * 2, clamped to (0, 1). One unused parameter (optimisers need one)."""

    def __init__(self, config: TrainConfig):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, src_feat, tgt_feat, src_hide=None, tgt_hide=None):
        return self._one_way(src_feat, tgt_feat), self._one_way(tgt_feat, src_feat)

    def _one_way(self, a, b):
        batch, _, h, w = a.shape
        h_b, w_b = b.shape[2:]
        similarity = torch.einsum("bci,bcj->bij", F.normalize(a.flatten(2), dim=1), F.normalize(b.flatten(2), dim=1))
        best, index = similarity.max(dim=2)
        x = ((index % w_b).float() + 0.5) / w_b
        y = (torch.div(index, w_b, rounding_mode="floor").float() + 0.5) / h_b
        mask = ((best - 0.5) * 2).clamp(1e-4, 1 - 1e-4)
        return torch.stack([x, y, mask], dim=1).reshape(batch, 3, h, w) + 0 * self.anchor


if "nn-matcher" not in MODELS.names():
    register("nn-matcher")(NearestNeighbourMatcher)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = TrainConfig(arch="nn-matcher", image_size=SIZE, positives=2, negatives=0, steps=1, warmup_steps=1)
    options = FitOptions(run_dir=tmp_path_factory.mktemp("matcher_run"), device="cpu", workers=0,
                         backbone_weights="random", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Trainer(config, [], options).save()


def run(*args, expect: int = 0):
    result = make_runner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == expect, all_output(result)
    return result


@pytest.fixture(scope="module")
def retrieval_set(reference, tmp_path_factory) -> Path:
    """``trainer retrieval-set`` of the reference shards, plus, for each of the first 6 samples, a
    copy of its target saved as query image ``copy{i}.jpg``: the query's true match is the target."""
    out = tmp_path_factory.mktemp("retrieval") / "set"
    run("retrieval-set", "--shards", reference, "--out", out, "--n", REFERENCE_N)
    annotations = json.loads((out / "retrieval.json").read_text())
    entries = [entry for category in sorted(annotations) for entry in annotations[category]]
    copies = {}
    for i, entry in enumerate(entries[:6]):
        target, box = entry["gt"][0]
        shutil.copy(out / "images" / target, out / "images" / f"copy{i}.jpg")
        copies.setdefault("copies" if i % 2 else "odd-ones", []).append(
            {"query": [f"copy{i}.jpg", box], "gt": [[target, box]]})
    (out / "copies.json").write_text(json.dumps(copies))
    return out


def test_retrieval_set_holds_each_sample_as_query_and_answer(retrieval_set, reference):
    from trainer.data import iter_samples

    annotations = json.loads((retrieval_set / "retrieval.json").read_text())
    entries = {entry["sample"]: entry for category in annotations.values() for entry in category}
    assert len(entries) == REFERENCE_N
    for sample in iter_samples(reference):
        entry = entries[sample.key]
        rows, cols = np.nonzero(sample.tgt_mask)
        assert entry["gt"][0][1] == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
        category = sample.meta["objects"][0]["category"]
        assert entry in annotations[str(category)]


def test_brueghel_protocol_finds_every_copy_and_reuses_the_cache(checkpoint, retrieval_set, tmp_path):
    # --box-side 0: the query prepared like a database image (a copy's true match is at that scale)
    args = ["bench-retrieval", "brueghel", "--ckpt", checkpoint, "--annotations", retrieval_set / "copies.json",
            "--images", retrieval_set / "images", "--size", SIZE, "--box-side", 0, "--batch", 7, "--device", "cpu",
            "--cache-dir", tmp_path / "cache", "--no-progress", "--pictures", 2]
    result = run(*args, "--out", tmp_path / "one")
    results = json.loads((tmp_path / "one" / "results.json").read_text())
    assert results["mean"] == pytest.approx(1.0) and results["queries"] == 6
    assert set(results["per_category"]) == {"copies", "odd-ones"}
    assert "mAP 1.0000  (6 queries)" in result.output

    ranking = pq.read_table(tmp_path / "one" / "ranking.parquet").to_pylist()
    images = sorted(p.name for p in (retrieval_set / "images").iterdir())
    by_query = {}
    for row in ranking:
        by_query.setdefault(row["query"], []).append(row)
    assert len(by_query) == 6
    for rows in by_query.values():
        assert [r["rank"] for r in rows] == list(range(1, len(images)))  # every image but the query's own file
        assert all(a["score"] >= b["score"] for a, b in zip(rows, rows[1:]))
        assert rows[0]["candidate"].startswith("pair") and rows[0]["candidate"].endswith("_b.jpg")
    run_record = results["run"]
    assert run_record["features"]["computed"] == len(images) and run_record["features"]["reused"] == 0
    assert len(list((tmp_path / "one" / "pictures").glob("*.jpg"))) == 6

    again = run(*args, "--out", tmp_path / "two")
    rerun = json.loads((tmp_path / "two" / "results.json").read_text())["run"]
    assert rerun["features"]["computed"] == 0 and rerun["features"]["reused"] == len(images)
    assert "0 computed" in again.output
    assert pq.read_table(tmp_path / "two" / "ranking.parquet").equals(pq.read_table(tmp_path / "one" /
                                                                                    "ranking.parquet"))


def _copies(retrieval_set: Path) -> list[tuple[str, str]]:
    """(query copy, its true database image) for each copy of the retrieval set."""
    copies = json.loads((retrieval_set / "copies.json").read_text())
    return sorted((entry["query"][0], entry["gt"][0][0]) for entries in copies.values() for entry in entries)


def test_places_protocol_reranks_short_lists_and_suppresses_repeated_places(checkpoint, retrieval_set, tmp_path):
    database, queries = tmp_path / "database", tmp_path / "queries"
    database.mkdir()
    (queries / "q").mkdir(parents=True)
    for image in (retrieval_set / "images").glob("pair*.jpg"):
        shutil.copy(image, database / image.name)
    db_names = sorted(p.name for p in database.iterdir())
    pairs = _copies(retrieval_set)
    query_names = [f"q/{copy}" for copy, _ in pairs]
    for copy, _ in pairs:
        shutil.copy(retrieval_set / "images" / copy, queries / "q" / copy)
    db_utm = np.stack([np.arange(len(db_names)) * 100.0, np.zeros(len(db_names))])  # 100 m apart
    truth = [db_names.index(target) for _, target in pairs]
    query_utm = db_utm[:, truth] + np.array([[3.0], [4.0]])  # 5 m from the true image
    # each short-list: 9 wrong images first, the true one last (R@1 of the short-lists is 0)
    rng = np.random.default_rng(0)
    shortlists = np.stack([np.r_[rng.permutation([i for i in range(len(db_names)) if i != t])[:9], t] for t in truth])
    np.save(tmp_path / "top10.npy", shortlists)
    cells = lambda names: np.array([[name] for name in names], dtype=object)  # noqa: E731
    scipy.io.savemat(tmp_path / "tokyo247.mat", {"dbStruct": {
        "whichSet": "test", "dbImage": cells(db_names), "utmDb": db_utm, "qImage": cells(query_names),
        "utmQ": query_utm, "numImages": len(db_names), "numQueries": len(query_names), "posDistThr": 25.0}})

    result = run("bench-retrieval", "places", "--ckpt", checkpoint, "--mat", tmp_path / "tokyo247.mat", "--queries",
                 queries, "--database", database, "--shortlists", tmp_path / "top10.npy", "--out", tmp_path / "out",
                 "--size", f"{SIZE}x{SIZE - 16}", "--device", "cpu", "--cache-dir", tmp_path / "cache",
                 "--no-progress")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["nms"] is True  # a Tokyo 24/7 file
    recall = results["recall"]
    assert recall["shortlist"]["R@1"] == 0 and recall["shortlist"]["R@10"] == 1
    assert recall["reranked"]["R@1"] == 1 and recall["reranked_nms"]["R@1"] == 1
    assert "reranked       R@1 1.0000" in result.output
    # only the short-listed images were read: the cache holds those
    needed = {db_names[i] for row in shortlists for i in row}
    assert results["run"]["database_images"] == len(needed) == results["run"]["features"]["computed"]


def test_bad_files_are_set_aside_and_named(checkpoint, retrieval_set, tmp_path):
    database = tmp_path / "database"
    shutil.copytree(retrieval_set / "images", database)
    good = sorted(database.glob("pair*_b.jpg"))[0]
    (database / "truncated.jpg").write_bytes(good.read_bytes()[:2000])
    (database / "notes.png").write_bytes(b"not an image")
    pairs = _copies(retrieval_set)
    queries = tmp_path / "queries.csv"
    queries.write_text("image,x1,y1,x2,y2\n" + "".join(f"{copy},0,0,32,32\n" for copy, _ in pairs[:2])
                       + "missing.jpg,0,0,10,10\n")
    result = run("retrieve", "--ckpt", checkpoint, "--database", database, "--queries", queries, "--query-images",
                 database, "--out", tmp_path / "out", "--size", SIZE, "--device", "cpu", "--cache-dir",
                 tmp_path / "cache", "--no-progress", "--candidates", "first-stage", "--first-stage-k", 3)
    output = all_output(result)
    assert "truncated.jpg" in output and "notes.png" in output and "missing.jpg" in output
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert set(record["set_aside"]) == {"truncated.jpg", "notes.png"}
    assert set(record["queries_set_aside"]) == {"missing.jpg"} and record["queries_scored"] == 2
    rows = pq.read_table(tmp_path / "out" / "ranking.parquet").to_pylist()
    for copy, target in pairs[:2]:
        ranked = [r for r in rows if r["query"] == copy]
        assert len(ranked) == 3  # the first stage kept 3 candidates
        assert target in [r["candidate"] for r in ranked]  # an identical image is among the nearest

    hostile = tmp_path / "hostile.csv"
    hostile.write_text("image\n../../etc/passwd\n")
    result = run("retrieve", "--ckpt", checkpoint, "--database", database, "--queries", hostile, "--out",
                 tmp_path / "out2", "--device", "cpu", "--cache-dir", tmp_path / "cache", expect=1)
    assert "must be a relative path inside its folder" in all_output(result)
    assert not (tmp_path / "out2").exists()
