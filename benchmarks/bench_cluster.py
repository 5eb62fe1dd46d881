"""Pairs per second of a build's shard phase on a local Dask cluster against the local joblib run,
and the cluster's overhead per shard.

    python benchmarks/bench_cluster.py [--pairs 400] [--shard-size 20] [--workers 2] [--rounds 2]

Prepares the embedded sample's segment bank once, then runs the same shard tasks (--style none,
seed 0) on: one process (in process, the baseline of one core), joblib with --workers processes
(a local ``datagen build``), and a ``distributed.LocalCluster`` of --workers one-thread worker
processes on loopback (``datagen build --scheduler``), each writing into a folder of its own,
with the progress callback counting pairs as the build's bar does. Each is run --rounds times in
turns; the first round of each is cold (worker processes start, import and load the bank), the
later ones warm (joblib keeps its processes, the cluster its workers), and the best warm round is
reported. The cluster's overhead per shard is (cluster seconds - joblib seconds) / shards; its
start (scheduler and workers) is timed on its own, being paid once per cluster, not per build.
The shards of every run are checked to be the same bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distributed import LocalCluster  # noqa: E402

from datagen.config import BuildConfig  # noqa: E402
from datagen.runner.dask_distributor import DaskDistributor  # noqa: E402
from datagen.runner.distribute import InProcessDistributor, JoblibDistributor  # noqa: E402
from datagen.runner.run import SourceSpec, build  # noqa: E402
from datagen.runner.task import ShardTask, plan_shards  # noqa: E402

SAMPLE = ROOT / "datagen" / "sample_data" / "coco"


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--shard-size", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each distributor; the first is cold")
    args = parser.parse_args()

    config = BuildConfig(shard_size=args.shard_size, style="none")
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as scratch:
        scratch = Path(scratch)
        bank_build = scratch / "bank-build"
        build(config, SourceSpec("coco", {"root": SAMPLE, "split": "train2017"}), 1, bank_build,
              show_progress=False, log=lambda message: None, manifests_dir=scratch / "manifests")
        inputs = json.loads((bank_build / "manifest.json").read_text())["inputs"]
        shards = plan_shards(args.pairs, args.shard_size)

        def tasks(out: Path) -> list[ShardTask]:
            out.mkdir(parents=True)
            return [ShardTask(k, count, config, str(bank_build / "bank"), inputs["image_root"], 0, str(out),
                              inputs["inputs_sha256"]) for k, count in shards]

        started = time.perf_counter()
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None)
        cluster_start = time.perf_counter() - started
        dask = DaskDistributor(cluster.scheduler_address, log=lambda message: None)
        dask.connect()
        distributors = {"in process (1 core)": InProcessDistributor(),
                        f"joblib, {args.workers} processes": JoblibDistributor(args.workers, log=lambda message: None),
                        f"dask LocalCluster, {args.workers} workers": dask}
        times: dict[str, list[float]] = {name: [] for name in distributors}
        reference = None
        try:
            for _ in range(args.rounds):
                for name, distributor in distributors.items():
                    out = scratch / f"{len(times[name])}-{name.split()[0]}"
                    counted = []
                    started = time.perf_counter()
                    distributor.run(tasks(out), counted.append)
                    times[name].append(time.perf_counter() - started)
                    assert sum(counted) == args.pairs, (name, sum(counted))
                    files = shard_bytes(out)
                    reference = reference or files
                    assert files == reference, f"{name}: other bytes"
        finally:
            dask.close()
            cluster.close()

    print(f"{args.pairs} pairs in {len(shards)} shards of {args.shard_size}, --style none, {os.cpu_count()} CPUs; "
          f"cluster start {cluster_start:.1f} s (once per cluster)")
    for name, runs in times.items():
        warm = best_of(runs)
        print(f"  {name:32s} cold {args.pairs / runs[0]:6.1f} pairs/s ({runs[0]:5.2f} s)   "
              f"warm {args.pairs / warm:6.1f} pairs/s ({warm:5.2f} s)   rounds: "
              + " ".join(f"{seconds:.2f}" for seconds in runs) + " s")
    joblib_name, dask_name = list(times)[1], list(times)[2]
    for label, pick in (("cold", lambda runs: runs[0]), ("warm", best_of)):
        extra = pick(times[dask_name]) - pick(times[joblib_name])
        print(f"  cluster overhead per shard, {label}: {1000 * extra / len(shards):+.0f} ms "
              f"({extra:+.2f} s over {len(shards)} shards; cluster/joblib pairs/s "
              f"{pick(times[joblib_name]) / pick(times[dask_name]):.2f})")
    print("  same shard bytes from every distributor: yes")


def best_of(runs: list[float]) -> float:
    """The best warm run (all but the first), or the only one."""
    return min(runs[1:]) if len(runs) > 1 else runs[0]


if __name__ == "__main__":
    main()
