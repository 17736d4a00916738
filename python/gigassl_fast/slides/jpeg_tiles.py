"""The JPEG tiles of a tiled TIFF pyramid (Aperio SVS, generic pyramidal TIFF), read as compressed bytes
and decoded strictly: libjpeg-turbo's warnings ("Premature end of JPEG file", "Corrupt JPEG data") are
errors here. Readers that decode such damage into garbage without a word (tiffslide through imagecodecs)
are checked through this, so that no reader encodes a corrupt tile silently."""

from __future__ import annotations

import math
import threading

#: TIFF compression code of JPEG ("new-style", with optional shared JPEGTables).
JPEG = 7


class JpegTiles:
    """The JPEG-compressed tiled pages of one TIFF file, by their (width, height)."""

    def __init__(self, path: str) -> None:
        import tifffile

        self.path = path
        self._tif = tifffile.TiffFile(path)
        self._lock = threading.Lock()  # one file handle: seeks and reads go one at a time
        self._pages = {}
        for page in self._tif.pages:
            if getattr(page, "is_tiled", False) and page.compression == JPEG:
                self._pages.setdefault((int(page.imagewidth), int(page.imagelength)), page)
        self._checked: set[tuple[int, int]] = set()  # (page offset, tile index) found sound

    def close(self) -> None:
        self._tif.close()

    def covers(self, size: tuple[int, int]) -> bool:
        """Whether the level of this (width, height) is a JPEG-tiled page."""
        return tuple(size) in self._pages

    def tile_bytes(self, page, index: int) -> bytes:
        """Tile `index` of `page` as a complete JPEG stream (shared tables spliced in)."""
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        with self._lock:
            fh = self._tif.filehandle
            fh.seek(offset)
            data = fh.read(count)
        if len(data) != count:
            raise ValueError(f"the file ends inside the tile ({len(data)} of {count} bytes)")
        tables = page.jpegtables
        if tables is not None and len(tables) > 4 and data[:2] == b"\xff\xd8":
            data = bytes(tables[:-2]) + data[2:]  # tables' SOI..(no EOI) + tile's stream after its SOI
        return data

    def problem(self, size: tuple[int, int], x: int, y: int, width: int, height: int) -> str | None:
        """The first decoding problem among the tiles of the (width, height) = `size` level that the region
        (x, y, width, height) in that level's pixels touches; None when they all decode cleanly."""
        import simplejpeg

        page = self._pages[tuple(size)]
        tw, th = int(page.tilewidth), int(page.tilelength)
        cols = math.ceil(page.imagewidth / tw)
        rows = math.ceil(page.imagelength / th)
        c0, c1 = max(0, x // tw), min(cols - 1, (x + width - 1) // tw)
        r0, r1 = max(0, y // th), min(rows - 1, (y + height - 1) // th)
        for r in range(r0, r1 + 1):
            for c in range(c0, c1 + 1):
                key = (int(page.offset), r * cols + c)
                if key in self._checked:
                    continue
                try:
                    if page.databytecounts[key[1]] == 0:
                        continue  # a tile never written (sparse file): readers fill it, nothing to decode
                    data = self.tile_bytes(page, key[1])
                    simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
                except (ValueError, OSError) as err:
                    return f"JPEG tile {key[1]} of the {size[0]}x{size[1]} level: {str(err).strip() or type(err).__name__}"
                self._checked.add(key)
        return None

