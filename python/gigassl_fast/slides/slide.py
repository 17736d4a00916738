"""The slide handle: geometry, resolution by microns per pixel, thumbnails and tile reads."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from ..errors import SlideError
from .backends import CorruptTilesError, SlideBackend, open_backend
from .jpeg_engine import JpegTileEngine, RegionPass, level_positions

if TYPE_CHECKING:
    import torch

#: File types the JPEG tile engine is tried on (TIFF containers).
_ENGINE_EXTS = {".svs", ".tif", ".tiff"}

#: Name of the decoding path of the JPEG tile engine, in run summaries and `info`.
ENGINE = "libjpeg-turbo engine"

#: A level counts as "finer" than a target resolution up to this relative slack, so a 0.2502 mpp
#: level still serves a 0.25 mpp request.
MPP_SLACK = 0.02

#: Pixels per side of the chunks a thumbnail is read in, so that memory stays bounded on slides
#: whose coarsest level is large.
_THUMB_CHUNK = 4096

#: Block side (level pixels) by which a damaged thumbnail chunk is searched for its corrupt tiles.
_LOCATE_BLOCK = 256


class Slide:
    """A whole-slide image, opened lazily; use as a context manager.

    Args:
        path: slide file.
        reader: ``"auto"`` (by file type: cuCIM for SVS/tiled TIFF, tiffslide for strip TIFF,
            OpenSlide for the rest; batched region reads of JPEG-tiled TIFF levels through the JPEG tile
            engine) or a backend name (``cucim``, ``openslide``, ``tiffslide``) for every read.
        mpp: level-0 microns per pixel, overriding the file's metadata (``--slide-mpp``).
    """

    def __init__(self, path: str | os.PathLike, reader: str = "auto", mpp: float | None = None) -> None:
        self.path = os.fspath(path)
        self.reader = reader
        self.mpp_override = mpp
        self._backend: SlideBackend | None = None
        self._engine: JpegTileEngine | None = None
        self._engine_why: str | None = None  # why there is no engine, once tried

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def backend(self) -> SlideBackend:
        if self._backend is None:
            self._backend = open_backend(self.path, self.reader)
            w, h = self._backend.level_dimensions[0]
            if w < 1 or h < 1:
                raise SlideError(self.path, f"level 0 is empty ({w}x{h})")
        return self._backend

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None
        if self._engine is not None:
            self._engine.close()
            self._engine = None
            self._engine_why = None

    @property
    def engine(self) -> JpegTileEngine | None:
        """The JPEG tile engine over this file, or None (see `decode_path` for why)."""
        if self._engine is None and self._engine_why is None:
            if self.reader != "auto":
                self._engine_why = f"--reader {self.reader}"
            elif os.path.splitext(self.path)[1].lower() not in _ENGINE_EXTS:
                self._engine_why = "the engine reads SVS and TIFF files only"
            else:
                try:
                    self._engine = JpegTileEngine(self.path)
                except Exception as err:  # tifffile cannot parse it: the backends' readers decide
                    self._engine_why = f"tifffile cannot parse it ({type(err).__name__})"
        return self._engine

    def decode_path(self, level: int) -> tuple[str, str]:
        """(who decodes batched reads at `level`, why): the JPEG tile engine or the backend's library."""
        engine = self.engine
        if engine is None:
            return self.backend_name, self._engine_why or ""
        size = self.level_dimensions[level]
        if engine.level(size) is None:
            return self.backend_name, f"level {level}: {engine.why_not(size)}"
        return ENGINE, f"level {level}: JPEG tiles of {engine.level(size).tile_width} px"

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- geometry ------------------------------------------------------------------------------
    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.backend.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.backend.level_dimensions)

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return self.backend.level_dimensions

    @property
    def level_downsamples(self) -> list[float]:
        return self.backend.level_downsamples

    @property
    def metadata_mpp(self) -> float | None:
        return self.backend.mpp

    @property
    def mpp_source(self) -> str:
        return "user" if self.mpp_override is not None else "metadata"

    @property
    def mpp(self) -> float:
        """Level-0 microns per pixel: ``--slide-mpp`` when given, else the metadata's."""
        if self.mpp_override is not None:
            if not (self.mpp_override > 0 and math.isfinite(self.mpp_override)):
                raise SlideError(self.path, f"--slide-mpp must be > 0 (got {self.mpp_override})")
            return float(self.mpp_override)
        mpp = self.backend.mpp
        if mpp is None:
            raise SlideError(self.path, "no resolution (microns per pixel) in the file's metadata; "
                                        "give it with --slide-mpp (or an mpp column in the manifest)")
        return mpp

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def best_level_for_mpp(self, target_mpp: float) -> int:
        """The coarsest level whose resolution is at least as fine as `target_mpp`, else level 0."""
        fine_enough = [lv for lv in range(self.level_count)
                       if self.level_mpp(lv) <= target_mpp * (1 + MPP_SLACK)]
        return max(fine_enough, key=lambda lv: self.level_downsamples[lv], default=0)

    # -- pixels --------------------------------------------------------------------------------
    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """uint8 (height, width, 3) at `level`, top-left at level-0 (x, y)."""
        return self.backend.read_region(x, y, level, width, height)

    def read_regions(self, xy: np.ndarray, level: int, width: int, height: int,
                     num_workers: int = 1) -> np.ndarray:
        """uint8 (N, height, width, 3): one region per level-0 top-left (x, y) in `xy` (N, 2), at `level`,
        decoded on `num_workers` threads. Regions whose image data is corrupt raise one CorruptTilesError
        naming all of them."""
        xy = np.asarray(xy, np.int64).reshape(-1, 2)
        out = np.empty((len(xy), height, width, 3), np.uint8)
        corrupt: list[CorruptTilesError] = []
        start = 0
        for batch, err in self.region_batches(xy, level, width, height, max(1, len(xy)), num_workers):
            if batch is not None:
                out[start:start + len(batch)] = batch
            if err is not None:
                corrupt.append(err)
            start += len(batch) if batch is not None else 0
        if corrupt:
            raise CorruptTilesError.merged(corrupt)
        return out

    def region_batches(self, xy: np.ndarray, level: int, width: int, height: int, batch_size: int,
                       num_workers: int = 1) -> Iterator[tuple[np.ndarray | None, CorruptTilesError | None]]:
        """The regions of `read_regions` in batches of `batch_size`, in order, each compressed tile decoded
        once over the whole pass where the JPEG tile engine serves the level. Yields (regions, None) or,
        for a batch with corrupt image data, (regions or None, the error naming its damaged regions);
        the pixels of damaged regions are undefined."""
        xy = np.asarray(xy, np.int64).reshape(-1, 2)
        regions = self.region_pass(xy, level, width, height)
        if regions is None:
            for start in range(0, len(xy), batch_size):
                try:
                    yield self.backend.read_regions(xy[start:start + batch_size], level, width, height,
                                                    num_workers), None
                except CorruptTilesError as err:
                    yield None, err
            return
        for start in range(0, len(xy), batch_size):
            stop = min(len(xy), start + batch_size)
            batch, bad = regions.read(start, stop, num_workers)
            yield batch, (CorruptTilesError.in_batch(self.path, xy, bad, level) if bad else None)

    def region_pass(self, xy: np.ndarray, level: int, width: int, height: int) -> RegionPass | None:
        """The JPEG tile engine's pass over regions at level-0 `xy` (N, 2) read at `level` (each source
        tile decoded once for the pass), or None when that level is not the engine's (``decode_path``)."""
        engine = self.engine
        lv = engine.level(self.level_dimensions[level]) if engine is not None else None
        if lv is None:
            return None
        return RegionPass(engine, lv, level_positions(xy, self.level_downsamples[level]), width, height)

    def read_regions_torch(self, xy: np.ndarray, level: int, width: int, height: int, device: torch.device,
                           num_workers: int = 1) -> torch.Tensor:
        """`read_regions` as a uint8 tensor on `device` (decoded on the CPU, copied from pinned memory)."""
        from ..runtime import to_device

        return to_device(self.read_regions(xy, level, width, height, num_workers), device)

    def thumbnail(self, target_mpp: float) -> np.ndarray:
        """uint8 (h, w, 3) RGB of the whole slide at `target_mpp` microns per pixel (area-averaged).

        The output covers the whole level-0 extent: h = round(H0 * mpp / target_mpp), at least 1.
        """
        w0, h0 = self.dimensions
        scale = self.mpp / target_mpp
        tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        level = self.best_level_for_mpp(target_mpp)
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        # Integer block-averaging per chunk keeps memory bounded; a final area resize hits the size.
        factor = max(1, min(lw // tw, lh // th))
        chunk = max(factor, (_THUMB_CHUNK // factor) * factor)
        reduced = np.empty((math.ceil(lh / factor), math.ceil(lw / factor), 3), np.uint8)
        for cy in range(0, lh, chunk):
            for cx in range(0, lw, chunk):
                cw, ch = min(chunk, lw - cx), min(chunk, lh - cy)
                try:
                    region = self.backend.read_region(round(cx * ds), round(cy * ds), level, cw, ch)
                except CorruptTilesError:
                    _corrupt_blocks(self, cx, cy, cw, ch, level)
                block = _block_mean(region, factor)
                reduced[cy // factor:cy // factor + block.shape[0],
                        cx // factor:cx // factor + block.shape[1]] = block
        if reduced.shape[:2] == (th, tw):
            return reduced
        from PIL import Image

        return np.asarray(Image.fromarray(reduced).resize((tw, th), Image.Resampling.BOX))


def _corrupt_blocks(slide: Slide, cx: int, cy: int, cw: int, ch: int, level: int) -> None:
    """Raises a CorruptTilesError naming the 256-px blocks of a damaged thumbnail chunk (at `level`,
    level pixels) whose data is corrupt, by their level-0 positions."""
    ds = slide.level_downsamples[level]
    bad, detail = [], ""
    for y in range(cy, cy + ch, _LOCATE_BLOCK):
        for x in range(cx, cx + cw, _LOCATE_BLOCK):
            w, h = min(_LOCATE_BLOCK, cx + cw - x), min(_LOCATE_BLOCK, cy + ch - y)
            try:
                slide.backend.read_region(round(x * ds), round(y * ds), level, w, h)
            except CorruptTilesError as err:
                bad.append((round(x * ds), round(y * ds)))
                detail = detail or err.detail
    if not bad:  # damage seen only in the whole chunk's read: name the chunk
        bad, detail = [(round(cx * ds), round(cy * ds))], "damaged image data"
    raise CorruptTilesError(slide.path, bad, level, f"{detail}; it is in the level the tissue mask is computed on")


def _block_mean(img: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks; partial blocks at the right and bottom edges average what
    they have."""
    if factor == 1:
        return img
    h, w = img.shape[:2]
    hb, wb = math.ceil(h / factor), math.ceil(w / factor)
    padded = np.zeros((hb * factor, wb * factor, 3), np.float32)
    padded[:h, :w] = img
    counts = np.zeros((hb * factor, wb * factor, 1), np.float32)
    counts[:h, :w] = 1
    sums = padded.reshape(hb, factor, wb, factor, 3).sum(axis=(1, 3))
    n = counts.reshape(hb, factor, wb, factor, 1).sum(axis=(1, 3))
    return np.clip(np.rint(sums / n), 0, 255).astype(np.uint8)
