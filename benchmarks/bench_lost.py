"""Seconds per image of the lost source on the CPU (DINO ViT-S/16 keys, LOST, bilateral solver
refinement) at 480 px and 1024 px, and the peak memory of the process.

    python benchmarks/bench_lost.py [--images 3] [--sizes 480,1024] [--threads 1]

No DINO weights can be downloaded here, so the ViT gets random weights in the official layout:
the time of DINO and LOST's maths does not depend on the values, but the solver's does a little
(its grid depends on the image, its target on the coarse mask) and random weights give arbitrary
masks. Images: coco-mini photos (../shared/data/coco-mini) resized so that their longer side is
the size, as ``--max-size`` does. Each size runs in a fresh process, whose peak resident memory
(``ru_maxrss``) is reported with its baseline after loading the model.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
COCO_MINI = ROOT.parent / "shared" / "data" / "coco-mini" / "images"


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_size(size: int, count: int, threads: int) -> dict:
    """Per-stage mean seconds per image at ``size`` px (longer side), in this process."""
    import cv2
    import torch

    from datagen.format.imageio import load_rgb
    from datagen.segments.dino import image_batch, last_keys, make_vit, padded_grid
    from datagen.segments.lost import lost
    from datagen.segments.refine import refine_mask, upsample_patches

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = make_vit()
    files = sorted(COCO_MINI.glob("*.jpg"))[:count + 1]
    images = []
    for path in files:
        image = load_rgb(path)
        scale = size / max(image.shape[:2])
        width, height = round(image.shape[1] * scale), round(image.shape[0] * scale)
        images.append(cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR))
    baseline = rss_mib()
    times = {"dino": [], "lost": [], "refine": []}
    for index, image in enumerate(images):
        start = time.perf_counter()
        keys = last_keys(model, image_batch([image]))[0]
        after_dino = time.perf_counter()
        found = lost(keys, padded_grid(*image.shape[:2]))
        after_lost = time.perf_counter()
        refine_mask(image, upsample_patches(found.mask, image.shape[:2]))
        after_refine = time.perf_counter()
        if index == 0:
            continue  # warm-up
        times["dino"].append(after_dino - start)
        times["lost"].append(after_lost - after_dino)
        times["refine"].append(after_refine - after_lost)
    means = {stage: sum(values) / len(values) for stage, values in times.items()}
    tokens = sum(h * w for h, w in (padded_grid(*image.shape[:2]) for image in images[1:])) / count
    return {"size": size, "image": f"{images[1].shape[1]}x{images[1].shape[0]}", "tokens": round(tokens),
            "threads": threads, "images": count, **means, "total": sum(means.values()),
            "baseline_mib": baseline, "peak_mib": rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3, help="timed images per size (after one warm-up)")
    parser.add_argument("--sizes", default="480,1024", help="comma-separated longer sides, pixels")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_size(args.one, args.images, args.threads)))
        return
    print(f"{'size':>5} {'image':>9} {'tokens':>6} {'thr':>3} {'DINO s':>7} {'LOST s':>7} {'solver s':>8} "
          f"{'total s':>7} {'base MiB':>8} {'peak MiB':>8}")
    for size in (int(s) for s in args.sizes.split(",")):
        output = subprocess.run([sys.executable, __file__, "--one", str(size), "--images", str(args.images),
                                 "--threads", str(args.threads)], check=True, capture_output=True, text=True)
        r = json.loads(output.stdout.strip().splitlines()[-1])
        print(f"{r['size']:>5} {r['image']:>9} {r['tokens']:>6} {r['threads']:>3} {r['dino']:>7.2f} "
              f"{r['lost']:>7.3f} {r['refine']:>8.2f} {r['total']:>7.2f} {r['baseline_mib']:>8.0f} "
              f"{r['peak_mib']:>8.0f}")


if __name__ == "__main__":
    main()
