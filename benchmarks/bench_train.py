"""Training speed of the paper's configuration, and what a few minutes of small training learn.

    python benchmarks/bench_train.py [--minutes 3] [--workers 2] [--steps 3] [--pairs 400]

Builds ``--pairs`` pairs from the embedded 60-image COCO sample (480 px, one object, no style)
into a temporary folder, in shards of ``--shard-size``; the last shard is held out for validation.

1. The paper's step (default TrainConfig: 480 px, 5 positives + 15 negatives, the SCSCS
   transformer; the backbone keeps random weights since no MoCo weights are available here):
   the loader alone with ``--workers`` workers (samples/s after its first batch, which waits for
   the shuffle buffer), then ``--steps`` timed training steps after one warm-up step, each split
   into loading (the wait for the next batch), backbone, and transformer + loss + backward + Adam.
2. A small configuration (``--small-size`` px, a small transformer, lr 1e-3, warm-up 10) trained
   for ``--minutes`` minutes, then evaluated on the held-out shard with trainer.evaluate against
   the same network before training (same initialisation).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datagen.config import BuildConfig  # noqa: E402
from datagen.runner.run import SourceSpec, build  # noqa: E402
from trainer.config import TrainConfig, TransformerConfig  # noqa: E402
from trainer.data import make_loader, shard_urls  # noqa: E402
from trainer.evaluate import evaluate_model  # noqa: E402
from trainer.loop import FitOptions, Trainer  # noqa: E402

SAMPLE_ROOT = ROOT / "datagen" / "sample_data" / "coco"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_shards(out: Path, pairs: int, shard_size: int, workers: int) -> tuple[list[str], list[str]]:
    """(training shard paths, held-out shard paths): the last shard is held out."""
    started = time.perf_counter()
    spec = SourceSpec("coco", {"root": SAMPLE_ROOT.resolve(), "split": "train2017"})
    build(BuildConfig(shard_size=shard_size, style="none", objects="1"), spec, pairs, out, seed=0, workers=workers,
          manifests_dir=out.parent / "manifests", log=lambda message: None, show_progress=False)
    urls = shard_urls(out)
    print(f"built {pairs} pairs (480 px, embedded sample) in {len(urls)} shards of {shard_size} in "
          f"{time.perf_counter() - started:.1f} s; training on {len(urls) - 1} shards, "
          f"holding out {Path(urls[-1]).name}")
    return urls[:-1], urls[-1:]


def make_trainer(config: TrainConfig, shards, run_dir: Path, workers: int) -> Trainer:
    torch.manual_seed(config.seed)
    options = FitOptions(run_dir=run_dir, device="cpu", workers=workers, backbone_weights="random", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-backbone warning: expected here
        return Trainer(config, shards, options)


class Timed:
    """Wraps a callable and adds up the seconds spent in it."""

    def __init__(self, function, sync):
        self.function, self.sync, self.seconds = function, sync, 0.0

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        result = self.function(*args, **kwargs)
        self.sync()
        self.seconds += time.perf_counter() - started
        return result


def paper_step(train: list[str], run_dir: Path, workers: int, steps: int, loader_batches: int) -> None:
    config = TrainConfig()
    print(f"\n== 1. the paper's step: {config.image_size} px, {config.positives} positives + {config.negatives} "
          f"negatives, transformer {config.transformer.layers} d_model {config.transformer.d_model}, "
          f"shuffle buffer {config.shuffle_buffer}; torch threads {torch.get_num_threads()}, "
          f"loader workers {workers}, {cores()} CPU cores")
    trainer = make_trainer(config, train, run_dir, workers)
    params = sum(p.numel() for p in trainer.model.parameters())
    print(f"transformer parameters: {params / 1e6:.2f} M; backbone: random ResNet-50 conv1..layer3")
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)

    loader = iter(make_loader(train, config, workers))
    started = time.perf_counter()
    next(loader)
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(loader_batches):
        next(loader)
    loader_rate = loader_batches * config.positives / (time.perf_counter() - started)
    print(f"loader alone: first batch after {first:.1f} s (filling the shuffle buffers), then "
          f"{loader_rate:.1f} samples/s over {loader_batches} batches ({loader_batches * config.positives} samples)")

    features = Timed(trainer.features, sync)
    trainer.features = features  # the instance attribute shadows the method: forward() calls it
    split = {"load": 0.0, "backbone": 0.0, "transformer": 0.0}
    total = 0.0
    for step in range(steps + 1):  # step 0 warms up
        t0 = time.perf_counter()
        batch = next(loader)
        t1 = time.perf_counter()
        features.seconds = 0.0
        trainer.train_step(batch)
        sync()
        t2 = time.perf_counter()
        print(f"  step {step}{' (warm-up, not counted)' if step == 0 else ''}: load {t1 - t0:.3f} s, "
              f"backbone {features.seconds:.2f} s, transformer+loss+backward+Adam {t2 - t1 - features.seconds:.2f} s")
        if step:
            split["load"] += t1 - t0
            split["backbone"] += features.seconds
            split["transformer"] += t2 - t1 - features.seconds
            total += t2 - t0
    del loader
    print(f"training: {steps / total:.3f} steps/s ({total / steps:.2f} s per step, mean of {steps} steps), "
          f"{steps * config.positives / total:.2f} positive samples/s consumed")
    for name, seconds in split.items():
        print(f"  {name:<12} {seconds / steps:7.3f} s per step ({100 * seconds / total:5.1f} %)")
    needed = config.positives * steps / total
    verdict = "does NOT limit" if loader_rate > 2 * needed and split["load"] < 0.05 * total else "may limit"
    print(f"the loader {verdict} the step: it delivers {loader_rate:.1f} samples/s alone, the step consumes "
          f"{needed:.2f} samples/s, and the step waited {split['load'] / steps * 1000:.1f} ms per batch")


def small_training(train: list[str], val: list[str], run_dir: Path, size: int, minutes: float, workers: int) -> None:
    config = TrainConfig(image_size=size, lr=1e-3, warmup_steps=10, steps=1_000_000, shuffle_buffer=100,
                         transformer=TransformerConfig(d_model=128, heads=2, feedforward=256, layers="SCSCS"))
    print(f"\n== 2. small training: {size} px (grid {config.grid_size}), {config.positives} positives + "
          f"{config.negatives} negatives, transformer {config.transformer.layers} d_model "
          f"{config.transformer.d_model} feedforward {config.transformer.feedforward}, lr {config.lr}, warm-up "
          f"{config.warmup_steps}, shuffle buffer {config.shuffle_buffer}, {minutes:g} min; torch threads "
          f"{torch.get_num_threads()}, loader workers {workers}")
    trainer = make_trainer(config, train, run_dir, workers)
    initial = copy.deepcopy(trainer.model)
    loader = iter(make_loader(train, config, workers))
    started = time.perf_counter()
    deadline = started + minutes * 60
    losses = []
    while time.perf_counter() < deadline:
        metrics = trainer.train_step(next(loader))
        losses.append(float(metrics["loss"].detach()))
        if trainer.step % 100 == 0:
            recent = losses[-100:]
            print(f"  step {trainer.step}: loss {sum(recent) / len(recent):.3f} (mean of the last 100), "
                  f"{time.perf_counter() - started:.0f} s")
    elapsed = time.perf_counter() - started
    del loader
    head, tail = losses[:20], losses[-20:]
    print(f"trained {trainer.step} steps in {elapsed:.0f} s ({trainer.step / elapsed:.2f} steps/s, "
          f"{trainer.step * config.positives} positive pairs, {trainer.step * config.positives / 350:.1f} epochs "
          f"of ~350); loss {sum(head) / len(head):.3f} (first 20 steps) -> {sum(tail) / len(tail):.3f} (last 20)")

    rows = [("untrained, held-out", evaluate_model(config, trainer.backbone, initial, val, progress=False)),
            ("trained, held-out", evaluate_model(config, trainer.backbone, trainer.model, val, progress=False)),
            ("trained, 1st training shard", evaluate_model(config, trainer.backbone, trainer.model, train[:1],
                                                           progress=False))]
    names = ("mask_iou", "pos_mask_mean", "neg_mask_mean", "corr_error", "corr_within_1", "score_ap")
    header = f"{'':<28}{'pairs':>6}" + "".join(f"{name:>15}" for name in names)
    print(header)
    for label, result in rows:
        print(f"{label:<28}{result['samples']:>6}" + "".join(f"{result[name]:>15.4f}" for name in names))
    held = rows[0][1]
    print(f"(held out: mask IoU over the {2 * held['samples'] - held['empty_gt_images']} of {2 * held['samples']} "
          f"images with a ground-truth cell > 0.5; correspondence error in grid cells over {held['corr_cells']} "
          f"ground-truth mask cells, both directions; AP of the Eq. 3 score, {held['samples']} positives vs "
          f"{held['negatives']} negatives)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="training time of part 2")
    parser.add_argument("--workers", type=int, default=2, help="loader workers of part 1")
    parser.add_argument("--steps", type=int, default=3, help="timed steps of part 1 (after one warm-up step)")
    parser.add_argument("--loader-batches", type=int, default=40, help="batches timed for the loader alone")
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--small-size", type=int, default=128, help="image size of part 2")
    parser.add_argument("--small-workers", type=int, default=1, help="loader workers of part 2")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of part 1 (default: all cores); part 2 uses cores - small workers")
    parser.add_argument("--skip-paper", action="store_true", help="only part 2")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {cores()} CPU cores, CUDA {'yes' if torch.cuda.is_available() else 'no'}")
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        train, val = build_shards(tmp / "shards", args.pairs, args.shard_size, workers=cores())
        if not args.skip_paper:
            torch.set_num_threads(args.threads or cores())
            paper_step(train, tmp / "paper", args.workers, args.steps, args.loader_batches)
        torch.set_num_threads(max(1, cores() - args.small_workers))
        small_training(train, val, tmp / "small", args.small_size, args.minutes, args.small_workers)


if __name__ == "__main__":
    main()
