"""Running a build: the segment bank, shard tasks over joblib workers, resume, the manifest.

A build of ``n`` samples is cut into shards of ``config.shard_size`` samples. Shard ``k`` is a
pure function of (config, bank, root seed, k): attempt ``a`` of shard ``k`` draws from
``SeedSequence(root_seed, spawn_key=(k, a))``. A shard is done when its stats marker is on disk
and agrees with the build, so re-running the same command after a crash rebuilds only the
missing shards, and a larger ``n`` adds shards (and refills a last, partial shard).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import sys
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
from joblib import Parallel, delayed
from tqdm import tqdm

from datagen.config import BuildConfig
from datagen.format.hashing import canonical_json, config_hash
from datagen.format.manifest import (
    build_manifest,
    make_stats,
    read_stats,
    samples_name,
    stats_name,
    write_manifest,
    write_sample_rows,
    write_stats,
)
from datagen.build.lock import OutputLock, die_with_parent, sigterm_as_interrupt
from datagen.synth.pairs import PairBuilder, Rejected
from datagen.synth.sampling import Sampler, attempt_rng, objects_for_attempt
from datagen.format.schema import encode_sample
from datagen.segments.bank import SegmentBank, write_bank
from datagen.format.shards import ShardWriter, parse_shard_index, sample_key, shard_name
from datagen.format.hashing import sha256_file
from datagen.segments import RUNTIME_OPTIONS, get_source, source_inputs
from datagen.style import NO_STYLE, make_stylizer
from datagen.style.pipeline import LocalStyler, RemoteStyler, StyleServer

BANK_DIR = "bank"
BANK_INPUTS = "inputs.json"


class BuildError(RuntimeError):
    """A build cannot go on (a whole shard failing, an output directory of another build)."""


@dataclass(frozen=True)
class SourceSpec:
    """Where segments come from: a source name and its options (paths are not hashed; runtime
    options such as the device are not recorded)."""

    name: str
    options: dict

    def to_json(self) -> dict:
        return {"name": self.name, "options": {k: str(v) for k, v in sorted(self.options.items())
                                               if k not in RUNTIME_OPTIONS}}


@dataclass(frozen=True)
class StyleSpec:
    """Options of the stylizer (``config.style``): style folder, weights, device. Not hashed;
    what they resolve to (the style images' and weights' checksums) is part of the inputs."""

    options: dict

    def make(self, config: BuildConfig):
        """The stylizer of ``config.style``, or None for 'none'. Made once per process: the
        build's own check and an in-process shard share one (its networks load once)."""
        if config.style == NO_STYLE:
            return None
        options = {k: v for k, v in self.options.items() if v is not None}
        key = (config.style, tuple(sorted(options.items())))
        if key not in _STYLIZERS:
            _STYLIZERS.clear()
            _STYLIZERS[key] = make_stylizer(config.style, **options)
        return _STYLIZERS[key]

    def styler(self, config: BuildConfig) -> LocalStyler | None:
        """This process's stylizer on a background thread, or None for 'none'."""
        stylizer = self.make(config)
        return None if stylizer is None else LocalStyler(stylizer)


_STYLIZERS: dict = {}


def style_identity(description: dict | None) -> dict | None:
    """What makes stylised bytes differ: the method, the style images and the weights."""
    if description is None:
        return None
    weights = description.get("weights") or {}
    return {"method": description["method"], "styles_sha256": description.get("styles_sha256"),
            "weights": {name: entry.get("sha256") for name, entry in sorted(weights.items())}}


def inputs_checksum(source_sha256: str, style: dict | None) -> str:
    """One checksum of everything a build reads besides its config: the source's inputs (COCO:
    the annotation file's sha256), and the style images and weights when there is a style."""
    if style is None:
        return source_sha256
    # the key stays "annotations" (COCO's), so that shard sets built before other sources stay current
    return hashlib.sha256(canonical_json({"annotations": source_sha256, "style": style}).encode()).hexdigest()


def source_record(spec: SourceSpec, config: BuildConfig) -> dict:
    """The inputs record of a source (options, its checksums and settings, image root), found
    without loading the source: resuming a big build must not parse annotations or run LOST again.
    ``source_sha256`` is one checksum of the source's inputs (see :class:`~datagen.segments.bank.SourceInputs`)."""
    inputs = source_inputs(spec.name, **spec.options)
    return {
        "source": spec.to_json(),
        "min_area": config.min_area,
        **inputs.record,
        "source_sha256": inputs.sha256,
        "image_root": str(inputs.image_root),
    }


def current_bank(bank_dir: Path, record: dict) -> dict | None:
    """The bank's stored inputs record if ``bank_dir`` holds a bank of exactly these inputs."""
    inputs_path = bank_dir / BANK_INPUTS
    if not inputs_path.is_file():
        return None
    previous = json.loads(inputs_path.read_text())
    return previous if {k: previous.get(k) for k in record} == record else None


def prepare_bank(spec: SourceSpec, config: BuildConfig, bank_dir: Path, log=print, record=None,
                 source=None) -> dict:
    """Scan the source into ``bank_dir`` unless a bank of the same inputs is already there.

    ``record`` / ``source``: the source's :func:`source_record` and the loaded source, when the
    caller has them already. Returns the inputs record (with the bank's counts).
    """
    record = dict(record or source_record(spec, config))
    previous = current_bank(bank_dir, record)
    if previous is not None:
        return previous
    source = source or get_source(spec.name, min_area=config.min_area, **spec.options)
    options = ", ".join(f"{k}={v}" for k, v in spec.to_json()["options"].items())
    log(f"scanning {spec.name} segments ({options}) ...")
    summary = write_bank(source.scan(), bank_dir)
    record["bank"] = {"segments": summary.segments, "images": summary.images, "skipped": summary.skipped}
    (bank_dir / BANK_INPUTS).write_text(json.dumps(record, indent=2, sort_keys=True))
    log(f"segment bank: {summary.segments} segments, {summary.images} images, {summary.skipped} skipped "
        f"(see {bank_dir / 'skipped.parquet'})")
    return record


def plan_shards(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[(shard index, samples)] for ``n`` samples: full shards, then a partial last one."""
    return [(k, min(shard_size, n - k * shard_size)) for k in range((n + shard_size - 1) // shard_size)]


_WORKER_CACHE: dict = {}


def _worker_state(bank_dir: str, image_root: str, config: BuildConfig, inputs_sha256=None):
    """Bank, sampler and builder of this process, loaded once and reused by its shards (until
    the inputs change: a rescan into the same ``bank_dir`` must not reuse the old bank)."""
    key = (bank_dir, image_root, config, inputs_sha256)
    if key not in _WORKER_CACHE:
        _WORKER_CACHE.clear()
        bank = SegmentBank.load(bank_dir)
        _WORKER_CACHE[key] = (Sampler(bank, config), PairBuilder(bank, Path(image_root), config))
    return _WORKER_CACHE[key]


def draw_style(rng, styler, config: BuildConfig) -> dict:
    """Style image and strength of each image of a pair, drawn after the pair's plan so that the
    pair itself is the same with or without a style."""
    names = styler.style_names
    choice = {"method": config.style}
    for side in ("src", "tgt"):
        index = int(rng.integers(styler.n_styles))
        choice[side] = {"style": index, "name": names[index] if names else None,
                        "alpha": float(rng.random() * config.style_alpha_max)}
    return choice


def submit_style(styler, samples: list):
    """Start stylising both images of every sample (one request); None when there is nothing to do."""
    if styler is None or not samples:
        return None
    images = [image for sample in samples for image in (sample.src_image, sample.tgt_image)]
    styles = [sample.meta["style"][side]["style"] for sample in samples for side in ("src", "tgt")]
    alphas = [sample.meta["style"][side]["alpha"] for sample in samples for side in ("src", "tgt")]
    return styler.submit(images, styles, alphas)


def collect_style(job, samples: list) -> None:
    """Fill ``src_style_image``/``tgt_style_image`` of ``samples`` from their finished job."""
    if job is None:
        return
    stylised = job.result()
    for k, sample in enumerate(samples):
        sample.src_style_image, sample.tgt_style_image = stylised[2 * k], stylised[2 * k + 1]


def build_shard(shard: int, count: int, config: BuildConfig, bank_dir: str, image_root: str,
                root_seed: int, out_dir: str, inputs_sha256: str | None = None,
                style: StyleSpec | RemoteStyler | None = None, progress=None, build_pid: int | None = None) -> dict:
    """Build shard ``shard`` with ``count`` samples into ``out_dir``; returns its stats.

    ``inputs_sha256`` (the inputs' checksum) is recorded in the stats, so that shards of
    other inputs are never taken for finished ones. ``style``: where stylisation happens, this
    process's stylizer (:class:`StyleSpec`) or the build's style server (:class:`RemoteStyler`).
    Every ``config.style_batch`` accepted pairs are sent to the stylizer together; the next
    batch is built while they are stylised, and they are written when it is ready.

    Writes the tar, then the per-attempt parquet, then the stats marker (last). A rejected or
    failing attempt is recorded and the shard goes on; ``config.max_attempts`` failures in a
    row stop it with :class:`BuildError` (something is wrong with every input, not one).

    ``build_pid``: the build's process; a worker process it started kills itself when it is gone
    (:func:`datagen.build.lock.die_with_parent`), so that no shard is written after a build is killed.
    """
    if build_pid is not None:
        die_with_parent(build_pid)
    cv2.setNumThreads(1)
    sampler, builder = _worker_state(bank_dir, image_root, config, inputs_sha256)
    styler = (style or StyleSpec({})).styler(config) if config.style != NO_STYLE else None
    chash = config_hash(config)
    out = Path(out_dir)
    rows, rejected, pending = [], Counter(), []
    in_flight: list[tuple] = []  # (samples and rows, style job) sent to the stylizer, not yet written
    accepted = attempt = failures = 0

    def write_done():
        """Write the batch in flight (waiting for its stylised images), in order."""
        for batch, job in in_flight:
            collect_style(job, [sample for sample, _ in batch])
            for sample, row in batch:
                written = writer.write(encode_sample(sample, config.jpeg_quality))
                row.update(bytes=written.bytes, sha256=written.sha256)
                if progress is not None:
                    progress(1)
        in_flight.clear()

    def flush():
        """Send the pending samples to the stylizer, then write the previous batch."""
        batch = list(pending)
        pending.clear()
        job = submit_style(styler, [sample for sample, _ in batch])
        write_done()
        in_flight.append((batch, job))

    with contextlib.ExitStack() as stack:
        if styler is not None:
            stack.enter_context(styler)
            # a shard that fails leaves no request memory behind (a finished one has none in flight)
            stack.callback(lambda: [job.discard() for _, job in in_flight if job is not None])
        writer = stack.enter_context(ShardWriter(out / shard_name(shard)))
        while accepted < count:
            rng = attempt_rng(root_seed, shard, attempt)
            objects = objects_for_attempt(rng, config.objects)
            key = sample_key(shard, accepted)
            row = {"shard": shard, "attempt": attempt, "objects": objects, "bytes": 0,
                   "seed": f"root={root_seed} shard={shard} attempt={attempt}"}
            try:
                plan = sampler.plan(rng, objects)
                row.update(source_image_id=plan.source_image, background_image_id=plan.background_image,
                           segment_ids=[int(sampler.bank.segment_ids[o.segment_row]) for o in plan.objects],
                           category_ids=[int(sampler.bank.category_ids[o.segment_row]) for o in plan.objects])
                sample = builder.build(plan, key)
                sample.meta.update(config_hash=chash, seed={"root": root_seed, "shard": shard, "attempt": attempt})
                if styler is not None:
                    sample.meta["style"] = draw_style(rng, styler, config)
                row.update(key=key, status="accepted")
                pending.append((sample, row))
                accepted += 1
                failures = 0
            except Exception as error:  # noqa: BLE001 - one bad input never kills a shard
                reason = error.reason if isinstance(error, Rejected) else f"error:{type(error).__name__}"
                detail = error.detail if isinstance(error, Rejected) else str(error)
                row.update(status="rejected", reason=f"{reason}: {detail}" if detail else reason)
                rejected[reason] += 1
                failures += 1
                if failures >= config.max_attempts:
                    common = ", ".join(f"{name} {count}" for name, count in rejected.most_common(3))
                    raise BuildError(f"shard {shard_name(shard)}: {failures} attempts in a row failed; "
                                     f"most common: {common}; last: {row['reason']}") from error
            rows.append(row)
            attempt += 1
            if len(pending) >= config.style_batch or accepted == count:
                flush()
        write_done()
    write_sample_rows(rows, out / samples_name(shard))
    stats = make_stats(shard_index=shard, samples=accepted, attempted=attempt, rejected=dict(rejected),
                       bytes=writer.bytes, sha256=writer.sha256, config_hash=chash, root_seed=root_seed,
                       inputs_sha256=inputs_sha256)
    write_stats(out / stats_name(shard), stats)
    return stats


def same_build(stats: dict, chash: str, root_seed: int, inputs_sha256: str | None) -> bool:
    """Whether a shard's stats come from this build: same config, root seed and annotations."""
    return (stats["config_hash"] == chash and stats.get("root_seed") == root_seed
            and stats.get("inputs_sha256") == inputs_sha256)


def shard_is_done(out: Path, shard: int, count: int, chash: str, root_seed: int,
                  inputs_sha256: str | None = None, log=None) -> dict | None:
    """The shard's stats if it is complete for this build (marker present, same build and
    count, and the tar's own bytes: its size and sha256 as the stats record them), else None.
    ``log`` hears of a shard whose bytes changed after it was written (it is rebuilt)."""
    stats = read_stats(out / stats_name(shard))
    tar = out / shard_name(shard)
    if stats is None or not tar.is_file():
        return None
    if not (same_build(stats, chash, root_seed, inputs_sha256) and stats["samples"] == count):
        return None
    if tar.stat().st_size != stats["bytes"] or sha256_file(tar) != stats["sha256"]:
        if log is not None:
            log(f"{tar.name}: its bytes differ from the checksum recorded when it was written; rebuilding it")
        return None
    return stats


def check_out_dir(out: Path, chash: str, root_seed: int, overwrite: bool,
                  inputs_sha256: str | None = None) -> None:
    """Refuse to mix shards of another config, seed or inputs into ``out`` unless ``overwrite``."""
    for path in sorted(out.glob("shard-*.stats.json")):
        stats = read_stats(path)
        if stats is None or overwrite:
            continue
        theirs = stats.get("inputs_sha256")
        if not same_build(stats, chash, root_seed, inputs_sha256):
            raise BuildError(
                f"{out} holds shards of another build ({path.name}: config {stats['config_hash'][:12]}, "
                f"seed {stats.get('root_seed')}, annotations {str(theirs)[:12]}; "
                f"this build: config {chash[:12]}, seed {root_seed}, annotations {str(inputs_sha256)[:12]}). "
                "Use another --out, or --overwrite to replace them.")


def _run_parallel(tasks, workers: int, bar, style: StyleSpec, served_stylizer=None, log=print) -> list[dict]:
    """Run shard tasks on ``workers`` processes; per-sample progress flows back through a queue.

    ``served_stylizer``: a stylizer of this process that every worker uses through a
    :class:`StyleServer` (a GPU one); else each worker makes its own from ``style``."""
    from multiprocessing.managers import SyncManager

    manager = SyncManager()
    manager.start(die_with_parent, (os.getpid(),))  # its server process goes with a killed build too
    updates = manager.Queue()
    stop = threading.Event()

    def drain():
        while not stop.is_set() or not updates.empty():
            try:
                bar.update(updates.get(timeout=0.2))
            except queue.Empty:
                continue

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        with contextlib.ExitStack() as stack:
            server = (stack.enter_context(StyleServer(served_stylizer, manager))
                      if served_stylizer is not None else None)
            jobs = (delayed(build_shard)(*task, style=server.styler() if server else style,
                                         progress=updates.put, build_pid=os.getpid()) for task in tasks)
            built = list(Parallel(n_jobs=workers, return_as="generator_unordered")(jobs))
        if server is not None:
            log(f"style server: {server.served} requests, stylising {server.busy_seconds:.1f} s of "
                f"{server.open_seconds:.1f} s ({100 * server.busy_seconds / max(server.open_seconds, 1e-9):.0f}% busy)")
        return built
    finally:
        stop.set()
        reader.join()
        manager.shutdown()


def serve_style(stylizer, workers: int, serve: bool | None) -> bool:
    """Whether the workers share this process's stylizer through a :class:`StyleServer`:
    ``serve`` if given, else when there are several workers and the stylizer is on a GPU."""
    if stylizer is None or workers <= 1:
        return False
    if serve is not None:
        return serve
    device = getattr(stylizer, "device", None)
    return getattr(device, "type", None) == "cuda"


def build(config: BuildConfig, spec: SourceSpec, n: int, out_dir, seed: int = 0, workers: int = 1,
          overwrite: bool = False, manifests_dir=None, log=None, show_progress: bool = True,
          style: StyleSpec | None = None, style_server: bool | None = None) -> dict:
    """Build (or resume, or extend) ``n`` samples into ``out_dir``; returns the manifest.

    ``style_server``: whether several workers share one stylizer in this process (see
    :func:`serve_style`; default: when it runs on a GPU). The bytes are the same either way."""
    log = log or (lambda message: print(message, file=sys.stderr))
    config.validate()
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    out = Path(out_dir)
    chash = config_hash(config)
    record = source_record(spec, config)
    # the source is loaded (and a bad annotation file fails) only when the bank must be scanned,
    # and then before --out is touched
    source = None if current_bank(out / BANK_DIR, record) else get_source(
        spec.name, min_area=config.min_area, **spec.options)
    style = style or StyleSpec({})
    stylizer = style.make(config)  # missing weights or style images fail here too
    style_description = stylizer.describe() if stylizer is not None else None
    inputs_sha256 = inputs_checksum(record["source_sha256"], style_identity(style_description))
    if manifests_dir is not None:
        check_writable(Path(manifests_dir), "--manifests-dir")
    check_writable(out, "--out")
    with OutputLock(out, "datagen build"), sigterm_as_interrupt():
        _remove_leftovers(out)
        check_out_dir(out, chash, seed, overwrite, inputs_sha256)
        inputs = prepare_bank(spec, config, out / BANK_DIR, log, record=record, source=source)
        bank_dir, image_root = str(out / BANK_DIR), inputs["image_root"]

        shards = plan_shards(n, config.shard_size)
        done = {k: s for k, c in shards
                if (s := shard_is_done(out, k, c, chash, seed, inputs_sha256, log)) is not None}
        todo = [(k, c, config, bank_dir, image_root, seed, str(out), inputs_sha256)
                for k, c in shards if k not in done]
        if done:
            log(f"resuming: {len(done)} of {len(shards)} shards already complete")
        extra = sorted(p.name for p in out.glob("shard-*.tar") if parse_shard_index(p.name) >= len(shards))
        if extra:
            log(f"warning: {len(extra)} shards beyond this build's {len(shards)} are left out of the manifest: "
                f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")

        total = sum(c for k, c, *_ in todo)
        workers = max(1, min(workers, len(todo)))
        with tqdm(total=total, unit="pair", desc="pairs", disable=not show_progress or total == 0,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            if workers == 1:
                built = [build_shard(*task, style=style, progress=bar.update) for task in todo]
            else:
                served = stylizer if serve_style(stylizer, workers, style_server) else None
                if served is not None:
                    device = getattr(served, "device", "the CPU")
                    log(f"style server: {workers} workers share one stylizer on {device}")
                built = _run_parallel(todo, workers, bar, style, served, log)
        all_stats = list(done.values()) + built
        inputs_record = {"segments": spec.to_json(), **{k: v for k, v in inputs.items() if k != "source"},
                         "style": style_description, "inputs_sha256": inputs_sha256}
        manifest = build_manifest(config=config, root_seed=seed, inputs=inputs_record, shard_stats=all_stats,
                                  n_requested=n)
        write_manifest(manifest, out, manifests_dir)
    return manifest


def check_writable(directory: Path, option: str) -> None:
    """Fail before any work when ``directory`` cannot be made or written in (a read-only file
    system, a file in the way), rather than after hours of shards."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise BuildError(f"{option} {directory}: cannot write there ({error.strerror or error})") from None


def _remove_leftovers(out: Path) -> None:
    """Remove the temporary files of shards that a killed build left (no other writer can exist
    while the lock is held)."""
    for path in [*out.glob("shard-*.tmp"), out / "manifest.json.tmp"]:
        path.unlink(missing_ok=True)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
