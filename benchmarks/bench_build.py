"""Pairs per second of the pair builder on one core, with the time per stage.

    python benchmarks/bench_build.py [--pairs 300] [--objects 1] [--data sample | ../shared/data/coco-mini]

Builds one-object (or, with --objects 2, two-object) pairs at 480 px with --style none from real
COCO images (the embedded 400 px sample by default; or coco-mini's 640 px originals),
single-threaded, and prints pairs/s, milliseconds per accepted pair for each stage (load, warp, blend,
correspondences, encode/write), the CPU time and the bytes written per pair. In one run it times
four generators on plans drawn from the same attempt seeds, interleaved in turns of 10 attempts
so that a shared machine's drifting speed reaches all of them alike: ours as configured by
default (a thin-plate spline on half the pairs, the paper's setting), ours with no TPS (the work
of the released scripts, which have none), ours with cv2.seamlessClone, and the baseline, the
per-pair steps of the authors' released one- or two-object generator (``released_generator.py``:
PIL, scipy dilation, seamlessClone, torch grid sampling, four files per pair; its two-object
steps in the layouts of our sampler's plans). It prints the
ratios against the baseline, with the same work and with our TPS, then times JPEG decoding and
encoding alone: the floors of load and encode/write. On a shared machine compare runs made in
the same conditions. The README's Speed section has the figures of a run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# one core: BLAS and OpenMP pools are sized when numpy is first imported (cv2 imports it)
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import cv2  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datagen.config import BuildConfig, WarpConfig  # noqa: E402
from datagen.format.schema import encode_sample  # noqa: E402
from datagen.format.shards import ShardWriter  # noqa: E402
from datagen.segments.bank import SegmentBank, write_bank  # noqa: E402
from datagen.segments.coco_source import CocoSource  # noqa: E402
from datagen.synth.pairs import PairBuilder, Rejected  # noqa: E402
from datagen.synth.sampling import Sampler, attempt_rng  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from released_generator import ReleasedGeneratorSteps  # noqa: E402

COCO_MINI = ROOT.parent / "shared" / "data" / "coco-mini"


def source_paths(data: str) -> tuple[Path, Path]:
    if data == "sample":
        root = ROOT / "datagen" / "sample_data" / "coco"
        return root / "annotations" / "instances_train2017.json", root / "train2017"
    root = Path(data)
    return root / "instances.json", root / "images"


class TimedGenerator:
    """One generator under test, run attempt by attempt so that all of them share the machine's
    slow and fast spells (:func:`interleave`). ``attempt(index)`` builds the pair of attempt
    ``index`` (its plan drawn from ``attempt_rng(0, 0, index)``) and says whether it was kept;
    ``timed`` adds its wall and CPU time and counts it."""

    def __init__(self, name: str):
        self.name = name
        self.total = self.cpu = 0.0
        self.accepted = self.attempts = 0

    def attempt(self, index: int) -> bool:
        raise NotImplementedError

    def stages(self) -> dict:
        raise NotImplementedError

    def bytes_written(self) -> int:
        raise NotImplementedError

    def timed(self, index: int) -> None:
        started, cpu_started = time.perf_counter(), time.process_time()
        kept = self.attempt(index)
        self.total += time.perf_counter() - started
        self.cpu += time.process_time() - cpu_started
        self.attempts += 1
        self.accepted += kept

    def reset(self) -> None:
        """Forget the warm-up: times, counts, stage times and bytes start again from zero."""
        self.total = self.cpu = 0.0
        self.accepted = self.attempts = 0


class OurGenerator(TimedGenerator):
    """Our builder, writing into an open :class:`ShardWriter`."""

    def __init__(self, name: str, bank, images: Path, config: BuildConfig, objects: int, writer: ShardWriter):
        super().__init__(name)
        self.builder, self.sampler = PairBuilder(bank, images, config), Sampler(bank, config)
        self.objects, self.quality, self.writer = objects, config.jpeg_quality, writer
        self.encode, self.bytes_before = 0.0, 0

    def attempt(self, index: int) -> bool:
        try:
            sample = self.builder.build(self.sampler.plan(attempt_rng(0, 0, index), self.objects), f"{index:06d}")
        except Rejected:
            return False
        started = time.perf_counter()
        self.writer.write(encode_sample(sample, self.quality))
        self.encode += time.perf_counter() - started
        return True

    def stages(self) -> dict:
        return dict(self.builder.timer.seconds, **{"encode/write": self.encode})

    def bytes_written(self) -> int:
        return self.writer.member_bytes - self.bytes_before

    def reset(self) -> None:
        super().reset()
        self.builder.timer.seconds.clear()
        self.encode, self.bytes_before = 0.0, self.writer.member_bytes


class ReleasedGenerator(TimedGenerator):
    """The released generator's steps, writing its four files per pair to ``out_dir``."""

    def __init__(self, name: str, steps: ReleasedGeneratorSteps, sampler: Sampler, objects: int, out_dir: Path):
        super().__init__(name)
        self.steps, self.sampler, self.objects, self.out_dir = steps, sampler, objects, out_dir
        self.bytes_before = 0

    def attempt(self, index: int) -> bool:
        plan = self.sampler.plan(attempt_rng(0, 0, index), self.objects)
        return self.steps.build(plan, self.out_dir, f"{index:06d}")

    def stages(self) -> dict:
        return dict(self.steps.seconds)

    def _written(self) -> int:
        return sum(path.stat().st_size for path in self.out_dir.iterdir())

    def bytes_written(self) -> int:
        return self._written() - self.bytes_before

    def reset(self) -> None:
        super().reset()
        self.steps.seconds.clear()
        self.bytes_before = self._written()


def interleave(generators: list, pairs: int, block: int = 10, warm_up: int = 5) -> None:
    """Run the generators in turns of ``block`` consecutive attempts each, in an order that
    rotates, until each has kept ``pairs`` pairs after ``warm_up`` attempts each. Every generator
    meets the same slow and fast spells of a shared machine, so their ratios hold even when its
    speed drifts (whole runs one after the other moved them by 10 % and more here), and each
    runs warm within its turn, as in a build (attempt by attempt, every generator ran 20-40 %
    slower, evicted from the caches by the others)."""
    for generator in generators:
        for index in range(warm_up):
            generator.timed(index)
        generator.reset()
    start = warm_up
    while any(generator.accepted < pairs for generator in generators):
        shift = (start // block) % len(generators)
        for generator in generators[shift:] + generators[:shift]:
            for index in range(start, start + block):
                if generator.accepted < pairs:
                    generator.timed(index)
        start += block


def codec_floors(images: Path, quality: int, size: int = 480, count: int = 40, repeats: int = 3) -> dict:
    """Milliseconds per pair that JPEG decoding (two inputs, as the builder loads them) and JPEG
    encoding (two size x size outputs) take alone on the first ``count`` images: the stages'
    floors. Best of ``repeats``."""
    from datagen.format.imageio import load_rgb
    from datagen.format.schema import encode_jpeg

    paths = sorted(images.glob("*.jpg"))[:count]
    resized = [cv2.resize(load_rgb(path), (size, size), interpolation=cv2.INTER_LINEAR) for path in paths]
    best = {"decode": float("inf"), "encode": float("inf")}
    for _ in range(repeats):
        started = time.perf_counter()
        for path in paths:
            load_rgb(path)
        best["decode"] = min(best["decode"], time.perf_counter() - started)
        started = time.perf_counter()
        for image in resized:
            encode_jpeg(image, quality)
        best["encode"] = min(best["encode"], time.perf_counter() - started)
    return {stage: 2000 * seconds / len(paths) for stage, seconds in best.items()}


GENERATORS = {
    "poisson": "ours (DST Poisson solver, TPS on half the pairs: the paper's default)",
    "poisson-no-tps": "ours with no TPS (the released scripts' work)",
    "cv2": "ours with --blend cv2",
    "released": "released generator's steps (baseline, no TPS)",
}


def generator_config(method: str, objects: int) -> BuildConfig:
    """Our build config for one of :data:`GENERATORS` (the baseline samples its plans from it too)."""
    warp = WarpConfig(tps_prob=0.0) if method == "poisson-no-tps" else WarpConfig()
    return BuildConfig(objects=str(objects), style="none", blend="cv2" if method == "cv2" else "poisson", warp=warp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=300, help="accepted pairs per generator")
    parser.add_argument("--objects", type=int, choices=(1, 2), default=1,
                        help="objects per pair (the baseline: the released one- or two-object script)")
    parser.add_argument("--data", default="sample",
                        help="'sample' (the embedded 400 px sample) or a coco-mini "
                             f"folder (640 px originals: {COCO_MINI})")
    args = parser.parse_args()

    cv2.setNumThreads(1)
    annotations, images = source_paths(args.data)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as writers:
        write_bank(CocoSource(annotations, images).scan(), Path(tmp) / "bank")
        bank = SegmentBank.load(Path(tmp) / "bank")
        print(f"data: {annotations.parent} ({len(bank)} segments, {len(bank.images.image_ids)} images); "
              f"{args.pairs} accepted {args.objects}-object pairs at 480 px, style none, 1 thread, "
              f"generators interleaved in turns of 10 attempts")
        generators = []
        for method in GENERATORS:
            config, out_dir = generator_config(method, args.objects), Path(tmp) / method
            out_dir.mkdir()
            if method == "released":
                steps = ReleasedGeneratorSteps(annotations, images, bank, config.image_size, config.stride)
                generators.append(ReleasedGenerator(method, steps, Sampler(bank, config), args.objects, out_dir))
            else:
                writer = writers.enter_context(ShardWriter(out_dir / "shard-000000.tar"))
                generators.append(OurGenerator(method, bank, images, config, args.objects, writer))
        interleave(generators, args.pairs)
        results = {g.name: g for g in generators}
        for generator in generators:
            ms = {k: 1000 * v / generator.accepted for k, v in generator.stages().items()}
            per_pair = 1000 * generator.total / generator.accepted
            print(f"\n{GENERATORS[generator.name]}: {generator.accepted / generator.total:.1f} pairs/s, "
                  f"{per_pair:.1f} ms per accepted pair ({1000 * generator.cpu / generator.accepted:.1f} ms of "
                  f"CPU; {generator.attempts} attempts), "
                  f"{generator.bytes_written() / generator.accepted / 1024:.0f} KB per pair")
            for stage in ("load", "warp", "blend", "correspondences", "encode/write"):
                print(f"  {stage:16s} {ms.get(stage, 0.0):6.2f} ms")
        fast, slow = results["poisson"], results["cv2"]
        print(f"\nblend stage, cv2.seamlessClone / DST solver: "
              f"{slow.stages()['blend'] / fast.stages()['blend']:.2f}x; whole pair: "
              f"{slow.total / slow.accepted / (fast.total / fast.accepted):.2f}x")
        floors = codec_floors(images, BuildConfig().jpeg_quality)
        print(f"floors, alone on the same images: decoding the two input JPEGs {floors['decode']:.1f} ms, "
              f"encoding the two output JPEGs {floors['encode']:.1f} ms per pair")
        if "released" in results:
            per_pair = {name: 1000 * g.total / g.accepted for name, g in results.items()}
            baseline = per_pair["released"]
            print(f"baseline / ours, whole pair ({args.objects} object{'s' * (args.objects > 1)}):")
            print(f"  same work (no TPS):         {baseline / per_pair['poisson-no-tps']:.2f}x faster per core")
            print(f"  with TPS on half the pairs: {baseline / per_pair['poisson']:.2f}x "
                  "(work the baseline does not do)")
        summary = {g.name: {"total": g.total, "cpu": g.cpu, "stages": g.stages(), "accepted": g.accepted,
                            "attempts": g.attempts, "bytes": g.bytes_written()} for g in generators}
        json.dump(summary, sys.stderr, default=float)
        print(file=sys.stderr)


if __name__ == "__main__":
    main()
