"""Sparse NC-Net: time and peak memory of the sparse 4-D consensus against the dense one.

    python benchmarks/bench_ncnet.py [--grids 30 40] [--k 10] [--batch 1] [--repeats 3] [--device cpu]

Input: one pair (``--batch`` pairs) of 1024-channel L2-normalised features whose target is the
source moved by 3 and 2 cells plus noise (smooth random fields, so that the top-k sites cluster as
real matches do). For each grid h x h:

- sparse: the sparse correlation (top-k in both directions) and its kernel map ("build"), then the
  network's consensus (ReLU, sparse conv 1->16, ReLU, sparse conv 16->1, ReLU, symmetric mode) and
  heads (forward), and the backward pass of a random linear function of the outputs;
- dense: the same consensus on the dense 4-D tensor (NC-Net's Conv4d made of conv3d, as in
  tests/dense_conv4d.py, masked to the same sites after every layer, symmetric mode run on the
  swapped tensor), forward and backward; skipped with ``--skip-dense`` or when it fails (memory).

Each measurement runs in a fresh process. Peak memory comes from a first, untimed run: the peak
resident memory above what the process held before it (Linux /proc/self/clear_refs, with glibc
told to return freed blocks at once), or torch.cuda.max_memory_allocated on CUDA. Times are medians
of ``--repeats`` sparse (``--dense-repeats`` dense) runs after it. Nothing here asserts anything
about speed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from dense_conv4d import dense_consensus  # noqa: E402

from trainer.config import NCNetConfig  # noqa: E402
from trainer.models.ncnet import SparseNCNet, sparse_correlation  # noqa: E402
from trainer.models.sparse4d import build_kernel_map, to_dense  # noqa: E402

CHANNELS = 1024


def shifted_features(batch: int, grid: int, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1024, grid, grid) source and target features: the target is the source moved by (3, 2)
    cells plus noise, both smooth random fields (5 x 5 box filter), L2-normalised."""
    g = torch.Generator().manual_seed(seed)
    field = F.avg_pool2d(torch.randn(batch, CHANNELS, grid + 9, grid + 9, generator=g), 5, stride=1)
    src = field[:, :, :grid, :grid]
    tgt = field[:, :, 3:grid + 3, 2:grid + 2] + 0.5 * F.avg_pool2d(
        torch.randn(batch, CHANNELS, grid + 4, grid + 4, generator=g), 5, stride=1)
    return F.normalize(src, dim=1).to(device), F.normalize(tgt, dim=1).to(device)


class Meter:
    """Peak memory of the work between :meth:`start` and :meth:`peak`, in MiB."""

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # resets the peak resident size (VmHWM) to the current one
            self.base = self._status("VmRSS")

    def peak(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20
        return (self._status("VmHWM") - self.base) / 2 ** 20


def timed(function, sync) -> tuple[object, float]:
    started = time.perf_counter()
    result = function()
    sync()
    return result, time.perf_counter() - started


def build_sparse(model: SparseNCNet, src: torch.Tensor, tgt: torch.Tensor) -> tuple:
    """The sparse correlation of a pair of feature maps and its kernel map."""
    correlation = sparse_correlation(src, tgt, model.config.k)
    return correlation, build_kernel_map(correlation.keys, correlation.shape, model.consensus.kernel_size)


def measure(kind: str, grid: int, k: int, batch: int, repeats: int, device_name: str) -> dict:
    """One kind ('sparse' or 'dense') at one grid: seconds of each phase, peak MiB, sizes."""
    device = torch.device(device_name)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = SparseNCNet(NCNetConfig(k=k)).to(device)
    src, tgt = shifted_features(batch, grid, device)
    meter = Meter(device)
    phases: dict[str, list[float]] = {}
    record: dict = {"kind": kind, "grid": grid, "k": k, "batch": batch}
    with torch.no_grad():
        correlation, kernel_map = build_sparse(model, src, tgt)
    record.update(sites=int(correlation.keys.shape[0]), pairs=kernel_map.pairs,
                  dense_cells=batch * grid ** 4)
    if kind == "dense":
        weights = [conv.weight for conv in model.consensus.convs]
        biases = [conv.bias for conv in model.consensus.convs]
        active = to_dense(torch.ones(len(correlation.keys), 1, device=device), correlation.keys, correlation.shape)
        dense_correlation = torch.einsum("bcn,bcm->bnm", src.flatten(2), tgt.flatten(2)).view(
            batch, 1, grid, grid, grid, grid)

    def step() -> tuple[float, float, float]:
        """Build, forward and backward seconds of one run."""
        model.zero_grad(set_to_none=True)
        if kind == "sparse":
            (sparse, neighbours), build = timed(lambda: build_sparse(model, src, tgt), sync)
            outputs, forward = timed(lambda: model.heads(sparse, model.consensus(sparse.values, neighbours)
                                                         / model.config.temperature), sync)
            loss = sum((out * torch.rand_like(out)).sum() for out in outputs)
        else:
            build = 0.0
            outputs, forward = timed(lambda: dense_consensus(dense_correlation, active, weights, biases,
                                                             symmetric=True), sync)
            loss = (outputs * torch.rand_like(outputs)).sum()
        _, backward = timed(loss.backward, sync)
        return build, forward, backward

    meter.start()  # the memory run, untimed: resetting the peak (clear_refs) slows the accesses after it
    step()
    record["peak_mib"] = meter.peak()
    if kind == "sparse":
        step()  # one more warm-up: the sparse run's small operations are the ones slowed above
    for _ in range(repeats):
        for name, seconds in zip(("build", "forward", "backward"), step()):
            phases.setdefault(name, []).append(seconds)
    record.update({name: statistics.median(values) for name, values in phases.items()})
    return record


def run_child(kind: str, args) -> dict | None:
    """:func:`measure` in a fresh process (a clean memory peak; a dense run that dies is reported)."""
    repeats = args.repeats if kind == "sparse" else args.dense_repeats
    command = [sys.executable, __file__, "--child", kind, "--grids", str(args.grid_now), "--k", str(args.k),
               "--batch", str(args.batch), "--repeats", str(repeats), "--device", args.device,
               "--threads", str(args.threads)]
    # Blocks of 16 KiB and more are mapped and unmapped one by one, so that the resident size follows
    # the memory in use instead of the allocator's reuse of freed blocks.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="16384", MALLOC_TRIM_THRESHOLD_="0")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        print(f"  {kind} at {args.grid_now} x {args.grid_now}: failed ({reason[0]})")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grids", type=int, nargs="+", default=[30, 40])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1, help="pairs per forward")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the sparse network")
    parser.add_argument("--dense-repeats", type=int, default=1, help="timed runs of the dense one")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steady figures on a small shared machine; both kinds use the same)")
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--child", choices=("sparse", "dense"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.child, args.grids[0], args.k, args.batch, args.repeats, args.device)))
        return

    print(f"torch {torch.__version__}, device {args.device}, {args.threads} thread(s), {os.cpu_count()} CPUs; "
          f"k {args.k}, {args.batch} pair(s) per forward; median of {args.repeats} sparse and "
          f"{args.dense_repeats} dense timed run(s)")
    header = (f"{'grid':>6} {'kind':>7} {'sites':>8} {'pairs':>9} {'build s':>8} {'fwd s':>8} {'bwd s':>8} "
              f"{'peak MiB':>9}")
    rows = []
    for grid in args.grids:
        args.grid_now = grid
        for kind in ("sparse",) + (() if args.skip_dense else ("dense",)):
            record = run_child(kind, args)
            if record is not None:
                rows.append(record)
    print(header)
    for r in rows:
        sites = r["sites"] if r["kind"] == "sparse" else r["dense_cells"]
        pairs = r["pairs"] if r["kind"] == "sparse" else "-"
        print(f"{r['grid']:>6} {r['kind']:>7} {sites:>8} {pairs:>9} {r['build']:>8.3f} {r['forward']:>8.3f} "
              f"{r['backward']:>8.3f} {r['peak_mib']:>9.1f}")
    print("sites: active cells of the sparse tensor (dense: every cell, B h^4); pairs: (input, output) site "
          "pairs of the kernel map over its 81 offsets. sparse build = top-k correlation + kernel map; sparse "
          "fwd = consensus + heads; dense fwd = masked dense consensus (no heads).")


if __name__ == "__main__":
    main()
