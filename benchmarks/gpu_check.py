"""The checks that need a GPU, in one run on a lent machine (a few minutes on an H200).

    bash benchmarks/gpu_check.sh            # on the device machine (installs carried wheels)
    python benchmarks/gpu_check.py --quick  # here, on the CPU: a dry run of the same steps

No weights can be downloaded, so every network gets random weights in its published layout
(speed, and the agreement of two devices on the same weights, do not depend on the values).
Each part prints figures; with $OUT set, the whole report is also written to
$OUT/gpu_check.txt.

1. AdaIN: ``bench_style.py --device cuda --workers 16 --pairs 400``: seconds per
   image in fp32 and in the bf16 fast path, batches 1, 8 and 32, the mean absolute difference
   of bf16 from fp32 in grey levels, and a build through the style server with its busy share.
2. Training on CUDA against the CPU: a few ``trainer fit`` steps of each network
   (transformer, ncnet) on 40 pairs of the embedded sample, same seed and data on both
   devices; the losses of the first step must agree (TF32 convolutions allow ~1e-3).
3. LOST on CUDA against the CPU: ``datagen segments --source lost`` on 8 sample images;
   the IoU of each image's mask between the two devices.
4. Sparse NC-Net on CUDA: ``bench_ncnet.py --device cuda`` (sparse against dense, time, memory).
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_IMAGES = ROOT / "datagen" / "sample_data" / "coco" / "train2017"
REPORT: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    REPORT.append(line)


def run(args: list, timeout: float, quiet: bool = False) -> subprocess.CompletedProcess:
    """Run a command of this repository (``python -m`` or a script), with the report's output."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    elapsed = time.perf_counter() - started
    if result.returncode != 0 or not quiet:
        for line in (result.stdout + result.stderr).splitlines()[-40:]:
            say(f"    {line}")
    say(f"  [{' '.join(map(str, args[:3]))} ... exit {result.returncode}, {elapsed:.0f} s]")
    return result


def first_loss(run_dir: Path) -> float:
    with open(run_dir / "metrics.csv") as handle:
        return float(next(csv.DictReader(handle))["loss"])


def check_training(tmp: Path, device: str, quick: bool) -> None:
    say("\n== 2. training on the GPU against the CPU (same seed, same data) ==")
    shards = tmp / "shards"
    run(["-m", "datagen.cli", "build", "--n", 40, "--out", shards, "--style", "none", "--shard-size", 20,
         "--manifests-dir", tmp / "manifests"], timeout=300, quiet=True)
    for arch in ("transformer", "ncnet"):
        losses = []
        for k, where in enumerate(("cpu", device)):
            run_dir = tmp / f"fit-{arch}-{k}-{where}"
            result = run(["-m", "trainer.cli", "fit", "--shards", shards, "--out", run_dir, "--arch", arch,
                          "--steps", 3, "--positives", 2, "--negatives", 2, "--warmup", 1, "--workers", 0,
                          "--backbone-weights", "random", "--device", where, "--log-every", 1,
                          "--no-progress", "--seed", 0], timeout=600, quiet=True)
            if result.returncode == 0:
                losses.append(first_loss(run_dir))
        if len(losses) == 2:
            cpu, gpu = losses
            say(f"  {arch}: first-step loss cpu {cpu:.6f}, {device} {gpu:.6f}, "
                f"relative difference {abs(cpu - gpu) / max(abs(cpu), 1e-12):.2e}")


def check_lost(tmp: Path, device: str, quick: bool) -> None:
    say("\n== 3. LOST on the GPU against the CPU (random DINO weights, 8 sample images) ==")
    import numpy as np
    import torch

    from datagen.segments.bank import SegmentBank
    from datagen.segments.dino import make_vit

    images = tmp / "lost-images"
    images.mkdir()
    for path in sorted(SAMPLE_IMAGES.glob("*.jpg"))[:8]:
        shutil.copy(path, images / path.name)
    torch.manual_seed(0)
    weights = tmp / "dino_deitsmall16_pretrain.pth"
    torch.save(make_vit().state_dict(), weights)
    banks = []
    for k, where in enumerate(("cpu", device)):
        out = tmp / f"bank-{k}-{where}"
        result = run(["-m", "datagen.cli", "segments", "--source", "lost", "--images", images,
                      "--dino-weights", weights, "--device", where, "--out", out, "--no-progress"],
                     timeout=600, quiet=True)
        if result.returncode == 0:
            banks.append(SegmentBank.load(out))
    if len(banks) == 2:
        cpu, gpu = banks
        by_path = {cpu.row(i).image_path: i for i in range(len(cpu))}
        ious = []
        for j in range(len(gpu)):
            i = by_path.get(gpu.row(j).image_path)
            if i is not None:
                a, b = cpu.mask(i) > 0, gpu.mask(j) > 0
                ious.append((a & b).sum() / max((a | b).sum(), 1))
        say(f"  segments: cpu {len(cpu)}, {device} {len(gpu)}; mask IoU between devices: "
            f"min {min(ious):.3f}, mean {np.mean(ious):.3f} over {len(ious)} images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="dry run on the CPU with small sizes")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: style,train,lost,ncnet")
    args = parser.parse_args()
    device = "cpu" if args.quick else args.device
    skip = set(filter(None, args.skip.split(",")))
    sys.path.insert(0, str(ROOT))
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    say(f"gpu_check: torch {torch.__version__}, {gpu}, {os.cpu_count()} CPUs, device {device}"
        f"{' (quick dry run)' if args.quick else ''}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "style" not in skip:
            say("\n== 1. AdaIN: bf16 against fp32, batches, and a build through the style server ==")
            style_args = (["--device", "cpu", "--images", 2, "--pairs", 2, "--precisions", "fp32",
                           "--baseline-images", 1] if args.quick else
                          ["--device", device, "--workers", 16, "--pairs", 400, "--baseline-images", 0])
            run(["benchmarks/bench_style.py", *style_args], timeout=900)
        if "train" not in skip:
            check_training(tmp, device, args.quick)
        if "lost" not in skip:
            check_lost(tmp, device, args.quick)
        if "ncnet" not in skip:
            say("\n== 4. Sparse NC-Net on the GPU (sparse against dense) ==")
            run(["benchmarks/bench_ncnet.py", "--device", device, "--grids", *((12,) if args.quick else (30, 40))],
                timeout=600)
    say(f"\ngpu_check done in {time.perf_counter() - started:.0f} s")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.txt").write_text("\n".join(REPORT) + "\n")


if __name__ == "__main__":
    main()
