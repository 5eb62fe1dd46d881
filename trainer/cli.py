"""``trainer`` command line: maps options onto :class:`TrainConfig` and calls the modules."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .config import TrainConfig, TransformerConfig

DEFAULTS = TrainConfig()
TDEFAULTS = TransformerConfig()


def _fail(error: Exception) -> None:
    raise click.ClickException(str(error)) from error


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """Train networks that find the same visual pattern in two images, from datagen shards.

    Typical use: trainer fit --shards shards/coco --out runs/transformer
    """


@main.command()
@click.option("--shards", required=True,
              help="Shard directory (its manifest.json is checked), manifest.json, brace pattern "
                   "('shards/shard-{000000..000099}.tar') or .tar file.")
@click.option("--out", "run_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/transformer"),
              show_default=True, help="Run directory: checkpoint.pt, metrics.csv, tensorboard/, run.json.")
@click.option("--arch", default=DEFAULTS.arch, show_default=True, help="Network: 'transformer'.")
@click.option("--steps", type=click.IntRange(min=1), default=DEFAULTS.steps, show_default=True,
              help="Total training steps (the paper: 200k).")
@click.option("--positives", type=click.IntRange(min=1), default=DEFAULTS.positives, show_default=True,
              help="Positive pairs per step (P).")
@click.option("--negatives", type=click.IntRange(min=0), default=DEFAULTS.negatives, show_default=True,
              help="Negative pairs per step (N): the source of one positive with the target of another.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS.lr, show_default=True,
              help="Adam learning rate (betas 0.5, 0.999).")
@click.option("--warmup", type=click.IntRange(min=1), default=DEFAULTS.warmup_steps, show_default=True,
              help="Linear warm-up steps.")
@click.option("--milestone", type=click.IntRange(min=1), default=None,
              help="Step at which the learning rate is multiplied by 0.05. Default: half of --steps.")
@click.option("--eta", type=click.FloatRange(min=0), default=DEFAULTS.eta, show_default=True,
              help="Weight of the correspondence term of Eq. 2.")
@click.option("--layers", default=TDEFAULTS.layers, show_default=True,
              help="Transformer layers: S = self-attention within each image, C = cross-attention.")
@click.option("--d-model", type=click.IntRange(min=2), default=TDEFAULTS.d_model, show_default=True,
              help="Transformer width.")
@click.option("--heads", type=click.IntRange(min=1), default=TDEFAULTS.heads, show_default=True,
              help="Attention heads.")
@click.option("--feedforward", type=click.IntRange(min=1), default=TDEFAULTS.feedforward, show_default=True,
              help="Feed-forward width.")
@click.option("--shuffle-buffer", type=click.IntRange(min=1), default=DEFAULTS.shuffle_buffer, show_default=True,
              help="Samples held for shuffling by each loader worker.")
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True, help="Seed of the data order and init.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Data loader worker processes (0: load in the main process).")
@click.option("--device", default="auto", show_default=True, help="'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:1'.")
@click.option("--backbone-weights", default=None,
              help="ResNet-50 weights: a MoCo-v2 checkpoint (moco_v2_800ep_pretrain.pth.tar) or a torchvision/"
                   "timm ResNet-50 state dict. Default: looked up in $SEGSWAP_BACKBONE_WEIGHTS, ~/.cache/segswap "
                   "and torch hub's checkpoints folder. 'random': no pre-training (smoke tests only; recorded).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Write checkpoint.pt every this many steps (and on Ctrl-C / SIGTERM).")
@click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True,
              help="Metrics (CSV and TensorBoard) every this many steps.")
@click.option("--image-every", type=click.IntRange(min=1), default=500, show_default=True,
              help="A picture of predicted masks and correspondences in TensorBoard every this many steps.")
@click.option("--resume", is_flag=True, help="Continue from --out/checkpoint.pt (same config and data).")
@click.option("--force", is_flag=True, help="With --resume: accept a checkpoint of another config or data set.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def fit(shards, run_dir, arch, steps, positives, negatives, lr, warmup, milestone, eta, layers, d_model, heads,
        feedforward, shuffle_buffer, seed, workers, device, backbone_weights, checkpoint_every, log_every,
        image_every, resume, force, no_progress):
    """Train a network on datagen shards (paper section 3.2, Eq. 2)."""
    import torch

    from .backbone import BackboneWeightsError, find_backbone_weights
    from .loop import FitOptions, ResumeError, fit as run_fit

    transformer = TransformerConfig(layers=layers, d_model=d_model, heads=heads, feedforward=feedforward)
    try:
        config = TrainConfig(arch=arch, steps=steps, positives=positives, negatives=negatives, lr=lr,
                             warmup_steps=warmup, milestone=milestone, eta=eta, shuffle_buffer=shuffle_buffer,
                             seed=seed, transformer=transformer).validate()
        weights = "random" if backbone_weights == "random" else find_backbone_weights(backbone_weights)
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    except BackboneWeightsError as error:
        _fail(error)
    if weights == "random":
        click.echo("WARNING: --backbone-weights random: the backbone is not pre-trained; this run is for "
                   "smoke tests only and is recorded as such in run.json and the checkpoint.", err=True)
    torch.manual_seed(seed)
    options = FitOptions(run_dir=run_dir, device=device, workers=workers, checkpoint_every=checkpoint_every,
                         log_every=log_every, image_every=image_every, resume=resume, force=force,
                         backbone_weights=weights, progress=not no_progress)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"config": config.to_dict(), "shards": str(shards),
                                                  "backbone_weights": weights}, indent=2, sort_keys=True))
    try:
        metrics = run_fit(config, shards, options)
    except (ResumeError, FileNotFoundError, ValueError, BackboneWeightsError) as error:
        _fail(error)
    summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "step")
    click.echo(f"stopped at step {metrics.get('step', '?')}: {summary}; checkpoint {run_dir / 'checkpoint.pt'}")


@main.command()
@click.argument("shards", type=click.Path(exists=True, path_type=Path))
def inspect(shards):
    """Read every sample of a shard directory (or one .tar) and print what it holds."""
    from .data import summarise

    try:
        summary = summarise(shards)
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
    for key, value in summary.items():
        click.echo(f"{key}: {value}")


if __name__ == "__main__":
    main()
