"""The ``gigassl-fast`` command line: one command per stage; options are parsed here and the stage
modules do the work."""

from __future__ import annotations

import os
import sys

import click

from . import __version__
from .errors import GigasslError
from .tissue import MASK_METHODS, MaskParams

_POSITIVE = click.FloatRange(min=0, min_open=True)


class _AggregatorChoice(click.Choice):
    """One of ``aggregators.list_aggregators()``, read when first needed: the registry imports torch, which
    the commands that do not train (tile) do not load."""

    def __init__(self) -> None:
        super().__init__((), case_sensitive=True)

    @property
    def choices(self) -> tuple[str, ...]:
        from .aggregators import list_aggregators

        return tuple(list_aggregators())

    @choices.setter
    def choices(self, _names) -> None:  # click.Choice.__init__ sets it; the registry holds the names
        pass


def _tile_options(f):
    """Options shared by every command that may tile slides."""
    options = [
        click.option("--mpp", type=_POSITIVE, default=1.0, show_default=True,
                     help="Target resolution in microns per pixel (1.0 is about 10x, as in the paper)."),
        click.option("--tile-size", type=click.IntRange(min=8), default=224, show_default=True,
                     help="Tile side in pixels at --mpp."),
        click.option("--min-tissue", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True,
                     help="Keep a tile when more than this fraction of it is tissue."),
        click.option("--overlap", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Pixels (at --mpp) shared by neighbouring tiles."),
        click.option("--mask-method", type=click.Choice(MASK_METHODS), default="otsu-gray", show_default=True,
                     help="otsu-gray: the Giga-SSL reference mask; otsu-saturation: CLAM-style HSV mask."),
        click.option("--mask-mpp", type=_POSITIVE, default=MaskParams.mask_mpp, show_default=True,
                     help="Coarsest resolution of the thumbnail the mask is computed on (µm/px); small slides use a "
                          "finer one, with at least 1024 px on the long side."),
        click.option("--slide-mpp", type=_POSITIVE, default=None,
                     help="Level-0 µm/px for slides whose file has none (a manifest's mpp column wins)."),
        click.option("--reader", type=click.Choice(["auto", "cucim", "openslide", "tiffslide"]), default="auto",
                     show_default=True, help="Slide reader; auto picks by file type."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _progress(line: str, last: bool) -> None:
    """A cohort stage's progress on stderr: one live line on a terminal, a line per slide in logs."""
    if sys.stderr.isatty():
        click.echo("\r\033[K" + line, nl=last, err=True)
    else:
        click.echo(line, err=True)


def _tile_params(mpp, tile_size, min_tissue, overlap, mask_method, mask_mpp):
    from .tiling import TileParams

    return TileParams(mpp=mpp, tile_size=tile_size, min_tissue=min_tissue, overlap=overlap,
                      mask=MaskParams(method=mask_method, mask_mpp=mask_mpp)).validate()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="gigassl-fast")
def cli() -> None:
    """Giga-SSL slide embeddings for whole-slide image cohorts.

    Each command is one stage and reads only what the stage before it wrote.
    """


@cli.command()
@click.argument("slides", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder: tiles/<slide_id>.h5, qc/<slide_id>.png, tile_summary.json.")
@_tile_options
@click.option("--shard", default=None, metavar="I/N", help="Process only shard I of N (0-based), e.g. for SLURM arrays.")
@click.option("--overwrite", is_flag=True, help="Redo slides whose tile file is already up to date.")
@click.option("--no-qc", is_flag=True, help="Do not write QC pictures.")
def tile(slides, out_dir, mpp, tile_size, min_tissue, overlap, mask_method, mask_mpp, slide_mpp, reader, shard,
         overwrite, no_qc) -> None:
    """Tissue mask and tile grid for each slide.

    SLIDES are slide files, folders, globs or a CSV manifest (slide_id,path[,mpp]). Slides whose
    tile file is complete with the same parameters are skipped. Exit code 1 if any slide failed, 3 if
    none failed but another process was working on some (the cohort is incomplete).
    """
    from .cohort import collect_slides, parse_shard, take_shard
    from .outputs import writable_dir
    from .tiling import run_tile

    params = _tile_params(mpp, tile_size, min_tissue, overlap, mask_method, mask_mpp)
    shard_spec = parse_shard(shard)
    entries = take_shard(collect_slides(slides, default_mpp=slide_mpp), shard_spec)
    writable_dir(out_dir)
    name = "tile_summary.json" if shard is None else f"tile_summary.shard{shard_spec[0]}of{shard_spec[1]}.json"
    summary = run_tile(entries, params, out_dir, reader=reader, overwrite=overwrite, qc=not no_qc, summary_name=name,
                       progress=_progress)
    click.echo(summary.table())
    click.echo(f"tile files in {os.path.join(out_dir, 'tiles')}, summary in {os.path.join(out_dir, name)}")
    sys.exit(summary.exit_code)


@cli.command()
@click.argument("slides", nargs=-1)
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Output folder: features/<slide_id>.h5 (and tiles/, qc/ when tiling was needed), encode_summary.json.")
@click.option("--encoder", default="efficientnet-lite0", show_default=True, help="Tile encoder (see --list-encoders).")
@click.option("--weights", default=None,
              help="Encoder weights: a checkpoint path, 'imagenet' (resnet18-l3: torchvision's, downloaded once), "
                   "or 'random' (tests). Default: the encoder's own (efficientnet-lite0: shipped offline).")
@click.option("--naug", type=click.IntRange(min=0), default=50, show_default=True, help="Augmented versions per slide.")
@click.option("--nt", type=click.IntRange(min=1), default=256, show_default=True,
              help="Tiles per augmented version (drawn with replacement).")
@_tile_options
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Tiles per encoder call [default: 256 on GPUs, 64 on CPUs].")
@click.option("--workers", type=click.IntRange(min=1), default=4, show_default=True,
              help="Decoding threads (the JPEG tile engine, or the slide reader).")
@click.option("--prefetch-mb", type=click.IntRange(min=0), default=1024, show_default=True,
              help="Decoded tiles held ahead of the encoder, in MB (a 224-px tile is 150 KB, a 448-px one 600 KB; "
                   "in device memory on a GPU): the next slide is tiled and decoded while this one is encoded.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
              help="Encoder compute precision; auto is bf16 on GPUs and on CPUs with AMX, float32 on other CPUs "
                   "(features are stored as float16).")
@click.option("--decode", type=click.Choice(["auto", "gpu", "cpu"]), default="auto", show_default=True,
              help="Where tiles are decoded. JPEG-tiled SVS/TIFF levels: by the JPEG tile engine (libjpeg-turbo, "
                   "--workers threads) on the CPU. Other formats: auto decodes on the GPU (cuCIM) when the encoder "
                   "runs there and a trial in a separate process finds it matches CPU decoding and is faster, else "
                   "on the CPU; gpu: cuCIM on the GPU whenever it matches CPU decoding (checked in this process), and "
                   "the JPEG engine's streams batch-decoded by nvImageCodec on the GPU for each kind of tile where a "
                   "trial batch matches the CPU engine (opt-in: not yet run on a GPU).")
@click.option("--on-corrupt-tile", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="A tile whose image data is corrupt: fail the slide naming it, or drop the tiles it touches "
                   "(recorded in the feature file and the summary).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of tile draws and augmentations.")
@click.option("--pca", type=click.Path(dir_okay=False), default=None,
              help="Project features with a PCA file (from `gigassl-fast pca`), e.g. wide features to 256-d.")
@click.option("--shard", default=None, metavar="I/N", help="Process only shard I of N (0-based), e.g. for SLURM arrays.")
@click.option("--overwrite", is_flag=True, help="Replace feature files made with other parameters.")
@click.option("--list-encoders", is_flag=True, help="List the registered encoders and exit.")
def encode(slides, out_dir, encoder, weights, naug, nt, mpp, tile_size, min_tissue, overlap, mask_method, mask_mpp,
           slide_mpp, reader, batch_size, workers, prefetch_mb, device, precision, decode, on_corrupt_tile, seed, pca,
           shard, overwrite, list_encoders) -> None:
    """Tile features for each slide, plain and under Giga-SSL augmentations.

    SLIDES are slide files, folders, globs or a CSV manifest (slide_id,path[,mpp]). Slides are tiled
    first when their tile file is missing. Finished slides are skipped; under torchrun each rank takes
    its share of the slides and its own GPU. Exit code 1 if any slide failed, 3 if none failed but
    another process was working on some (the cohort is incomplete: run again when it has finished).
    """
    from .encoders import get_config
    from .encoders import list_encoders as names

    if list_encoders:
        for name in names():
            c = get_config(name)
            click.echo(f"{name:<20} {c.out_dim:>5}-d  input {c.input_size}px  {c.description}")
        click.echo(f"{'timm:<name>':<20} {'':>7}  any timm model, with --weights PATH (needs timm installed)")
        return
    if not slides or not out_dir:
        raise click.UsageError("encode needs SLIDES and --out (or --list-encoders)")
    from .cohort import collect_slides, parse_shard, take_shard
    from .encode import EncodeParams
    from .encode_pipeline import run_encode
    from .outputs import writable_dir
    from .runtime import launch

    params = EncodeParams(encoder=encoder, weights=weights, naug=naug, nt=nt, batch_size=batch_size, workers=workers,
                          prefetch_mb=prefetch_mb, device=device, precision=precision, decode=decode,
                          on_corrupt_tile=on_corrupt_tile, seed=seed,
                          pca=pca, tiles=_tile_params(mpp, tile_size, min_tissue, overlap, mask_method, mask_mpp)).validate()
    shard_spec = parse_shard(shard)
    entries = take_shard(collect_slides(slides, default_mpp=slide_mpp), shard_spec)
    writable_dir(out_dir)
    name = "encode_summary.json" if shard is None else f"encode_summary.shard{shard_spec[0]}of{shard_spec[1]}.json"
    name = launch().per_rank(name)
    summary = run_encode(entries, params, out_dir, reader=reader, overwrite=overwrite, summary_name=name,
                         progress=_progress, warn=lambda line: click.echo(line, err=True))
    click.echo(summary.table())
    tp = summary.config["throughput"]
    rates = ", ".join(f"{k.split('_')[0]} {v:,.0f} tiles/s" for k, v in tp.items() if k.endswith("per_s") and v)
    if rates:
        click.echo(f"throughput: {rates}")
    click.echo(f"feature files in {os.path.join(out_dir, 'features')}, summary in {os.path.join(out_dir, name)}")
    sys.exit(summary.exit_code)


@cli.command()
@click.argument("features_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--dim", type=click.IntRange(min=1), default=256, show_default=True, help="Components to keep.")
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False), help="PCA file to write (.npz).")
@click.option("--max-tiles", type=click.IntRange(min=1), default=200_000, show_default=True,
              help="Tiles sampled evenly over slides for the fit.")
def pca(features_dir, dim, out_file, max_tiles) -> None:
    """Fit a PCA on the plain tile features in FEATURES_DIR (encode's --out folder, or its features/), for
    `encode --pca`: e.g. encode a subset with --naug 0, fit, then encode the cohort with --pca."""
    from .outputs import writable_file
    from .pca import fit_pca, save_pca

    writable_file(out_file)
    fitted = fit_pca(features_dir, dim, max_tiles)
    save_pca(out_file, fitted)
    click.echo(f"PCA {fitted['components'].shape[1]} -> {dim}, explained variance "
               f"{fitted['explained_variance_ratio'].sum():.3f}, written to {out_file}")


@cli.command(name="pack")
@click.argument("features_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False), help="Store file to write (.h5).")
@click.option("--pca", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Project every feature with a PCA file (from `gigassl-fast pca`), e.g. to 256-d for sparse-layer4.")
def pack_cmd(features_dir, out_file, pca) -> None:
    """Pack every feature file in FEATURES_DIR (encode's --out folder, or its features/) into one store
    for `train`."""
    from .outputs import writable_file
    from .pack import pack

    writable_file(out_file)
    info = pack(features_dir, out_file, pca)
    for f, why in info["skipped"]:
        click.echo(f"skipped {f}: {why}", err=True)
    click.echo(f"{info['slides']} slides, {info['tiles']} tiles, {info['naug']} x {info['nt']} augmented tiles of "
               f"{info['dim']}-d per slide -> {out_file}")


@cli.command(name="train")
@click.argument("store", type=click.Path(dir_okay=False, exists=True))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run folder (checkpoints, log).")
@click.option("--aggregator", type=_AggregatorChoice(), default="sparse-layer4",
              show_default=True, help="Slide encoder: the paper's sparse ResNet18-layer4, or non-spatial MIL.")
@click.option("--epochs", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=256, show_default=True,
              help="Slides per step (per process under torchrun).")
@click.option("--tiles-per-view", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--lr", "base_lr", type=_POSITIVE, default=0.03, show_default=True, help="Adam lr for a batch of 256 (scaled).")
@click.option("--warmup-epochs", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Adam weight decay. The reference's config says 5e-4 but never passes it to Adam, hence 0.")
@click.option("--resnet18-weights", default=None,
              help="Start sparse-layer4 from a torchvision ResNet18 (layer4.*): a path, or 'imagenet' (downloaded).")
@click.option("--init", "init", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Start from a trained slide model (fine-tuning): ours, an original trislaz/gigassl SimCLRMIL "
                   "checkpoint, or a Democratizing_WSI one (format detected).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=10, show_default=True, help="Epochs.")
@click.option("--sync-bn", is_flag=True, help="Batch-norm statistics over all processes (torchrun).")
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
              help="Forward passes in bf16 autocast or float32 (the loss is float32); auto is bf16 on CPUs with AMX, "
                   "float32 on other CPUs and on GPUs.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in --out from checkpoint_last.pt, with the same settings.")
@click.option("--force-resume", is_flag=True,
              help="With --resume: continue even with settings that change the run (logged; config.json keeps the "
                   "original).")
@click.option("--stop-at-epoch", type=click.IntRange(min=1), default=None,
              help="Stop after this epoch (the schedule still spans --epochs); continue later with --resume.")
@click.option("--cuda-graphs/--no-cuda-graphs", default=False, show_default=True,
              help="One CUDA GPU, one process: capture each step (forwards, loss, backward, Adam) once per shape "
                   "bucket and replay it. Opt-in: not yet measured on a GPU.")
def train_cmd(store, out_dir, aggregator, epochs, batch_size, tiles_per_view, base_lr, warmup_epochs, weight_decay,
              resnet18_weights, init, checkpoint_every, sync_bn, device, precision, seed, resume, force_resume,
              stop_at_epoch, cuda_graphs) -> None:
    """Slide-level SimCLR on a packed STORE (from `pack`); one process per GPU under torchrun."""
    import torch.distributed as dist

    from .outputs import writable_dir
    from .runtime import init_distributed
    from .train import TrainParams, train

    if force_resume and not resume:
        raise click.UsageError("--force-resume goes with --resume")
    writable_dir(out_dir)
    init_distributed()
    params = TrainParams(aggregator=aggregator, epochs=epochs, batch_size=batch_size, tiles_per_view=tiles_per_view,
                         base_lr=base_lr, warmup_epochs=warmup_epochs, weight_decay=weight_decay, seed=seed,
                         checkpoint_every=checkpoint_every, resnet18_weights=resnet18_weights, init=init, sync_bn=sync_bn,
                         device=device, stop_at_epoch=stop_at_epoch, precision=precision, cuda_graphs=cuda_graphs)
    result = train(store, out_dir, params, resume=resume, force_resume=force_resume, log=lambda m: click.echo(m, err=True))
    if not dist.is_initialized() or dist.get_rank() == 0:
        click.echo(f"{result['steps']} steps, last loss {result['last_loss']:.4f}; checkpoint {result['checkpoint']}")


@cli.command(name="embed")
@click.argument("source", type=click.Path(exists=True))
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False, exists=True),
              help="From `train`, or a released model: an original trislaz/gigassl SimCLRMIL checkpoint or a "
                   "Democratizing_WSI one (format detected; the run says what it loaded).")
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False), help="embeddings.h5 to write.")
@click.option("--views", type=click.IntRange(min=1), default=100, show_default=True, help="Views per slide.")
@click.option("--tiles-per-view", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--with-replacement", is_flag=True,
              help="Draw each view's tiles with replacement (the original inference) instead of without.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["h5", "npy"]), default="h5", show_default=True,
              help="npy also writes the reference's embeddings.npy + ids.npy beside the .h5.")
@click.option("--device", default="auto", show_default=True)
def embed_cmd(source, checkpoint, out_file, views, tiles_per_view, with_replacement, seed, fmt, device) -> None:
    """Slide embeddings (512-d, L2-normalised) from SOURCE, a store (from `pack`) or feature files (encode's
    --out folder, or its features/), with a trained CHECKPOINT."""
    from .embed import EmbedParams, embed
    from .outputs import writable_file

    writable_file(out_file)
    info = embed(source, checkpoint, out_file, EmbedParams(views, tiles_per_view, with_replacement, seed, device=device),
                 fmt, log=lambda m: click.echo(m, err=True))
    click.echo(f"{info['slides']} slides embedded -> {out_file}" +
               (f"; {len(info['empty'])} without tissue left out" if info["empty"] else ""))


@cli.command(name="export")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False, exists=True),
              help="A sparse-layer4 slide model (from `train`, or any format `embed` reads).")
@click.option("--format", "fmt", type=click.Choice(["gigassl"]), default="gigassl", show_default=True,
              help="gigassl: the original trislaz/gigassl SimCLRMIL layout (SparseConvNet weights), for its code.")
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False), help="Checkpoint file to write.")
def export_cmd(checkpoint, fmt, out_file) -> None:
    """Write a slide model in another code base's layout, so that models trained here can be used there."""
    import torch

    from .checkpoints import export_gigassl, read_slide_checkpoint
    from .outputs import atomic_file, writable_file

    writable_file(out_file)
    ckpt = read_slide_checkpoint(checkpoint)
    obj = export_gigassl(ckpt)
    nbytes = sum(v.numel() * v.element_size() for v in obj["state_dict"].values())
    with atomic_file(out_file, nbytes) as tmp:
        torch.save(obj, tmp)
    click.echo(f"{ckpt.describe()} -> {out_file} ({fmt} layout, {len(obj['state_dict'])} tensors)")


@cli.command(name="probe")
@click.argument("embeddings", type=click.Path(dir_okay=False, exists=True))
@click.option("--labels", required=True, type=click.Path(dir_okay=False, exists=True),
              help="CSV with slide_id,label[,patient_id].")
@click.option("--out", "out_dir", default="probe_report", show_default=True, type=click.Path(file_okay=False))
@click.option("--folds", type=click.IntRange(min=2), default=10, show_default=True, help="Stratified k-fold CV.")
@click.option("--train-size", default="", help="Few-shot settings: training-set sizes, e.g. 25,50,100.")
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True, help="Splits per few-shot setting.")
@click.option("--C", "C", type=_POSITIVE, default=10.0, show_default=True, help="Inverse regularisation (reference: 10).")
@click.option("--search-C", "search_C", is_flag=True, help="Choose C by inner 3-fold CV instead.")
@click.option("--baseline", "baseline", default=None, type=click.Path(file_okay=False, exists=True),
              help="Feature files (encode's --out folder, or its features/): also evaluate mean-pooled tile "
                   "features, in the same report.")
@click.option("--seed", type=int, default=0, show_default=True)
def probe_cmd(embeddings, labels, out_dir, folds, train_size, repeats, C, search_C, baseline, seed) -> None:
    """Linear evaluation of slide EMBEDDINGS (ours, or the reference's embeddings.npy with ids.npy beside).

    Logistic regression (C=10, balanced classes, as the reference), ROC-AUC and balanced accuracy over
    stratified k-fold CV and few-shot splits. With a patient_id column, a patient's slides stay on one
    side of every split (the reference splits by slide and lets patients leak into the test set).
    """
    from .outputs import writable_dir
    from .probe import ProbeParams, run_probe

    try:
        sizes = tuple(int(v) for v in train_size.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"must be integers separated by commas (got {train_size!r})",
                                 param_hint="--train-size") from None
    if any(n < 2 for n in sizes) or (train_size.strip() and not sizes):
        raise click.BadParameter(f"training-set sizes must be whole numbers >= 2 (got {train_size!r})",
                                 param_hint="--train-size")
    writable_dir(out_dir)
    report = run_probe(embeddings, labels, out_dir, ProbeParams(folds, sizes, repeats, C, search_C, seed), baseline,
                       warn=lambda m: click.echo(m, err=True))
    click.echo(report["table"])
    roc = ", roc.png" if os.path.exists(os.path.join(out_dir, "roc.png")) else ""
    click.echo(f"report in {out_dir}: probe.json, probe.md{roc}")


@cli.command(name="bench")
@click.option("--stages", default="tile,decode,encode,train,embed", show_default=True, help="Comma-separated stages to time.")
@click.option("--quick", is_flag=True, help="Small settings: the whole suite in about a minute on 2 cores (full settings, "
              "a realistic 4-slide cohort at 50 x 256 among them, take about an hour there).")
@click.option("--out", "out_dir", default="bench_out", show_default=True, type=click.Path(file_okay=False))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where both sides of encode, train and embed run (auto: the GPU when there is one).")
def bench_cmd(stages, quick, out_dir, device) -> None:
    """Time every stage against its reference implementation on this machine (same data, same run):
    a table, bench.json, bench.md and a bar chart of the ratios."""
    from .bench import STAGES, run_bench

    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown or not chosen:
        raise click.BadParameter(f"must be among {', '.join(STAGES)} (got {stages!r})", param_hint="--stages")
    if device == "cuda":
        from .runtime import check_device

        check_device(device)
    report = run_bench(chosen, quick, out_dir, log=lambda m: click.echo(m, err=True), device=device)
    click.echo(report["table"])
    m = report["machine"]
    click.echo(f"machine: {m['cpu']}, {m['cores']} cores, GPU {m.get('gpu') or 'none'}; "
               f"report in {out_dir}: bench.json, bench.md, bench.png")


@cli.command()
@click.argument("slides", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--reader", type=click.Choice(["auto", "cucim", "openslide", "tiffslide"]), default="auto",
              show_default=True, help="Slide reader, as for tile and encode.")
def info(slides, reader) -> None:
    """Versions, devices, and the compute path each stage takes here.

    With SLIDES: for each, the reader that opens it, its levels, and who decodes each level's tiles
    (the JPEG tile engine or the reader) and why."""
    if not slides:
        from .compute import report

        click.echo(report())
        return
    from .slides import Slide
    from .slides.backends import SlideError

    failed = 0
    for path in slides:
        try:
            with Slide(path, reader=reader) as s:
                mpp = f"{s.metadata_mpp:.4g} um/px" if s.metadata_mpp else "no resolution in the metadata"
                click.echo(f"{path}: {s.backend_name}, {mpp}")
                for level in range(s.level_count):
                    (w, h), ds = s.level_dimensions[level], s.level_downsamples[level]
                    who, why = s.decode_path(level)
                    click.echo(f"  level {level}: {w} x {h}, downsample {ds:.4g}; {who}: {why.split(': ', 1)[-1]}")
        except SlideError as err:
            click.echo(f"error: {err}", err=True)
            failed += 1
    sys.exit(1 if failed else 0)


@cli.command()
@click.option("--out", "out_dir", default="demo_out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for every artefact of the demo.")
@click.option("--sample-slides", type=click.Path(exists=True), default=None,
              help="Real slides to tile too: a slide, a folder, or a CSV manifest (slide_id,path,mpp) that gives the "
                   "resolution of files without one (`make demo` passes data/sample_slides.csv when the sample "
                   "slides are beside the checkout).")
@click.option("--quick", is_flag=True, help="A much smaller cohort and training (for tests).")
def demo(out_dir, sample_slides, quick) -> None:
    """The whole chain on synthetic slides (no network): tile, encode, pca, pack, train, embed, probe."""
    from .demo import run_demo

    sys.exit(run_demo(out_dir, sample_slides, quick, echo=click.echo, progress=_progress))


def main() -> None:
    """Entry point: user errors print one line and exit 2, never a traceback."""
    try:
        code = cli.main(standalone_mode=False)
        if isinstance(code, int):
            sys.exit(code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except GigasslError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except OSError as err:
        # A storage failure outside the writers that handle their own (e.g. a log line on a full disk).
        from .outputs import write_cause

        where = err.filename or "a file"
        cause = write_cause(str(where), err)
        hint = "; check free space and permissions" if cause else ""
        click.echo(f"error: {where}: {cause or err.strerror or err}{hint}", err=True)
        sys.exit(1)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
