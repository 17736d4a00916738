"""The tile decoding engine: regions of JPEG-tiled TIFF levels (Aperio SVS, generic pyramidal TIFF) built
from the compressed tiles, each fetched and decoded once per pass by libjpeg-turbo on a pool of threads.

A region reader (cuCIM, OpenSlide) decodes every source tile a region touches, once per region: 224-px
regions on a 256-px tile grid decode each tile about twice, and the 448-px regions of a 20x slide touch 9
tiles for 3 tiles of area. Here the tiles a batch of regions needs are listed first, their bytes read with
one ``pread`` each, decoded once in parallel (simplejpeg releases the GIL), and the regions copied out of
them; over a pass (`RegionPass`) a decoded tile is kept until the last batch that needs it.

Pixels are OpenSlide's and cuCIM's for the files they read right (tested to 2 grey levels; identical on
the sample SVS and the benchmark slides): the same libjpeg-turbo settings (accurate integer IDCT, smooth
chroma upsampling), and as cuCIM places a region, its level position is floor(level-0 position /
downsample); pixels outside the level are white. RGB-photometric tiles are decoded as RGB whatever
their stream says (cuCIM decodes those without an Adobe marker as YCbCr).
Damaged tiles are errors: libjpeg-turbo's warnings are raised (simplejpeg's strict mode), never decoded
into garbage silently.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

#: TIFF compression codes, for saying why a level is not decoded here.
COMPRESSION_NAMES = {1: "uncompressed", 5: "LZW", 6: "old-style JPEG", 8: "Deflate", 32773: "PackBits",
                     32946: "Deflate", 33003: "Aperio JPEG 2000 (YCbCr)", 33005: "Aperio JPEG 2000 (RGB)",
                     34712: "JPEG 2000", 50000: "Zstandard", 50001: "WebP", 50002: "JPEG XL"}
JPEG = 7
#: TIFF photometric interpretations this engine decodes: RGB (JPEG data kept in RGB) and YCbCr.
RGB, YCBCR = 2, 6

#: An Adobe APP14 segment with transform 0: tells libjpeg that the 3 components are R, G, B (Aperio's
#: photometric-RGB tiles carry no marker saying so, and libjpeg would assume YCbCr).
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
_SOI = b"\xff\xd8"


@dataclass(frozen=True)
class JpegLevel:
    """One JPEG-tiled level of a TIFF file: where each compressed tile lies and how to decode it."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    offsets: np.ndarray  # int64 (rows * cols,): file offset of each tile, row-major
    counts: np.ndarray  # int64: byte count of each tile; 0 for a tile never written
    tables: bytes  # the page's JPEGTables (SOI, tables, EOI) or b""
    rgb: bool  # components stored as R, G, B rather than YCbCr
    subsampling: tuple[int, int] = (1, 1)  # the TIFF's YCbCrSubsampling (chroma per luma, horizontally, vertically)

    @property
    def variant(self) -> tuple:
        """What a decoder's colour handling depends on: RGB or YCbCr, subsampling, tile size."""
        return self.rgb, self.subsampling, self.tile_width, self.tile_height

    @property
    def cols(self) -> int:
        return math.ceil(self.width / self.tile_width)

    @property
    def rows(self) -> int:
        return math.ceil(self.height / self.tile_height)

    def stream(self, data: bytes) -> bytes:
        """A tile's bytes as a complete JPEG stream: shared tables spliced in, the colour space stated."""
        if data[:2] != _SOI:
            return data  # not JPEG: the decoder says so
        end = self.tables.rfind(b"\xff\xd9")  # the tables' EOI (a writer may pad after it)
        if end > 2:
            data = self.tables[:end] + data[2:]  # tables' SOI and segments, then the tile's after its SOI
        if self.rgb:
            if data[2:4] == b"\xff\xe0" and data[6:11] == b"JFIF\0":
                # libjpeg takes JFIF to mean YCbCr before it reads an Adobe marker: the TIFF tag rules
                data = _SOI + data[4 + int.from_bytes(data[4:6], "big"):]
            if data[2:4] != b"\xff\xee":
                data = _SOI + _ADOBE_RGB + data[2:]
        return data


def describe_page(page) -> tuple[JpegLevel | None, str]:
    """The page as a `JpegLevel`, or None and why this engine does not decode it."""
    if not getattr(page, "is_tiled", False):
        return None, "stored in strips, not tiles"
    if page.compression != JPEG:
        code = int(page.compression)
        return None, f"{COMPRESSION_NAMES.get(code, f'compression {code}')} tiles, not JPEG"
    if int(page.samplesperpixel) != 3 or int(getattr(page, "bitspersample", 8)) != 8:
        return None, f"{page.samplesperpixel} samples of {page.bitspersample} bits, not 8-bit RGB"
    if int(page.planarconfig) != 1 or int(getattr(page, "tiledepth", 1)) != 1:
        return None, "planar or volumetric tiles"
    if int(page.photometric) not in (RGB, YCBCR):
        return None, f"photometric {int(page.photometric)} (not RGB or YCbCr)"
    tables = page.jpegtables
    lv = JpegLevel(int(page.imagewidth), int(page.imagelength), int(page.tilewidth), int(page.tilelength),
                   np.asarray(page.dataoffsets, np.int64), np.asarray(page.databytecounts, np.int64),
                   bytes(tables) if tables is not None else b"", int(page.photometric) == RGB,
                   tuple(int(v) for v in (getattr(page, "subsampling", None) or (1, 1))))
    if len(lv.offsets) < lv.rows * lv.cols:
        return None, f"{len(lv.offsets)} tile offsets for a {lv.cols} x {lv.rows} tile grid"
    return lv, "JPEG tiles"


def _pages(tif) -> list:
    """Every image page of the file: top-level pages and the levels of each series (SubIFD pyramids)."""
    pages = list(tif.pages)
    for series in tif.series:
        for level in series.levels:
            pages.extend(level.pages)
    return [p for p in pages if hasattr(p, "imagewidth")]


class TileDecodeError(Exception):
    """A tile that libjpeg-turbo rejected or warned about; `detail` says what it said."""

    def __init__(self, index: int, detail: str) -> None:
        super().__init__(detail)
        self.index, self.detail = index, detail


class JpegTileEngine:
    """The JPEG-tiled levels of one TIFF file (by (width, height)) and a pool of decoding threads."""

    def __init__(self, path: str) -> None:
        import tifffile

        self.path = path
        self.levels: dict[tuple[int, int], JpegLevel] = {}
        self.reasons: dict[tuple[int, int], str] = {}
        with tifffile.TiffFile(path) as tif:
            for page in _pages(tif):
                size = (int(page.imagewidth), int(page.imagelength))
                if size in self.levels:
                    continue
                level, why = describe_page(page)
                if level is not None:
                    self.levels[size] = level
                    self.reasons.pop(size, None)
                else:
                    self.reasons.setdefault(size, why)
        self._fd = os.open(path, os.O_RDONLY)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._pool_lock = threading.Lock()
        self._sound: set[tuple[tuple[int, int], int]] = set()  # (level size, tile) that decoded cleanly

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def level(self, size: tuple[int, int]) -> JpegLevel | None:
        return self.levels.get(tuple(size))

    def why_not(self, size: tuple[int, int]) -> str:
        """Why the level of this (width, height) is not decoded here."""
        return self.reasons.get(tuple(size), "no such page in the TIFF structure")

    # -- decoding ------------------------------------------------------------------------------------------
    def tile_stream(self, level: JpegLevel, index: int) -> bytes:
        """Tile `index` of `level` as a complete JPEG stream, read with one pread."""
        count, offset = int(level.counts[index]), int(level.offsets[index])
        data = os.pread(self._fd, count, offset)
        if len(data) != count:
            raise TileDecodeError(index, f"the file ends inside the tile ({len(data)} of {count} bytes)")
        return level.stream(data)

    def decode_tile(self, level: JpegLevel, index: int, out: np.ndarray | None = None) -> np.ndarray | None:
        """uint8 (tile_height, tile_width, 3) RGB of one tile, into `out` when given; None for a tile never
        written (white)."""
        import simplejpeg

        if level.counts[index] == 0:
            return None
        data = self.tile_stream(level, index)
        th, tw = level.tile_height, level.tile_width
        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            if (h, w) == (th, tw) and out is not None:
                return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, buffer=out)
            img = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
        except ValueError as err:
            raise TileDecodeError(index, str(err).strip() or "undecodable JPEG data") from None
        if img.shape[:2] != (th, tw):  # a writer that stored a short edge tile: place it, white around
            full = np.full((th, tw, 3), 255, np.uint8) if out is None else out
            full.fill(255)
            h, w = min(th, img.shape[0]), min(tw, img.shape[1])
            full[:h, :w] = img[:h, :w]
            img = full
        return img

    def decode_tiles(self, level: JpegLevel, indices: Sequence[int], num_workers: int = 1,
                     buffers: Sequence[np.ndarray] | None = None
                     ) -> tuple[dict[int, np.ndarray | None], dict[int, str]]:
        """Decoded tiles by index (into `buffers`, one per index, when given), and the problem of each
        tile that failed."""
        def one(k: int):
            index = indices[k]
            try:
                return index, self.decode_tile(level, index, None if buffers is None else buffers[k]), None
            except TileDecodeError as err:
                return index, None, err.detail

        results = self.map(one, range(len(indices)), num_workers)
        tiles = {i: img for i, img, problem in results if problem is None}
        problems = {i: problem for i, _, problem in results if problem is not None}
        return tiles, problems

    def map(self, fn, items, num_workers: int) -> list:
        """`fn` over `items` on the engine's threads (in this thread when there is one worker)."""
        items = list(items)
        if num_workers <= 1 or len(items) <= 1:
            return [fn(i) for i in items]
        return list(self._threads(num_workers).map(fn, items))

    def first_problem(self, size: tuple[int, int], x: int, y: int, width: int, height: int) -> str | None:
        """The first decoding problem among the tiles of the `size` level that the region (x, y, width,
        height) in level pixels touches, or None. Tiles found sound are remembered, so that a reader which
        decodes without checking (tiffslide through imagecodecs) pays for each check once."""
        level = self.levels[tuple(size)]
        for t in RegionPass(self, level, np.array([[x, y]]), width, height).tiles_of(0):
            if (size, t) in self._sound:
                continue
            _, problems = self.decode_tiles(level, [t])
            if problems:
                return f"JPEG tile {t} of the {size[0]}x{size[1]} level: {problems[t]}"
            self._sound.add((size, t))
        return None

    def _threads(self, n: int) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None or self._pool_size != n:
                if self._pool is not None:
                    self._pool.shutdown(wait=True)
                self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="gigassl-jpeg")
                self._pool_size = n
            return self._pool


def level_positions(xy: np.ndarray, downsample: float) -> np.ndarray:
    """int64 (N, 2): level pixel of each level-0 top-left, as cuCIM places a region (floor division)."""
    return np.floor(np.asarray(xy, np.float64) / downsample).astype(np.int64).reshape(-1, 2)


class RegionPass:
    """Regions (width x height at one level) read in batches, each source tile decoded once over the pass:
    a decoded tile is dropped after the last batch whose regions touch it. Batches are read in order."""

    def __init__(self, engine: JpegTileEngine, level: JpegLevel, positions: np.ndarray, width: int,
                 height: int) -> None:
        self.engine, self.level = engine, level
        self.positions = np.asarray(positions, np.int64).reshape(-1, 2)
        self.width, self.height = int(width), int(height)
        lv = level
        x, y = self.positions[:, 0], self.positions[:, 1]
        # tile columns and rows each region touches within the level (none when it lies wholly outside)
        xs, xe = np.maximum(x, 0), np.minimum(x + self.width, lv.width)
        ys, ye = np.maximum(y, 0), np.minimum(y + self.height, lv.height)
        inside = (xe > xs) & (ye > ys)
        self.c0 = np.where(inside, xs // lv.tile_width, 0)
        self.c1 = np.where(inside, (xe - 1) // lv.tile_width + 1, 0)
        self.r0 = np.where(inside, ys // lv.tile_height, 0)
        self.r1 = np.where(inside, (ye - 1) // lv.tile_height + 1, 0)
        cols = lv.cols
        self._tiles = [[r * cols + c for r in range(r0, r1) for c in range(c0, c1)]
                       for r0, r1, c0, c1 in zip(self.r0.tolist(), self.r1.tolist(), self.c0.tolist(), self.c1.tolist(),
                                                   strict=True)]
        self._last_use: dict[int, int] = {}
        for i, tiles in enumerate(self._tiles):
            for t in tiles:
                self._last_use[t] = i
        self._cache: dict[int, np.ndarray | None] = {}
        self._failed: dict[int, str] = {}
        # buffers of evicted tiles, decoded into again: fresh 200 KB arrays cost a page fault per 4 KB
        self._free: list[np.ndarray] = []
        self.tiles_decoded = 0

    @property
    def tiles_needed(self) -> int:
        """Distinct source tiles the whole pass decodes."""
        return len(self._last_use)

    def tiles_of(self, i: int) -> list[int]:
        """Indices (row-major) of the source tiles region `i` touches."""
        return self._tiles[i]

    def batch_tiles(self, start: int, stop: int) -> set[int]:
        """The source tiles the regions [start, stop) touch."""
        return {t for i in range(start, stop) for t in self._tiles[i]}

    def retiring(self, start: int, stop: int) -> list[int]:
        """The tiles of regions [start, stop) that no later region touches."""
        return [t for t in self.batch_tiles(start, stop) if self._last_use[t] < stop]

    def peak_tiles(self, batch_size: int) -> int:
        """Most tiles held at once over the pass in batches of `batch_size`."""
        live, peak = set(), 0
        for start in range(0, len(self._tiles), batch_size):
            stop = min(len(self._tiles), start + batch_size)
            live |= self.batch_tiles(start, stop)
            peak = max(peak, len(live))
            live -= set(self.retiring(start, stop))
        return peak

    def damage(self, start: int, stop: int, failed: dict[int, str]) -> dict[int, str]:
        """The problem of each region of [start, stop) that touches a tile in `failed` (by tile index)."""
        bad = {}
        for i in range(start, stop):
            damaged = [t for t in self._tiles[i] if t in failed]
            if damaged:
                lv = self.level
                bad[i] = f"JPEG tile {damaged[0]} of the {lv.width}x{lv.height} level: {failed[damaged[0]]}"
        return bad

    def read(self, start: int, stop: int, num_workers: int = 1) -> tuple[np.ndarray, dict[int, str]]:
        """uint8 (stop - start, height, width, 3) for regions [start, stop), and the problem of each region
        (by its index in the pass) that touches a damaged tile; such regions' pixels are undefined."""
        wanted = sorted(self.batch_tiles(start, stop) - self._cache.keys() - self._failed.keys())
        lv = self.level
        buffers = [self._free.pop() if self._free else np.empty((lv.tile_height, lv.tile_width, 3), np.uint8)
                   for _ in wanted]
        tiles, problems = self.engine.decode_tiles(lv, wanted, num_workers, buffers)
        self._cache.update(tiles)
        self._failed.update(problems)
        self._free.extend(b for t, b in zip(wanted, buffers, strict=True) if tiles.get(t) is None)
        self.tiles_decoded += len(wanted)
        out = np.empty((stop - start, self.height, self.width, 3), np.uint8)
        bad = self.damage(start, stop, self._failed)

        def assemble(part: range) -> None:  # numpy copies release the GIL: parts run in parallel
            for i in part:
                if i not in bad:
                    self._assemble(out[i - start], i, self._tiles[i])

        n = max(1, min(num_workers, stop - start))
        self.engine.map(assemble, [range(start + k * (stop - start) // n, start + (k + 1) * (stop - start) // n)
                                   for k in range(n)], num_workers)
        for t in self.retiring(start, stop):
            img = self._cache.pop(t, None)
            if img is not None:
                self._free.append(img)
        return out, bad

    def _assemble(self, dst: np.ndarray, i: int, touched: list[int]) -> None:
        lv = self.level
        x, y = int(self.positions[i, 0]), int(self.positions[i, 1])
        w, h = self.width, self.height
        covered = (x >= 0 and y >= 0 and x + w <= lv.width and y + h <= lv.height)
        if not covered or any(self._cache[t] is None for t in touched):
            dst.fill(255)
        for t in touched:
            img = self._cache[t]
            if img is None:
                continue
            r, c = divmod(t, lv.cols)
            tx, ty = c * lv.tile_width, r * lv.tile_height
            xs, xe = max(x, tx), min(x + w, tx + lv.tile_width, lv.width)
            ys, ye = max(y, ty), min(y + h, ty + lv.tile_height, lv.height)
            dst[ys - y:ye - y, xs - x:xe - x] = img[ys - ty:ye - ty, xs - tx:xe - tx]

