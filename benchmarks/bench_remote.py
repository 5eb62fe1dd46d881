"""Samples per second of the trainer's reader on a shard set read from local files and from a
loopback HTTP server (Python's ``http.server``, no range requests), in the same run.

    python benchmarks/bench_remote.py [--pairs 400] [--shard-size 50] [--rounds 3]

Builds ``--pairs`` unstylised pairs from the embedded sample into a temporary folder, serves it,
then reads every sample through ``trainer.data.iter_raw`` with the manifest's checksums (what
``trainer fit`` does by default: a local shard is hashed and then read, a remote one is fetched
once, hashed on the way in, and read from its spool) and through the full example pipeline
(decode, resize to 480 px, batches), alternating local and remote each round. Prints samples/s of
each and their ratio.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from datagen.cli import SAMPLE_ROOT
from datagen.config import BuildConfig
from datagen.format.shardset import resolve_shard_set
from datagen.runner.run import SourceSpec, build
from trainer.config import TrainConfig
from trainer.data import iter_raw, make_loader, manifest_checksums


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def read_all(spec) -> tuple[int, float]:
    """(samples, seconds) of one pass over the set's raw samples, shards checked."""
    found = resolve_shard_set(spec)
    checksums = manifest_checksums(found)
    started = time.perf_counter()
    count = sum(1 for _ in iter_raw([str(tar) for tar in found.tars], lambda url, error: print(url, error), checksums))
    return count, time.perf_counter() - started


def pipeline(spec, samples: int) -> float:
    """Seconds to take ``samples`` examples through the training pipeline (one process)."""
    config = TrainConfig(positives=10, image_size=480, shuffle_buffer=20)
    batches = iter(make_loader(spec, config, workers=0))
    started = time.perf_counter()
    for _ in range(samples // config.positives):
        next(batches)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "www"
        out = root / "set"
        source = SourceSpec("coco", {"root": SAMPLE_ROOT, "split": "train2017"})
        build(BuildConfig(shard_size=args.shard_size, style="none"), source, args.pairs, out, workers=2,
              show_progress=False, log=lambda message: None)
        shutil.rmtree(out / "bank")
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=root))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_port}/set"
        size = sum(p.stat().st_size for p in out.glob("shard-*.tar")) / 1e6
        print(f"{args.pairs} pairs in {len(list(out.glob('shard-*.tar')))} shards, {size:.1f} MB", file=sys.stderr)
        raw = {"local": [], "http": []}
        full = {"local": [], "http": []}
        for _ in range(args.rounds):
            for name, spec in (("local", out), ("http", url)):
                count, seconds = read_all(spec)
                raw[name].append(count / seconds)
                full[name].append(min(args.pairs, 200) / pipeline(spec, min(args.pairs, 200)))
        server.shutdown()
    for label, table in (("raw samples, shards checked", raw), ("training examples (decode, 480 px)", full)):
        local, remote = max(table["local"]), max(table["http"])
        print(f"{label}: local {local:.0f}/s, loopback HTTP {remote:.0f}/s (http / local {remote / local:.2f}; "
              f"best of {args.rounds})")


if __name__ == "__main__":
    main()
