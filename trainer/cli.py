"""``trainer`` command line: maps options onto :class:`TrainConfig` and calls the modules."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .config import NCNetConfig, TrainConfig, TransformerConfig
from .models import MODELS

DEFAULTS = TrainConfig()
TDEFAULTS = TransformerConfig()
NDEFAULTS = NCNetConfig()
ARCHITECTURES = MODELS.names()
"""Choices of ``--arch``: the registered networks (listing them imports no network module)."""
PRESETS = {
    "paper": {},
    "cpu": {"steps": 500, "image_size": 128, "d_model": 128, "feedforward": 256, "lr": 1e-3, "warmup": 10,
            "shuffle_buffer": 100, "workers": 1, "log_every": 10, "checkpoint_every": 100, "image_every": 50},
}
"""Option defaults of ``trainer fit --preset``; options given on the command line win. 'cpu' is a
smoke run that takes about five minutes on two cores (128 px: an 8 x 8 grid, a narrower
transformer, a larger learning rate with a short warm-up)."""


def _apply_preset(ctx, param, value: str) -> str:
    """Eager callback of --preset: the preset's values become the defaults of the options that
    follow (click reads ``ctx.default_map`` when it fills in an option the user did not give)."""
    ctx.default_map = {**(ctx.default_map or {}), **PRESETS[value]}
    return value


def _fail(error: Exception) -> None:
    raise click.ClickException(str(error)) from error


def _rank_zero() -> bool:
    """True unless this process is a rank other than 0 of a torchrun job (RANK in the
    environment): the messages of ``fit`` are printed once, by rank 0."""
    return os.environ.get("RANK", "0") == "0"


def _int_list(ctx, param, value: str) -> tuple[int, ...]:
    """'3,3' -> (3, 3); a usage error naming the option otherwise."""
    try:
        numbers = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as '3,3', got {value!r}") from None
    return numbers


def _joined(numbers) -> str:
    return ",".join(str(n) for n in numbers)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="segswap")
def main():
    """Train networks that find the same visual pattern in two images, from datagen shards.

    Typical use: trainer fit --shards shards/coco --out runs/transformer
    """


SHARDS_FORMS = ("a shard folder (its manifest.json is checked), its manifest.json, a brace pattern "
                "('shards/shard-{000000..000099}.tar', quoted) or one .tar file, on disk or by URL "
                "(https://, s3://, gs://; a folder URL needs its manifest.json)")


def _shard_set(shards, option: str | None = "--shards"):
    """The resolved shard set, or a usage error naming the option (checked before any slow work)."""
    from datagen.format.shardset import resolve_shard_set

    try:
        found = resolve_shard_set(shards)
        found.fingerprint  # noqa: B018 - a manifest whose fingerprint is not its shard list's is refused here
        return found
    except (ValueError, OSError) as error:
        if option is None:
            raise click.BadParameter(str(error), param_hint="SHARDS") from error
        raise click.BadParameter(str(error), param_hint=option) from error


@main.command(short_help="Train a network on datagen shards (progress bar, TensorBoard, checkpoints, --resume).")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="paper", show_default=True, is_eager=True,
              callback=_apply_preset, expose_value=False,
              help="Defaults for the options below: 'paper' (the paper's settings, as shown) or 'cpu', a short "
                   "smoke run (minutes on two cores): " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                          PRESETS["cpu"].items()) + ". Options you give win.")
@click.option("--shards", required=True, help=f"Training shards: {SHARDS_FORMS}.")
@click.option("--out", "run_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/transformer"),
              show_default=True, help="Run directory: checkpoint.pt, metrics.csv, tensorboard/, run.json.")
@click.option("--arch", type=click.Choice(ARCHITECTURES), default=DEFAULTS.arch, show_default=True,
              help="Network: 'transformer' (the cross-image transformer) or 'ncnet' (Sparse NC-Net, the paper's "
                   "second network; --ncnet-* options).")
@click.option("--steps", type=click.IntRange(min=1), default=DEFAULTS.steps, show_default=True,
              help="Total training steps (the paper: 200k).")
@click.option("--image-size", type=click.IntRange(min=16), default=DEFAULTS.image_size, show_default=True,
              help="Side of the square images the network sees, pixels (a multiple of 16; the grid is SIZE / 16). "
                   "Shards of another size are resized and their grids recomputed from the stored warps. "
                   "128 makes a CPU smoke run about 15x cheaper per step than the paper's 480.")
@click.option("--positives", type=click.IntRange(min=1), default=DEFAULTS.positives, show_default=True,
              help="Positive pairs per step (P).")
@click.option("--negatives", type=click.IntRange(min=0), default=DEFAULTS.negatives, show_default=True,
              help="Negative pairs per step (N): the source of one positive with the target of another.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS.lr, show_default=True,
              help="Adam learning rate (betas 0.5, 0.999).")
@click.option("--warmup", type=click.IntRange(min=1), default=DEFAULTS.warmup_steps, show_default=True,
              help="Linear warm-up steps.")
@click.option("--milestone", type=click.IntRange(min=1), default=None,
              help="Step from which the learning rate is multiplied by --lr-decay. Default: none, a constant rate "
                   "after the warm-up (the paper: 200k steps at 2e-4; its 5k steps at 1e-5 with hard negatives "
                   "are a separate stage).")
@click.option("--lr-decay", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS.lr_decay,
              show_default=True, help="Factor of the learning rate from --milestone on (2e-4 x 0.05 = 1e-5).")
@click.option("--eta", type=click.FloatRange(min=0), default=DEFAULTS.eta, show_default=True,
              help="Weight of the correspondence term of Eq. 2 (0: the paper's ablation without it).")
@click.option("--mask-loss/--no-mask-loss", default=DEFAULTS.mask_loss, show_default=True,
              help="Keep the mask term of Eq. 2 (each positive image's predicted mask against its ground truth). "
                   "--no-mask-loss is an ablation of the paper's Table 3; the negatives' masks are still pushed "
                   "towards 0.")
@click.option("--transported-mask-loss/--no-transported-mask-loss", default=DEFAULTS.transported_mask_loss,
              show_default=True,
              help="Keep the transported-mask term of Eq. 2 (the other image's predicted mask read at this image's "
                   "predicted correspondences, against this image's ground truth). --no-transported-mask-loss is "
                   "an ablation of the paper's Table 3.")
@click.option("--train-tps-prob", type=click.FloatRange(0, 1), default=DEFAULTS.tps_prob, show_default=True,
              help="Probability of warping the target of a pair by a new random thin-plate spline each time it is "
                   "loaded (image, mask and both correspondence fields together), as the authors' training does; "
                   "on top of the warps fixed when the shards were built. 0: off.")
@click.option("--train-tps-jitter", type=click.FloatRange(min=0), default=DEFAULTS.tps_jitter, show_default=True,
              help="Amplitude of that spline: the points of its g x g control grid move by U[-J/g, J/g] of the "
                   "image (the authors': 0.25).")
@click.option("--train-tps-grid-sizes", default=_joined(DEFAULTS.tps_grid_sizes), show_default=True,
              callback=_int_list, help="Sizes g of that control grid, one drawn per warp, comma-separated.")
@click.option("--layers", default=TDEFAULTS.layers, show_default=True,
              help="Transformer layers: S = self-attention within each image, C = cross-attention.")
@click.option("--d-model", type=click.IntRange(min=2), default=TDEFAULTS.d_model, show_default=True,
              help="Transformer width.")
@click.option("--heads", type=click.IntRange(min=1), default=TDEFAULTS.heads, show_default=True,
              help="Attention heads.")
@click.option("--feedforward", type=click.IntRange(min=1), default=TDEFAULTS.feedforward, show_default=True,
              help="Feed-forward width.")
@click.option("--ncnet-k", type=click.IntRange(min=1), default=NDEFAULTS.k, show_default=True,
              help="Sparse NC-Net: top-k matches kept per cell, in each direction, as sites of the 4-D correlation.")
@click.option("--ncnet-kernel-sizes", default=_joined(NDEFAULTS.kernel_sizes), show_default=True, callback=_int_list,
              help="Sparse NC-Net: kernel size of each sparse 4-D convolution (odd), comma-separated.")
@click.option("--ncnet-channels", default=_joined(NDEFAULTS.channels), show_default=True, callback=_int_list,
              help="Sparse NC-Net: output channels of each sparse 4-D convolution, comma-separated; the last is 1.")
@click.option("--ncnet-symmetric/--ncnet-asymmetric", default=NDEFAULTS.symmetric, show_default=True,
              help="Sparse NC-Net: also run the convolutions on the pair with its images swapped and add the result.")
@click.option("--ncnet-temperature", type=click.FloatRange(min=0, min_open=True), default=NDEFAULTS.temperature,
              show_default=True, help="Sparse NC-Net: the softmax of Eq. 1 reads the matching scores divided by this.")
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
@click.option("--verify-shards/--no-verify-shards", default=None,
              help="Check each shard's sha256 against its manifest before reading it (once per loader worker); a "
                   "shard whose bytes differ is skipped with a warning naming it. Default: the shards a manifest "
                   "beside them lists, with a warning naming the others; --verify-shards: every shard (an error "
                   "if one is not listed); --no-verify-shards: none (saves one read of each shard).")
@click.option("--resume", is_flag=True, help="Continue from --out/checkpoint.pt (same config and data).")
@click.option("--force", is_flag=True, help="With --resume: accept a checkpoint of another config or data set.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def fit(shards, run_dir, arch, steps, image_size, positives, negatives, lr, warmup, milestone, lr_decay, eta,
        mask_loss, transported_mask_loss, train_tps_prob, train_tps_jitter, train_tps_grid_sizes, layers, d_model,
        heads, feedforward, ncnet_k, ncnet_kernel_sizes, ncnet_channels, ncnet_symmetric, ncnet_temperature,
        shuffle_buffer, seed, workers, device, backbone_weights, checkpoint_every, log_every, image_every,
        verify_shards, resume, force, no_progress):
    """Train a network on datagen shards (paper section 3.2, Eq. 2).

    The options and --shards are checked first; run.json (the resolved config, data and backbone
    weights) is written when training starts.

    Several GPUs or machines: torchrun --nproc_per_node=N -m trainer fit ... (each rank takes
    --positives and --negatives per step; rank 0 writes --out).
    """
    transformer = TransformerConfig(layers=layers, d_model=d_model, heads=heads, feedforward=feedforward)
    ncnet = NCNetConfig(k=ncnet_k, kernel_sizes=ncnet_kernel_sizes, channels=ncnet_channels,
                        symmetric=ncnet_symmetric, temperature=ncnet_temperature)
    try:
        config = TrainConfig(arch=arch, steps=steps, image_size=image_size, positives=positives,
                             negatives=negatives, lr=lr, warmup_steps=warmup, milestone=milestone,
                             lr_decay=lr_decay, eta=eta, mask_loss=mask_loss,
                             transported_mask_loss=transported_mask_loss, tps_prob=train_tps_prob,
                             tps_jitter=train_tps_jitter, tps_grid_sizes=train_tps_grid_sizes,
                             shuffle_buffer=shuffle_buffer, seed=seed, transformer=transformer,
                             ncnet=ncnet).validate()
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    _shard_set(shards)

    import warnings

    from .backbone import RANDOM, BackboneWeightsError, find_backbone_weights
    from .loop import FitOptions, ResumeError
    from .loop import fit as run_fit

    try:
        weights = find_backbone_weights(backbone_weights)
    except BackboneWeightsError as error:
        _fail(error)
    if weights == RANDOM and _rank_zero():
        click.echo("WARNING: --backbone-weights random: the backbone is not pre-trained; this run is for "
                   "smoke tests only and is recorded as such in run.json and the checkpoint.", err=True)
    options = FitOptions(run_dir=run_dir, device=device, workers=workers, checkpoint_every=checkpoint_every,
                         log_every=log_every, image_every=image_every, resume=resume, force=force,
                         backbone_weights=weights, progress=not no_progress, verify_shards=verify_shards)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="the backbone keeps its RANDOM")  # said above, once
            metrics = run_fit(config, shards, options)
    except (ResumeError, FileNotFoundError, ValueError, BackboneWeightsError) as error:
        if not _rank_zero():
            sys.exit(1)  # every rank fails alike; rank 0 says why
        _fail(error)
    summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "step")
    if _rank_zero():
        click.echo(f"stopped at step {metrics.get('step', '?')}: {summary}; checkpoint {run_dir / 'checkpoint.pt'}")


@main.command(short_help="Read every sample through the trainer's reader and print counts.")
@click.argument("shards")
def inspect(shards):
    """Read every sample of a shard set through the trainer's reader and print what it holds;
    each unreadable shard or sample is named (exit 1), the reading goes on.

    SHARDS: a shard folder, its manifest.json, a brace pattern ('shards/shard-{000000..000009}.tar',
    quoted) or one .tar file.
    """
    from .data import summarise

    _shard_set(shards, option=None)
    try:
        summary, problems = summarise(shards)
    except (ValueError, OSError) as error:
        _fail(error)
    for key, value in summary.items():
        click.echo(f"{key}: {value}")
    for problem in problems:
        click.echo(f"BAD {problem}")
    if problems:
        click.echo(f"{len(problems)} unreadable shard(s) or sample(s) skipped", err=True)
        sys.exit(1)


_CKPT_TYPE = click.Path(exists=True, dir_okay=False, path_type=Path)
_DEVICE_HELP = "'auto' (CUDA if present, else the CPU), 'cpu', 'cuda', 'cuda:1'."


def _inference_errors():
    """The errors of reading checkpoints, shards and images, named by their file."""
    from datagen.format.imageio import BadInput

    from .loop import ResumeError

    return (ResumeError, BadInput, FileNotFoundError, ValueError)


RANDOM_BACKBONE_WARNING = ("WARNING: {ckpt} was trained with --backbone-weights random: its backbone is not "
                           "pre-trained, so its predictions are for smoke tests only.")


@main.command("eval", short_help="Evaluate a checkpoint on held-out shards: mask IoU, correspondence error, AP.")
@click.option("--shards", required=True, help=f"Validation shards, read in stored order: {SHARDS_FORMS}.")
@click.option("--ckpt", "checkpoint", type=_CKPT_TYPE, required=True,
              help="Checkpoint written by 'trainer fit' (checkpoint.pt); it holds the config, the network and the "
                   "backbone weights. Images are resized to its image size.")
@click.option("--vs-untrained", is_flag=True,
              help="Also evaluate the same network as its run started (initialised from the run's --seed, the "
                   "same backbone) and print both side by side: what training has learned.")
@click.option("--max-samples", type=click.IntRange(min=1), default=None,
              help="Evaluate only the first this many samples. Default: all of them.")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Pairs per forward pass (memory vs speed; the metrics do not depend on it).")
@click.option("--device", default="auto", show_default=True, help=_DEVICE_HELP)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the metrics (and the checkpoint, step and shards) to this JSON file.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def eval_command(shards, checkpoint, vs_untrained, max_samples, batch, device, json_path, no_progress):
    """Evaluate a checkpoint on held-out shards.

    Each sample is used without style, role swap or hidden tokens. Negatives pair sample i's source
    with sample i+1's target (cyclically). Prints: mask IoU on positives (prediction > 0.5 vs ground
    truth > 0.5, per image, averaged over the images that have a ground-truth cell > 0.5); the mean
    predicted mask on negatives; the correspondence error on positives (Euclidean distance in grid
    cells over ground-truth mask cells, both directions) and the share of those cells within one
    cell; the average precision of the Eq. 3 pair score separating positives from negatives.
    """
    from .evaluate import evaluate_checkpoint, format_table, json_ready

    _shard_set(shards)
    try:
        metrics = evaluate_checkpoint(checkpoint, shards, max_samples=max_samples, batch=batch, device=device,
                                      progress=not no_progress, vs_untrained=vs_untrained)
    except _inference_errors() as error:
        _fail(error)
    if metrics["backbone"].get("source") == "random":
        click.echo(RANDOM_BACKBONE_WARNING.format(ckpt=checkpoint), err=True)
    click.echo(f"checkpoint {checkpoint} (step {metrics['step']}, image size {metrics['image_size']}) on {shards}")
    click.echo(format_table(metrics, metrics.get("untrained")))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(json_ready(metrics), indent=2, sort_keys=True) + "\n")
        click.echo(f"metrics written to {json_path}")


@main.command(short_help="Predict both masks, correspondences and the Eq. 3 score of one image pair.")
@click.argument("image_a", type=click.Path(path_type=Path))
@click.argument("image_b", type=click.Path(path_type=Path))
@click.option("--ckpt", "checkpoint", type=_CKPT_TYPE, required=True,
              help="Checkpoint written by 'trainer fit' (checkpoint.pt).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output directory: pair.png (both images at the network's size under heat maps of the predicted "
                   "masks, cells above 0.5 outlined, correspondence lines), masks.png (the two predicted masks, "
                   "greyscale, at each image's own size, side by side), result.json (score, checkpoint and step, "
                   "images, mean and largest mask value of each).")
@click.option("--lines", "n_lines", type=click.IntRange(min=0), default=24, show_default=True,
              help="Correspondence lines drawn in pair.png (from source cells whose predicted mask > 0.5).")
@click.option("--device", default="auto", show_default=True, help=_DEVICE_HELP)
def predict(image_a, image_b, checkpoint, out_dir, n_lines, device):
    """Find the pattern shared by IMAGE_A (source) and IMAGE_B (target) with a trained checkpoint.

    Images of any size and format OpenCV reads are resized to the checkpoint's image size. Prints the
    Eq. 3 pair score: the sum over source cells of mask(source) x mask(target at the correspondence) x
    feature cosine, in grid cells (higher means more shared content).
    """
    from .predict import predict_files

    try:
        result = predict_files(image_a, image_b, checkpoint, out_dir, device=device, n_lines=n_lines)
    except _inference_errors() as error:
        _fail(error)
    if result["backbone"].get("source") == "random":
        click.echo(RANDOM_BACKBONE_WARNING.format(ckpt=checkpoint), err=True)
    if result["nothing_passes"]:
        click.echo(f"note: no cell of either predicted mask passes 0.5 (largest {result['mask_max'][0]:.3f} / "
                   f"{result['mask_max'][1]:.3f}): the network finds nothing shared. pair.png and masks.png show "
                   f"the soft masks.", err=True)
    click.echo(f"score {result['score']:.4f} (of at most {result['score_max']}); mean mask "
               f"{result['mask_mean'][0]:.3f} / {result['mask_mean'][1]:.3f}; written to {out_dir}")


if __name__ == "__main__":
    main()
