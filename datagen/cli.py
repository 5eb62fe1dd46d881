"""``datagen`` command line: maps options onto :class:`BuildConfig` and calls the modules."""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import click

from datagen.config import (
    BLEND_METHODS,
    DILATION_SHAPES,
    OBJECT_MODES,
    ONE_SEGMENT_SOURCES,
    STYLE_METHODS,
    TWO_OBJECT_LAYOUTS,
    BuildConfig,
    WarpConfig,
)
from datagen.format.hashing import config_hash
from datagen.segments import SOURCES

SAMPLE_ROOT = Path(__file__).parent / "sample_data" / "coco"


def _say(message: str) -> None:
    click.echo(message, err=True)


def _source_spec(segments: str, coco_root, coco_split: str, images=None, dino_weights=None,
                 max_size: int = 1024, device: str = "auto", progress: bool = True):
    """The :class:`SourceSpec` of the source options; usage errors name the option."""
    from datagen.runner.inputs import SourceSpec

    if segments == "coco":
        from datagen.segments.coco_source import CocoOptions

        if coco_root is None:
            _say(f"no --coco-root given: using the embedded sample of 60 COCO images ({SAMPLE_ROOT})")
            coco_root = SAMPLE_ROOT
        return SourceSpec("coco", CocoOptions(root=Path(coco_root).resolve(), split=coco_split))
    if segments == "lost":
        from datagen.segments.lost_source import LostOptions

        if images is None:
            raise click.UsageError("the lost source needs --images DIR, a folder of images")
        try:
            options = LostOptions(images_dir=Path(images).resolve(), max_size=max_size, device=device,
                                  progress=progress,
                                  dino_weights=None if dino_weights is None else Path(dino_weights).resolve())
        except ValueError as error:
            raise click.UsageError(str(error)) from error
        return SourceSpec("lost", options)
    raise click.BadParameter(f"unknown segment source {segments!r}", param_hint="--segments")


def _check_objects(segments: str, objects: str | None) -> None:
    """--objects 2 or mix with a source of one segment per image is a usage error (the default,
    BuildConfig's, is '1' for those: see :attr:`BuildConfig.objects`)."""
    if segments in ONE_SEGMENT_SOURCES and objects not in (None, "1"):
        raise click.UsageError(f"--objects {objects}: the {segments} source finds one segment per image, and a "
                               "two-object pair needs two segments of one image; use --objects 1")


def _fail(error: Exception) -> None:
    raise click.ClickException(str(error)) from error


def _resolve_style(style: str, style_dir):
    """The style method to use: 'auto' becomes 'adain' when its weights are found (else the error
    names the files and the alternatives); 'adain' and 'color' need --style-dir."""
    if style == "auto":
        from datagen.style.adain_net import StyleWeightsError, find_adain_weights

        try:
            find_adain_weights()
        except StyleWeightsError as error:
            raise click.UsageError(f"--style auto: {error}") from error
        style = "adain"
    if style in ("adain", "color") and style_dir is None:
        raise click.UsageError(f"--style {style} needs --style-dir, a folder of style images "
                               "(the paper uses the Brueghel paintings)")
    if style == "color":
        _say("WARNING: --style color is the weight-free colour fallback, not AdaIN; the manifest records it.")
    return style


segments_option = click.option(
    "--segments", "segments", type=click.Choice(sorted(SOURCES)), default="coco", show_default=True,
    help="Segment source: 'coco' uses COCO instance annotations; 'lost' finds one object in each image of "
         "--images without any label (LOST on DINO features, refined by a bilateral solver).")
coco_root_option = click.option(
    "--coco-root", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="COCO root holding annotations/instances_SPLIT.json and SPLIT/*.jpg. "
         "Default: the embedded 60-image sample.")
coco_split_option = click.option("--coco-split", default="train2017", show_default=True,
                                 help="COCO split name (annotation file and image folder).")
images_option = click.option(
    "--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
    help="lost source: folder of images (searched recursively; jpg, png, bmp, tif, webp), e.g. artworks.")
dino_weights_option = click.option(
    "--dino-weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
    help="lost source: DINO ViT-S/16 weights (dino_deitsmall16_pretrain.pth, or timm's file). "
         "Default: $SEGSWAP_DINO_WEIGHTS, then ~/.cache/torch/hub/checkpoints/ and ~/.cache/segswap/.")
max_size_option = click.option(
    "--max-size", type=click.IntRange(min=0), default=1024, show_default=True,
    help="lost source: images whose longer side exceeds this many pixels are downscaled for DINO and the "
         "solver (the masks come back at full resolution); 0: never.")
min_area_option = click.option("--min-area", type=click.FloatRange(min=0), default=BuildConfig.min_area,
                               show_default=True, help="Skip segments with a smaller mask area (pixels).")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="segswap")
def main():
    """Build segment-swapping training pairs (Shen et al., CVPR 2022) as WebDataset shards.

    Typical use: datagen build --segments coco --coco-root /data/coco --n 500000 --out shards/
    --style-dir /data/brueghel (AdaIN weights in ~/.cache/segswap/adain/; or --style color|none)
    """


@main.command(short_help="Build N pairs into shards with a manifest; resumes and extends.")
@segments_option
@coco_root_option
@coco_split_option
@images_option
@dino_weights_option
@max_size_option
@click.option("--dino-device", default="auto", show_default=True,
              help="lost source: device of DINO, 'auto' (CUDA when present), 'cpu' or 'cuda'.")
@click.option("--n", "n", type=click.IntRange(min=1), required=True, help="Number of pairs to build.")
@click.option("--out", "out_dir", metavar="DIR|URL", default="shards", show_default=True,
              help="Output folder for shards, per-sample parquet files and manifest.json, or a store URL "
                   "(s3://BUCKET/PREFIX, gs://..., file://...): each shard is built in --work, then uploaded, "
                   "stats marker last, the manifest after every shard.")
@click.option("--work", "work_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With a URL --out: local folder for the segment bank, the build's lock and the shards being "
                   "uploaded (a rerun finds its bank there). With --scheduler every worker must see it. Default: "
                   "${XDG_CACHE_HOME:-~/.cache}/segswap/builds/<hash of the URL>.")
@click.option("--break-lock", is_flag=True,
              help="With a URL --out: take over the lock object (.build.lock) that a build on another machine "
                   "left in the store. Only when that build is gone: two builds writing one set is not checked "
                   "further. (A lock left by a gone build of this machine is taken over without it.)")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Root seed: the same options and seed give byte-identical shards.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Parallel worker processes (one shard each). Default: all cores. Ignored with --scheduler.")
@click.option("--scheduler", metavar="ADDRESS", default=None,
              help="Address of a Dask distributed scheduler (tcp://HOST:PORT): the shards are built by that "
                   "cluster's workers (--workers is ignored), failed shards retried twice, then listed. --out "
                   "(for a URL --out: --work), its bank and the source images must be on a file system that every "
                   "worker sees at the same path; with a URL --out each worker uploads its shards. Needs the "
                   "'cluster' extra (pip install 'segswap[cluster]'). Default: this machine.")
@click.option("--objects", type=click.Choice(OBJECT_MODES), default=BuildConfig.objects,
              help="'1': one segment per pair; '2': two segments of different categories; 'mix': half and half. "
                   "Default: mix, or 1 for --segments lost (one segment per image).")
@click.option("--style", type=click.Choice(("auto",) + STYLE_METHODS), default="auto", show_default=True,
              help="Style transfer of both images of every pair: 'adain' (AdaIN, needs vgg_normalised.pth and "
                   "decoder.pth), 'color' (weight-free Lab colour transfer, recorded in the manifest), 'none', or "
                   "'auto': AdaIN when its weights are found, else an error naming the files and the alternatives.")
@click.option("--style-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of style images (the paper: the Brueghel paintings); needed by adain and color.")
@click.option("--adain-vgg", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="AdaIN encoder weights (vgg_normalised.pth). "
                   "Default: $SEGSWAP_ADAIN_VGG or ~/.cache/segswap/adain/.")
@click.option("--adain-decoder", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="AdaIN decoder weights (decoder.pth, or one trained on your style collection). "
                   "Default: $SEGSWAP_ADAIN_DECODER or ~/.cache/segswap/adain/.")
@click.option("--style-device", default="auto", show_default=True,
              help="Device of the AdaIN networks: 'auto' (CUDA when present), 'cpu', 'cuda'.")
@click.option("--image-size", type=click.IntRange(min=64), default=BuildConfig.image_size, show_default=True,
              help="Side of the square source and target images, pixels.")
@click.option("--stride", type=click.IntRange(min=1), default=BuildConfig.stride, show_default=True,
              help="Correspondence grid stride, pixels (480 / 16 = a 30 x 30 grid).")
@click.option("--shard-size", type=click.IntRange(min=1), default=BuildConfig.shard_size, show_default=True,
              help="Samples per shard.")
@click.option("--blend", type=click.Choice(BLEND_METHODS), default=BuildConfig.blend, show_default=True,
              help="'poisson': fast DST solver of OpenCV's NORMAL_CLONE equations; 'cv2': cv2.seamlessClone; "
                   "'paste': plain copy (no blending).")
@min_area_option
@click.option("--dilation", type=click.IntRange(min=0), default=BuildConfig.dilation_px, show_default=True,
              help="Dilate each segment mask by this many pixels (at the source's resolution).")
@click.option("--dilation-shape", type=click.Choice(DILATION_SHAPES), default=BuildConfig.dilation_shape,
              show_default=True, help="Shape of the dilation: 'diamond' (the authors': DILATION iterations of a 3x3 "
                                      "cross, every pixel within L1 distance DILATION) or 'disc' (Euclidean).")
@click.option("--border-crop-prob", type=click.FloatRange(0, 1), default=BuildConfig.border_crop_prob,
              show_default=True, help="Probability of cropping the source so the object touches a border.")
@click.option("--rotation", type=click.FloatRange(min=0), default=WarpConfig.rotation_deg, show_default=True,
              help="Rotation angle ~ U[-ROTATION, ROTATION] degrees.")
@click.option("--aspect-min", type=click.FloatRange(0, 1, min_open=True), default=WarpConfig.aspect_min,
              show_default=True, help="Each axis is scaled by U[ASPECT_MIN, 1].")
@click.option("--tps-prob", type=click.FloatRange(0, 1), default=WarpConfig.tps_prob, show_default=True,
              help="Probability of a thin-plate-spline warp.")
@click.option("--tps-jitter", type=click.FloatRange(min=0), default=WarpConfig.tps_jitter, show_default=True,
              help="TPS control points of a g x g grid move by U[-J/g, J/g] of the image (the authors': 0.25).")
@click.option("--two-object-layout", type=click.Choice(TWO_OBJECT_LAYOUTS), default=WarpConfig.two_object_layout,
              show_default=True, help="'fixed': one of the authors' 16 quadrant/half layouts; 'cut': the target cut "
                                      "in two at U[0.35, 0.65].")
@click.option("--two-object-gap", type=click.IntRange(min=0), default=WarpConfig.two_object_gap_px, show_default=True,
              help="Pixels between the two regions of a two-object pair where they meet.")
@click.option("--jpeg-quality", type=click.IntRange(1, 100), default=BuildConfig.jpeg_quality, show_default=True,
              help="JPEG quality of the stored images.")
@click.option("--overwrite", is_flag=True, help="Replace shards of another config or seed found in --out.")
@click.option("--manifests-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("manifests"),
              show_default=True, help="Also copy manifest.json here (named after --out and the fingerprint).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def build(segments, coco_root, coco_split, images, dino_weights, max_size, dino_device, n, out_dir, work_dir,
          break_lock, seed, workers, scheduler, objects, style, style_dir, adain_vgg, adain_decoder, style_device,
          image_size, stride, shard_size, blend, min_area, dilation, dilation_shape, border_crop_prob, rotation,
          aspect_min, tps_prob, tps_jitter, two_object_layout, two_object_gap, jpeg_quality, overwrite, manifests_dir,
          no_progress):
    """Build N pairs into --out as WebDataset shards with a manifest.

    Re-running the same command resumes an interrupted build (only unfinished shards are
    rebuilt, and only shards whose bytes match their stats are kept); a larger --n extends it.
    --out may be a bucket (s3://, gs://): shards are uploaded as they are finished. With
    --scheduler the shards are built on a Dask cluster and are the same bytes.
    """
    from datagen.format.storage import WRITE_SCHEMES, LocationError, check_scheme, is_url
    from datagen.runner.lock import LockedError
    from datagen.runner.run import BuildError, StyleOptions, StyleSpec, default_workers
    from datagen.runner.run import build as run_build

    if is_url(out_dir):  # a store URL; refused schemes (http://) before any work
        try:
            check_scheme(out_dir, WRITE_SCHEMES)
        except LocationError as error:
            raise click.BadParameter(str(error), param_hint="'--out'") from None
        if out_dir.lower().startswith("file://"):
            out_dir = Path(out_dir[len("file://"):])
    else:
        out_dir = Path(out_dir)
    if isinstance(out_dir, Path) and (work_dir is not None or break_lock):
        _say("--work and --break-lock are for a URL --out; a local --out holds its own bank and lock")
    _check_objects(segments, objects)
    style = _resolve_style(style, style_dir)
    warp = WarpConfig(rotation_deg=rotation, aspect_min=aspect_min, tps_prob=tps_prob, tps_jitter=tps_jitter,
                      two_object_layout=two_object_layout, two_object_gap_px=two_object_gap)
    try:
        config = BuildConfig(segments=segments, min_area=min_area, image_size=image_size, stride=stride,
                             objects=objects, dilation_px=dilation, dilation_shape=dilation_shape,
                             border_crop_prob=border_crop_prob,
                             blend=blend, style=style, jpeg_quality=jpeg_quality, shard_size=shard_size,
                             warp=warp).validate()
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    spec = _source_spec(segments, coco_root, coco_split, images, dino_weights, max_size, dino_device,
                        progress=not no_progress)
    started = time.perf_counter()
    try:
        style_spec = StyleSpec(StyleOptions(style_dir=style_dir) if style == "color" else
                               StyleOptions(style_dir=style_dir, vgg_path=adain_vgg, decoder_path=adain_decoder,
                                            device=style_device))
        with contextlib.ExitStack() as stack:
            distributor = None
            if scheduler is not None:  # distributed is imported only here
                try:
                    from datagen.runner.dask_distributor import DaskDistributor
                except ImportError as error:
                    raise click.UsageError(f"--scheduler needs Dask's distributed ({error}): "
                                           "pip install 'segswap[cluster]'") from error
                if workers is not None:
                    _say("--workers is ignored with --scheduler: the cluster's workers build the shards")
                distributor = stack.enter_context(DaskDistributor(scheduler, log=_say))
            manifest = run_build(config, spec, n, out_dir, seed=seed, workers=workers or default_workers(),
                                 overwrite=overwrite, manifests_dir=manifests_dir, log=_say,
                                 show_progress=not no_progress, style=style_spec, distributor=distributor,
                                 work_dir=work_dir, break_lock=break_lock)
    except (BuildError, LockedError, ValueError, FileNotFoundError, LookupError) as error:
        _fail(error)
    except OSError as error:  # a read-only or full disk: the path and the cause, in one line
        _fail(OSError(f"{error.filename or out_dir}: {error.strerror or error}"))
    elapsed = time.perf_counter() - started
    rejected = ", ".join(f"{reason} {count}" for reason, count in manifest["rejected"].items()) or "none"
    click.echo(f"{manifest['n_samples']} pairs in {len(manifest['shards'])} shards at {out_dir} "
               f"({elapsed:.1f} s, {manifest['n_samples'] / max(elapsed, 1e-9):.1f} pairs/s overall)")
    click.echo(f"attempts: {manifest['n_attempted']}; rejected: {rejected}")
    manifest_at = out_dir / "manifest.json" if isinstance(out_dir, Path) else f"{out_dir.rstrip('/')}/manifest.json"
    click.echo(f"config {config_hash(config)[:12]}  fingerprint {manifest['fingerprint'][:12]}  "
               f"manifest {manifest_at}")


class _DefaultCommandGroup(click.Group):
    """A group whose arguments go to ``default_command`` unless they start with a command name:
    ``datagen segments --out B`` is ``datagen segments scan --out B``."""

    def __init__(self, *args, default_command: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.default_command = default_command

    def parse_args(self, ctx, args):
        help_only = bool(args) and all(arg in ctx.help_option_names for arg in args)
        if not help_only and (not args or args[0] not in self.commands):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


@main.group(cls=_DefaultCommandGroup, default_command="scan",
            short_help="Scan a segment source into a parquet bank, or score a bank against masks.")
def segments():
    """Scan a segment source into a bank (the default: datagen segments [scan] --source ... --out BANK),
    or score a bank against ground-truth masks (datagen segments eval --pred BANK --gt DIR).

    `datagen segments scan --help` and `datagen segments eval --help` list their options.
    """


@segments.command("scan", short_help="Scan a segment source into a parquet segment bank (the default).")
@click.option("--source", "segments", type=click.Choice(sorted(SOURCES)), default="coco", show_default=True,
              help="Segment source: 'coco' (COCO instance annotations) or 'lost' (one object per image of "
                   "--images, found without labels).")
@coco_root_option
@coco_split_option
@images_option
@dino_weights_option
@max_size_option
@click.option("--device", default="auto", show_default=True,
              help="lost source: device of DINO, 'auto' (CUDA when present), 'cpu' or 'cuda'.")
@min_area_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for the bank (segments.parquet, images.parquet, skipped.parquet).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar (lost source).")
def segments_scan(segments, coco_root, coco_split, images, dino_weights, max_size, device, min_area, out_dir,
                  no_progress):
    """Scan a segment source into a parquet segment bank and report what was skipped.

    Example: datagen segments --source lost --images artworks/ --out bank/ (then `datagen segments eval
    --help` to score it against ground-truth masks).
    """
    from datagen.runner.inputs import prepare_bank

    spec = _source_spec(segments, coco_root, coco_split, images, dino_weights, max_size, device,
                        progress=not no_progress)
    try:
        record = prepare_bank(spec, BuildConfig(segments=segments, min_area=min_area), out_dir, log=_say)
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
    bank = record.get("bank", {})
    click.echo(f"{out_dir}: {bank.get('segments')} segments, {bank.get('images')} images, "
               f"{bank.get('skipped')} skipped")
    if segments == "lost":
        import pyarrow.parquet as pq

        ious = pq.read_table(Path(out_dir) / "segments.parquet", columns=["refine_iou"]).column(0).to_numpy()
        click.echo(f"bilateral solver: {int((ious < 0.5).sum())} of {len(ious)} segments kept LOST's coarse mask "
                   f"(refinement IoU < 0.5)")


@segments.command("eval", short_help="Max F-beta, IoU and pixel accuracy of a bank against ground-truth masks "
                                     "(TokenCut's protocol and ours).")
@click.option("--pred", "bank_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Segment bank to score (e.g. of `datagen segments --source lost --images DATASET/images "
                   "--min-area 0`).")
@click.option("--gt", "gt_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Folder of ground-truth masks (the object: grey > 0 in the reference protocol, grey > 127 in "
                   "ours), matched to the bank's images by file stem (ECSSD ground_truth_mask/, DUTS-TE-Mask/, "
                   "DUT-OMRON pixelwiseGT-new-PNG/).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the scores (per method and protocol), notes, unmatched masks and problems to this "
                   "JSON file.")
def segments_eval(bank_dir, gt_dir, json_path):
    """Unsupervised saliency scores of a bank (the paper's Table 4): max F-beta (beta^2 = 0.3), IoU and
    pixel accuracy, for LOST alone and for LOST + bilateral solver, under two protocols, labelled:
    the reference (TokenCut's: the solver's soft output, empty prediction precision 1, GT > 0) and
    ours (the bank's binary masks, GT > 127). The table's notes define both."""
    import json

    from datagen.segments.saliency_eval import evaluate

    try:
        report = evaluate(bank_dir, gt_dir, progress=True)
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
    if report.unmatched:
        _say(f"{len(report.unmatched)} ground-truth masks have no image in the bank (e.g. "
             f"{', '.join(report.unmatched[:3])}); they are left out")
    for name, reason in report.problems[:10]:
        _say(f"left out {name}: {reason}")
    if json_path is not None:
        json_path.write_text(json.dumps(report.to_json(), indent=1) + "\n")
    if not report.images:
        _fail(ValueError(f"no ground-truth mask of {gt_dir} matches an image of {bank_dir}"))
    click.echo(report.table())


@main.command(short_help="Check a shard set: checksums, counts, samples, warps; prints its fingerprint.")
@click.argument("shards")
@click.option("--quiet", is_flag=True, help="Print only problems and the summary lines.")
@click.option("--quick", is_flag=True, help="Check only that each shard exists with the size its manifest records, "
                                            "and the manifest's fingerprint against its shard list; read no shard.")
@click.option("--rebuild-check", type=click.IntRange(min=1), default=None, metavar="N",
              help="Also rebuild N shards (spread over the set) from the recorded config, seed, bank (bank/ beside "
                   "the shards) and images, and compare their bytes: whether this machine can reproduce the set, "
                   "not only verify it.")
@click.option("--style-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="With --rebuild-check on a stylised set: its style images (AdaIN weights are found as for a build).")
def verify(shards, quiet, quick, rebuild_check, style_dir):
    """Check a shard set against its manifest: sizes, checksums, counts, every sample decoded, the
    schema, and that masks and correspondences agree with the stored warps. Prints the set's
    fingerprint, recomputed from the bytes read, for comparing sets between teams. Exit 1 on
    problems.

    SHARDS: a shard folder, its manifest.json, a brace pattern ('shards/shard-{000000..000009}.tar',
    quoted) or one .tar file, on disk or by URL (https://, s3://, gs://; a folder URL needs its
    manifest.json). Shards named by a pattern or one by one are checked against the entries of
    their folder's manifest.
    """
    from datagen.verify import verify_dir

    report = verify_dir(shards, progress=not quiet, quick=quick)
    for note in report.notes:
        _say(f"note: {note}")
    if report.versions:
        _say("note: package versions differ from the set's (verifying is unaffected; rebuilding the set here "
             "may give other bytes):")
        for line in report.versions:
            _say(f"  {line}")
    for problem in report.problems:
        click.echo(f"BAD {problem}")
    if report.quick:
        click.echo(f"{report.shards} shards: sizes and manifest checked: {len(report.problems)} problem(s)")
    else:
        click.echo(f"{report.samples} samples in {report.shards} shards checked: "
                   f"{len(report.problems)} problem(s)")
    if rebuild_check is not None:
        from datagen.rebuild_check import rebuild_check as run_rebuild_check
        from datagen.runner.styling import StyleSpec

        try:
            rebuilt = run_rebuild_check(shards, rebuild_check, StyleSpec({"style_dir": style_dir}), log=_say)
        except (ValueError, OSError) as error:
            _fail(error)
        for problem in rebuilt.problems:
            click.echo(f"BAD {problem}")
        click.echo(f"rebuild check: {len(rebuilt.identical)} of {len(rebuilt.rebuilt)} shards rebuilt byte for byte"
                   + ("" if not rebuilt.problems else " (see the package versions above)" if rebuilt.versions else ""))
        report.problems += rebuilt.problems
    if report.fingerprint:
        click.echo(f"fingerprint {report.fingerprint}")
    sys.exit(1 if report.problems else 0)


@main.command(short_help="Draw pairs with masks and correspondence lines (HTML page or contact sheet).")
@click.argument("shards")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=Path("preview.html"),
              show_default=True, help="Output file: .html (one page, JPEG thumbnails) or .png/.jpg (one contact "
                                      "sheet).")
@click.option("-n", "n", type=click.IntRange(min=1), default=16, show_default=True, help="Pairs to show.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the choice of correspondence lines.")
@click.option("--fill/--outline", default=False, show_default=True,
              help="Masks drawn as a half-opaque fill, or as outlines only (the pasted object stays visible).")
def preview(shards, out_path, n, seed, fill):
    """Draw pairs with their masks and correspondence lines, so a person can check the data.

    SHARDS: a shard folder, its manifest.json, a brace pattern ('shards/shard-{000000..000009}.tar',
    quoted) or one .tar file.
    """
    from datagen.format.shardset import resolve_shard_set
    from datagen.preview import write_preview

    problems: list[str] = []
    try:
        count = write_preview(resolve_shard_set(shards).tars, out_path, n=n, seed=seed, fill=fill,
                              problems=problems)
    except (ValueError, OSError) as error:
        _fail(error)
    finally:
        for problem in problems:
            _say(f"skipped: {problem}")
    click.echo(f"{count} pairs drawn to {out_path}")


@main.group("style", short_help="AdaIN tools: train a decoder on your own style collection.")
def style_group():
    """AdaIN style transfer tools (the decoder used by build --style adain)."""


@style_group.command("train", short_help="Train an AdaIN decoder (content + 10 x style loss).")
@click.option("--styles", "style_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder of style images (e.g. the Brueghel paintings); images directly inside it.")
@click.option("--content", "content_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder of content images (e.g. COCO train2017); images directly inside it.")
@click.option("--vgg", "vgg_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Frozen VGG encoder weights (the port's vgg_normalised.pth).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Decoder file to write (decoder.pth layout, for build --adain-decoder), saved atomically; "
                   "a preview grid (content | style | stylisation) goes next to it as OUT.preview.jpg, and "
                   "the training state for --resume as OUT.state.pth.")
@click.option("--decoder-init", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Start from this decoder.pth-layout file instead of a decoder initialised from --seed.")
@click.option("--steps", type=click.IntRange(min=1), default=160_000, show_default=True,
              help="Training steps (the port's --max_iter).")
@click.option("--batch", "batch_size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Content and style images per step (each).")
@click.option("--size", type=click.IntRange(min=16), default=512, show_default=True,
              help="Each image is resized so that its shorter side is SIZE before cropping.")
@click.option("--crop", type=click.IntRange(min=16), default=256, show_default=True,
              help="Side of the random square crop of each resized image (<= --size).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True,
              help="Adam learning rate at step 0.")
@click.option("--lr-decay", type=click.FloatRange(min=0), default=5e-5, show_default=True,
              help="Inverse-time decay: lr = LR / (1 + LR_DECAY x step).")
@click.option("--style-weight", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Weight of the style loss (sum over relu1_1..relu4_1 of the MSE of means and stds).")
@click.option("--content-weight", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Weight of the content loss (MSE of relu4_1 features to the AdaIN target).")
@click.option("--save-every", type=click.IntRange(min=0), default=10_000, show_default=True,
              help="Save the decoder and the preview every this many steps (0: only at the end); "
                   "always after the last step.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the image and crop draws, the preview examples and the initial decoder.")
@click.option("--device", default="auto", show_default=True,
              help="Training device: 'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'.")
@click.option("--workers", type=click.IntRange(min=0), default=4, show_default=True,
              help="Threads loading the next batch's images during a step (0: none); results do not depend on it.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out (not needed when it is --decoder-init).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted (or finished) run from the training state saved next to --out "
                   "(OUT.state.pth: decoder, Adam moments, steps done) up to --steps steps in all, with the "
                   "same options, images and --vgg; the result equals an uninterrupted run.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def style_train(style_dir, content_dir, vgg_path, out_path, decoder_init, steps, batch_size, size, crop, lr,
                lr_decay, style_weight, content_weight, save_every, seed, device, workers, overwrite, resume,
                no_progress):
    """Train an AdaIN decoder on your style collection (Huang & Belongie 2017, the recipe of the
    pytorch-AdaIN port's train.py): t = AdaIN(relu4_1(content), relu4_1(style)); loss = content
    MSE of relu4_1(decoder(t)) to t + STYLE_WEIGHT x style loss; Adam with inverse-time decay.

    Example: datagen style train --styles brueghel/ --content coco/train2017 --vgg vgg_normalised.pth
    --out decoder.pth
    """
    from tqdm import tqdm

    from datagen.style import StyleError
    from datagen.style.train import preview_path, train_decoder

    started = time.perf_counter()
    try:
        losses = train_decoder(content_dir, style_dir, vgg_path, out_path, decoder_init=decoder_init,
                               steps=steps, batch_size=batch_size, size=size, crop=crop, lr=lr,
                               lr_decay=lr_decay, style_weight=style_weight, content_weight=content_weight,
                               save_every=save_every, seed=seed, device=device, workers=workers,
                               overwrite=overwrite, resume=resume, progress=not no_progress,
                               log=lambda message: tqdm.write(message, file=sys.stderr))
    except (StyleError, ValueError, OSError) as error:
        _fail(error)
    head = sum(losses[:10]) / len(losses[:10])
    tail = sum(losses[-10:]) / len(losses[-10:])
    click.echo(f"{len(losses)} steps in {time.perf_counter() - started:.1f} s; mean loss of the first "
               f"{len(losses[:10])} steps {head:.4f}, of the last {len(losses[-10:])} {tail:.4f}")
    click.echo(f"decoder {out_path}  preview {preview_path(out_path)}")


@main.command(short_help="Upload a shard set to s3://, gs:// or file:// (manifest last) and record it.")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.argument("url")
@click.option("--catalog", type=click.Path(file_okay=False, path_type=Path), default=Path("manifests"),
              show_default=True, help="Folder of the catalog: one <set>-<fingerprint>.published.json per published "
                                      "set, with its URL and fingerprint.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def publish(folder, url, catalog, no_progress):
    """Upload the set in FOLDER to URL: each shard's sha256 is checked against the manifest first;
    then the shards, their sample rows and stats, and the manifest last, so that a reader who finds
    the manifest finds the whole set. Credentials come from the store's usual places (for S3 the
    AWS_* variables, AWS_ENDPOINT_URL for another endpoint, or ~/.aws).

    Example: datagen publish shards/coco s3://team-bucket/sets/coco-500k
    """
    from datagen.share import publish as run_publish

    try:
        report = run_publish(folder, url, catalog_dir=catalog, progress=not no_progress)
    except (ValueError, OSError) as error:
        _fail(error)
    click.echo(f"published {report.files} files ({report.bytes / 1e6:.1f} MB) to {url}; fingerprint "
               f"{report.fingerprint}; catalog {report.catalog}")


@main.command(short_help="Download a shard set by URL into a folder, checking every shard's sha256.")
@click.argument("url")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def pull(url, folder, no_progress):
    """Download the set at URL (its folder or manifest.json; https://, s3://, gs://) into FOLDER.
    Every shard is hashed as it arrives and compared with the manifest; the manifest is written
    last, and only when all match, so a folder with a manifest holds a checked set. Exit 1 when a
    shard differs (it is named).
    """
    from datagen.runner.lock import LockedError
    from datagen.share import pull as run_pull

    try:
        report = run_pull(url, folder, progress=not no_progress)
    except (ValueError, OSError, LockedError) as error:
        _fail(error)
    for problem in report.problems:
        click.echo(f"BAD {problem}")
    if report.problems:
        click.echo(f"{len(report.problems)} problem(s); {folder} has no manifest until a pull succeeds")
        sys.exit(1)
    click.echo(f"pulled {report.files} files ({report.bytes / 1e6:.1f} MB) into {folder}; fingerprint "
               f"{report.fingerprint}")


if __name__ == "__main__":
    main()
