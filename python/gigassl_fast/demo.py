"""``gigassl-fast demo``: the pipeline on data that needs no network.

Writes a small synthetic cohort (pyramidal JPEG TIFFs with H&E-like tissue) and tiles it; when the
real sample slides are present (../shared/data/slides in a development checkout), tiles those too
through a manifest that supplies the resolution the strip TIFF lacks.
"""

from __future__ import annotations

import os

import click

from .cohort import SlideEntry, collect_slides
from .encode import EncodeParams, run_encode
from .synthetic import write_synthetic_slide
from .tiling import TileParams, run_tile

#: Augmented versions and tiles per version in the demo (the paper uses 50 x 256).
DEMO_NAUG, DEMO_NT = 4, 32

#: The strip TIFF among the sample slides carries no resolution; the demo states one (the image is a
#: downsampled crop, about 10x).
KIDNEY_ASSUMED_MPP = 1.0


def default_sample_slides() -> str | None:
    for candidate in ("../shared/data/slides", os.path.join(os.path.dirname(__file__), "../../../shared/data/slides")):
        if os.path.isdir(candidate):
            return os.path.abspath(candidate)
    return None


def synthetic_cohort(folder: str, n: int = 4, width: int = 3072, height: int = 2048) -> list[SlideEntry]:
    """`n` synthetic slides in `folder` (kept if already there)."""
    os.makedirs(folder, exist_ok=True)
    entries = []
    for i in range(n):
        path = os.path.join(folder, f"synthetic_{i:02d}.tif")
        if not os.path.exists(path):
            write_synthetic_slide(path, width, height, mpp=0.5, seed=i)
        entries.append(SlideEntry(f"synthetic_{i:02d}", path))
    return entries


def sample_manifest(slides_dir: str, out_dir: str) -> str:
    """A CSV manifest over the sample slides, with the mpp the strip TIFF lacks."""
    path = os.path.join(out_dir, "sample_slides.csv")
    rows = ["slide_id,path,mpp"]
    for name in sorted(os.listdir(slides_dir)):
        mpp = str(KIDNEY_ASSUMED_MPP) if name.startswith("kidney") else ""
        rows.append(f"{os.path.splitext(name)[0]},{os.path.abspath(os.path.join(slides_dir, name))},{mpp}")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(rows) + "\n")
    return path


def run_demo(out_dir: str, sample_slides: str | None = None) -> int:
    os.makedirs(out_dir, exist_ok=True)
    params = TileParams().validate()
    click.echo("== writing a synthetic cohort")
    entries = synthetic_cohort(os.path.join(out_dir, "slides"))
    sample_slides = sample_slides or default_sample_slides()
    if sample_slides:
        entries += collect_slides([sample_manifest(sample_slides, out_dir)])
    else:
        click.echo("(no real sample slides found; pass --sample-slides DIR to tile some)")
    click.echo(f"== tiling {len(entries)} slides at {params.mpp} µm/px, {params.tile_size} px tiles")
    summary = run_tile(entries, params, out_dir)
    click.echo(summary.table())
    synthetic = [e for e in entries if e.slide_id.startswith("synthetic_")]
    click.echo(f"== encoding the synthetic cohort: efficientnet-lite0, {DEMO_NAUG} augmented versions x {DEMO_NT} tiles")
    enc = run_encode(synthetic, EncodeParams(naug=DEMO_NAUG, nt=DEMO_NT, batch_size=32, tiles=params), out_dir)
    click.echo(enc.table())
    click.echo(f"demo artefacts in {os.path.abspath(out_dir)}: tiles/, qc/ (QC pictures), features/, "
               "tile_summary.json, encode_summary.json")
    return max(summary.exit_code, enc.exit_code)
