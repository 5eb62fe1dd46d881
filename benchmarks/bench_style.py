"""Seconds per AdaIN-stylised image on this machine, and pairs/s of a build with AdaIN.

    python benchmarks/bench_style.py [--images 8] [--pairs 6]

No AdaIN weights can be downloaded here, so the networks get random weights in the published
layout (speed does not depend on the values). Content: 480 px images of the embedded sample,
through the paper's 512 px resize, as a build stylises them. Measured:

1. seconds per image, one image per forward against batches of 8, with 1 thread and with all
   threads, in fp32 and in bf16 autocast (bf16 is fast only on CPUs with AVX-512 BF16 or AMX;
   the development machine, an AMD EPYC, has AVX2 only and emulates it);
2. the mean absolute difference (grey levels) of each fast setting's images from the plain
   fp32 one-at-a-time images, so speed does not silently change the data;
3. the baseline in the same run: the authors' released generator's style steps
   (``released_generator.released_stylize``: torchvision resize of PIL images, content and
   style image both encoded for every image, fp32, one image at a time, one thread) on the same
   images, style choices and strengths, and the ratio against ours (one thread, fp32, batch 1);
4. pairs/s of ``datagen build --style adain`` (``--workers``, batches of ``style_batch`` pairs;
   with a GPU and several workers, through the style server, whose busy share is printed).

On a GPU machine: ``python benchmarks/bench_style.py --device cuda --workers 16 --pairs 400``
(precisions fp32 and auto = bf16 autocast, batches 1, 8 and 32).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datagen.config import BuildConfig  # noqa: E402
from datagen.runner.run import SourceSpec, StyleSpec, build  # noqa: E402
from datagen.style.adain import AdainStylizer  # noqa: E402
from datagen.style.adain_net import ENCODER_MODULES, make_decoder, make_full_vgg  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from released_generator import released_stylize  # noqa: E402

SAMPLE = ROOT / "datagen" / "sample_data" / "coco"


def content_images(count: int) -> list[np.ndarray]:
    files = sorted((SAMPLE / "train2017").glob("*.jpg"))[:count]
    return [cv2.resize(cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB), (480, 480)) for f in files]


def timed(stylizer, images, styles, alphas) -> tuple[float, list[np.ndarray]]:
    stylizer.stylize(images[:1], styles[:1], alphas[:1])  # warm-up
    start = time.perf_counter()
    out = stylizer.stylize(images, styles, alphas)
    return (time.perf_counter() - start) / len(images), out


def released_baseline(tmp: Path, images, styles_dir: Path, styles, alphas) -> float:
    """Seconds per image of the released generator's style steps, one image at a time, with
    the same random weights, images, style choices and strengths as the stylizer runs."""
    vgg, decoder = make_full_vgg(), make_decoder()
    vgg.load_state_dict(torch.load(tmp / "vgg_normalised.pth", weights_only=True))
    decoder.load_state_dict(torch.load(tmp / "decoder.pth", weights_only=True))
    encoder = torch.nn.Sequential(*list(vgg.children())[:ENCODER_MODULES]).eval()
    decoder.eval()
    style_paths = sorted(styles_dir.iterdir())
    released_stylize(encoder, decoder, images[0], style_paths[styles[0]], alphas[0])  # warm-up
    start = time.perf_counter()
    for image, style, alpha in zip(images, styles, alphas):
        released_stylize(encoder, decoder, image, style_paths[style], alpha)
    return (time.perf_counter() - start) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--baseline-images", type=int, default=4,
                        help="images timed through the released generator's style steps on the CPU, one thread "
                             "(about 2x ours each; 0: skip; never on CUDA)")
    parser.add_argument("--precisions", default=None,
                        help="comma-separated: fp32, bf16, auto (default: fp32,bf16 on the CPU, where bf16 is "
                             "emulated, hence slow, without AVX-512 BF16/AMX; fp32,auto on CUDA)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--workers", type=int, default=1, help="workers of the build (several share a GPU "
                        "through the style server)")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    precisions = (args.precisions or ("fp32,auto" if cuda else "fp32,bf16")).split(",")
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        torch.save(make_full_vgg().state_dict(), tmp / "vgg_normalised.pth")
        torch.save(make_decoder().state_dict(), tmp / "decoder.pth")
        styles_dir = tmp / "styles"
        styles_dir.mkdir()
        for k, image in enumerate(content_images(12)[8:]):
            cv2.imwrite(str(styles_dir / f"style{k}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        images = content_images(args.images)
        rng = np.random.default_rng(0)
        styles = rng.integers(4, size=len(images)).tolist()
        alphas = rng.random(len(images)).tolist()
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        native_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
        native = "yes" if native_bf16 else "no"
        device = torch.cuda.get_device_name() if cuda else f"{cores} cores, native bf16: {native}"
        print(f"{len(images)} content images 480 px -> 512 px, 4 style images, random weights; {device}")
        reference = None
        for threads in ((cores,) if cuda else (1, cores)):
            torch.set_num_threads(threads)
            for precision in precisions:
                for batch in ((1, 8, 32) if cuda else (1, 8)):
                    stylizer = AdainStylizer(tmp / "vgg_normalised.pth", tmp / "decoder.pth", styles_dir,
                                             device=args.device, batch_size=batch, precision=precision)
                    stylizer.precompute()
                    seconds, out = timed(stylizer, images, styles, alphas)
                    if reference is None:
                        reference, ours_one_thread = out, seconds
                    difference = np.mean([np.abs(a.astype(int) - b.astype(int)).mean()
                                          for a, b in zip(out, reference)])
                    print(f"  threads {threads}  {precision}  batch {batch}:  {seconds:6.2f} s per image  "
                          f"(mean |diff| from fp32 one-at-a-time: {difference:.2f} grey levels)")
        if args.baseline_images > 0 and not cuda:
            torch.set_num_threads(1)
            baseline = released_baseline(tmp, images[:args.baseline_images], styles_dir, styles, alphas)
            print(f"  released generator's steps (baseline; re-encodes the style image), threads 1, fp32: "
                  f"{baseline:6.2f} s per image;  ours, threads 1, fp32, batch 1: {ours_one_thread:6.2f} s "
                  f"per image = {baseline / ours_one_thread:.2f}x faster (aim: >= 3x)")
        torch.set_num_threads(cores)
        style = StyleSpec({"style_dir": styles_dir, "vgg_path": tmp / "vgg_normalised.pth",
                           "decoder_path": tmp / "decoder.pth", "device": args.device})
        spec = SourceSpec("coco", {"root": SAMPLE, "split": "train2017"})
        shard_size = max(1, -(-args.pairs // args.workers))
        config = BuildConfig(style="adain", objects="1", shard_size=shard_size)
        messages = []
        start = time.perf_counter()
        build(config, spec, args.pairs, tmp / "out", style=style, workers=args.workers, show_progress=False,
              log=messages.append)
        elapsed = time.perf_counter() - start
        print(f"build with --style adain ({args.device}, {args.workers} worker(s), shards of {shard_size}): "
              f"{args.pairs} pairs in {elapsed:.1f} s = {args.pairs / elapsed:.3f} pairs/s "
              "(bank scan and model loading included)")
        for message in messages:
            if message.startswith("style server"):
                print(f"  {message}")


if __name__ == "__main__":
    main()
