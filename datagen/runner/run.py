"""A build from start to end: check the inputs, take the lock on ``--out``, prepare the bank,
find what is already done, run the remaining shard tasks on a distributor, write the manifest.

The parts live in their own modules: :mod:`~datagen.runner.inputs` (source options, inputs record,
bank), :mod:`~datagen.runner.styling` (style options and the style step), :mod:`~datagen.runner.task`
(one shard), :mod:`~datagen.runner.distribute` (where tasks run), :mod:`~datagen.runner.resume`
(what is on disk already) and :mod:`~datagen.runner.lock`. The names a caller needs are importable
from here: :func:`build`, :class:`SourceSpec`, :class:`StyleSpec`, :class:`BuildError`.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from datagen.config import BuildConfig
from datagen.format.hashing import config_hash
from datagen.format.manifest import (
    MANIFEST_NAME,
    ManifestError,
    build_manifest,
    load_manifest,
    version_differences,
    write_manifest,
)
from datagen.runner.distribute import CLUSTER_STAGING_DIR, Distributor, local_distributor
from datagen.runner.errors import BuildError
from datagen.runner.inputs import (
    BANK_DIR,
    SourceSpec,
    inputs_checksum,
    prepare_bank,
    source_record,
    source_to_scan,
    style_identity,
)
from datagen.runner.lock import OutputLock, sigterm_as_interrupt
from datagen.runner.resume import BuildIdentity, check_out_dir, finished_shards, remove_leftovers, shards_beyond
from datagen.runner.styling import StyleOptions, StyleSpec
from datagen.runner.task import ShardTask, plan_shards

__all__ = ["BuildError", "SourceSpec", "StyleOptions", "StyleSpec", "build", "check_writable", "default_workers"]


def build(config: BuildConfig, spec: SourceSpec, n: int, out_dir, seed: int = 0, workers: int = 1,
          overwrite: bool = False, manifests_dir=None, log=None, show_progress: bool = True,
          style: StyleSpec | None = None, style_server: bool | None = None,
          distributor: Distributor | None = None) -> dict:
    """Build (or resume, or extend) ``n`` samples into ``out_dir``; returns the manifest.

    ``style``: the stylizer's options when ``config.style`` is not 'none'. ``style_server``:
    whether several workers share one stylizer in this process (see
    :func:`~datagen.runner.styling.serve_style`; default: when it runs on a GPU). The bytes are the
    same either way. ``distributor``: where the shard tasks run (default: this machine, on
    ``workers`` processes, see :func:`~datagen.runner.distribute.local_distributor`).
    """
    log = log or (lambda message: print(message, file=sys.stderr))
    config.validate()
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    out = Path(out_dir)
    record = source_record(spec, config)
    # the source is loaded (and a bad annotation file fails) only when the bank must be scanned,
    # and then before --out is touched
    source = source_to_scan(spec, config, out / BANK_DIR, record)
    style = style or StyleSpec()
    stylizer = style.make(config)  # missing weights or style images fail here too
    style_description = stylizer.describe() if stylizer is not None else None
    identity = BuildIdentity(config_hash(config), seed,
                             inputs_checksum(record["source_sha256"], style_identity(style_description)))
    if manifests_dir is not None:
        check_writable(Path(manifests_dir), "--manifests-dir")
    check_writable(out, "--out")
    with OutputLock(out, "datagen build"), sigterm_as_interrupt():
        remove_leftovers(out)
        # a killed cluster build's attempt folders: an attempt still running there can no longer publish
        shutil.rmtree(out / CLUSTER_STAGING_DIR, ignore_errors=True)
        check_out_dir(out, identity, overwrite)
        inputs = prepare_bank(spec, config, out / BANK_DIR, log, record=record, source=source)

        shards = plan_shards(n, config.shard_size)
        done = finished_shards(out, shards, identity, log)
        tasks = [ShardTask(k, count, config, str(out / BANK_DIR), inputs["image_root"], seed, str(out),
                           identity.inputs_sha256, style) for k, count in shards if k not in done]
        if done:
            log(f"resuming: {len(done)} of {len(shards)} shards already complete")
            for line in versions_since_last_manifest(out):
                log(f"warning: {line}; the new shards may not match bytes the old ones would have had")
        extra = shards_beyond(out, len(shards))
        if extra:
            log(f"warning: {len(extra)} shards beyond this build's {len(shards)} are left out of the manifest: "
                f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")

        total = sum(task.count for task in tasks)
        distributor = distributor or local_distributor(max(1, min(workers, len(tasks))), stylizer, style_server, log)
        with tqdm(total=total, unit="pair", desc="pairs", disable=not show_progress or total == 0,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            built = distributor.run(tasks, bar.update)
        inputs_record = {"segments": spec.to_json(), **{k: v for k, v in inputs.items() if k != "source"},
                         "style": style_description, "inputs_sha256": identity.inputs_sha256}
        manifest = build_manifest(config=config, root_seed=seed, inputs=inputs_record,
                                  shard_stats=list(done.values()) + built, n_requested=n)
        write_manifest(manifest, out, manifests_dir)
    return manifest


def versions_since_last_manifest(out: Path) -> list[str]:
    """The package versions that differ from those of the manifest already in ``out`` (a resumed
    or extended set), each with what it decides in the bytes; empty when there is none."""
    try:
        manifest = load_manifest(out / MANIFEST_NAME)
    except ManifestError:
        return []
    return version_differences(manifest.get("versions") or {})


def check_writable(directory: Path, option: str) -> None:
    """Fail before any work when ``directory`` cannot be made or written in (a read-only file
    system, a file in the way), rather than after hours of shards."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise BuildError(f"{option} {directory}: cannot write there ({error.strerror or error})") from None


def default_workers() -> int:
    """The CPU cores this process may run on (the ``--workers`` default)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
