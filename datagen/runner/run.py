"""A build from start to end: check the inputs, take the lock on ``--out``, prepare the bank,
find what is already done, run the remaining shard tasks on a distributor, write the manifest.

``--out`` is a local folder, or a store URL (``s3://``, ``gs://``; :mod:`~datagen.runner.store`):
then the bank, the lock and the shards in progress live in a local work folder, each shard is
uploaded as it is finished, the manifest last, and the store gets a lock object of its own
(:class:`~datagen.runner.lock.StoreLock`). A local build is unchanged by this.

The parts live in their own modules: :mod:`~datagen.runner.inputs` (source options, inputs record,
bank), :mod:`~datagen.runner.styling` (style options and the style step), :mod:`~datagen.runner.task`
(one shard), :mod:`~datagen.runner.distribute` (where tasks run), :mod:`~datagen.runner.resume`
(what is in the output already), :mod:`~datagen.runner.store` (an output in a store) and
:mod:`~datagen.runner.lock`. The names a caller needs are importable
from here: :func:`build`, :class:`SourceSpec`, :class:`StyleSpec`, :class:`BuildError`.
"""
from __future__ import annotations

import contextlib
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
from datagen.format.storage import Store
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
from datagen.runner.lock import LockedError, OutputLock, StoreLock, sigterm_as_interrupt
from datagen.runner.resume import BuildIdentity, check_out_dir, finished_shards, remove_leftovers, shards_beyond
from datagen.runner.store import clear_uploads, default_work_dir, output_of, upload_dir
from datagen.runner.styling import StyleOptions, StyleSpec
from datagen.runner.task import ShardTask, plan_shards

__all__ = ["BuildError", "SourceSpec", "StyleOptions", "StyleSpec", "build", "check_writable", "default_workers"]


def build(config: BuildConfig, spec: SourceSpec, n: int, out_dir, seed: int = 0, workers: int = 1,
          overwrite: bool = False, manifests_dir=None, log=None, show_progress: bool = True,
          style: StyleSpec | None = None, style_server: bool | None = None,
          distributor: Distributor | None = None, work_dir=None, break_lock: bool = False) -> dict:
    """Build (or resume, or extend) ``n`` samples into ``out_dir``; returns the manifest.

    ``out_dir``: a local folder, or a store URL (``s3://bucket/sets/x``; see
    :mod:`~datagen.runner.store`). For a URL, ``work_dir`` is the local work folder (default
    :func:`~datagen.runner.store.default_work_dir`) and ``break_lock`` takes over the store's
    lock object whoever left it (:class:`~datagen.runner.lock.StoreLock`); both are unused for a
    local folder.

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
    target = output_of(out_dir)  # a URL that cannot be written is refused before any work
    store = None if isinstance(target, Path) else target
    if store is None:
        work = out = target
    else:
        work = Path(work_dir) if work_dir is not None else default_work_dir(store.url)
        out = upload_dir(work, store)  # where shards are written before they are uploaded
    record = source_record(spec, config)
    # the source is loaded (and a bad annotation file fails) only when the bank must be scanned,
    # and then before --out is touched
    source = source_to_scan(spec, config, work / BANK_DIR, record)
    style = style or StyleSpec()
    stylizer = style.make(config)  # missing weights or style images fail here too
    style_description = stylizer.describe() if stylizer is not None else None
    identity = BuildIdentity(config_hash(config), seed,
                             inputs_checksum(record["source_sha256"], style_identity(style_description)))
    if manifests_dir is not None:
        check_writable(Path(manifests_dir), "--manifests-dir")
    check_writable(work, "--out" if store is None else "--work")
    with contextlib.ExitStack() as held:
        held.enter_context(OutputLock(work, "datagen build", "--out" if store is None else "--work"))
        held.enter_context(sigterm_as_interrupt())
        if store is None:
            remove_leftovers(out)
            # a killed cluster build's attempt folders: an attempt still running there can no longer publish
            shutil.rmtree(out / CLUSTER_STAGING_DIR, ignore_errors=True)
        else:
            log(f"building into {store} through the work folder {work} (segment bank, shards in transit)")
            try:  # the first write to the store: no credentials, no bucket or no right to write fail here
                held.enter_context(StoreLock(store, work, "datagen build", break_lock, log))
            except (LockedError, BuildError):
                raise
            except Exception as error:  # noqa: BLE001 - botocore's and gcsfs's errors are not all OSErrors
                raise BuildError(f"--out {store}: cannot write there ({type(error).__name__}: {error})") from error
            clear_uploads(work)  # shards a killed build never uploaded; an attempt still going can no longer upload
            out.mkdir(parents=True, exist_ok=True)
        check_out_dir(target, identity, overwrite)
        inputs = prepare_bank(spec, config, work / BANK_DIR, log, record=record, source=source)

        shards = plan_shards(n, config.shard_size)
        done = finished_shards(target, shards, identity, log)
        tasks = [ShardTask(k, count, config, str(work / BANK_DIR), inputs["image_root"], seed, str(out),
                           identity.inputs_sha256, style, store=None if store is None else store.url)
                 for k, count in shards if k not in done]
        if done:
            log(f"resuming: {len(done)} of {len(shards)} shards already complete")
            for line in versions_since_last_manifest(target):
                log(f"warning: {line}; the new shards may not match bytes the old ones would have had")
        extra = shards_beyond(target, len(shards))
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
        path = write_manifest(manifest, out, manifests_dir)
        if store is not None:  # last: a reader that finds the manifest finds every shard stored
            store.put(path, MANIFEST_NAME)
            clear_uploads(work)
    return manifest


def versions_since_last_manifest(out) -> list[str]:
    """The package versions that differ from those of the manifest already in ``out`` (a local
    folder or a store; a resumed or extended set), each with what it decides in the bytes; empty
    when there is none."""
    try:
        manifest = load_manifest(out.url_of(MANIFEST_NAME) if isinstance(out, Store) else out / MANIFEST_NAME)
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
