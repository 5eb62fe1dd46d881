"""The hard-negative stage: after the main stage, training goes on with the pairs the network gets
most wrong among images that share nothing (paper section 3.2: a pool of 500 images, the masks
predicted for all their pairs, the pairs above tau = 0.04 kept as hard negatives, the pool renewed
during the stage, 5k steps at lr 1e-5).

What the authors' released code does (github.com/XiSHEN0220/SegSwap, ``train/``), and what this
module does with it:

- **Pool** (``DataloaderHardMining.py`` l. 108, 40-51): 500 distinct synthetic pairs drawn at
  random, and of each ONE image, the first or the second with probability 1/2 (stylised with
  probability 0.5). Here: the first ``pool`` distinct samples of the stage's stream, each giving
  its ``src_image`` as the trainer loads it (after the random role swap and style choice, so
  either image of the pair). Their backbone features are computed once per renewal and kept on
  the training device (500 x 1024 x 30 x 30 float32 = 1.8 GB at 480 px). The authors also
  crop and flip the pool images at random (l. 73-74); not done here.
- **Criterion** (``DataloaderHardMining.py`` l. 97, 128-131, 145): for every unordered pair
  (i < j) of the pool, network in eval mode on (image i, image j), the score is the mean of the
  predicted mask over the cells of image i PLUS the mean over the cells of image j (a sum of two
  means, in [0, 2]); a pair passes when its score is strictly greater than tau = 0.04. Pairs of
  images of the same synthetic pair are left out (with distinct samples in the pool there are
  none; they can occur in a small data set, where the stream repeats samples). :func:`mine`
  keeps only the score of each pair, never the network's outputs: 124,750 floats for a pool of 500.
- **Mixing** (``Train.py`` ``trainEpochHardMining``; ``MainHardMining.py`` l. 61-64): each step
  has the usual 5 positives and 15 negatives plus 5 hard negatives (``--batch-hard-neg 5``),
  drawn among the passing pairs without replacement, with probability proportional to their score
  (``np.random.choice(..., p=mask_pred / mask_pred.sum())``, ``DataloaderHardMining.py`` l. 165,
  172). A hard negative is supervised as a negative: both predicted masks towards 0, in the one
  BCE mean of Eq. 2 with all the other mask terms, no correspondence term
  (:func:`trainer.loss.step_loss`; the authors concatenate them with the batch's negatives before
  the BCE). Here: :attr:`HardNegativeConfig.per_step` pairs, the same draw (fewer when fewer
  pairs pass; none when none does).
- **Optimiser**: lr 1e-5 (``MainHardMining.py`` l. 51), constant (its MultiStepLR milestone, 50
  epochs, is never reached, l. 49-50, 173), no warm-up. The authors reload the main stage's Adam
  state and set its rate to 1e-5 (l. 165, 170); here a fresh Adam at 1e-5 with the main stage's
  betas.
- **Renewal**: here every :attr:`HardNegativeConfig.renew_every` steps (1000, the issue's
  figure). The authors renew the pool after each of 49 "epochs" of ``min(#pairs scoring > 0.1,
  100)`` steps (``DataloaderHardMining.py`` l. 160-166, ``MainHardMining.py`` l. 202-205),
  drawing a new pool at once while 10 pairs or fewer score above 0.1; about 4.9k steps in all.
  Their training pairs also exclude the pool's pairs (``DataloaderHardMining.py`` l. 186); here
  the pool's samples are taken from the stream the positives come from, so the stream does not
  give them again as positives until it wraps.

**Windows, resume.** Steps [k R, (k + 1) R) (R = ``renew_every``) form window k: a new loader of the
training stream for it (epoch ``parent step + k R``, so each window reads a new shard order), its
first ``pool`` distinct samples make the pool, the network as it is at step k R mines it, and the
batches that follow train the window's steps. The checkpoint records the window's mined pairs
(every rank's), so ``--resume`` rebuilds the window's stream, recomputes the pool's features,
takes the mined pairs back, skips the batches already trained on and goes on: an interrupted and
resumed stage ends with the weights of an uninterrupted one. Hard negatives are drawn with a
generator seeded by (seed, rank, step).

**Several processes**: as :class:`trainer.loop.Trainer`; each rank mines its own pool from its own
share of the shards; each rank reads the parent checkpoint (it must be on every machine).
"""
from __future__ import annotations

import dataclasses
import random
import sys
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

from datagen.format.hashing import config_hash, sha256_file

from .backbone import RANDOM
from .config import TrainConfig
from .data import make_loader
from .loop import METRICS, FitOptions, ResumeError, Trainer, load_checkpoint

STAGE = "hard_negatives"
"""The ``stage`` entry of this stage's checkpoints."""


@dataclass(frozen=True)
class HardNegativeConfig:
    """What the hard-negative stage learns with (hashed into its checkpoints: a resume refuses
    another one unless forced). Defaults: the paper and the authors' code (module docstring)."""

    pool: int = 500
    """Images in the pool, each from a distinct synthetic pair (``--neg-pool-size 500``)."""
    tau: float = 0.04
    """A pair passes when mean(predicted mask of image i) + mean(predicted mask of image j) > tau
    (the authors' ``mask_pred * (mask_pred > 0.04)``, ``DataloaderHardMining.py`` l. 145)."""
    renew_every: int = 1000
    """Steps between two renewals of the pool (a new pool, mined again)."""
    steps: int = 5000
    """Steps of the stage."""
    lr: float = 1e-5
    """Adam's learning rate, constant (the main stage's betas)."""
    per_step: int = 5
    """Hard negative pairs added to each step's positives and negatives (``--batch-hard-neg 5``),
    drawn among the passing pairs without replacement, with probability proportional to their score."""
    ordered_pairs: bool = False
    """False (the authors'): score each unordered pair once, image i as the source for i < j. True:
    both orders, each scored and drawn on its own (twice the mining; the same for a network
    symmetric in its two inputs, as the transformer without hidden tokens is)."""

    def validate(self) -> HardNegativeConfig:
        def integer(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        checks = [
            (integer(self.pool) and self.pool >= 2, f"--pool must be an integer >= 2 (images), got {self.pool!r}"),
            (isinstance(self.tau, (int, float)) and 0 <= self.tau < 2,
             f"--tau must be in [0, 2) (the score is the sum of two mean masks, in [0, 2]), got {self.tau!r}"),
            (integer(self.renew_every) and self.renew_every >= 1,
             f"--renew-every must be an integer >= 1 (steps), got {self.renew_every!r}"),
            (integer(self.steps) and self.steps >= 1, f"--steps must be an integer >= 1, got {self.steps!r}"),
            (isinstance(self.lr, (int, float)) and self.lr > 0, f"--lr must be positive, got {self.lr!r}"),
            (integer(self.per_step) and self.per_step >= 1,
             f"--per-step must be an integer >= 1 (hard negatives per step), got {self.per_step!r}"),
            (isinstance(self.ordered_pairs, bool), f"ordered_pairs must be a bool, got {self.ordered_pairs!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> HardNegativeConfig:
        return cls(**data)


def stage_config(parent: TrainConfig, hard: HardNegativeConfig) -> TrainConfig:
    """The training config of the stage: the parent run's (architecture, image size, positives,
    negatives, loss, augmentations, seed) at ``hard.lr`` for ``hard.steps``, without warm-up or
    decay."""
    return dataclasses.replace(parent, lr=hard.lr, steps=hard.steps, warmup_steps=0, milestone=None).validate()


# -- mining: pure functions -------------------------------------------------------------------

class MinedPairs(NamedTuple):
    """The pairs of a pool that pass the criterion."""

    pairs: torch.Tensor
    """(M, 2) int64: (source, target) indices into the pool."""
    scores: torch.Tensor
    """(M,) float32: their scores (:func:`pair_criterion`), all > tau."""


def pool_pairs(keys: Sequence[str], ordered: bool = False) -> torch.Tensor:
    """(K, 2) int64 candidate pairs of a pool whose image k comes from sample ``keys[k]``: every
    (i, j) with i < j (``ordered``: i != j), row-major, leaving out the pairs of two images of
    one sample."""
    codes = {key: code for code, key in enumerate(dict.fromkeys(keys))}
    ids = torch.tensor([codes[key] for key in keys], dtype=torch.long)
    n = len(keys)
    allowed = ids[:, None] != ids[None, :]
    if not ordered:
        allowed &= torch.ones(n, n, dtype=torch.bool).triu(1)
    return allowed.nonzero()


def pair_criterion(src_out: torch.Tensor, tgt_out: torch.Tensor) -> torch.Tensor:
    """(B,) score of B pairs from the network's outputs (B, 3, h, w): the mean predicted mask
    (channel 2) over the source's cells plus the mean over the target's (the authors')."""
    return src_out[:, 2].flatten(1).float().mean(1) + tgt_out[:, 2].flatten(1).float().mean(1)


@torch.no_grad()
def score_pairs(model: torch.nn.Module, features: torch.Tensor, pairs: torch.Tensor, batch_size: int = 64,
                autocast: Callable | None = None, progress: bool = False,
                should_stop: Callable[[], bool] | None = None) -> torch.Tensor | None:
    """(K,) float32 (CPU) :func:`pair_criterion` of ``model`` on each pair (i, j) of ``pairs``
    (K, 2), image i of ``features`` (P, C, h, w) as the source; ``batch_size`` pairs per forward
    pass, on the device of ``features``, the model in eval mode (given back in its mode). Only
    the scores are kept. ``autocast``: a context factory around each forward pass (the trainer's
    bf16 on CUDA). None when ``should_stop()`` turned true between two batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = features.device
    scores = torch.empty(len(pairs), dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(pairs), unit="pair", desc="mining", leave=False, file=sys.stderr, dynamic_ncols=True,
                  disable=not progress) as bar:
            for start in range(0, len(pairs), batch_size):
                if should_stop is not None and should_stop():
                    return None
                chunk = pairs[start:start + batch_size].to(device)
                with (autocast or nullcontext)():
                    src_out, tgt_out = model(features[chunk[:, 0]], features[chunk[:, 1]])
                scores[start:start + len(chunk)] = pair_criterion(src_out, tgt_out)
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    return scores.cpu()


def mine(model: torch.nn.Module, features: torch.Tensor, keys: Sequence[str], tau: float, batch_size: int = 64,
         ordered: bool = False, autocast: Callable | None = None, progress: bool = False,
         should_stop: Callable[[], bool] | None = None) -> MinedPairs | None:
    """The hard negatives of a pool: image k has features ``features[k]`` (P, C, h, w) and comes
    from sample ``keys[k]``; every pair of :func:`pool_pairs` is scored (:func:`score_pairs`) and
    those scoring more than ``tau`` are kept. None when stopped (:func:`score_pairs`)."""
    if len(keys) != len(features):
        raise ValueError(f"{len(keys)} keys for {len(features)} pool images")
    candidates = pool_pairs(keys, ordered)
    scores = score_pairs(model, features, candidates, batch_size, autocast, progress, should_stop)
    if scores is None:
        return None
    passing = scores > tau
    return MinedPairs(candidates[passing], scores[passing])


def draw_pairs(mined: MinedPairs, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(k, 2) pairs of ``mined`` for one step, k = min(count, passing pairs): drawn without
    replacement with probability proportional to their scores (the authors')."""
    k = min(count, len(mined.pairs))
    if k == 0:
        return mined.pairs[:0]
    picks = torch.multinomial(mined.scores.double(), k, replacement=False, generator=generator)
    return mined.pairs[picks]


# -- the stage ------------------------------------------------------------------------------------

class Window(NamedTuple):
    """The pool of the steps [start, start + renew_every) on this rank."""

    start: int
    features: torch.Tensor
    """(P, C, h, w) backbone features of the pool's images, on the training device."""
    keys: list
    """The sample of each pool image."""
    mined: MinedPairs
    records: list
    """Every rank's ``{"keys", "pairs", "scores"}`` of this window (what the checkpoint holds)."""


class HardNegativeTrainer(Trainer):
    """The hard-negative stage, started from ``checkpoint`` (a trainer checkpoint: its network,
    backbone and training config; a fresh Adam at ``config.lr``), trained on ``shards`` through
    :meth:`Trainer.fit` (progress bar, logs, checkpoints every ``options.checkpoint_every`` steps
    and on Ctrl-C or SIGTERM, ``options.resume`` and ``force`` as for ``fit``; see the module
    docstring for the pool's windows). ``mining_batch``: pairs per forward pass when mining
    (memory, not results)."""

    metric_names = (*METRICS, "hard_negatives", "pool_passing", "pool_size")

    def __init__(self, checkpoint, shards, config: HardNegativeConfig, options: FitOptions, mining_batch: int = 64):
        self.hard = config.validate()
        if mining_batch < 1:
            raise ValueError(f"mining batch must be at least 1, got {mining_batch}")
        self.mining_batch = mining_batch
        path = Path(checkpoint)
        if path.resolve() == (Path(options.run_dir) / "checkpoint.pt").resolve():
            raise ValueError(f"{path}: the stage would overwrite the checkpoint it starts from; give another --out")
        parent = load_checkpoint(path)
        try:
            parent_config = TrainConfig.from_dict(parent["config"]).validate()
            self._parent_model = parent["model"]
            self._parent_backbone = parent["backbone_state"], dict(parent.get("backbone") or {})
            parent_step = int(parent["step"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ResumeError(f"{path}: not a trainer checkpoint ({type(error).__name__}: {error})") from error
        self.parent = {"path": str(path.resolve()), "sha256": sha256_file(path), "step": parent_step,
                       "config_hash": parent.get("config_hash"), "stage": parent.get("stage", "main")}
        del parent
        super().__init__(stage_config(parent_config, self.hard), shards, options)
        self.model.load_state_dict(self._parent_model)
        del self._parent_model, self._parent_backbone
        self.window: Window | None = None
        self.renewals: list[int] = []
        """The steps at which this process mined a pool (a resume that takes a window back does not)."""
        self._resumed: dict | None = None

    # -- what differs from the main stage --------------------------------------------------------

    def _load_backbone(self) -> dict:
        state, record = self._parent_backbone
        self.backbone.load_state_dict(state)
        if record.get("source") == RANDOM:
            warnings.warn("the backbone keeps its RANDOM initialisation (the parent checkpoint was trained with "
                          "--backbone-weights random): this stage is only good for smoke tests", stacklevel=3)
        return record

    def _record(self) -> dict:
        return {"config": self.hard.to_dict(), "config_hash": config_hash(self.hard), "parent": self.parent}

    def _checkpoint_extra(self) -> dict:
        window = None
        if self.window is not None:
            window = {"start": self.window.start, "world_size": self.world_size, "mined": self.window.records}
        return {"stage": STAGE, STAGE: {**self._record(), "window": window}}

    def _run_record(self) -> dict:
        return {**super()._run_record(), "stage": STAGE, STAGE: self._record()}

    def _resume_problems(self, state: dict) -> list[str]:
        problems = super()._resume_problems(state)
        record = state.get(STAGE)
        if state.get("stage") != STAGE or not isinstance(record, dict):
            return [*problems, "it is not a checkpoint of the hard-negative stage"]
        if record.get("config_hash") != config_hash(self.hard):
            problems.append("its hard-negative config differs from this run's")
        parent = record.get("parent") or {}
        if parent.get("sha256") != self.parent["sha256"]:
            problems.append(f"it started from another checkpoint ({str(parent.get('sha256'))[:12]}, "
                            f"{self.parent['path']} is {self.parent['sha256'][:12]})")
        return problems

    def _resumed_extra(self, state: dict) -> dict:
        return {STAGE: state.get(STAGE)}

    def _apply_state(self, state: dict) -> None:
        super()._apply_state(state)
        self._resumed = state.get(STAGE)

    def train_step(self, batch: dict, extra_negatives=None) -> dict:
        """One step of :meth:`Trainer.train_step` with this step's hard negatives of the current
        window (a different ``extra_negatives`` is refused: the window supplies them)."""
        if extra_negatives is not None:
            raise ValueError("the hard-negative stage draws its own extra negatives")
        if self.window is None:
            raise RuntimeError("no pool yet: the hard-negative stage trains through fit()")
        seed = random.Random(f"{self.config.seed}:hard:{self.rank}:{self.step}").getrandbits(63)
        chosen = draw_pairs(self.window.mined, self.hard.per_step, torch.Generator().manual_seed(seed))
        features = self.window.features
        extra = (features[chosen[:, 0].to(features.device)], features[chosen[:, 1].to(features.device)]) \
            if len(chosen) else None
        losses = super().train_step(batch, extra)
        return {**losses, "hard_negatives": len(chosen), "pool_passing": len(self.window.mined.pairs),
                "pool_size": len(self.window.keys)}

    # -- the windows ------------------------------------------------------------------------------

    def _loader(self):
        return self._windows()

    def _windows(self):
        """The batches of the stage, window after window (see the module docstring); a pool is
        read and mined (or taken back from a resumed checkpoint) when a window starts. Returns
        early when a stop is asked during the mining of a single-process run."""
        every = self.hard.renew_every
        while True:
            start = self.step - self.step % every
            self.window = None  # the previous pool's features are freed before the next one is read
            batches = self._window_batches(start)
            features, keys = self._read_pool(batches)
            records = self._resumed_records(start, keys)
            if records is None:
                records = self._mine_pool(features, keys)
                if records is None:
                    return
            own = records[self.rank]
            self.window = Window(start, features, keys, MinedPairs(own["pairs"], own["scores"]), records)
            for _ in range(self.step - start):  # a resumed window: the batches trained on before
                if next(batches, None) is None:
                    return
            while self.step < start + every:
                batch = next(batches, None)
                if batch is None:  # the stream is endless; a finite one ends the stage
                    return
                yield batch
            del batches, features

    def _window_batches(self, start: int):
        """An iterator over the training batches of the window starting at step ``start``: a new
        stream, its epoch ``parent step + start``. Made without drawing from torch's random
        stream (the loader's seed draw would make a resumed run's dropout differ)."""
        loader = make_loader(self.shards, self.config, self.options.workers, start_epoch=self.parent["step"] + start,
                             verify=self.options.verify_shards, rank=self.rank, world_size=self.world_size)
        with torch.random.fork_rng(devices=[]):
            return iter(loader)

    def _read_pool(self, batches) -> tuple[torch.Tensor, list]:
        """(features (P, C, h, w), keys) of the pool: the ``src_image`` of the first ``pool``
        distinct samples of ``batches`` (at most 2 x ``pool`` samples are read to find them)."""
        wanted = self.hard.pool
        features, keys, seen, read = [], [], set(), 0
        while len(keys) < wanted and read < 2 * wanted:
            batch = next(batches, None)
            if batch is None:
                break
            read += len(batch["keys"])
            fresh = []
            for index, key in enumerate(batch["keys"]):
                if key not in seen and len(keys) + len(fresh) < wanted:
                    seen.add(key)
                    fresh.append(index)
            if fresh:
                features.append(self.features(batch["src_image"][fresh]))
                keys += [batch["keys"][index] for index in fresh]
        if len(keys) < 2:
            raise RuntimeError(f"the hard-negative pool needs at least 2 distinct samples; the stream gave {len(keys)}")
        if len(keys) < wanted and self.is_main:
            warnings.warn(f"the hard-negative pool holds {len(keys)} distinct samples, not {wanted}: the data set "
                          f"(or this rank's share of it) is small", stacklevel=2)
        return torch.cat(features), keys

    def _mine_pool(self, features: torch.Tensor, keys: list) -> list | None:
        """Every rank's mined pairs of its own pool (gathered from all ranks); None when a stop was
        asked during the mining (single process only: the ranks of a job mine to the end)."""
        stop = None if self.distributed else (lambda: self.stop_requested)
        mined = mine(self.model, features, keys, self.hard.tau, self.mining_batch, self.hard.ordered_pairs,
                     autocast=self.autocast, progress=self.options.progress and self.is_main, should_stop=stop)
        if mined is None:
            return None
        self.renewals.append(self.step)
        record = {"keys": list(keys), "pairs": mined.pairs, "scores": mined.scores}
        if not self.distributed:
            return [record]
        records = [None] * self.world_size
        dist.all_gather_object(records, record)
        return records

    def _resumed_records(self, start: int, keys: list) -> list | None:
        """The mined pairs of the window at ``start`` from the checkpoint resumed, when it holds
        them for this world size and this rank's pool is the one they were mined on (every rank
        agrees); else None (the window is mined again, by the network as it is now)."""
        record, self._resumed = self._resumed, None
        window = (record or {}).get("window") or {}
        usable = window.get("start") == start and window.get("world_size") == self.world_size \
            and list(window["mined"][self.rank]["keys"]) == list(keys)
        if self.distributed:
            agreed = torch.tensor([float(usable)], device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            usable = bool(agreed.item())
        if record is not None and not usable and self.step != start and self.is_main:
            warnings.warn(f"step {self.step}: the checkpoint's hard-negative pool does not fit this run (another "
                          f"world size or loader); mining a new one with the current network", stacklevel=2)
        return window["mined"] if usable else None


def fit_hard_negatives(checkpoint, shards, config: HardNegativeConfig, options: FitOptions,
                       mining_batch: int = 64) -> dict:
    """Run the hard-negative stage from ``checkpoint`` on ``shards`` into ``options.run_dir`` (see
    :class:`HardNegativeTrainer`); the last metrics. Leaves the process group it joined, if any."""
    trainer = HardNegativeTrainer(checkpoint, shards, config, options, mining_batch)
    try:
        return trainer.fit()
    finally:
        trainer.close()
