"""One shard of a build as a task: :class:`ShardTask`, a picklable callable holding everything a
worker needs, which builds the shard and writes it.

Shard ``k`` of a build is a pure function of (config, bank, root seed, ``k``): attempt ``a`` of
shard ``k`` draws from ``SeedSequence(root_seed, spawn_key=(k, a))``, so the bytes do not depend
on which process or machine runs the task, on how many run at once, or on when. A distributor
(:mod:`datagen.runner.distribute`) only has to call it and send its progress back.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2

from datagen.config import BuildConfig
from datagen.format.hashing import config_hash
from datagen.format.manifest import make_stats, samples_name, stats_name, write_sample_rows, write_stats
from datagen.format.schema import encode_sample
from datagen.format.shards import ShardWriter, sample_key, shard_name
from datagen.runner.errors import BuildError
from datagen.runner.store import upload_shard
from datagen.runner.styling import StyleSpec, collect_style, draw_style, submit_style
from datagen.runner.worker_state import STATE
from datagen.style import NO_STYLE
from datagen.synth.pairs import Rejected
from datagen.synth.sampling import attempt_rng, objects_for_sample


def plan_shards(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[(shard index, samples)] for ``n`` samples: full shards, then a partial last one."""
    return [(k, min(shard_size, n - k * shard_size)) for k in range((n + shard_size - 1) // shard_size)]


@dataclass(frozen=True)
class ShardTask:
    """Build shard ``shard`` with ``count`` samples into ``out_dir``; calling it returns its stats.

    ``bank_dir``, ``image_root``: the segment bank and the folder its image paths are relative to.
    ``inputs_sha256`` (the inputs' checksum) is recorded in the stats, so that shards of other
    inputs are never taken for finished ones. ``style``: the options of this process's stylizer
    when the task stylises its pairs itself. ``store``: the URL of the build's output when it is a
    store (``s3://...``): the shard is written into ``out_dir`` (a local folder) as always, then
    uploaded there, stats marker last, and its local files deleted
    (:func:`~datagen.runner.store.upload_shard`); the bytes are those of a local build.
    """

    shard: int
    count: int
    config: BuildConfig
    bank_dir: str
    image_root: str
    root_seed: int
    out_dir: str
    inputs_sha256: str | None = None
    style: StyleSpec = StyleSpec()
    store: str | None = None

    def __call__(self, progress: Callable[[int], None] | None = None, remote_style=None) -> dict:
        """Build and write the shard; returns its stats.

        ``progress(1)`` is called for each sample written. ``remote_style``: where stylisation
        happens instead of this process (a :class:`~datagen.style.pipeline.RemoteStyler` of the
        build's style server). Every ``config.style_batch`` accepted pairs go to the stylizer
        together; the next batch is built while they are stylised (:class:`_Batches`).

        Writes the tar, then the per-attempt parquet, then the stats marker (last), and uploads
        them in that order when the output is a store. A rejected or
        failing attempt is recorded and the shard goes on; ``config.max_attempts`` failures in a
        row stop it with :class:`~datagen.runner.errors.BuildError` (something is wrong with every
        input, not one).
        """
        config, shard, root_seed = self.config, self.shard, self.root_seed
        cv2.setNumThreads(1)
        sampler, builder = STATE.shard_tools(self.bank_dir, self.image_root, config, self.inputs_sha256)
        styler = (remote_style or self.style).styler(config) if config.style != NO_STYLE else None
        chash = config_hash(config)
        out = Path(self.out_dir)
        rows, rejected = [], Counter()
        accepted = attempt = failures = 0
        with contextlib.ExitStack() as stack:
            batches = _Batches(styler)
            if styler is not None:
                stack.enter_context(styler)
                stack.callback(batches.discard)  # a failing shard leaves no request memory behind
            writer = stack.enter_context(ShardWriter(out / shard_name(shard)))

            def write(batch):
                for sample, row in batch:
                    written = writer.write(encode_sample(sample, config.jpeg_quality))
                    row.update(bytes=written.bytes, sha256=written.sha256)
                    if progress is not None:
                        progress(1)

            while accepted < self.count:
                rng = attempt_rng(root_seed, shard, attempt)
                objects = objects_for_sample(accepted, config.objects)
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
                    batches.add(sample, row)
                    accepted += 1
                    failures = 0
                except Exception as error:  # noqa: BLE001 - one bad input never kills a shard
                    reason = error.reason if isinstance(error, Rejected) else f"error:{type(error).__name__}"
                    detail = error.detail if isinstance(error, Rejected) else str(error)
                    row.update(status="rejected", reason=f"{reason}: {detail}" if detail else reason)
                    rejected[reason] += 1
                    failures += 1
                    if failures >= config.max_attempts:
                        common = ", ".join(f"{name} {n}" for name, n in rejected.most_common(3))
                        raise BuildError(f"shard {shard_name(shard)}: {failures} attempts in a row failed; "
                                         f"most common: {common}; last: {row['reason']}") from error
                rows.append(row)
                attempt += 1
                if len(batches) >= config.style_batch or accepted == self.count:
                    write(batches.send())
            write(batches.collect())
        write_sample_rows(rows, out / samples_name(shard))
        stats = make_stats(shard_index=shard, samples=accepted, attempted=attempt, rejected=dict(rejected),
                           bytes=writer.bytes, sha256=writer.sha256, config_hash=chash, root_seed=root_seed,
                           inputs_sha256=self.inputs_sha256)
        write_stats(out / stats_name(shard), stats)
        if self.store is not None:
            upload_shard(out, self.store, shard)
        return stats


class _Batches:
    """Accepted (sample, row) pairs on their way to the tar, with the stylizer one batch ahead
    (double buffering): :meth:`send` starts stylising the pending batch and hands back the batch
    sent before it, stylised, to be written while the new one is stylised and the next is built.
    Without a stylizer a batch is handed back as it is, one call later."""

    def __init__(self, styler):
        self._styler = styler
        self._pending: list[tuple] = []
        self._in_flight: list[tuple[list[tuple], object]] = []  # (batch, style job), oldest first

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, sample, row: dict) -> None:
        self._pending.append((sample, row))

    def send(self) -> list[tuple]:
        """Send the pending batch to the stylizer; returns the batch sent before it, stylised."""
        batch, self._pending = self._pending, []
        self._in_flight.append((batch, submit_style(self._styler, [sample for sample, _ in batch])))
        return self._collect(keep=1)

    def collect(self) -> list[tuple]:
        """Every batch in flight with its stylised images (waiting for them)."""
        return self._collect(keep=0)

    def _collect(self, keep: int) -> list[tuple]:
        done = []
        while len(self._in_flight) > keep:
            batch, job = self._in_flight[0]
            collect_style(job, [sample for sample, _ in batch])
            self._in_flight.pop(0)
            done.extend(batch)
        return done

    def discard(self) -> None:
        """Give up the batches in flight (a shard that failed): their requests' memory is freed."""
        for _, job in self._in_flight:
            if job is not None:
                job.discard()
        self._in_flight.clear()
