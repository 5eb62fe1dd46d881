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


def _run_logging_options(command):
    """--checkpoint-every, --log-every, --image-every: shared by 'fit' and 'hard-negatives'."""
    for option in reversed([
        click.option("--checkpoint-every", type=click.IntRange(min=1), default=1000, show_default=True,
                     help="Write checkpoint.pt every this many steps (and on Ctrl-C / SIGTERM)."),
        click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True,
                     help="Metrics (CSV and TensorBoard) every this many steps."),
        click.option("--image-every", type=click.IntRange(min=1), default=500, show_default=True,
                     help="A picture of predicted masks and correspondences in TensorBoard every this many steps."),
    ]):
        command = option(command)
    return command


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
@_run_logging_options
@click.option("--verify-shards/--no-verify-shards", default=None,
              help="Check each shard's sha256 against its manifest before reading it (once per loader worker); a "
                   "shard whose bytes differ is skipped with a warning naming it. Default: the shards a manifest "
                   "beside them lists, with a warning naming the others; --verify-shards: every shard (an error "
                   "if one is not listed); --no-verify-shards: none (saves one read of each shard).")
@click.option("--val-retrieval", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Model selection: a retrieval benchmark in Brueghel's format (the retrieval.json of 'trainer "
                   "retrieval-set' on held-out shards, or brueghelVal.json) scored every --val-every steps (mAP, "
                   "Eq. 3, at --image-size); written to validation.csv and TensorBoard, and the best step's "
                   "checkpoint kept as best.pt beside checkpoint.pt.")
@click.option("--val-images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The images of --val-retrieval. Default: the 'images' folder beside it.")
@click.option("--val-every", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Steps between two scorings of --val-retrieval.")
@click.option("--resume", is_flag=True, help="Continue from --out/checkpoint.pt (same config and data).")
@click.option("--force", is_flag=True, help="With --resume: accept a checkpoint of another config or data set.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def fit(shards, run_dir, arch, steps, image_size, positives, negatives, lr, warmup, milestone, lr_decay, eta,
        mask_loss, transported_mask_loss, train_tps_prob, train_tps_jitter, train_tps_grid_sizes, layers, d_model,
        heads, feedforward, ncnet_k, ncnet_kernel_sizes, ncnet_channels, ncnet_symmetric, ncnet_temperature,
        shuffle_buffer, seed, workers, device, backbone_weights, checkpoint_every, log_every, image_every,
        verify_shards, val_retrieval, val_images, val_every, resume, force, no_progress):
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
    validation = None
    if val_retrieval is not None:
        from .selection import RetrievalValidation

        try:
            validation = RetrievalValidation.from_options(val_retrieval, val_images, val_every)
        except (ValueError, OSError) as error:
            raise click.BadParameter(str(error), param_hint="--val-retrieval") from error

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
                         backbone_weights=weights, progress=not no_progress, verify_shards=verify_shards,
                         validation=validation)
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


@main.command("hard-negatives", short_help="The paper's second stage: fine-tune a checkpoint with mined hard "
                                           "negatives.")
@click.option("--from", "parent", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Checkpoint of the main stage ('trainer fit'): its network, backbone and settings are the start.")
@click.option("--shards", required=True, help=f"Training shards: {SHARDS_FORMS}.")
@click.option("--out", "run_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Run directory of the stage: checkpoint.pt (records the stage and its parent), metrics.csv, "
                   "tensorboard/, run.json. Not the parent's folder.")
@click.option("--pool", type=click.IntRange(min=2), default=500, show_default=True,
              help="Images in the mining pool, each from a distinct synthetic pair.")
@click.option("--tau", type=click.FloatRange(0, 2, max_open=True), default=0.04, show_default=True,
              help="A pool pair is a hard negative when the mean of one image's predicted mask plus the other's "
                   "exceeds this (the authors' criterion).")
@click.option("--renew-every", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Steps between renewals of the pool (new images, mined again with the network as it is).")
@click.option("--steps", type=click.IntRange(min=1), default=5000, show_default=True, help="Steps of the stage.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-5, show_default=True,
              help="Adam's learning rate, constant.")
@click.option("--per-step", type=click.IntRange(min=1), default=5, show_default=True,
              help="Hard negative pairs added to each step's positives and negatives, drawn among the passing pairs "
                   "with probability proportional to their score.")
@click.option("--ordered-pairs", is_flag=True,
              help="Mine both orders of each pool pair (the authors score each unordered pair once).")
@click.option("--mining-batch", type=click.IntRange(min=1), default=64, show_default=True,
              help="Pool pairs per forward pass while mining.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Data loader worker processes (0: load in the main process).")
@click.option("--device", default="auto", show_default=True, help="'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:1'.")
@_run_logging_options
@click.option("--verify-shards/--no-verify-shards", default=None,
              help="Check each shard's sha256 against its manifest before reading it (as 'fit').")
@click.option("--resume", is_flag=True, help="Continue from --out/checkpoint.pt (same stage settings and parent).")
@click.option("--force", is_flag=True, help="With --resume: accept another stage config or a changed parent.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bars.")
def hard_negatives(parent, shards, run_dir, pool, tau, renew_every, steps, lr, per_step, ordered_pairs, mining_batch,
                   workers, device, checkpoint_every, log_every, image_every, verify_shards, resume, force,
                   no_progress):
    """Fine-tune a main-stage checkpoint with hard negatives (paper section 3.2): every
    --renew-every steps a pool of --pool images from distinct synthetic pairs is drawn, the
    network predicts masks for all pairs of the pool, and the pairs whose masks pass --tau are
    added, --per-step at a time, to the usual positives and negatives (both masks pushed to 0).
    The paper: 5k steps at 1e-5 after 200k. Runs under torchrun like 'fit'. Example:

      trainer hard-negatives --from runs/transformer/checkpoint.pt --shards shards/coco --out runs/hard
    """
    import warnings

    from .hardneg import HardNegativeConfig, fit_hard_negatives
    from .loop import FitOptions, ResumeError

    try:
        config = HardNegativeConfig(pool=pool, tau=tau, renew_every=renew_every, steps=steps, lr=lr,
                                    per_step=per_step, ordered_pairs=ordered_pairs).validate()
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    _shard_set(shards)
    options = FitOptions(run_dir=run_dir, device=device, workers=workers, checkpoint_every=checkpoint_every,
                         log_every=log_every, image_every=image_every, resume=resume, force=force,
                         progress=not no_progress, verify_shards=verify_shards)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="the backbone keeps its RANDOM")
            metrics = fit_hard_negatives(parent, shards, config, options, mining_batch=mining_batch)
    except (ResumeError, FileNotFoundError, ValueError, RuntimeError) as error:
        if not _rank_zero():
            sys.exit(1)
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


@main.command("import-released", short_help="Convert the authors' released network into a trainer checkpoint.")
@click.argument("released", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--mode", type=click.Choice(["tiny", "small", "base", "large"]), default="small", show_default=True,
              help="The authors' model size the file was trained with (their --mode; the paper's model is 'small').")
@click.option("--heads", type=click.IntRange(min=1), default=None,
              help="Attention heads, when the file is not one of the --mode sizes (shapes cannot tell them).")
@click.option("--layer-type", default="ICICIN", show_default=True,
              help="The authors' --layer-type: I (attention within an image), C (across images), N (none), two per "
                   "block.")
@click.option("--image-size", type=click.IntRange(min=16), default=480, show_default=True,
              help="Image size recorded in the checkpoint (the size 'predict' and 'eval' resize to; retrieval "
                   "takes its own --size).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def import_released(released, out, mode, heads, layer_type, image_size, force):
    """Convert RELEASED, the authors' released cross-image transformer (their
    hard_mining_neg5.pth: MoCo-v2 backbone and encoder), into the trainer checkpoint OUT, so that
    predict, eval, retrieve and the benchmarks run with the paper's trained network. Every key of
    the file is mapped and none is left over; the file is read weights-only. Example:

      trainer import-released model/hard_mining_neg5.pth runs/released.pt
    """
    from .released import ReleasedCheckpointError
    from .released import import_released as run_import

    try:
        summary = run_import(released, out, mode=mode, layer_type=layer_type, image_size=image_size, heads=heads,
                             force=force)
    except (ReleasedCheckpointError, ValueError, OSError) as error:
        _fail(error)
    summary.pop("mapping", None)
    click.echo(json.dumps(summary, indent=2, default=str))
    click.echo(f"written to {out}")


# -- retrieval ---------------------------------------------------------------------------------

def _resolution(ctx, param, value):
    from .retrieval.engine import Resolution

    if value is None:
        return None
    try:
        return Resolution.parse(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def _scoring_options(default_size: str, default_box_side: int | None):
    """Options shared by ``retrieve`` and the benchmarks: resolution, score, batching, cache, pictures."""
    def decorate(command):
        options = [
            click.option("--size", "resolution", default=default_size, show_default=True, callback=_resolution,
                         help="Resolution the network sees: N (square) or WxH, multiples of 16. Database images are "
                              "resized to it, aspect ratio not kept, as the authors do (the paper: 640 for Brueghel, "
                              "640x480 for place recognition)."),
            click.option("--box-side", type=click.IntRange(min=0), default=default_box_side or 0, show_default=True,
                         help="For a query with a box: rescale the query so the box's longer side is this many "
                              "pixels, then cut a window of --size around it (the authors' Brueghel protocol: 64). "
                              "0: the query image is prepared like a database image (the box scaled with it)."),
            click.option("--score", type=click.Choice(["eq3", "released"]), default="eq3", show_default=True,
                         help="'eq3': the paper's Eq. 3 (query mask x region x candidate mask at the correspondence "
                              "x feature cosine, summed over query cells). 'released': the authors' evaluation code "
                              "(query region made consistent with the query's prediction on itself, correspondences "
                              "rounded to cells, each candidate cell counted once), to compare with their numbers."),
            click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True,
                         help="Pairs per forward pass (and images per backbone pass)."),
            click.option("--device", default="auto", show_default=True, help=_DEVICE_HELP),
            click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
                         default=Path("~/.cache/segswap/features"), show_default=True,
                         help="Folder of the feature cache: float16 backbone features of each database image, "
                              "memory-mapped, reused by runs with the same backbone weights and --size, resumed "
                              "after an interruption (about 3.3 MB per image at 640)."),
            click.option("--pictures", type=click.IntRange(min=0), default=0, show_default=True,
                         help="Draw each query beside its best N matches, under heat maps of the predicted masks, "
                              "into OUT/pictures/ (0: none)."),
            click.option("--no-progress", is_flag=True, help="Hide the progress bars."),
        ]
        for option in reversed(options):
            command = option(command)
        return command
    return decorate


def _retrieve_options(resolution, box_side, score, batch, cache_dir, pictures, no_progress, **extra):
    from .retrieval.rank import RetrieveOptions

    return RetrieveOptions(resolution=resolution, box_side=box_side or None, score=score, batch=batch,
                           cache_dir=cache_dir.expanduser(), pictures=pictures, progress=not no_progress, **extra)


def _retrieval_errors():
    return (*_inference_errors(), OSError)


def _report_run(run: dict, out_dir: Path) -> None:
    features = run.get("features") or {}
    rate = run.get("pairs_per_second")
    click.echo(f"{run['queries_scored']} of {run['queries']} queries scored against {run['database_images']} "
               f"database images ({run['pairs_scored']} pairs, {rate:.1f} pairs/s on {run['device']}); features: "
               f"{features.get('computed', 0)} computed, "
               f"{features.get('reused', 0) + features.get('copied', 0)} reused from the cache"
               if rate else f"{run['queries_scored']} of {run['queries']} queries scored")
    for name, reason in list(run.get("set_aside", {}).items()) + list(run.get("queries_set_aside", {}).items()):
        click.echo(f"set aside: {name}: {reason}", err=True)
    click.echo(f"written to {out_dir}")


@main.command(short_help="Rank database images for each query with a trained network (Eq. 3).")
@click.option("--ckpt", "checkpoint", type=_CKPT_TYPE, required=True, help="Checkpoint written by 'trainer fit'.")
@click.option("--database", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Folder of database images (sub-folders too); candidates are named by their path in it.")
@click.option("--queries", type=click.Path(exists=True, path_type=Path), required=True,
              help="A folder (each image is a whole-image query), or a CSV file with a header "
                   "image[,x1,y1,x2,y2][,name] or a JSON list of {\"image\", \"box\", \"name\"}: a query with a box "
                   "looks for that region (the region mask is the box's cells).")
@click.option("--query-images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder the images of a CSV/JSON --queries file are in. Default: that file's folder.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder: ranking.parquet (query, candidate, score, rank), run.json, pictures/.")
@click.option("--candidates", type=click.Choice(["all", "first-stage"]), default="all", show_default=True,
              help="'all': every database image but the query's own file. 'first-stage': the --first-stage-k "
                   "nearest by a global descriptor of the frozen backbone (mean of its normalised features, "
                   "cosine), then re-ranked. --shortlists wins over both.")
@click.option("--first-stage-k", type=click.IntRange(min=1), default=100, show_default=True,
              help="Candidates the first stage keeps per query.")
@click.option("--shortlists", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Each query's candidates, re-ranked: CSV or parquet with columns query, candidate and rank or "
                   "score; or a (Q, K) .npy of database indices (sorted names) in the order of the queries.")
@click.option("--keep", type=click.IntRange(min=1), default=None,
              help="Rows kept per query in ranking.parquet. Default: every candidate.")
@_scoring_options("640", None)
def retrieve(checkpoint, database, queries, query_images, out_dir, candidates, first_stage_k, shortlists, keep,
             resolution, box_side, score, batch, device, cache_dir, pictures, no_progress):
    """Score every query against its candidates with a trained network and rank them.

    Backbone features of the database are computed once and cached (--cache-dir); pairs are
    scored in batches on the GPU when there is one. Example:

      trainer retrieve --ckpt runs/transformer/checkpoint.pt --database photos/ --queries details.csv
      --out runs/retrieval --pictures 5
    """
    from .retrieval.datasets import read_shortlists
    from .retrieval.images import list_images
    from .retrieval.rank import read_queries
    from .retrieval.rank import retrieve as run_retrieve

    try:
        query_list, query_dir = read_queries(queries, query_images)
        lists = None
        if shortlists is not None:
            lists = read_shortlists(shortlists, [q.name for q in query_list], list_images(database))
        options = _retrieve_options(resolution, box_side, score, batch, cache_dir, pictures, no_progress,
                                    candidates=candidates, first_stage_k=first_stage_k, keep=keep)
        run = run_retrieve(checkpoint, database, query_list, query_dir, out_dir, options, shortlists=lists,
                           device=device)
    except _retrieval_errors() as error:
        _fail(error)
    _report_run(run, out_dir)


@main.group("bench-retrieval", short_help="The paper's retrieval benchmarks: Brueghel (Table 1), places (Table 2).")
def bench_retrieval():
    """The paper's retrieval benchmarks, on the datasets' own files."""


@bench_retrieval.command("brueghel", short_help="One-shot detail retrieval on Brueghel: mAP per category (Table 1).")
@click.option("--ckpt", "checkpoint", type=_CKPT_TYPE, required=True, help="Checkpoint written by 'trainer fit'.")
@click.option("--annotations", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="brueghelVal.json or brueghelTest.json ({category: [{query: [image, box], gt: [[image, box]]}]}), "
                   "or the retrieval.json of 'trainer retrieval-set'.")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="The folder of the dataset's images: all of them are the database.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder: results.json (AP per query, mAP per category and overall), ranking.parquet.")
@click.option("--detection", is_flag=True,
              help="Also score detection: a ground-truth image counts only where the box around the predicted "
                   "region overlaps one of its boxes with IoU > --iou.")
@click.option("--iou", type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help="IoU threshold of --detection.")
@_scoring_options("640", 64)
def bench_brueghel(checkpoint, annotations, images, out_dir, detection, iou, resolution, box_side, score, batch,
                   device, cache_dir, pictures, no_progress):
    """Brueghel one-shot detail retrieval (paper Table 1): each query box ranks every other image;
    AP per query, mAP per category and the mean over categories. Example:

      trainer bench-retrieval brueghel --ckpt released.pt --annotations Brueghel/brueghelTest.json
      --images Brueghel/Image --out runs/brueghel-test
    """
    from .retrieval.protocols import brueghel_benchmark

    options = _retrieve_options(resolution, box_side, score, batch, cache_dir, pictures, no_progress)
    try:
        result = brueghel_benchmark(checkpoint, annotations, images, out_dir, options, detection=detection,
                                    iou_threshold=iou, device=device)
    except _retrieval_errors() as error:
        _fail(error)
    width = max(len(c) for c in result["per_category"]) if result["per_category"] else 8
    for category, value in result["per_category"].items():
        line = f"{category:<{width}}  mAP {value:.4f}"
        if detection:
            line += f"  detection mAP {result['detection']['per_category'][category]:.4f}"
        click.echo(line)
    click.echo(f"{'mean':<{width}}  mAP {result['mean']:.4f}" + (f"  detection mAP {result['detection']['mean']:.4f}"
                                                               if detection else "")
               + f"  ({result['queries']} queries)")
    _report_run(result["run"], out_dir)


@bench_retrieval.command("places", short_help="Place recognition: R@1/5/10 after re-ranking short-lists (Table 2).")
@click.option("--ckpt", "checkpoint", type=_CKPT_TYPE, required=True, help="Checkpoint written by 'trainer fit'.")
@click.option("--mat", "mat_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="NetVLAD's dbStruct file: pitts30k_test.mat or tokyo247.mat (image lists and UTM positions).")
@click.option("--queries", "query_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Folder the query images (qImage paths) are in.")
@click.option("--database", "database_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              required=True, help="Folder the database images (dbImage paths) are in.")
@click.option("--shortlists", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Each query's candidates from a global descriptor (the paper: Patch-NetVLAD's top 100): a (Q, K) "
                   ".npy of database indices, or CSV/parquet with query, candidate, rank or score.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder: results.json (recall before and after re-ranking), ranking.parquet.")
@click.option("--top", type=click.IntRange(min=1), default=100, show_default=True,
              help="Candidates re-ranked per query.")
@click.option("--nms/--no-nms", default=None,
              help="Spatial non-maximum suppression of the rankings (database images of one place count once). "
                   "Default: on for Tokyo 24/7 (a --mat whose name has 'tokyo'), as in the standard protocol.")
@_scoring_options("640x480", None)
def bench_places(checkpoint, mat_file, query_dir, database_dir, shortlists, out_dir, top, nms, resolution, box_side,
                 score, batch, device, cache_dir, pictures, no_progress):
    """Place recognition (paper Table 2): re-rank each query's short-list with the pair score;
    R@1/5/10/100 within the file's distance threshold (25 m), before and after. Example:

      trainer bench-retrieval places --ckpt released.pt --mat tokyo247.mat --queries Tokyo247/query
      --database Tokyo247/database --shortlists top100_patchVlad_idx.npy --out runs/tokyo
    """
    from .retrieval.protocols import places_benchmark

    options = _retrieve_options(resolution, box_side, score, batch, cache_dir, pictures, no_progress)
    try:
        result = places_benchmark(checkpoint, mat_file, query_dir, database_dir, shortlists, out_dir, options,
                                  top=top, nms=nms, device=device)
    except _retrieval_errors() as error:
        _fail(error)
    for name, recall in result["recall"].items():
        click.echo(f"{name:<14} " + "  ".join(f"{k} {v:.4f}" for k, v in recall.items()))
    _report_run(result["run"], out_dir)


@main.command("retrieval-set", short_help="Write a small retrieval benchmark from held-out shards.")
@click.option("--shards", required=True, help=f"Held-out shards: {SHARDS_FORMS}.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder: images/ and retrieval.json (Brueghel's format).")
@click.option("--n", type=click.IntRange(min=1), default=50, show_default=True, help="Queries (samples) to write.")
def retrieval_set(shards, out_dir, n):
    """Turn the first N samples of held-out shards into a retrieval benchmark whose answers are
    known: each sample's source (with the box of its object) is a query, its target the only
    image to find among all the others. Run it with 'trainer bench-retrieval brueghel
    --annotations OUT/retrieval.json --images OUT/images', or use it for 'fit --val-retrieval'.
    """
    from .retrieval.synthetic_set import write_retrieval_set

    _shard_set(shards)
    try:
        summary = write_retrieval_set(shards, out_dir, n)
    except (ValueError, OSError) as error:
        _fail(error)
    click.echo(f"{summary['queries']} queries in {summary['categories']} categories, {summary['images']} images "
               f"({summary['skipped']} samples skipped) written to {out_dir}")


# -- discovery -----------------------------------------------------------------------------------

@main.group(invoke_without_command=True, short_help="Discovery and co-segmentation in a collection (paper section 5).")
@click.option("--ckpt", "checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Checkpoint written by 'trainer fit' (or the authors' released file).")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The collection: a folder of images (sub-folders too).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder: masks/ (coseg) or clusters/index.html (clusters), potentials.npy, pairs/ "
                   "(the saved predictions: a rerun resumes there), report.json (each stage's time, memory, counts).")
@click.option("--mode", type=click.Choice(["coseg", "clusters"]), default="coseg", show_default=True,
              help="'coseg': the first eigenvector summed per image and cell seeds GrabCut, one mask per image "
                   "(Table 5). 'clusters': --eigenvectors eigenvectors, K-means with --clusters clusters, "
                   "clusters of repeated regions as a page of crops.")
@click.option("--size", type=click.IntRange(min=16), default=480, show_default=True,
              help="Images are seen at SIZE x SIZE (a multiple of 16; the authors: 480 for the Internet dataset, "
                   "640 for Brueghel).")
@click.option("--k", type=click.IntRange(min=1), default=5, show_default=True,
              help="Partners kept per image, by the Eq. 3 score (the paper: the five most similar).")
@click.option("--shortlist", type=click.IntRange(min=0), default=20, show_default=True,
              help="Candidates per image from the first stage (global descriptors of the frozen backbone, cosine) "
                   "that the network scores to choose the --k; 0: the first stage gives the --k directly.")
@click.option("--close-triangles/--no-close-triangles", default=True, show_default=True,
              help="Also predict the pairs between two partners of an image, so that every 3-cycle of Eq. 4 "
                   "through it exists (at most N k (k - 1) / 2 more pairs).")
@click.option("--mask-threshold", type=click.FloatRange(0, 1, max_open=True), default=0.85, show_default=True,
              help="A predicted correspondence is a vertex of the graph when its mask passes this (the authors').")
@click.option("--sigma", type=click.FloatRange(min=0, min_open=True), default=1.2, show_default=True,
              help="Distance scale of Eq. 4, in cells (the authors: 5.0 Car, 0.8 Airplane, 1.2 Horse).")
@click.option("--edge-threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.01,
              show_default=True, help="Edges lighter than this are dropped (the authors').")
@click.option("--fg-ratio", type=click.FloatRange(0, 1, min_open=True), default=0.6, show_default=True,
              help="Coseg: cells whose potential passes this share of the image's largest are definite foreground "
                   "for GrabCut (the authors').")
@click.option("--dilate", type=click.IntRange(min=0), default=10, show_default=True,
              help="Coseg: width in pixels of the probable-background ring around the potential's support.")
@click.option("--eigenvectors", "n_eigenvectors", type=click.IntRange(min=1), default=100, show_default=True,
              help="Clusters: eigenvectors embedding the vertices (the paper: 100).")
@click.option("--clusters", "n_clusters", type=click.IntRange(min=1), default=500, show_default=True,
              help="Clusters: K-means clusters (the paper: 500 on Brueghel).")
@click.option("--filter-pairs/--no-filter-pairs", default=None,
              help="Leave out of the graph the pairs of duplicates (mean predicted mask >= --duplicate-mask in both "
                   "images) and the pairs that match on their borders (>= --border-share of their confident cells "
                   "on the outer ring of cells of both images), as the paper does on Brueghel. Default: in clusters "
                   "mode only.")
@click.option("--duplicate-mask", type=click.FloatRange(0, 1, min_open=True), default=0.9, show_default=True,
              help="Mean predicted mask, in both images, from which a pair is a duplicate.")
@click.option("--border-share", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="Share of confident cells on the border from which a pair matches on its borders.")
@click.option("--batch", type=click.IntRange(min=1), default=16, show_default=True, help="Pairs per forward pass.")
@click.option("--device", default="auto", show_default=True, help="'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:1'.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("~/.cache/segswap/features"), show_default=True,
              help="Folder of the feature cache (shared with 'trainer retrieve').")
@click.option("--no-progress", is_flag=True, help="Hide the progress bars.")
@click.pass_context
def discover(ctx, checkpoint, images, out_dir, mode, size, k, shortlist, close_triangles, mask_threshold, sigma,
             edge_threshold, fg_ratio, dilate, n_eigenvectors, n_clusters, filter_pairs, duplicate_mask, border_share,
             batch, device, cache_dir, no_progress):
    """Find what a collection repeats (paper section 5): first-stage neighbours, the network on
    those pairs only, the sparse correspondence graph of Eq. 4, its leading eigenvectors, then
    co-segmentation masks or clusters of repeated regions. The cost grows with the number of
    images times --k, not with its square. Examples:

      trainer discover --ckpt released.pt --images Internet/Airplane100 --out runs/int/Airplane100

      trainer discover eval --pred runs/int --gt Internet
    """
    if ctx.invoked_subcommand is not None:
        return
    missing = [name for name, value in (("--ckpt", checkpoint), ("--images", images), ("--out", out_dir))
               if value is None]
    if missing:
        raise click.UsageError(f"missing option(s) {', '.join(missing)}")
    from .discovery.coseg import CosegOptions
    from .discovery.graph import GraphParams
    from .discovery.run import DiscoverOptions
    from .discovery.run import discover as run_discover

    try:
        options = DiscoverOptions(mode=mode, size=size, k=k, shortlist=shortlist, close_triangles=close_triangles,
                                  graph=GraphParams(mask_threshold=mask_threshold, sigma=sigma,
                                                    edge_threshold=edge_threshold),
                                  coseg=CosegOptions(fg_ratio=fg_ratio, dilate=dilate), n_eigenvectors=n_eigenvectors,
                                  n_clusters=n_clusters, filter_pairs=filter_pairs, duplicate_mask=duplicate_mask,
                                  border_share=border_share, batch=batch, cache_dir=cache_dir.expanduser(),
                                  progress=not no_progress).validate()
    except (ValueError, TypeError) as error:
        raise click.UsageError(str(error)) from error
    try:
        report = run_discover(checkpoint, images, out_dir, options, device=device)
    except _retrieval_errors() as error:
        _fail(error)
    for name, reason in report["set_aside"].items():
        click.echo(f"set aside: {name}: {reason}", err=True)
    graph = report["graph"]
    click.echo(f"{len(report['images'])} images, {report['pairs']['pairs']} short-listed pairs, graph of "
               f"{graph['n_vertices']} vertices and {graph['n_edges']} edges; {report['seconds']:.1f} s; "
               f"written to {out_dir}")


@discover.command("eval", short_help="Precision P and Jaccard J of co-segmentation masks (Table 5).")
@click.option("--pred", "pred_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="A folder of class folders, each the --out of 'trainer discover' on that class (its masks/) or a "
                   "folder of <stem>.png masks.")
@click.option("--gt", "gt_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="The dataset: a folder of class folders (Internet: Airplane100/ with GroundTruth/<stem>.png; "
                   "MSRC-style: images with GroundTruth/ or gt/ masks).")
@click.option("--layout", type=click.Choice(["internet", "msrc"]), default="internet", show_default=True,
              help="The ground truth's folder layout.")
@click.option("--resize", is_flag=True, help="Resize predictions of another size than their mask (nearest).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the scores (per class and per image) to this JSON file.")
def discover_eval(pred_dir, gt_dir, layout, resize, json_path):
    """Precision (share of pixels labelled right) and Jaccard (IoU of the foreground, over the
    images whose mask is not empty) per class, as the paper's Table 5, and their means."""
    from .discovery.metrics import evaluate_folder

    try:
        scores = evaluate_folder(pred_dir, gt_dir, layout=layout, resize_predictions=resize)
    except (ValueError, OSError) as error:
        _fail(error)
    except Exception as error:  # noqa: BLE001 - BadInput of a mask file names it
        _fail(error)
    width = max(len(name) for name in scores["classes"])
    for name, entry in scores["classes"].items():
        j = "n/a" if entry["J"] is None else f"{entry['J']:.4f}"
        click.echo(f"{name:<{width}}  P {entry['P']:.4f}  J {j}  ({entry['images']} images"
                   + (f", {len(entry['missing'])} without prediction" if entry["missing"] else "") + ")")
    mean_j = "n/a" if scores["J"] is None else f"{scores['J']:.4f}"
    click.echo(f"{'mean':<{width}}  P {scores['P']:.4f}  J {mean_j}")
    if json_path is not None:
        json_path.write_text(json.dumps(scores, indent=2) + "\n")


if __name__ == "__main__":
    main()
