"""``gigassl-fast demo``: the whole chain on data that needs no network.

A synthetic cohort of pyramidal JPEG TIFFs (pink stroma, purple nuclei, white background) in two classes
that differ only in a few regions (denser nuclei in class "dense"), then encode (efficientnet-lite0,
offline weights), PCA to 256-d, pack, train the sparse ResNet18-layer4 briefly, embed, and probe, with
the AUC of Giga-SSL embeddings next to mean-pooled tile features. Real slides given with
``--sample-slides`` (files, a folder or a manifest with an mpp column for files without a resolution;
a development checkout has data/sample_slides.csv for the sample slides beside it) are tiled too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from .cohort import SlideEntry, collect_slides
from .runlog import ShowProgress
from .synthetic import write_synthetic_slide
from .tiling import TileParams, run_tile


@dataclass(frozen=True)
class DemoSize:
    per_class: int
    width: int
    height: int
    naug: int
    nt: int
    epochs: int
    batch: int
    folds: int


FULL = DemoSize(per_class=10, width=2048, height=1536, naug=4, nt=32, epochs=40, batch=10, folds=5)
QUICK = DemoSize(per_class=4, width=1536, height=1024, naug=2, nt=8, epochs=3, batch=4, folds=2)


def synthetic_cohort(folder: str, size: DemoSize) -> tuple[list[SlideEntry], str]:
    """Slides of two classes in `folder` (kept if already there) and a labels CSV."""
    os.makedirs(folder, exist_ok=True)
    entries, rows = [], ["slide_id,label"]
    for i in range(2 * size.per_class):
        label = "dense" if i % 2 else "sparse"
        sid = f"synthetic_{i:02d}"
        path = os.path.join(folder, f"{sid}.tif")
        if not os.path.exists(path):
            extra = {"hotspots": 3, "hotspot_density": 0.35} if label == "dense" else {}
            write_synthetic_slide(path, size.width, size.height, mpp=0.5, seed=100 + i, **extra)
        entries.append(SlideEntry(sid, path))
        rows.append(f"{sid},{label}")
    labels = os.path.join(folder, "labels.csv")
    with open(labels, "w", encoding="utf-8") as fh:
        fh.write("\n".join(rows) + "\n")
    return entries, labels


def run_demo(out_dir: str, sample_slides: str | None = None, quick: bool = False,
             echo: Callable[[str], None] = print, progress: ShowProgress | None = None) -> int:
    """Runs the chain into `out_dir`; `echo` gets the demo's report, `progress` the cohort stages' lines.
    Returns the exit code."""
    from .embed import EmbedParams, embed
    from .encode import EncodeParams
    from .encode_pipeline import run_encode
    from .pack import pack
    from .pca import fit_pca, save_pca
    from .probe import ProbeParams, run_probe
    from .train import TrainParams, train

    size = QUICK if quick else FULL
    os.makedirs(out_dir, exist_ok=True)
    if sample_slides:
        echo(f"== tiling the sample slides of {sample_slides}")
        real = run_tile(collect_slides([sample_slides]), TileParams(), os.path.join(out_dir, "samples"), progress=progress)
        echo(real.table())
    echo(f"== writing a synthetic cohort: {2 * size.per_class} slides, classes 'sparse' and 'dense'")
    entries, labels = synthetic_cohort(os.path.join(out_dir, "slides"), size)
    tiles = TileParams(mpp=1.0, tile_size=112)
    echo(f"== encode: efficientnet-lite0, {size.naug} augmented versions x {size.nt} tiles per slide")
    enc = run_encode(entries, EncodeParams(naug=size.naug, nt=size.nt, batch_size=64, tiles=tiles), out_dir,
                     progress=progress)
    echo(enc.table())
    if enc.exit_code:
        return enc.exit_code
    features = os.path.join(out_dir, "features")
    pca_file = os.path.join(out_dir, "pca256.npz")
    fitted = fit_pca(features, 256 if not quick else 16)
    save_pca(pca_file, fitted)
    echo(f"== pca: 1280 -> {fitted['components'].shape[0]}-d, explained variance "
         f"{fitted['explained_variance_ratio'].sum():.2f}")
    store = os.path.join(out_dir, "store.h5")
    info = pack(features, store, pca_file)
    echo(f"== pack: {info['slides']} slides, {info['tiles']} tiles -> {store}")
    aggregator = "sparse-layer4" if not quick else "mlp"
    echo(f"== train: {aggregator}, {size.epochs} epochs, batch {size.batch}")
    run_dir = os.path.join(out_dir, "run")
    result = train(store, run_dir, TrainParams(aggregator=aggregator, epochs=size.epochs, batch_size=size.batch,
                                               warmup_epochs=max(1, size.epochs // 10), checkpoint_every=size.epochs),
                   resume=os.path.exists(os.path.join(run_dir, "checkpoint_last.pt")), log=lambda m: None)
    echo(f"   {result['steps']} steps, last loss {result['last_loss']:.3f}")
    emb = os.path.join(out_dir, "embeddings.h5")
    embed(store, result["checkpoint"], emb, EmbedParams(views=50))
    echo("== probe: Giga-SSL embeddings against mean-pooled tile features")
    report = run_probe(emb, labels, os.path.join(out_dir, "report"), ProbeParams(folds=size.folds), baseline=features,
                       warn=lambda m: None)
    echo(report["table"])
    echo(f"demo artefacts in {os.path.abspath(out_dir)}: slides/, tiles/, qc/, features/, store.h5, run/, "
         f"embeddings.h5, report/ (probe.json, probe.md, roc.png)" + (", samples/" if sample_slides else ""))
    return 0
