"""Seconds per image and peak memory of the bilateral solver (``datagen.segments.bilateral``).

    python benchmarks/bench_bilateral.py [--sizes 480,1024] [--repeats 3]

Images: scikit-image's colour photographs (the ``test`` extra), resized so that their long side
is each size (area interpolation down, cubic up). Target: a coarse mask, an ellipse drawn at
1/16 of the image and upsampled nearest, as a patch-level mask upsampled to the image would be;
confidence: ones; default :class:`~datagen.segments.bilateral.SolverConfig`. Printed for each size:

1. seconds per image for the whole ``bilateral_solve`` (median over images of the best of
   ``--repeats`` calls), and within it the grid construction and the 25 CG iterations alone;
2. grid vertices per image (min-median-max) and pixels;
3. peak memory of one solve on the largest image, in a fresh process: Python allocations
   (numpy arrays included) traced by tracemalloc, and the growth of the process's peak resident
   set (/proc VmHWM, else ``resource.getrusage``).
"""
from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datagen.segments.bilateral import BilateralGrid, SolverConfig, bilateral_solve, build_system, solve  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "retina", "hubble_deep_field", "immunohistochemistry")


def photos(long_side: int) -> list[np.ndarray]:
    from skimage import data
    images = []
    for name in PHOTOS:
        image = getattr(data, name)()
        scale = long_side / max(image.shape[:2])
        size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
        images.append(cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC))
    return images


def coarse_ellipse(shape: tuple[int, int], block: int = 16) -> np.ndarray:
    """(H, W) float32 0/1: a centred ellipse drawn at 1/block resolution, upsampled nearest."""
    height, width = shape
    small = np.zeros((max(1, height // block), max(1, width // block)), np.uint8)
    cv2.ellipse(small, (small.shape[1] // 2, small.shape[0] // 2), (small.shape[1] // 3, small.shape[0] // 3),
                20, 0, 360, 1, -1)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_NEAREST).astype(np.float32)


def best_of(repeats: int, call) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def maxrss_mib() -> float:
    """This process's peak resident set in MiB: VmHWM where /proc has it (a spawned process
    starts afresh there), else ``ru_maxrss``, which Linux carries over from the parent through
    fork and exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(image: np.ndarray, target: np.ndarray, config: SolverConfig, repeats: int) -> tuple:
    """(seconds of the whole solve, of the grid construction, of CG alone, grid vertices)."""
    total = best_of(repeats, lambda: bilateral_solve(image, target, config=config))
    grid = best_of(repeats, lambda: BilateralGrid(image, config.sigma_spatial, config.sigma_luma,
                                                  config.sigma_chroma))
    system = build_system(image, target, config=config)
    return total, grid, best_of(repeats, lambda: solve(system, config)), system.grid.nvertices


def peak_memory(image: np.ndarray, target: np.ndarray, config: SolverConfig) -> tuple[int, float, float]:
    """In a fresh process: (bytes traced by tracemalloc at the peak of one solve, growth of the
    maximum resident set during it in MiB, that maximum in MiB)."""
    before = maxrss_mib()
    tracemalloc.start()
    bilateral_solve(image, target, config=config)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return traced_peak, maxrss_mib() - before, maxrss_mib()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="480,1024", help="comma-separated long sides in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="calls per image, the best one counts")
    args = parser.parse_args()
    config = SolverConfig()
    print(f"config: {config}")
    bilateral_solve(np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), np.float32))  # warm-up
    for long_side in (int(s) for s in args.sizes.split(",")):
        images = photos(long_side)
        targets = [coarse_ellipse(image.shape[:2]) for image in images]
        totals, grids, cgs, vertices = zip(*(measure(image, target, config, args.repeats)
                                             for image, target in zip(images, targets)))

        # peak memory of one solve on the largest image of this size, in a fresh process
        largest = max(range(len(images)), key=lambda i: images[i].shape[0] * images[i].shape[1])
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            traced_peak, rss_growth, rss_total = pool.apply(peak_memory, (images[largest], targets[largest], config))

        pixels = [image.shape[0] * image.shape[1] for image in images]
        print(f"\nlong side {long_side} px, {len(images)} photographs "
              f"({min(pixels) / 1e6:.2f}-{max(pixels) / 1e6:.2f} Mpixel)")
        print(f"  seconds per image: {statistics.median(totals):.3f} median, {max(totals):.3f} max "
              f"(grid {statistics.median(grids):.3f}, CG {statistics.median(cgs):.3f})")
        print(f"  grid vertices: {min(vertices)} / {int(statistics.median(vertices))} / {max(vertices)} "
              f"(min / median / max)")
        print(f"  peak memory of one solve ({images[largest].shape[1]}x{images[largest].shape[0]}): "
              f"{traced_peak / 2**20:.1f} MiB traced, max RSS +{rss_growth:.1f} MiB "
              f"(to {rss_total:.0f} MiB, imports included)")


if __name__ == "__main__":
    main()
