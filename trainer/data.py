"""Streaming datagen shards into training batches, through the schema module both sides share.

Shards are read with datagen's strict tar reader (plain tars only, member sizes bounded, a
corrupt member an error rather than a silent stop); samples are decoded only by
:func:`datagen.format.schema.decode_sample` (raw bytes in, arrays out: nothing is ever unpickled).
Each epoch visits the shards in a new order (seeded by the run seed and the epoch), samples
pass through a shuffle buffer, and every loader worker of every rank (process of a
``torchrun`` job) reads its own share of the shards (:func:`worker_shards`). A corrupt shard or
sample is skipped with a warning and counted; training goes on.
"""
from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from datagen.format.grids import recompute_grids
from datagen.format.imageio import resize_image
from datagen.format.schema import PairSample, decode_sample
from datagen.format.shards import ShardError, iter_tar_samples
from datagen.format.shardset import ShardSet, resolve_shard_set
from datagen.format.storage import is_url
from datagen.format.warps import ThinPlateSpline

from .augment import random_target_tps, warp_image, warp_target_fields
from .config import TrainConfig


def shard_urls(shards) -> list[str]:
    """Shard paths of a shard set: a folder (its manifest.json's shards, else its shard-*.tar), a
    manifest.json, a brace pattern such as ``shards/shard-{000000..000009}.tar``, a single .tar, or
    a list of those (:func:`datagen.format.shardset.resolve_shard_set`)."""
    return [str(tar) for tar in resolve_shard_set(shards).tars]


def dataset_fingerprint(shards) -> str | None:
    """The manifest's fingerprint when ``shards`` names a manifest's whole set (a folder or
    manifest); None for other sets, and for no shards at all (a network built only to be saved)."""
    if isinstance(shards, (list, tuple)) and not shards:
        return None
    return resolve_shard_set(shards).fingerprint


def iter_raw(urls: list[str], on_error, checksums: dict | None = None, verified: set | None = None) -> Iterator[dict]:
    """Raw samples ``{"__key__": ..., field: bytes}`` of the tar files at ``urls`` (paths or URLs) in
    order, read with datagen's strict reader (:func:`datagen.format.shards.iter_tar_samples`: plain
    tars only, member sizes bounded, a corrupt or truncated member is an error, not a silent stop;
    a remote shard fetched in one pass).

    ``on_error(url, exception)`` is called for a shard that cannot be read, after its complete
    samples; the stream goes on with the next shard. ``checksums`` ({url: sha256}): a shard whose
    bytes do not hash to it is skipped whole, before any of its samples is used (``verified``
    remembers the local shards already checked, so an epoch does not hash them again; a remote
    shard is hashed as it arrives, at no extra cost).
    """
    for url in urls:
        expected = (checksums or {}).get(url)
        if expected is not None and verified is not None and url in verified:
            expected = None
        try:
            yield from iter_tar_samples(url, sha256=expected)
        except ShardError as error:
            on_error(url, error)
            continue
        if expected is not None and verified is not None and not is_url(url):
            verified.add(url)


@dataclass
class Example:
    """One training pair as arrays: images (H, W, 3) uint8 RGB; masks (1, h, w) float32;
    flows (2, h, w) float32, x then y normalised to [0, 1] of the other image; ``tgt_hide``
    (h, w) bool, True = target token hidden from attention."""

    key: str
    src_image: np.ndarray
    tgt_image: np.ndarray
    src_mask: np.ndarray
    tgt_mask: np.ndarray
    src_to_tgt: np.ndarray
    tgt_to_src: np.ndarray
    tgt_hide: np.ndarray


def to_example(sample: PairSample, config: TrainConfig, rng: random.Random,
               tps_rng: random.Random | None = None) -> Example:
    """A decoded sample as a training example: stylised or plain image (each with probability
    ``style_prob``), roles swapped with probability ``swap_prob``, images resized to the
    config's size and grids recomputed from the stored warps when the network's grid differs,
    the target (after the swap) warped by a random thin-plate spline with probability
    ``tps_prob`` when ``tps_rng`` is given (:func:`augment_target`), target tokens outside the
    target mask hidden with probability ``hide_prob``.

    Random draws: from ``rng`` the style of each image, the swap and the hiding, in that order;
    from ``tps_rng`` the TPS (its coin, then its spline; nothing when ``tps_prob`` is 0).
    :class:`PairStream` gives the TPS a generator of its own, seeded like the stream's, so that
    switching the TPS on or off changes neither the order of the pairs nor their styles, swaps
    and hidden tokens. ``tps_rng`` None: no TPS, whatever ``tps_prob`` says (the TPS is a
    training augmentation; evaluation reads the stored pairs)."""
    grid = (config.grid_size, config.grid_size)
    if sample.src_grid_mask.shape != grid:
        fields = recompute_grids(sample, grid)
        src_mask, tgt_mask = fields["src_grid_mask"], fields["tgt_grid_mask"]
        src_to_tgt, tgt_to_src = fields["src_to_tgt"], fields["tgt_to_src"]
    else:
        src_mask, tgt_mask = sample.src_grid_mask, sample.tgt_grid_mask
        src_to_tgt, tgt_to_src = sample.src_to_tgt, sample.tgt_to_src

    def pick(plain, stylised):
        image = stylised if stylised is not None and rng.random() < config.style_prob else plain
        if image.shape[:2] != (config.image_size, config.image_size):
            image = resize_image(image, config.image_size)
        return image

    src_image = pick(sample.src_image, sample.src_style_image)
    tgt_image = pick(sample.tgt_image, sample.tgt_style_image)
    if rng.random() < config.swap_prob:
        src_image, tgt_image = tgt_image, src_image
        src_mask, tgt_mask = tgt_mask, src_mask
        src_to_tgt, tgt_to_src = tgt_to_src, src_to_tgt
    hide = rng.random() < config.hide_prob
    example = Example(
        key=sample.key,
        src_image=np.ascontiguousarray(src_image),
        tgt_image=np.ascontiguousarray(tgt_image),
        src_mask=src_mask[None].astype(np.float32),
        tgt_mask=tgt_mask[None].astype(np.float32),
        src_to_tgt=np.ascontiguousarray(src_to_tgt.transpose(2, 0, 1), dtype=np.float32),
        tgt_to_src=np.ascontiguousarray(tgt_to_src.transpose(2, 0, 1), dtype=np.float32),
        tgt_hide=np.zeros(tgt_mask.shape, bool),
    )
    if tps_rng is not None and config.tps_prob > 0 and tps_rng.random() < config.tps_prob:
        tps = random_target_tps(tps_rng, config.tps_grid_sizes, config.tps_jitter)
        if tps is not None:
            example = augment_target(example, tps)
    if hide:
        example.tgt_hide = example.tgt_mask[0] < 0.5
    return example


def augment_target(example: Example, tps: ThinPlateSpline) -> Example:
    """``example`` with its target warped by the backward spline ``tps`` (warped -> original,
    normalised): the target image, the target grid mask and both correspondence fields, by the
    rules of :mod:`trainer.augment`; the source mask loses the cells whose content leaves the
    warped target. ``tgt_hide`` is left as it is (:func:`to_example` sets it afterwards, from
    the warped mask). A new Example; ``example`` is not modified."""
    fields = warp_target_fields(tps, example.src_mask[0], example.tgt_mask[0],
                                example.src_to_tgt.transpose(1, 2, 0), example.tgt_to_src.transpose(1, 2, 0))
    return Example(
        key=example.key,
        src_image=example.src_image,
        tgt_image=np.ascontiguousarray(warp_image(example.tgt_image, tps)),
        src_mask=fields.src_mask[None],
        tgt_mask=fields.tgt_mask[None],
        src_to_tgt=np.ascontiguousarray(fields.src_to_tgt.transpose(2, 0, 1)),
        tgt_to_src=np.ascontiguousarray(fields.tgt_to_src.transpose(2, 0, 1)),
        tgt_hide=example.tgt_hide,
    )


def collate(examples: list[Example], skipped: int) -> dict:
    """Stack examples into a batch of tensors (images stay uint8; the trainer normalises them)."""
    batch = {name: torch.from_numpy(np.stack([getattr(e, name) for e in examples]))
             for name in ("src_image", "tgt_image", "src_mask", "tgt_mask", "src_to_tgt", "tgt_to_src",
                          "tgt_hide")}
    batch["keys"] = [e.key for e in examples]
    batch["skipped"] = skipped
    return batch


def worker_shards(urls: list[str], seed: int, epoch: int, index: int, total: int) -> list[str]:
    """The shards that loader worker ``index`` of ``total`` reads in epoch ``epoch``.

    A worker's index counts over all the ranks of a job: ``rank * workers + worker`` of
    ``world_size * workers`` (``workers`` 1 for a loader without worker processes). Every worker
    of every rank shuffles the same list with ``Random((seed, epoch))`` (no rank in it), so the
    shares ``order[index::total]`` are disjoint and together hold every shard once per epoch.

    When there are fewer shards than workers, a worker whose share is empty reads the one shard
    ``order[index % len(order)]`` (it is some other worker's too): each worker, hence each rank,
    has data in every epoch, so no rank runs dry while the others wait for it to take its
    training step; the samples of the ranks then overlap. Disjoint data across ranks needs at
    least ``world_size * workers`` shards. Shares that differ by one shard are fine: the stream is
    endless and training counts steps, so a rank with a smaller share just begins its next epoch
    sooner.
    """
    if not 0 <= index < total:
        raise ValueError(f"loader worker {index} of {total}: the index must be in 0 .. {total - 1}")
    order = list(urls)
    random.Random(f"{seed}:epoch:{epoch}").shuffle(order)
    return order[index::total] or order[index % len(order)::len(order)]


class PairStream(torch.utils.data.IterableDataset):
    """An endless stream of batches of ``config.positives`` examples.

    Epoch ``e`` visits the shards in the order of ``Random((seed, start_epoch + e))``, split
    between the loader workers of all ranks (:func:`worker_shards`; ``rank`` of ``world_size``
    is this process's place in a multi-process job, 0 of 1 otherwise); samples go through a
    buffer of ``config.shuffle_buffer``, whose random draws are seeded per worker and rank (as
    are those of the examples, and apart from them those of the train-time TPS). Each
    batch carries ``skipped``: how many shards or samples this worker skipped since its last batch.
    """

    def __init__(self, urls: list[str], config: TrainConfig, start_epoch: int = 0, batch_size: int | None = None,
                 checksums: dict | None = None, rank: int = 0, world_size: int = 1):
        super().__init__()
        if not urls:
            raise ValueError("no shards to train on")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of {world_size}: the rank must be in 0 .. {world_size - 1}")
        self.urls = list(urls)
        self.config = config
        self.start_epoch = start_epoch
        self.batch_size = batch_size or config.positives
        self.checksums = checksums
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        index, total = self.rank * workers + worker, self.world_size * workers
        rng = random.Random(f"{self.config.seed}:{self.start_epoch}:{index}")
        tps_rng = random.Random(f"{self.config.seed}:{self.start_epoch}:{index}:tps")  # see to_example
        skipped = 0

        def on_error(where, error):
            nonlocal skipped
            skipped += 1
            print(f"warning: skipping {where}: {error}", file=sys.stderr)

        buffer: list[Example] = []
        batch: list[Example] = []
        verified: set = set()
        epoch = self.start_epoch
        idle_epochs = 0
        while True:
            mine = worker_shards(self.urls, self.config.seed, epoch, index, total)
            seen = 0
            for members in iter_raw(mine, on_error, self.checksums, verified):
                try:
                    example = to_example(decode_sample(members), self.config, rng, tps_rng)
                except Exception as error:  # noqa: BLE001 - one bad sample (JSON, warp, mask) is skipped
                    on_error(f"sample {members.get('__key__', '?')}", error)
                    continue
                seen += 1
                buffer.append(example)
                if len(buffer) < self.config.shuffle_buffer:
                    continue
                batch.append(buffer.pop(rng.randrange(len(buffer))))
                if len(batch) == self.batch_size:
                    yield collate(batch, skipped)
                    batch, skipped = [], 0
            # A worker that cannot make batches must fail, not spin: in a multi-process run the other
            # ranks would wait for it. An epoch without a readable sample is tolerated while samples
            # are left over, as long as another share may still hold some.
            idle_epochs = 0 if seen else idle_epochs + 1
            if idle_epochs and (not buffer or idle_epochs > len(self.urls)):
                raise RuntimeError(f"loader worker {index} of {total}: no readable sample in {len(mine)} shards"
                                   + (f" ({idle_epochs} epochs in a row)" if idle_epochs > 1 else ""))
            rng.shuffle(buffer)
            while len(buffer) > self.config.shuffle_buffer // 2:
                batch.append(buffer.pop())
                if len(batch) == self.batch_size:
                    yield collate(batch, skipped)
                    batch, skipped = [], 0
            epoch += 1


def manifest_checksums(found: ShardSet, verify: bool | None = None) -> dict | None:
    """{tar path: sha256} of the shards of a resolved set to check before reading, from its manifest.

    ``verify`` True: every shard (ValueError naming a shard that no manifest lists: its bytes
    cannot be checked); None (the default): the shards a manifest lists, with a warning naming
    the others; False: none (None is returned)."""
    if verify is False:
        return None
    unlisted = [tar.name for tar in found.tars if found.entry(tar) is None]
    if unlisted:
        names = f"{', '.join(unlisted[:3])}{' ...' if len(unlisted) > 3 else ''}"
        if verify:
            raise ValueError(f"--verify-shards needs each shard's manifest entry; no manifest beside the shards "
                             f"lists {names}")
        print(f"WARNING: {len(unlisted)} shard(s) are not listed by a manifest beside them; their bytes "
              f"cannot be checked: {names}", file=sys.stderr)
    return {str(tar): found.entry(tar)["sha256"] for tar in found.tars if found.entry(tar) is not None}


def make_loader(shards, config: TrainConfig, workers: int, start_epoch: int = 0,
                batch_size: int | None = None, verify: bool | None = None, rank: int = 0,
                world_size: int = 1) -> torch.utils.data.DataLoader:
    """A DataLoader over :class:`PairStream` with ``workers`` processes (0: in the main process),
    reading the share of rank ``rank`` of ``world_size`` (:func:`worker_shards`).
    ``verify`` (see :func:`manifest_checksums`): each shard's sha256 is checked against its
    manifest before it is read (once per loader process); a shard that differs is skipped with
    a warning."""
    found = resolve_shard_set(shards)
    checksums = manifest_checksums(found, verify)
    stream = PairStream([str(tar) for tar in found.tars], config, start_epoch, batch_size, checksums,
                        rank=rank, world_size=world_size)
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                       persistent_workers=workers > 0, prefetch_factor=4 if workers else None)


def iter_samples(shards) -> Iterator[PairSample]:
    """Decoded samples of ``shards`` in stored order (for evaluation and inspection)."""
    def fail(where, error):
        raise ValueError(f"cannot read {where}: {error}") from error

    for members in iter_raw(shard_urls(shards), fail):
        yield decode_sample(members)


def summarise(shards) -> tuple[dict, list[str]]:
    """(counts, problems) of a shard set read as the trainer reads it: samples, objects per pair,
    grid and image shapes of the readable samples; one line per unreadable shard or sample."""
    from collections import Counter

    objects, grids, images = Counter(), Counter(), Counter()
    problems: list[str] = []

    def note(where, error):
        problems.append(f"{where}: {error}")

    for members in iter_raw(shard_urls(shards), note):
        try:
            sample = decode_sample(members)
            count = len(sample.meta["objects"])
        except Exception as error:  # noqa: BLE001 - reported by name, the reading goes on
            note(f"sample {members.get('__key__', '?')}", error)
            continue
        objects[count] += 1
        grids[sample.src_grid_mask.shape] += 1
        images[sample.src_image.shape[:2]] += 1
    counts = {"samples": sum(objects.values()), "objects per pair": dict(objects), "grid": dict(grids),
              "image size": dict(images)}
    return counts, problems
