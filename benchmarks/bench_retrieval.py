"""Retrieval throughput: database features cached per second, and pairs scored per second.

    python benchmarks/bench_retrieval.py [--images DIR] [--n 60] [--queries 4] [--size 640]
                                         [--batch 32] [--device auto]

On a lent GPU machine:  python benchmarks/bench_retrieval.py --device cuda --n 400 --queries 20

The network is the paper's cross-image transformer (the 'small' model: d_model 256, 5 layers)
with a random backbone: throughput does not depend on the weights. The database is ``--n``
images of ``--images`` (default: the embedded COCO sample, repeated with small crops to reach
``--n`` distinct files). Printed, on one line each:

- features (cold): the first run's feature extraction and caching, images per second;
- features (warm): a second run's check of the cache (every row re-hashed), images per second;
- scoring: pairs per second of ``trainer retrieve``'s scoring loop, Eq. 3 and the authors'
  score, with the cache warm (read from the memory-mapped float16 file, batch by batch).

Nothing here asserts anything about speed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import cv2
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datagen.format.imageio import load_rgb  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.loop import FitOptions, Trainer  # noqa: E402
from trainer.retrieval.engine import Resolution  # noqa: E402
from trainer.retrieval.images import list_images  # noqa: E402
from trainer.retrieval.rank import Query, RetrieveOptions, retrieve  # noqa: E402

SAMPLE = ROOT / "datagen" / "sample_data" / "coco" / "train2017"


def make_database(source: Path, n: int, out: Path) -> None:
    """``n`` distinct JPEGs in ``out``: the images of ``source``, then crops of them."""
    names = list_images(source)
    if not names:
        raise SystemExit(f"{source}: no images")
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = load_rgb(source / names[i % len(names)])
        shrink = (i // len(names)) * 4
        crop = image[shrink: image.shape[0] - shrink, shrink: image.shape[1] - shrink]
        cv2.imwrite(str(out / f"db{i:05d}.jpg"), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=SAMPLE, help="folder of source images (default: the sample)")
    parser.add_argument("--n", type=int, default=60, help="database images")
    parser.add_argument("--queries", type=int, default=4, help="queries (whole images of the database)")
    parser.add_argument("--size", default="640", help="resolution, N or WxH")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    resolution = Resolution.parse(args.size)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_database(args.images, args.n, tmp / "db")
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checkpoint = Trainer(TrainConfig(), [], FitOptions(run_dir=tmp / "run", device="cpu", workers=0,
                                                              backbone_weights="random", progress=False)).save()
        queries = [Query(f"q{i}", name) for i, name in enumerate(list_images(tmp / "db")[: args.queries])]
        figures = {}
        for label, score in (("cold", "eq3"), ("warm", "eq3"), ("warm", "released")):
            options = RetrieveOptions(resolution=resolution, score=score, batch=args.batch, cache_dir=tmp / "cache",
                                      progress=False)
            started = time.perf_counter()
            run = retrieve(checkpoint, tmp / "db", queries, tmp / "db", tmp / f"out-{label}-{score}", options,
                           device=args.device)
            features = run["features"]
            if score == "eq3":
                figures[f"features ({label})"] = (f"{args.n / max(features['seconds'], 1e-9):.2f} images/s "
                                                  f"({features['computed']} computed, {features['reused']} reused, "
                                                  f"{features['seconds']:.2f} s)")
            if label == "warm":
                figures[f"scoring, {score}"] = (f"{run['pairs_per_second']:.2f} pairs/s ({run['pairs_scored']} pairs, "
                                                f"total run {time.perf_counter() - started:.1f} s)")
        device = run["device"]
    print(f"retrieval at {resolution} on {device}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.n} database images, {args.queries} queries")
    for name, value in figures.items():
        print(f"  {name:<20} {value}")
    print(json.dumps({"resolution": str(resolution), "device": device, **figures}))


if __name__ == "__main__":
    main()
