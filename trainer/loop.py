"""The training loop: optimiser and schedule, mixed precision, checkpoints, resume, logging.

One step (paper section 3.2, Eq. 2): P positive pairs from the stream and N negatives made by
pairing the source of one positive with the target of another; frozen backbone features;
the network's masks and correspondences for all of them; ``trainer.loss.step_loss``; Adam.
"""
from __future__ import annotations

import csv
import json
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from datagen.format.atomic import atomic_write, atomic_write_bytes
from datagen.format.device import resolve_device
from datagen.format.hashing import config_hash

from .backbone import Backbone, load_backbone_weights, normalise
from .config import TrainConfig
from .data import dataset_fingerprint, make_loader
from .loss import PairBatch, step_loss
from .models import build_model

CHECKPOINT_FORMAT = 1
METRICS = ("step", "loss", "mask_bce", "corr_l1", "acc", "acc_pos", "acc_neg", "lr", "steps_per_s", "skipped")


def initial_model(config: TrainConfig) -> torch.nn.Module:
    """The network as a run of ``config`` starts: torch's generator is seeded with ``config.seed``
    just before the network is built, so ``fit()`` from Python is reproducible (dropout draws go on
    from that seed) and ``trainer eval --vs-untrained`` rebuilds a run's starting point."""
    torch.manual_seed(config.seed)
    return build_model(config)


class ResumeError(RuntimeError):
    """A checkpoint that does not belong to this run (other config or data) or is unreadable."""


def negative_pairs(positives: int, negatives: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(source index, target index) of the negatives: source i with target (i + k) mod P for
    k = 1..P-1 in turn (the authors' order), the first ``negatives`` of them."""
    src = [i for k in range(1, positives) for i in range(positives)]
    tgt = [(i + k) % positives for k in range(1, positives) for i in range(positives)]
    return torch.tensor(src[:negatives], dtype=torch.long), torch.tensor(tgt[:negatives], dtype=torch.long)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Learning-rate multiplier: linear warm-up, then 1, then ``lr_decay`` after the milestone."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    return 1.0 if step < config.milestone_step else config.lr_decay


def atomic_save(payload: dict, path: Path) -> None:
    """torch.save through :func:`datagen.format.atomic.atomic_write` (``path.tmp``, fsync, rename):
    a checkpoint file is never half written, and a failed save leaves the previous one."""
    atomic_write(path, lambda handle: torch.save(payload, handle))


def load_checkpoint(path) -> dict:
    """A checkpoint read with ``weights_only=True`` (tensors and plain data only, never code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - reported with the file's name
        raise ResumeError(f"{path}: not a readable checkpoint ({error})") from error


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


class Trainer:
    """Holds the backbone, network, optimiser and schedule of one run; see :meth:`fit`."""

    def __init__(self, config: TrainConfig, shards, options: FitOptions):
        self.config = config.validate()
        self.shards = shards
        self.options = options
        self.device = resolve_device(options.device)
        self.run_dir = Path(options.run_dir)
        self.checkpoint_path = self.run_dir / "checkpoint.pt"
        torch.manual_seed(config.seed)  # a random backbone is the same for the same seed
        self.backbone = Backbone().to(self.device)
        self.backbone_record = load_backbone_weights(self.backbone, options.backbone_weights)
        self.model = initial_model(config).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, betas=tuple(config.betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, config))
        self.neg_src, self.neg_tgt = negative_pairs(config.positives, config.negatives)
        self.step = 0
        self.fingerprint = dataset_fingerprint(shards)
        self.stop_requested = False

    # -- one step ---------------------------------------------------------------------------

    def features(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 1024, H/16, W/16) L2-normalised frozen features."""
        with torch.no_grad(), self.autocast():
            return self.backbone(normalise(images_uint8.to(self.device, non_blocking=True))).float()

    def autocast(self):
        """bf16 autocast on CUDA; nothing on the CPU."""
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def forward(self, batch: dict) -> tuple[dict, tuple]:
        """Loss dict and the positives' outputs (src_out, tgt_out) of one batch."""
        to = lambda name: batch[name].to(self.device, non_blocking=True)  # noqa: E731
        src_feat, tgt_feat = self.features(batch["src_image"]), self.features(batch["tgt_image"])
        with self.autocast():
            src_out, tgt_out = self.model(src_feat, tgt_feat, None, to("tgt_hide"))
            neg_src_out = neg_tgt_out = None
            if len(self.neg_src):
                neg_src_out, neg_tgt_out = self.model(src_feat[self.neg_src], tgt_feat[self.neg_tgt])
        truth = PairBatch(src_mask=to("src_mask"), tgt_mask=to("tgt_mask"),
                          src_to_tgt=to("src_to_tgt"), tgt_to_src=to("tgt_to_src"))
        outs = [o.float() if o is not None else None for o in (src_out, tgt_out, neg_src_out, neg_tgt_out)]
        return step_loss(*outs, truth, self.config.eta), (outs[0], outs[1])

    def train_step(self, batch: dict) -> dict:
        self.model.train()
        losses, _ = self.forward(batch)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return losses

    # -- checkpoints --------------------------------------------------------------------------

    def save(self) -> Path:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_save({
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "config": self.config.to_dict(),
            "config_hash": config_hash(self.config),
            "dataset_fingerprint": self.fingerprint,
            "backbone": self.backbone_record,
            "backbone_state": self.backbone.state_dict(),
            "rng": rng_state(),
        }, self.checkpoint_path)
        return self.checkpoint_path

    def restore(self, path: Path, force: bool = False) -> None:
        """Continue from ``path``: model, optimiser, schedule, step and random state. Refuses a
        checkpoint of another config or dataset unless ``force``."""
        state = load_checkpoint(path)
        problems = []
        if state.get("config_hash") != config_hash(self.config):
            problems.append("its training config differs from this run's")
        if state.get("dataset_fingerprint") != self.fingerprint:
            problems.append(f"it was trained on data {str(state.get('dataset_fingerprint'))[:12]}, "
                            f"these shards are {str(self.fingerprint)[:12]}")
        if problems and not force:
            raise ResumeError(f"{path}: " + "; ".join(problems) + " (use --force to resume anyway)")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        set_rng_state(state["rng"])

    # -- the run ------------------------------------------------------------------------------

    def write_run_record(self) -> Path:
        """``run.json``: what this run trains (the config with its milestone resolved to a step,
        its hash), on what (the shards as given, their fingerprint), from which backbone weights,
        and the step it starts at (0, or where a resume picks up)."""
        import datagen

        config = {**self.config.to_dict(), "milestone": self.config.milestone_step}
        record = {"config": config, "config_hash": config_hash(self.config), "shards": str(self.shards),
                  "dataset_fingerprint": self.fingerprint, "backbone": self.backbone_record,
                  "start_step": self.step, "device": str(self.device), "segswap_version": datagen.__version__,
                  "shards_checked": self.options.verify_shards is not False}
        path = self.run_dir / "run.json"
        return atomic_write_bytes(path, (json.dumps(record, indent=2, sort_keys=True, default=str) + "\n").encode())

    def _on_signal(self, signum, frame):
        if self.stop_requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.stop_requested = True

    def fit(self) -> dict:
        """Train until ``config.steps``; returns the last metrics. Writes checkpoint.pt every
        ``checkpoint_every`` steps and on SIGINT/SIGTERM, metrics.csv, and TensorBoard logs."""
        options = self.options
        if options.resume and self.checkpoint_path.is_file():
            self.restore(self.checkpoint_path, options.force)
        elif options.resume:
            raise ResumeError(f"--resume: no checkpoint at {self.checkpoint_path}")
        elif self.checkpoint_path.is_file():
            raise ResumeError(f"{self.checkpoint_path} exists: continue it with --resume, or use another --out")
        loader = make_loader(self.shards, self.config, options.workers, start_epoch=self.step,
                             verify=options.verify_shards)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.write_run_record()
        logger = MetricsLogger(self.run_dir, resume=options.resume)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        metrics: dict = {}
        skipped = 0
        started, last_step = time.perf_counter(), self.step
        try:
            with tqdm(total=self.config.steps, initial=self.step, unit="step", disable=not options.progress,
                      file=sys.stderr, dynamic_ncols=True) as bar:
                for batch in loader:
                    if self.step >= self.config.steps or self.stop_requested:
                        break
                    skipped += batch["skipped"]
                    losses = self.train_step(batch)
                    bar.update(1)
                    if self.step % options.log_every == 0 or self.step == self.config.steps:
                        now = time.perf_counter()
                        metrics = {"step": self.step, **{k: float(v.detach()) if torch.is_tensor(v) else float(v)
                                                         for k, v in losses.items()},
                                   "lr": self.scheduler.get_last_lr()[0],
                                   "steps_per_s": (self.step - last_step) / max(now - started, 1e-9),
                                   "skipped": skipped}
                        started, last_step = now, self.step
                        logger.scalars(metrics)
                        bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['acc']:.3f}",
                                        it_s=f"{metrics['steps_per_s']:.2f}")
                    if self.step % options.image_every == 0:
                        logger.image(self.step, batch, self._predict_first(batch))
                    if self.step % options.checkpoint_every == 0:
                        self.save()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.save()
            logger.close()
        if skipped:
            warnings.warn(f"{skipped} corrupt shards or samples were skipped (see the warnings above)", stacklevel=2)
        return metrics

    def _predict_first(self, batch: dict) -> tuple:
        """The first positive pair's predicted (src_out, tgt_out), (3, h, w) each, for pictures."""
        self.model.eval()
        with torch.no_grad():
            src_feat = self.features(batch["src_image"][:1])
            tgt_feat = self.features(batch["tgt_image"][:1])
            src_out, tgt_out = self.model(src_feat, tgt_feat)
        return src_out[0].float().cpu(), tgt_out[0].float().cpu()


class Inference(NamedTuple):
    """A checkpoint ready to run: in eval mode, on the device asked for."""

    config: TrainConfig
    backbone: Backbone
    model: torch.nn.Module
    step: int
    backbone_record: dict
    """Where the backbone's weights came from: ``{"source", "format", "sha256"}``; source "random"
    for a run trained with ``--backbone-weights random``."""


def load_for_inference(path, device: str = "auto") -> Inference:
    """The config, backbone, model, step and backbone record of a checkpoint, in eval mode on
    ``device``: the checkpoint holds the frozen backbone's weights too, so evaluation and
    prediction need no other file. Anything that is not a trainer checkpoint with a valid config
    raises :class:`ResumeError`."""
    state = load_checkpoint(path)
    try:
        config = TrainConfig.from_dict(state["config"]).validate()
        backbone = Backbone()
        backbone.load_state_dict(state["backbone_state"])
        model = build_model(config)
        model.load_state_dict(state["model"])
        step = int(state["step"])
        record = dict(state.get("backbone") or {})
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as error:
        raise ResumeError(f"{path}: not a trainer checkpoint ({type(error).__name__}: {error})") from error
    target = resolve_device(device)
    return Inference(config, backbone.to(target).eval(), model.to(target).eval(), step, record)


class MetricsLogger:
    """metrics.csv (appended on resume) and TensorBoard scalars and image grids."""

    def __init__(self, run_dir: Path, resume: bool):
        self.csv_path = run_dir / "metrics.csv"
        fresh = not (resume and self.csv_path.is_file())
        self.csv_file = open(self.csv_path, "w" if fresh else "a", newline="")
        self.csv = csv.DictWriter(self.csv_file, fieldnames=METRICS, extrasaction="ignore")
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
    """Train ``config`` on ``shards`` (see :class:`Trainer`)."""
    return Trainer(config, shards, options).fit()
