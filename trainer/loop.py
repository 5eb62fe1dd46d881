"""The training loop: optimiser and schedule, mixed precision, checkpoints, resume, logging.

One step (paper section 3.2, Eq. 2): P positive pairs from the stream and N negatives made by
pairing the source of one positive with the target of another; frozen backbone features;
the network's masks and correspondences for all of them; ``trainer.loss.step_loss``; Adam.

Several processes (``torchrun --nproc_per_node=N -m trainer fit ...``, on one machine or many)
train one network together with DistributedDataParallel: each rank takes its own P + N pairs
per step from its own share of the shards, the gradients are averaged across ranks, and rank 0
alone writes the run folder. See :class:`Trainer`.

The hard-negative stage that follows (:mod:`trainer.hardneg`) runs through the same loop, with a
few more negative pairs per step (``extra_negatives`` of :meth:`Trainer.train_step`).
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from datagen.format.atomic import atomic_write_bytes
from datagen.format.device import resolve_device
from datagen.format.hashing import config_hash

from .backbone import Backbone, load_backbone_weights, normalise
from .checkpoints import CHECKPOINT_FORMAT, ResumeError, atomic_save, load_checkpoint
from .config import TrainConfig
from .data import dataset_fingerprint, make_loader
from .inference import Inference
from .loss import PairBatch, step_loss
from .models import build_model

METRICS = ("step", "loss", "mask_bce", "corr_l1", "acc", "acc_pos", "acc_neg", "lr", "steps_per_s", "skipped")
FeaturePairs = tuple[torch.Tensor, torch.Tensor]
"""Backbone features of the sources and of the targets of K pairs: (K, C, h, w) each."""
REPEATED_SIGNAL_S = 2.0
"""In a multi-process run, a second signal this soon after the first is the same request
delivered twice (a batch system signals every process of a job, and torchrun forwards the one
it got), not a user asking to stop at once."""


def initial_model(config: TrainConfig) -> torch.nn.Module:
    """The network as a run of ``config`` starts: torch's generator is seeded with ``config.seed``
    just before the network is built, so ``fit()`` from Python is reproducible (dropout draws go on
    from that seed) and ``trainer eval --vs-untrained`` rebuilds a run's starting point."""
    torch.manual_seed(config.seed)
    return build_model(config)


def negative_pairs(positives: int, negatives: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(source index, target index) of the negatives: source i with target (i + k) mod P for
    k = 1..P-1 in turn (the authors' order), the first ``negatives`` of them."""
    src = [i for k in range(1, positives) for i in range(positives)]
    tgt = [(i + k) % positives for k in range(1, positives) for i in range(positives)]
    return torch.tensor(src[:negatives], dtype=torch.long), torch.tensor(tgt[:negatives], dtype=torch.long)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Learning-rate multiplier: linear warm-up, then 1; ``lr_decay`` from the milestone on, when
    the config names one (by default it does not: the paper's constant rate)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    return 1.0 if config.milestone is None or step < config.milestone else config.lr_decay


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`; CUDA states of devices this machine does not have are dropped
    (a run resumed on fewer GPUs)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def launched_ranks(environ=None) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) as torchrun (or another launcher) sets them in RANK,
    WORLD_SIZE and LOCAL_RANK; None when the process was not launched so. A value that is not a
    valid place in a job raises ValueError naming it."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        rank, world_size, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ValueError(f"RANK={env['RANK']!r}, WORLD_SIZE={env['WORLD_SIZE']!r}, LOCAL_RANK="
                         f"{env.get('LOCAL_RANK')!r}: not integers") from None
    if not (world_size >= 1 and 0 <= rank < world_size and local_rank >= 0):
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}: not a place in a job")
    return rank, world_size, local_rank


def rank_device(name: str, local_rank: int, world_size: int) -> torch.device:
    """The device of one rank of a multi-process run: ``cuda:LOCAL_RANK`` for 'auto' (when CUDA
    is present) and 'cuda', the CPU for 'cpu'. A numbered GPU is refused when there are several
    ranks: every rank of a machine would share it, while each needs its own."""
    asked = resolve_device(name)
    if asked.type == "cuda":
        if world_size == 1 and asked.index is not None and name != "auto":
            return asked
        if asked.index is not None and name != "auto":
            raise ValueError(f"device {name!r}: in a multi-process run each rank uses cuda:LOCAL_RANK; "
                             f"give --device cuda or auto (CUDA_VISIBLE_DEVICES chooses the GPUs)")
        return resolve_device(f"cuda:{local_rank}")
    if asked.type != "cpu":
        raise ValueError(f"device {name!r}: a multi-process run trains on CUDA (NCCL) or the CPU (gloo)")
    return asked


@dataclass
class FitOptions:
    """How a run is driven (not hashed: these do not change what is learned)."""

    run_dir: Path
    device: str = "auto"
    workers: int = 2
    checkpoint_every: int = 1000
    log_every: int = 10
    image_every: int = 500
    resume: bool = False
    force: bool = False
    backbone_weights: str = "random"
    progress: bool = True
    verify_shards: bool | None = None
    """Check each shard's sha256 against its manifest before reading it (a shard that differs is
    skipped with a warning): None, the shards a manifest lists; True, every shard (an error if one
    is not listed); False, none."""
    validation: Any = None
    """A :class:`trainer.selection.RetrievalValidation`: score it every ``every`` steps (rank 0),
    keep ``best.pt``; None: no validation."""


class Trainer:
    """Holds the backbone, network, optimiser and schedule of one run; see :meth:`fit`.

    **Several processes.** Under torchrun (RANK, WORLD_SIZE and LOCAL_RANK in the environment), or
    when the caller has already initialised a ``torch.distributed`` process group, the Trainer is
    one rank of a job: it joins the process group (NCCL on CUDA, each rank on ``cuda:LOCAL_RANK``;
    gloo on the CPU) and trains ``model`` wrapped in DistributedDataParallel (the frozen backbone
    is not wrapped: it has no gradients to share). Without either, nothing of this happens: one
    process, no process group.

    - Data: each rank reads its own share of the shards, split jointly with the loader workers
      (:func:`trainer.data.worker_shards`); the ranks' samples are disjoint when there are at
      least ranks x workers shards.
    - Batch: each rank takes ``config.positives`` positives (and ``config.negatives`` negatives)
      per step, so one optimiser step sees world size times as many pairs (the paper: 5 + 15 on
      one GPU). The learning rate is not rescaled for it; choose it for the effective batch.
    - Rank 0 alone writes run.json, metrics.csv, TensorBoard scalars and pictures, and
      checkpoints; the logged losses are averages over the ranks. A checkpoint holds the state of
      the unwrapped network, so it loads on any world size and without DDP.
    - Resume: rank 0 reads and checks the checkpoint and sends its state to every rank (the other
      machines need no copy of the run folder). Any world size may resume any checkpoint; the
      data order stays that of (seed, epoch), but which shards each rank reads changes with the
      number of ranks and workers.
    - Ctrl-C or SIGTERM on any rank stops every rank after the same step (the ranks agree on it
      after each step), and rank 0 writes the checkpoint.
    """

    metric_names: tuple = METRICS
    """The columns of metrics.csv."""

    def __init__(self, config: TrainConfig, shards, options: FitOptions):
        self.config = config.validate()
        self.shards = shards
        self.options = options
        self.step = 0
        self.owns_process_group = False
        launched = launched_ranks()
        if dist.is_available() and dist.is_initialized():  # the caller's process group
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            self.local_rank = launched[2] if launched else 0
        elif launched is not None:
            self.rank, self.world_size, self.local_rank = launched
        else:
            self.rank, self.world_size, self.local_rank = 0, 1, 0
        self.distributed = launched is not None or (dist.is_available() and dist.is_initialized())
        """True when this is one rank of a process group (even a group of one)."""
        self.is_main = self.rank == 0
        """Rank 0: the one that writes the run folder."""
        self.device = rank_device(options.device, self.local_rank, self.world_size) if self.distributed \
            else resolve_device(options.device)
        if self.distributed and not dist.is_initialized():
            self._join_process_group()
        self.run_dir = Path(options.run_dir)
        self.checkpoint_path = self.run_dir / "checkpoint.pt"
        torch.manual_seed(config.seed)  # a random backbone is the same for the same seed
        self.backbone = Backbone().to(self.device)
        self.backbone_record = self._load_backbone()
        self.model = initial_model(config).to(self.device)
        """The network itself: what checkpoints hold and pictures are drawn with."""
        self.net = self.model
        """What a training step runs: ``model``, or ``model`` in DistributedDataParallel."""
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(self.model, device_ids=[self.device.index]
                                               if self.device.type == "cuda" else None)
            self._seed_rank()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, betas=tuple(config.betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, config))
        self.neg_src, self.neg_tgt = negative_pairs(config.positives, config.negatives)
        self.fingerprint = dataset_fingerprint(shards)
        self.stop_requested = False
        self.validation_best: dict | None = None
        """The best validation mAP so far and its step (``{"value", "step"}``), kept in checkpoints."""
        self._signalled_at = 0.0

    def _load_backbone(self) -> dict:
        """Load the frozen backbone's weights (``options.backbone_weights``); their record
        ``{"source", "format", "sha256"}``. A stage that starts from a checkpoint takes its
        backbone from there instead (:mod:`trainer.hardneg`)."""
        return load_backbone_weights(self.backbone, self.options.backbone_weights)

    def _join_process_group(self) -> None:
        """Initialise the process group from the launcher's environment (MASTER_ADDR, MASTER_PORT):
        NCCL when this rank trains on a GPU, gloo on the CPU."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            dist.init_process_group("nccl", device_id=self.device)
        else:
            dist.init_process_group("gloo")
        self.owns_process_group = True

    def _seed_rank(self) -> None:
        """Give ranks other than 0 their own torch random stream (dropout draws), derived from the
        seed, the rank and the step; rank 0 keeps the stream a one-process run has."""
        if self.rank:
            torch.manual_seed(random.Random(f"{self.config.seed}:rank:{self.rank}:{self.step}").getrandbits(63))

    def close(self) -> None:
        """Leave the process group, if this Trainer joined it (one made by the caller stays)."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_process_group = False

    # -- one step ---------------------------------------------------------------------------

    def features(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 1024, H/16, W/16) L2-normalised frozen features."""
        with torch.no_grad(), self.autocast():
            return self.backbone(normalise(images_uint8.to(self.device, non_blocking=True))).float()

    def autocast(self):
        """bf16 autocast on CUDA; nothing on the CPU."""
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def forward(self, batch: dict, extra_negatives: FeaturePairs | None = None) -> tuple[dict, tuple]:
        """Loss dict and the positives' outputs (src_out, tgt_out) of one batch.

        ``extra_negatives``: backbone features (K, C, h, w) of the sources and of the targets of K
        more negative pairs (the hard negatives of :mod:`trainer.hardneg`), run together with the
        batch's own negatives and supervised as they are (both predicted masks towards 0)."""
        to = lambda name: batch[name].to(self.device, non_blocking=True)  # noqa: E731
        src_feat, tgt_feat = self.features(batch["src_image"]), self.features(batch["tgt_image"])
        neg_src_feat, neg_tgt_feat = src_feat[self.neg_src], tgt_feat[self.neg_tgt]
        if extra_negatives is not None:
            neg_src_feat = torch.cat([neg_src_feat, extra_negatives[0].to(self.device, neg_src_feat.dtype)])
            neg_tgt_feat = torch.cat([neg_tgt_feat, extra_negatives[1].to(self.device, neg_tgt_feat.dtype)])
        with self.autocast():
            src_out, tgt_out = self.net(src_feat, tgt_feat, None, to("tgt_hide"))
            neg_src_out = neg_tgt_out = None
            if len(neg_src_feat):
                neg_src_out, neg_tgt_out = self.net(neg_src_feat, neg_tgt_feat)
        truth = PairBatch(src_mask=to("src_mask"), tgt_mask=to("tgt_mask"),
                          src_to_tgt=to("src_to_tgt"), tgt_to_src=to("tgt_to_src"))
        outs = [o.float() if o is not None else None for o in (src_out, tgt_out, neg_src_out, neg_tgt_out)]
        losses = step_loss(*outs, truth, self.config.eta, mask_loss=self.config.mask_loss,
                           transported_mask_loss=self.config.transported_mask_loss)
        return losses, (outs[0], outs[1])

    def train_step(self, batch: dict, extra_negatives: FeaturePairs | None = None) -> dict:
        """One optimiser step on ``batch`` (and ``extra_negatives``, see :meth:`forward`)."""
        self.net.train()
        losses, _ = self.forward(batch, extra_negatives)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return losses

    # -- checkpoints --------------------------------------------------------------------------

    def save(self) -> Path:
        """Write checkpoint.pt (rank 0's business in a multi-process run: :meth:`fit` calls it
        there only). The network's state is that of the unwrapped module."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_save({
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "world_size": self.world_size,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "config": self.config.to_dict(),
            "config_hash": config_hash(self.config),
            "dataset_fingerprint": self.fingerprint,
            "backbone": self.backbone_record,
            "backbone_state": self.backbone.state_dict(),
            "rng": rng_state(),
            "validation_best": self.validation_best,
            **self._checkpoint_extra(),
        }, self.checkpoint_path)
        return self.checkpoint_path

    def _checkpoint_extra(self) -> dict:
        """More entries of checkpoint.pt (a later stage's record, :mod:`trainer.hardneg`); none here."""
        return {}

    def restore(self, path: Path, force: bool = False) -> None:
        """Continue from ``path``: model, optimiser, schedule, step and random state. Refuses a
        checkpoint of another config or dataset unless ``force``."""
        self._apply_state(self._checked_state(path, force))

    def _checked_state(self, path: Path, force: bool) -> dict:
        """What :meth:`restore` takes from ``path``, after checking that it belongs to this run."""
        state = load_checkpoint(path)
        problems = self._resume_problems(state)
        if problems and not force:
            raise ResumeError(f"{path}: " + "; ".join(problems) + " (use --force to resume anyway)")
        try:
            resumed = {name: state[name] for name in ("model", "optimizer", "scheduler", "step", "rng")}
        except KeyError as error:
            raise ResumeError(f"{path}: not a trainer checkpoint (no {error})") from error
        return {**resumed, "validation_best": state.get("validation_best"), **self._resumed_extra(state)}

    def _resume_problems(self, state: dict) -> list[str]:
        """Why checkpoint ``state`` does not belong to this run (empty when it does)."""
        problems = []
        if state.get("config_hash") != config_hash(self.config):
            problems.append("its training config differs from this run's")
        if state.get("dataset_fingerprint") != self.fingerprint:
            problems.append(f"it was trained on data {str(state.get('dataset_fingerprint'))[:12]}, "
                            f"these shards are {str(self.fingerprint)[:12]}")
        return problems

    def _resumed_extra(self, state: dict) -> dict:
        """The entries of :meth:`_checkpoint_extra` that a resume takes back from checkpoint ``state``
        (sent to every rank with the rest, given to :meth:`_apply_state`); none here."""
        return {}

    def _apply_state(self, state: dict) -> None:
        self.validation_best = state.get("validation_best")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        set_rng_state(state["rng"])
        if self.distributed:
            self._seed_rank()

    # -- the run ------------------------------------------------------------------------------

    def write_run_record(self) -> Path:
        """``run.json``: what this run trains (the config, whose ``milestone`` is the step of the
        learning-rate decay or null for none, and its hash), on what (the shards as given, their
        fingerprint), from which backbone weights, the step it starts at (0, or where a resume
        picks up), and on how many ranks (each takes the config's positives and negatives per
        step)."""
        path = self.run_dir / "run.json"
        return atomic_write_bytes(path, (json.dumps(self._run_record(), indent=2, sort_keys=True, default=str)
                                         + "\n").encode())

    def _run_record(self) -> dict:
        """What :meth:`write_run_record` writes."""
        import datagen

        return {"config": self.config.to_dict(), "config_hash": config_hash(self.config), "shards": str(self.shards),
                "dataset_fingerprint": self.fingerprint, "backbone": self.backbone_record,
                "start_step": self.step, "device": str(self.device), "world_size": self.world_size,
                "segswap_version": datagen.__version__,
                "shards_checked": self.options.verify_shards is not False}

    def _on_signal(self, signum, frame):
        now = time.monotonic()
        if self.stop_requested:
            if self.distributed and now - self._signalled_at < REPEATED_SIGNAL_S:
                return  # the same request delivered twice (see REPEATED_SIGNAL_S)
            raise KeyboardInterrupt  # a second signal: stop now
        self.stop_requested, self._signalled_at = True, now

    def _loader(self):
        return make_loader(self.shards, self.config, self.options.workers, start_epoch=self.step,
                           verify=self.options.verify_shards, rank=self.rank, world_size=self.world_size)

    def _start(self):
        """(loader, metrics logger) of a run that starts or resumes: the run folder is checked,
        the checkpoint read and applied, run.json written and the logs opened on rank 0 alone.
        In a multi-process run rank 0 then sends its outcome to every rank, an error (every rank
        raises it) or the state to resume from (every rank applies it): no rank starts training
        before rank 0 has checked and created the run folder, and the other machines need no
        copy of it. The logger is None on the other ranks."""
        options = self.options
        loader = logger = failure = state = None
        if self.is_main:
            try:
                if options.resume and self.checkpoint_path.is_file():
                    state = self._checked_state(self.checkpoint_path, options.force)
                    self._apply_state(state)
                elif options.resume:
                    raise ResumeError(f"--resume: no checkpoint at {self.checkpoint_path}")
                elif self.checkpoint_path.is_file():
                    raise ResumeError(f"{self.checkpoint_path} exists: continue it with --resume, or use another "
                                      f"--out")
                loader = self._loader()
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self.write_run_record()
                logger = MetricsLogger(self.run_dir, resume=options.resume, fields=self.metric_names)
            except Exception as error:
                if not self.distributed:
                    raise
                failure = error
        if self.distributed:
            outcome = [None if failure is None else (type(failure).__name__, str(failure)), state]
            dist.broadcast_object_list(outcome, src=0)
            if failure is not None:
                raise failure
            if outcome[0] is not None:
                name, message = outcome[0]
                kinds = {kind.__name__: kind for kind in (ResumeError, ValueError, FileNotFoundError, OSError)}
                if name in kinds:
                    raise kinds[name](message)
                raise RuntimeError(f"rank 0 could not start the run: {name}: {message}")
            if not self.is_main:
                if outcome[1] is not None:
                    self._apply_state(outcome[1])
                loader = self._loader()
        return loader, logger

    def _agree(self, losses: dict, skipped: int) -> tuple[dict, int, bool]:
        """(losses, skipped, stop) of the step just taken: the losses as floats, averaged over the
        ranks (each rank's NaN left out, as a rank without negatives has no ``acc_neg``), the
        shards or samples skipped by all ranks, and whether any rank has been asked to stop.
        One all_reduce of a few numbers per step, so that every rank stops after the same step:
        a rank that stopped alone would leave the others waiting in their next all_reduce."""
        values = {name: float(v.detach()) if torch.is_tensor(v) else float(v) for name, v in losses.items()}
        if not self.distributed:
            return values, skipped, self.stop_requested
        numbers = [float(self.stop_requested), float(skipped)]
        for value in values.values():
            numbers += [value, 1.0] if math.isfinite(value) else [0.0, 0.0]
        total = torch.tensor(numbers, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        total = total.tolist()
        sums, counts = total[2::2], total[3::2]
        averaged = {name: (value / count if count else math.nan) for name, value, count in zip(values, sums, counts)}
        return averaged, int(total[1]), total[0] > 0

    def fit(self) -> dict:
        """Train until ``config.steps``; returns the last metrics (in a multi-process run, the
        averages over the ranks, on every rank). Writes checkpoint.pt every ``checkpoint_every``
        steps and on SIGINT/SIGTERM, metrics.csv, and TensorBoard logs (rank 0 only)."""
        options = self.options
        loader, logger = self._start()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        metrics: dict = {}
        skipped = 0
        stop = False
        started, last_step = time.perf_counter(), self.step
        try:
            with tqdm(total=self.config.steps, initial=self.step, unit="step", file=sys.stderr, dynamic_ncols=True,
                      disable=not (options.progress and self.is_main)) as bar:
                batches = iter(loader)
                # checked before a batch is read: once the ranks agree to stop, none reads another
                while self.step < self.config.steps and not (stop if self.distributed else self.stop_requested):
                    batch = next(batches, None)
                    if batch is None:  # the stream is endless; a finite loader just ends the run
                        break
                    losses, batch_skipped, stop = self._agree(self.train_step(batch), batch["skipped"])
                    skipped += batch_skipped
                    bar.update(1)
                    if self.step % options.log_every == 0 or self.step == self.config.steps:
                        now = time.perf_counter()
                        metrics = {"step": self.step, **losses, "lr": self.scheduler.get_last_lr()[0],
                                   "steps_per_s": (self.step - last_step) / max(now - started, 1e-9),
                                   "skipped": skipped}
                        started, last_step = now, self.step
                        if logger is not None:
                            logger.scalars(metrics)
                        bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['acc']:.3f}",
                                        it_s=f"{metrics['steps_per_s']:.2f}")
                    if logger is not None and self.step % options.image_every == 0:
                        logger.image(self.step, batch, self._predict_first(batch))
                    if self.is_main and self.step % options.checkpoint_every == 0:
                        self.save()
                    if self.is_main and options.validation is not None \
                            and self.step % options.validation.every == 0:
                        self._validate(logger)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.is_main:
                self.save()
            if logger is not None:
                logger.close()
        if self.distributed:
            dist.barrier()  # every rank returns once rank 0 has written the last checkpoint
        if skipped and self.is_main:
            warnings.warn(f"{skipped} corrupt shards or samples were skipped (see the warnings above)", stacklevel=2)
        return metrics

    def _validate(self, logger) -> dict:
        """Score the retrieval benchmark with the network as it is (:mod:`trainer.selection`), log
        it, and when it is the best so far write the checkpoint and copy it to best.pt."""
        from .selection import append_row, is_better, keep_best, validate

        inference = Inference(self.config, self.backbone, self.model, self.step, self.backbone_record)
        result = validate(self.options.validation, inference, self.run_dir)
        if is_better(result["val_map"], self.validation_best):
            self.validation_best = {"value": result["val_map"], "step": self.step}
            keep_best(self.save())
        best = self.validation_best or {}
        row = {"step": self.step, **result, "best_map": best.get("value"), "best_step": best.get("step")}
        append_row(self.run_dir, row)
        if logger is not None and logger.tensorboard is not None:
            logger.tensorboard.add_scalar("val/map", result["val_map"], self.step)
        return row

    def _predict_first(self, batch: dict) -> tuple:
        """The first positive pair's predicted (src_out, tgt_out), (3, h, w) each, for pictures."""
        self.model.eval()
        with torch.no_grad():
            src_feat = self.features(batch["src_image"][:1])
            tgt_feat = self.features(batch["tgt_image"][:1])
            src_out, tgt_out = self.model(src_feat, tgt_feat)
        return src_out[0].float().cpu(), tgt_out[0].float().cpu()


class MetricsLogger:
    """metrics.csv (appended on resume; columns ``fields``) and TensorBoard scalars and image grids."""

    def __init__(self, run_dir: Path, resume: bool, fields: tuple = METRICS):
        self.csv_path = run_dir / "metrics.csv"
        fresh = not (resume and self.csv_path.is_file())
        self.csv_file = open(self.csv_path, "w" if fresh else "a", newline="")
        self.csv = csv.DictWriter(self.csv_file, fieldnames=fields, extrasaction="ignore")
        if fresh:
            self.csv.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency; keep training if it is broken
            warnings.warn("tensorboard is not importable: no TensorBoard logs for this run", stacklevel=2)
            self.tensorboard = None
        else:
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def scalars(self, metrics: dict) -> None:
        self.csv.writerow(metrics)
        self.csv_file.flush()
        if self.tensorboard is not None:
            for name, value in metrics.items():
                if name != "step":
                    self.tensorboard.add_scalar(f"train/{name}", value, metrics["step"])

    def image(self, step: int, batch: dict, outputs: tuple) -> None:
        if self.tensorboard is None:
            return
        from .visual import render_prediction

        picture = render_prediction(batch["src_image"][0].numpy(), batch["tgt_image"][0].numpy(), *outputs)
        self.tensorboard.add_image("train/prediction", picture, step, dataformats="HWC")

    def close(self) -> None:
        self.csv_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def fit(config: TrainConfig, shards, options: FitOptions) -> dict:
    """Train ``config`` on ``shards`` (see :class:`Trainer`), then leave the process group the
    Trainer joined, if any."""
    trainer = Trainer(config, shards, options)
    try:
        return trainer.fit()
    finally:
        trainer.close()
