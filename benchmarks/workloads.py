"""Realistic whole-slide workloads for the benchmarks: the slides users have, not toy ones.

A benchmark that tiles and encodes a 4096 x 3072 synthetic slide measures start-up costs; users run on
slides with thousands of tissue tiles, scanned at 40x or 20x. These are such slides, generated:

    40x  level 0 at 0.25 µm/px; 224-px tiles at 1 µm/px are 896 level-0 px, read exactly at level 1.
    20x  level 0 at 0.5 µm/px; the same tiles are 448 level-0 px, read from level 0 with a 2x downsample.

Both are laid out as Aperio SVS files (level 0, a thumbnail page, then levels 4x apart down to one whose
long side is at most 2048 px; 256 x 256 JPEG tiles at quality 90; the Aperio description carrying AppMag
and MPP), so cuCIM, OpenSlide and tiffslide read them as real scans of known resolution. The tissue
layout is a field of smooth blobs with rough borders, thresholded so that `tissue_tiles` 1-µm/px tiles,
and a few percent more, hold tissue; its texture is ``gigassl_fast.synthetic``'s H&E-like stroma and
nuclei. At 40x, 3000 tissue tiles make a slide of 77,504 x 57,792 level-0 px and 1.7 GB, written in
seconds: level-0 tiles are copied from a bank of pre-encoded JPEG tiles.

    python benchmarks/workloads.py [--out /tmp/gigassl_bench_workloads] [--slides 2] [--tissue-tiles 3000]

writes (or reuses) a cohort and reports each slide's size and tile count.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from gigassl_fast.synthetic import BACKGROUND, _smooth_field, aperio_description, synthetic_tissue

#: Level-0 microns per pixel of each kind of scan.
KINDS = {"40x": 0.25, "20x": 0.5}

#: Bumped whenever the generator's output changes, so that a cohort folder never reuses a stale slide.
VERSION = 1

TILE = 256
QUALITY = 90
#: The pyramid goes down to a level whose long side is at most this.
THUMB_MAX_SIDE = 2048
#: Long side of the SVS thumbnail page (Aperio's own are 768 to 1024 px).
THUMB_SIDE = 768
# The tile stage's defaults: the unit `tissue_tiles` counts in.
TARGET_MPP = 1.0
TARGET_TILE = 224
MIN_TISSUE = 0.1

#: Share of the slide's tile grid the tissue covers (whole-slide scans are about half glass).
TISSUE_SHARE = 0.55
#: Extra tissue tiles aimed for: blob borders rasterise a little differently in the tissue mask.
COUNT_MARGIN = 0.04
BLOBS = 10
#: Noise added to the blob field before thresholding, in units of its [0, 1] range: ragged borders.
ROUGHNESS = 0.08

#: Distinct tissue tiles per slide: enough that JPEG decoding never sees the same few tiles, few enough
#: that the bank costs under a second.
BANK_TISSUE = 128
BANK_BACKGROUND = 8
#: A bank tile is "tissue" when this share of its pixels is stroma or nuclei.
BANK_PURITY = 0.98
#: synthetic_tissue's noise amplitude: pixels closer than this to BACKGROUND are glass.
_NOISE = 12
_BANK_SOURCE = 2048
_WINDOW_STEP = 32


@dataclass(frozen=True)
class Geometry:
    """Size and pyramid of one workload slide."""

    kind: str
    mpp: float
    width: int
    height: int
    levels: int
    tile0: int  # side of a 224-px, 1-µm/px tile in level-0 pixels

    def level_shape(self, level: int) -> tuple[int, int]:
        """(height, width) of `level`; widths and heights are multiples of 4**(levels - 1), so every
        downsample is exact."""
        return self.height // 4**level, self.width // 4**level


def slide_geometry(kind: str = "40x", tissue_tiles: int = 3000) -> Geometry:
    """The size and pyramid of a `kind` slide with room for `tissue_tiles` tissue tiles (4:3 landscape)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)} (got {kind!r})")
    if tissue_tiles < 1:
        raise ValueError(f"tissue_tiles must be >= 1 (got {tissue_tiles})")
    mpp = KINDS[kind]
    tile0 = round(TARGET_TILE * TARGET_MPP / mpp)
    n_grid = tissue_tiles / TISSUE_SHARE
    rows = max(2, math.ceil(math.sqrt(n_grid * 3 / 4)))
    cols = max(2, math.ceil(n_grid / rows))
    # Half a tile of glass past the last grid column and row: real scans do not end on the tile grid.
    width, height = cols * tile0 + tile0 // 2, rows * tile0 + tile0 // 2
    levels = 1
    while max(width, height) / 4 ** (levels - 1) > THUMB_MAX_SIDE:
        levels += 1
    top = 4 ** (levels - 1)
    width, height = -(-width // top) * top, -(-height // top) * top
    return Geometry(kind, mpp, width, height, levels, tile0)


def workload_name(kind: str, tissue_tiles: int, seed: int) -> str:
    """File name that encodes everything the slide depends on, so a cohort folder can reuse it."""
    return f"realistic_{kind}_t{tissue_tiles}_s{seed}_v{VERSION}.tif"


def _tissue_tile_count(cells: np.ndarray, geom: Geometry) -> int:
    """How many grid tiles (224 px at 1 µm/px, from (0, 0), as the tile stage lays them) have more than
    MIN_TISSUE of their area on tissue cells (TILE x TILE level-0 px each)."""
    unit = math.gcd(TILE, geom.tile0)  # both cells and tiles are whole numbers of units
    r, t = TILE // unit, geom.tile0 // unit
    nx = (geom.width - geom.tile0) // geom.tile0 + 1
    ny = (geom.height - geom.tile0) // geom.tile0 + 1
    fine = cells[: -(-ny * t // r), : -(-nx * t // r)].repeat(r, 0).repeat(r, 1)[: ny * t, : nx * t]
    frac = fine.reshape(ny, t, nx, t).mean(axis=(1, 3))
    return int((frac > MIN_TISSUE).sum())


def tissue_layout(geom: Geometry, tissue_tiles: int, rng: np.random.Generator) -> np.ndarray:
    """bool (ceil(H0 / TILE), ceil(W0 / TILE)): which level-0 TIFF tiles are tissue.

    One cell per level-0 tile keeps level 0 free of mixed tiles (all of it comes from the pre-encoded
    bank); the threshold is the highest that still puts `tissue_tiles` (plus COUNT_MARGIN) grid tiles
    on tissue, so the slide is no bigger a job than asked.
    """
    gh, gw = -(-geom.height // TILE), -(-geom.width // TILE)
    field = _smooth_field(rng, gh, gw, BLOBS) + ROUGHNESS * rng.random((gh, gw), dtype=np.float32)
    target = math.ceil(tissue_tiles * (1 + COUNT_MARGIN)) + 1
    lo, hi = 0.0, float(field.max())
    for _ in range(30):  # the count only falls as the threshold rises
        mid = (lo + hi) / 2
        if _tissue_tile_count(field > mid, geom) >= target:
            lo = mid
        else:
            hi = mid
    return field > lo


@dataclass
class _Bank:
    tissue: np.ndarray  # uint8 (n, TILE, TILE, 3)
    tissue_jpeg: list[bytes]
    background: np.ndarray
    background_jpeg: list[bytes]


def _jpeg(tile: np.ndarray) -> bytes:
    # What tifffile itself writes for compression="jpeg", photometric="rgb": YCbCr with 2x2 chroma
    # subsampling, so these bytes match the tags it sets for the page.
    import imagecodecs

    return imagecodecs.jpeg_encode(np.ascontiguousarray(tile), level=QUALITY, subsampling=(2, 2),
                                   colorspace="RGB", outcolorspace="YCBCR")


def _tile_bank(rng: np.random.Generator) -> _Bank:
    """Tissue and glass tiles cut from synthetic_tissue images, raw and JPEG-encoded.

    Windows are taken at a _WINDOW_STEP stride, not on the TILE grid: a synthetic_tissue image is mostly
    glass, and few of its grid-aligned tiles are all tissue, while shifted windows give many distinct
    ones from the same image.
    """
    tissue: list[np.ndarray] = []
    background: list[np.ndarray] = []
    n = (_BANK_SOURCE - TILE) // _WINDOW_STEP + 1
    while len(tissue) < BANK_TISSUE or len(background) < BANK_BACKGROUND:
        img = synthetic_tissue(_BANK_SOURCE, _BANK_SOURCE, seed=int(rng.integers(2**31)))
        glass = np.abs(img.astype(np.int16) - np.array(BACKGROUND, np.int16)).max(axis=-1) <= _NOISE
        integral = np.zeros((_BANK_SOURCE + 1, _BANK_SOURCE + 1), np.int64)
        integral[1:, 1:] = glass.cumsum(0).cumsum(1)
        lo, hi = np.arange(n) * _WINDOW_STEP, np.arange(n) * _WINDOW_STEP + TILE
        glass_px = integral[hi][:, hi] - integral[lo][:, hi] - integral[hi][:, lo] + integral[lo][:, lo]
        share = 1.0 - glass_px / TILE**2
        for found, keep, want in ((tissue, share >= BANK_PURITY, BANK_TISSUE), (background, share == 0, BANK_BACKGROUND)):
            ys, xs = np.nonzero(keep)
            for i in rng.permutation(len(ys))[:want - len(found)]:
                y, x = ys[i] * _WINDOW_STEP, xs[i] * _WINDOW_STEP
                found.append(img[y:y + TILE, x:x + TILE])
    return _Bank(np.stack(tissue), [_jpeg(t) for t in tissue], np.stack(background), [_jpeg(t) for t in background])


def _level_tiles(cells: np.ndarray, geom: Geometry, level: int, bank: _Bank, rng: np.random.Generator) -> Iterator[bytes]:
    """The JPEG tiles of `level`, row-major: whole-tissue and whole-glass tiles straight from the bank,
    tiles on a border composed from bank tiles under the layout and encoded."""
    f = 4**level  # layout cells per tile side at this level
    lh, lw = geom.level_shape(level)
    nty, ntx = -(-lh // TILE), -(-lw // TILE)
    cover = np.zeros((nty * f, ntx * f), bool)
    ch, cw = min(cells.shape[0], nty * f), min(cells.shape[1], ntx * f)
    cover[:ch, :cw] = cells[:ch, :cw]
    counts = cover.reshape(nty, f, ntx, f).sum(axis=(1, 3))
    picks = rng.integers(len(bank.tissue), size=(nty, ntx))
    glass = rng.integers(len(bank.background), size=(nty, ntx))
    for ty in range(nty):
        for tx in range(ntx):
            c, p, g = counts[ty, tx], picks[ty, tx], glass[ty, tx]
            if c == f * f:
                yield bank.tissue_jpeg[p]
            elif c == 0:
                yield bank.background_jpeg[g]
            else:
                block = cover[ty * f:(ty + 1) * f, tx * f:(tx + 1) * f]
                if f <= TILE:
                    alpha = block.repeat(TILE // f, 0).repeat(TILE // f, 1)[..., None].astype(np.float32)
                else:  # a pixel spans several cells: blend by their tissue share
                    k = f // TILE
                    alpha = block.reshape(TILE, k, TILE, k).mean(axis=(1, 3), dtype=np.float32)[..., None]
                tile = alpha * bank.tissue[p] + (1 - alpha) * bank.background[g]
                yield _jpeg(np.rint(tile).astype(np.uint8))


def _thumbnail(cells: np.ndarray, geom: Geometry, bank: _Bank) -> np.ndarray:
    """The small overview image an SVS keeps as its second page, drawn from the layout."""
    from PIL import Image

    scale = THUMB_SIDE / max(geom.width, geom.height)
    tw, th = max(1, round(geom.width * scale)), max(1, round(geom.height * scale))
    gh, gw = cells.shape  # the cells reach past the slide's right and bottom edges: resize, then crop
    alpha = Image.fromarray(cells.astype(np.uint8) * 255).resize(
        (math.ceil(gw * TILE * scale), math.ceil(gh * TILE * scale)), Image.Resampling.BOX)
    alpha = np.asarray(alpha, np.float32)[:th, :tw, None] / 255
    reps = (-(-th // TILE), -(-tw // TILE), 1)
    tissue = np.tile(bank.tissue[0], reps)[:th, :tw]
    glass = np.tile(bank.background[0], reps)[:th, :tw]
    return np.rint(alpha * tissue + (1 - alpha) * glass).astype(np.uint8)


def write_realistic_slide(path: str | os.PathLike, kind: str = "40x", tissue_tiles: int = 3000, seed: int = 0) -> str:
    """Writes a realistic `kind` slide ("40x" or "20x") with about `tissue_tiles` tissue tiles (224 px
    at 1 µm/px) to `path`; see the module docstring.

    Tiles are streamed to the file already JPEG-encoded, so memory stays under about 200 MB whatever
    the slide's size. Written to a temporary name and renamed: `path` is complete or absent.
    """
    import tifffile

    geom = slide_geometry(kind, tissue_tiles)
    rng = np.random.default_rng(seed)
    cells = tissue_layout(geom, tissue_tiles, rng)
    bank = _tile_bank(rng)
    path = os.fspath(path)
    # Classic TIFF (as Aperio writes) unless its 32-bit offsets could overflow.
    biggest = max(len(b) for b in bank.tissue_jpeg + bank.background_jpeg)
    level0_tiles = -(-geom.width // TILE) * -(-geom.height // TILE)
    bigtiff = level0_tiles * biggest * 4 / 3 > 3.5e9
    desc = aperio_description(geom.width, geom.height, TILE, QUALITY, geom.mpp)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
            # The page order of a real SVS: level 0, the thumbnail, then the reduced levels, none of them
            # flagged "reduced" (NewSubfileType 0). tifffile, hence tiffslide, finds an SVS's levels only
            # that way; with subfiletype 1 and no thumbnail page it sees level 0 alone.
            for level in range(geom.levels):
                if level == 1:
                    tif.write(_thumbnail(cells, geom, bank), compression="jpeg", compressionargs={"level": QUALITY},
                              photometric="rgb", rowsperstrip=16, metadata=None)
                tif.write(_level_tiles(cells, geom, level, bank, rng), shape=(*geom.level_shape(level), 3),
                          dtype=np.uint8, tile=(TILE, TILE), compression="jpeg", compressionargs={"level": QUALITY},
                          photometric="rgb", description=desc if level == 0 else None, metadata=None)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path


def _is_complete(path: str, kind: str, tissue_tiles: int) -> bool:
    """`path` is a finished workload of this geometry (the rename makes a present file whole; the check
    catches a foreign file under the name)."""
    import tifffile

    geom = slide_geometry(kind, tissue_tiles)
    try:
        with tifffile.TiffFile(path) as tif:
            shapes = [tuple(p.shape[:2]) for p in tif.pages if p.is_tiled]
    except (OSError, ValueError, tifffile.TiffFileError):
        return False
    return shapes == [geom.level_shape(level) for level in range(geom.levels)]


def realistic_cohort(folder: str | os.PathLike, n_slides: int = 4, tissue_tiles: int = 3000,
                     kinds: Sequence[str] = ("40x", "20x"), seed: int = 0) -> list[str]:
    """`n_slides` realistic slides in `folder`, kinds alternating, slide i with seed `seed` + i.

    A slide already there with the same parameters (they are in its name) is reused, so benchmark
    reruns pay for generation once.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n_slides):
        kind = kinds[i % len(kinds)]
        path = os.path.join(folder, workload_name(kind, tissue_tiles, seed + i))
        if not _is_complete(path, kind, tissue_tiles):
            start = time.perf_counter()
            write_realistic_slide(path, kind, tissue_tiles, seed + i)
            print(f"workloads: wrote {path} ({os.path.getsize(path) / 1e9:.2f} GB) in {time.perf_counter() - start:.1f} s")
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/gigassl_bench_workloads")
    ap.add_argument("--slides", type=int, default=2)
    ap.add_argument("--tissue-tiles", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from gigassl_fast.slides import Slide
    from gigassl_fast.tiling import TileParams, tile_slide

    for path in realistic_cohort(args.out, args.slides, args.tissue_tiles, seed=args.seed):
        start = time.perf_counter()
        with Slide(path) as s:
            grid = tile_slide(s, TileParams(mpp=TARGET_MPP, tile_size=TARGET_TILE))
            dims, backend = s.dimensions, s.backend_name
        print(f"{os.path.basename(path)}: {dims[0]}x{dims[1]} px, {os.path.getsize(path) / 1e9:.2f} GB, "
              f"{len(grid.coords)} tissue tiles (read level {grid.read_level}), "
              f"tile_slide {time.perf_counter() - start:.1f} s ({backend})")


if __name__ == "__main__":
    main()
