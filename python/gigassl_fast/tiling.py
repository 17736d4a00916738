"""The tile stage: tissue mask and tile grid of each slide, written to ``tiles/<slide_id>.h5``.

File format (CLAM/TRIDENT names, so their tools read it):
    coords  int64 (N, 2)  level-0 top-left (x, y) of every kept tile, row-major order
    mask    uint8 (h, w)  tissue mask at thumbnail scale (0/1)
    attrs   slide path and size, level-0 mpp and its source, target mpp, read level, tile size at
            target and at level 0, step, mask method and parameters, thumbnail downsample, version.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import h5py
import numpy as np

from . import __version__, _core
from .cohort import SlideEntry
from .errors import GigasslError, SlideError
from .h5files import atomic_h5, is_complete, read_attrs, write_attrs
from .locks import lock_holder, slide_lock
from .qc import render_qc, save_png
from .runlog import Progress, RunSummary, ShowProgress, SlideRecord
from .slides import Slide
from .slides.slide import MPP_SLACK
from .tissue import MaskParams, tissue_mask

FORMAT = "gigassl-fast/tiles/1"

#: Mask thumbnails are at --mask-mpp or finer, so that they have at least this many pixels on their
#: long side (when the scan has them).
MIN_MASK_SIDE = 1024


@dataclass(frozen=True)
class TileParams:
    """Where tiles are and how big they are.

    Args:
        mpp: target resolution in microns per pixel (1.0 is about 10x, the paper's setting).
        tile_size: tile side in pixels at the target resolution.
        min_tissue: keep a tile when the tissue fraction of its footprint is > this (reference: 0.1).
        overlap: pixels (at the target resolution) shared by neighbouring tiles.
        mask: how the tissue mask is computed.
    """

    mpp: float = 1.0
    tile_size: int = 224
    min_tissue: float = 0.1
    overlap: int = 0
    mask: MaskParams = field(default_factory=MaskParams)

    def validate(self) -> TileParams:
        if not (self.mpp > 0 and math.isfinite(self.mpp)):
            raise GigasslError(f"--mpp must be > 0 (got {self.mpp})")
        if self.tile_size < 8:
            raise GigasslError(f"--tile-size must be >= 8 pixels (got {self.tile_size})")
        if not 0 <= self.min_tissue < 1:
            raise GigasslError(f"--min-tissue must be in [0, 1) (got {self.min_tissue})")
        if not 0 <= self.overlap < self.tile_size:
            raise GigasslError(f"--overlap must be in [0, --tile-size) (got {self.overlap} with tile size {self.tile_size})")
        self.mask.validate()
        return self

    def as_attrs(self) -> dict:
        return {"target_mpp": self.mpp, "tile_size": self.tile_size, "min_tissue": self.min_tissue,
                "overlap": self.overlap, "mask_params": self.mask.as_attrs(), "mask_method": self.mask.method}


@dataclass
class TileGrid:
    """The tiling of one slide."""

    coords: np.ndarray
    mask: np.ndarray
    attrs: dict
    thumbnail: np.ndarray | None = None

    @property
    def tile_size_level0(self) -> int:
        """Tile side at level 0 (pixels)."""
        return int(self.attrs["tile_size_level0"])

    @property
    def tile_size(self) -> int:
        """Tile side at the target mpp (pixels): what the encoder is given, after any resize."""
        return int(self.attrs["tile_size"])

    @property
    def read_level(self) -> int:
        """The pyramid level tiles are read from: the coarsest level at least as fine as the target mpp."""
        return int(self.attrs["read_level"])

    @property
    def read_tile_size(self) -> int:
        """Tile side at `read_level` (pixels)."""
        return int(self.attrs["read_tile_size"])

    @property
    def width0(self) -> int:
        return int(self.attrs["width0"])

    @property
    def height0(self) -> int:
        return int(self.attrs["height0"])


def tile_slide(slide: Slide, params: TileParams) -> TileGrid:
    """Masks and tiles one slide (see the module docstring for what `attrs` holds)."""
    w0, h0 = slide.dimensions
    mpp0 = slide.mpp
    if params.mpp < mpp0 * (1 - MPP_SLACK):
        raise SlideError(slide.path, f"--mpp {params.mpp} is finer than the scan ({mpp0:.4g} µm/px); "
                                     f"use --mpp >= {mpp0:.4g}")
    tile0 = max(1, round(params.tile_size * params.mpp / mpp0))
    step0 = tile0 - round(params.overlap * params.mpp / mpp0)
    read_level = slide.best_level_for_mpp(params.mpp)
    read_ds = slide.level_downsamples[read_level]
    # Small slides get a finer thumbnail (long side >= MIN_MASK_SIDE) so that their mask still resolves
    # tissue at tile scale; never finer than the scan itself.
    long_um = max(w0, h0) * mpp0
    mask_mpp = max(min(params.mask.mask_mpp, long_um / MIN_MASK_SIDE), mpp0)
    thumb = slide.thumbnail(mask_mpp)
    th, tw = thumb.shape[:2]
    thumb_mpp = mpp0 * math.sqrt((w0 / tw) * (h0 / th))
    mask, threshold = tissue_mask(thumb, params.mask, thumb_mpp)
    coords, _fractions = _core.tile_grid(mask, w0, h0, tile0, step0, params.min_tissue)
    attrs = {
        "format": FORMAT,
        "version": __version__,
        "slide_path": os.path.abspath(slide.path),
        "slide_bytes": os.path.getsize(slide.path),
        "reader": slide.backend_name,
        "width0": w0,
        "height0": h0,
        "level_count": slide.level_count,
        "mpp0": mpp0,
        "mpp_source": slide.mpp_source,
        **params.as_attrs(),
        "read_level": read_level,
        "read_downsample": read_ds,
        "read_tile_size": max(1, round(tile0 / read_ds)),
        "tile_size_level0": tile0,
        "step_level0": step0,
        "mask_mpp": thumb_mpp,
        "mask_downsample": [w0 / tw, h0 / th],
        "mask_threshold": threshold,
        "n_tiles": len(coords),
    }
    return TileGrid(coords=coords, mask=mask, attrs=attrs, thumbnail=thumb)


def tile_path(out_dir: str, slide_id: str) -> str:
    return os.path.join(out_dir, "tiles", f"{slide_id}.h5")


def qc_path(out_dir: str, slide_id: str) -> str:
    return os.path.join(out_dir, "qc", f"{slide_id}.png")


def write_tile_file(path: str, grid: TileGrid, slide_id: str, slide_mpp_user: float | None) -> None:
    with atomic_h5(path, grid.coords.nbytes + grid.mask.nbytes) as fh:
        fh.create_dataset("coords", data=np.asarray(grid.coords, np.int64))
        fh.create_dataset("mask", data=grid.mask, compression="gzip", compression_opts=4)
        write_attrs(fh, {**grid.attrs, "slide_id": slide_id, "slide_mpp_user": slide_mpp_user})


def read_tile_file(path: str) -> TileGrid:
    """Reads ``tiles/<slide_id>.h5`` back (thumbnail not stored)."""
    try:
        with h5py.File(path, "r") as fh:
            return TileGrid(coords=fh["coords"][:], mask=fh["mask"][:], attrs=read_attrs(fh))
    except (OSError, KeyError) as err:
        raise GigasslError(f"{path}: not a readable tile file ({err}); delete it and run `gigassl-fast tile` again") from None


def tile_count(path: str) -> int:
    """The number of tiles of a complete tile file, without reading its arrays."""
    with h5py.File(path, "r") as fh:
        return int(fh["coords"].shape[0])


def reuse_key(entry: SlideEntry, params: TileParams) -> dict:
    """Attributes a finished tile file must carry to be reused for `entry` with `params`."""
    path = os.path.abspath(entry.path)
    return {"format": FORMAT, "slide_path": path, "slide_bytes": _size(path), "slide_id": entry.slide_id,
            "mpp_source": "user" if entry.mpp is not None else "metadata", "slide_mpp_user": entry.mpp,
            **params.as_attrs()}


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def tile_one(entry: SlideEntry, params: TileParams, out_dir: str, reader: str = "auto",
             overwrite: bool = False, qc: bool = True) -> SlideRecord:
    """Tiles one cohort slide unless a matching tile file exists; errors become a failed record. A slide
    that another process is tiling (its lock is held) is recorded as "locked"."""
    start = time.time()
    path = tile_path(out_dir, entry.slide_id)
    key = reuse_key(entry, params)

    def up_to_date() -> SlideRecord | None:
        if overwrite or not (os.path.exists(path) and is_complete(path, key)):
            return None
        return SlideRecord(entry.slide_id, entry.path, "skipped", tile_count(path), time.time() - start, "up to date")

    if (record := up_to_date()) is not None:
        return record
    with slide_lock(path + ".lock") as mine:
        if not mine:
            return SlideRecord(entry.slide_id, entry.path, "locked", 0, time.time() - start,
                               f"being tiled by {lock_holder(path + '.lock')}")
        if not overwrite and (record := up_to_date()) is not None:  # finished by another process meanwhile
            return record
        try:
            with Slide(entry.path, reader=reader, mpp=entry.mpp) as slide:
                grid = tile_slide(slide, params)
            if qc:  # before the tile file: a run killed while drawing it redoes the slide, picture included
                save_png(qc_path(out_dir, entry.slide_id),
                         render_qc(grid.thumbnail, grid.mask, grid.coords, grid.tile_size_level0,
                                   grid.width0, grid.height0))
            write_tile_file(path, grid, entry.slide_id, entry.mpp)
        except GigasslError as err:
            return SlideRecord(entry.slide_id, entry.path, "failed", 0, time.time() - start, str(err))
        except Exception as err:  # one slide must never stop the cohort; the message keeps the cause
            return SlideRecord(entry.slide_id, entry.path, "failed", 0, time.time() - start,
                               f"{entry.path}: unexpected {type(err).__name__}: {err} (please report this)")
    n = len(grid.coords)
    if n == 0:
        return SlideRecord(entry.slide_id, entry.path, "empty", 0, time.time() - start,
                           "no tissue found: 0 tiles (check the QC picture; try --mask-method otsu-saturation "
                           "or a lower --min-tissue)")
    return SlideRecord(entry.slide_id, entry.path, "done", n, time.time() - start)


def run_tile(entries: Sequence[SlideEntry], params: TileParams, out_dir: str, reader: str = "auto",
             overwrite: bool = False, qc: bool = True, summary_name: str = "tile_summary.json",
             progress: ShowProgress | None = None) -> RunSummary:
    """Tiles a cohort; one bad slide is recorded and the run goes on. `progress` gets a line per slide."""
    params.validate()
    summary = RunSummary("tile", {"out": os.path.abspath(out_dir), "reader": reader, **asdict(params)})
    shown = Progress(len(entries), "tile", progress)
    for entry in entries:
        record = tile_one(entry, params, out_dir, reader, overwrite, qc)
        summary.add(record)
        shown.update(record)
    summary.write_json(os.path.join(out_dir, summary_name))
    return summary
