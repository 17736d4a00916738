"""Synthetic whole-slide images: pyramidal, tiled, JPEG-compressed TIFFs with H&E-like tissue.

They carry an Aperio-style description with the resolution, so cuCIM, OpenSlide and tiffslide all read
them as real slides of known mpp. Used by the tests, the benchmarks and the demo.
"""

from __future__ import annotations

import os

import numpy as np

BACKGROUND = (242, 240, 244)
STROMA = (226, 160, 196)
NUCLEUS = (96, 52, 140)


def _smooth_field(rng: np.random.Generator, h: int, w: int, n_blobs: int) -> np.ndarray:
    """Sum of random Gaussian blobs on an (h, w) grid, scaled to [0, 1]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    field = np.zeros((h, w), np.float32)
    for _ in range(n_blobs):
        cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
        sy, sx = rng.uniform(0.06, 0.2) * h, rng.uniform(0.06, 0.2) * w
        field += np.exp(-(((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2) / 2)
    return field / max(float(field.max()), 1e-6)


def _upsample(a: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(a).resize((w, h), Image.Resampling.BILINEAR))


def synthetic_tissue(width: int, height: int, seed: int = 0, nuclei_density: float = 0.06,
                     hotspots: int = 0, hotspot_density: float = 0.3) -> np.ndarray:
    """uint8 (height, width, 3) RGB: pink stroma with purple nuclei in blobs on a white background.

    `hotspots` regions get `hotspot_density` nuclei (denser and larger), the kind of minority-tile
    difference a slide-level classifier has to find.
    """
    rng = np.random.default_rng(seed)
    coarse = 16
    ch, cw = max(2, height // coarse), max(2, width // coarse)
    tissue = _upsample((_smooth_field(rng, ch, cw, 5) * 255).astype(np.uint8), height, width) > 110
    cell = 4  # nuclei are drawn on a 4-pixel lattice, then blurred a little by the JPEG
    nh, nw = -(-height // cell), -(-width // cell)
    density = np.full((nh, nw), nuclei_density, np.float32)
    if hotspots:
        yy, xx = np.mgrid[0:nh, 0:nw]
        for _ in range(hotspots):
            cy, cx, r = rng.uniform(0.3, 0.7) * nh, rng.uniform(0.3, 0.7) * nw, rng.uniform(0.06, 0.12) * min(nh, nw)
            density[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = hotspot_density
    nuclei = rng.random((nh, nw), np.float32) < density
    nuclei = np.repeat(np.repeat(nuclei, cell, 0), cell, 1)[:height, :width]
    img = np.empty((height, width, 3), np.uint8)
    img[:] = BACKGROUND
    img[tissue] = STROMA
    img[tissue & nuclei] = NUCLEUS
    noise = rng.integers(-12, 13, size=(height, width, 1), dtype=np.int16)
    return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def aperio_description(width: int, height: int, tile: int, quality: int, mpp: float | None) -> str:
    """The level-0 ImageDescription of an Aperio SVS, from which OpenSlide, tiffslide and cuCIM take the
    slide's resolution (none with ``mpp=None``)."""
    desc = f"Aperio Image Library v12.0.0 \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q={quality}"
    if mpp is not None:
        desc += f"|AppMag = {10.0 / mpp:g}|MPP = {mpp}"
    return desc


def write_pyramidal_tiff(path: str | os.PathLike, image: np.ndarray, mpp: float | None = 0.5,
                         tile: int = 256, min_level_size: int = 512, quality: int = 85) -> str:
    """Writes `image` as an Aperio-style pyramid (downsample 4 per level) of tiled JPEG pages.

    With ``mpp=None`` the description carries no resolution (a slide that needs --slide-mpp).
    Written to a temporary name and renamed, so a reader never sees half a file.
    """
    import tifffile
    from PIL import Image

    path = os.fspath(path)
    h, w = image.shape[:2]
    desc = aperio_description(w, h, tile, quality, mpp)
    levels = [image]
    while max(levels[-1].shape[:2]) // 4 >= min_level_size:
        lh, lw = levels[-1].shape[:2]
        levels.append(np.asarray(Image.fromarray(levels[-1]).resize((lw // 4, lh // 4), Image.Resampling.BOX)))
    tmp = path + ".tmp"
    with tifffile.TiffWriter(tmp, bigtiff=False) as tif:
        for i, level in enumerate(levels):
            tif.write(level, tile=(tile, tile), compression="jpeg", compressionargs={"level": quality},
                      photometric="rgb", description=desc if i == 0 else None,
                      subfiletype=0 if i == 0 else 1, metadata=None)
    os.replace(tmp, path)
    return path


def write_synthetic_slide(path: str | os.PathLike, width: int = 4096, height: int = 3072, mpp: float | None = 0.5,
                          seed: int = 0, **tissue_kwargs: float) -> str:
    """A synthetic H&E-like slide at `path` (see ``synthetic_tissue`` and ``write_pyramidal_tiff``)."""
    return write_pyramidal_tiff(path, synthetic_tissue(width, height, seed, **tissue_kwargs), mpp=mpp)


def _segments(data: bytes) -> list[bytes]:
    """A JPEG stream's marker segments after SOI; the last is SOS with the entropy-coded data and EOI."""
    out, i = [], 2
    while True:
        if data[i:i + 2] == b"\xff\xda":
            out.append(data[i:])
            return out
        n = int.from_bytes(data[i + 2:i + 4], "big")
        out.append(data[i:i + 2 + n])
        i += 2 + n


def _numbered_components(seg: bytes, first_id_at: int, stride: int) -> bytes:
    """SOF or SOS with component ids 'R', 'G', 'B' renumbered 1, 2, 3 (what libjpeg takes for YCbCr)."""
    seg = bytearray(seg)
    for k in range(3):
        seg[first_id_at + k * stride] = k + 1
    return bytes(seg)


def _encode_tile(tile: np.ndarray, rgb: bool, subsampling: str, quality: int = 90) -> bytes:
    import imagecodecs

    data = imagecodecs.jpeg8_encode(tile, level=quality, colorspace="RGB",
                                    outcolorspace="RGB" if rgb else "YCBCR", subsampling=subsampling)
    if not rgb:
        return data
    # RGB tiles with nothing in the stream saying so: no Adobe marker, components numbered 1, 2, 3
    segs = []
    for seg in _segments(data):
        if seg[:2] == b"\xff\xee":
            continue
        if seg[:2] == b"\xff\xc0":
            seg = _numbered_components(seg, 10, 3)
        if seg[:2] == b"\xff\xda":
            seg = _numbered_components(seg, 5, 2)
        segs.append(seg)
    return b"\xff\xd8" + b"".join(segs)


def _split_tables(stream: bytes) -> tuple[bytes, bytes]:
    """(tables-only stream, abbreviated stream), as TIFF's JPEGTables and a tile that relies on them."""
    segs = _segments(stream)
    tables = [s for s in segs if s[:2] in (b"\xff\xdb", b"\xff\xc4")]
    rest = [s for s in segs if s[:2] not in (b"\xff\xdb", b"\xff\xc4")]
    return b"\xff\xd8" + b"".join(tables) + b"\xff\xd9", b"\xff\xd8" + b"".join(rest)


def write_jpeg_variant_pyramid(path: str, image: np.ndarray, tile: int | tuple[int, int] = 256, rgb: bool = False,
                               subsampling: str = "420", tables: bool = False, mpp: float = 0.5) -> str:
    """An Aperio-style pyramid (levels 4x apart) of JPEG tiles encoded here, so that every variant the JPEG
    tile engine must read can be had: YCbCr or RGB tiles (RGB ones with nothing in the stream saying so,
    as Aperio writes them), chroma subsampling "420" or "444", shared JPEGTables, any tile size
    (`tile`: side, or (height, width)), partial edge tiles. Tests and gpu_check read these."""
    import tifffile
    from PIL import Image

    th, tw_ = (tile, tile) if isinstance(tile, int) else tile
    levels = [image]
    while min(levels[-1].shape[:2]) >= 4 * max(th, tw_):
        h, w = levels[-1].shape[:2]
        levels.append(np.asarray(Image.fromarray(levels[-1]).resize((w // 4, h // 4), Image.Resampling.BOX)))
    with tifffile.TiffWriter(path) as tw:
        for k, img in enumerate(levels):
            h, w = img.shape[:2]
            streams = []
            for y in range(0, h, th):
                for x in range(0, w, tw_):
                    block = np.full((th, tw_, 3), 255, np.uint8)
                    part = img[y:y + th, x:x + tw_]
                    block[:part.shape[0], :part.shape[1]] = part
                    streams.append(_encode_tile(block, rgb, subsampling))
            extratags = []
            if tables:  # every tile is encoded with the same tables at one quality: keep the first's
                shared, _ = _split_tables(streams[0])
                streams = [_split_tables(s)[1] for s in streams]
                extratags = [(347, 7, len(shared), shared, True)]
            tw.write(iter(streams), shape=img.shape, dtype=np.uint8, tile=(th, tw_), compression="jpeg",
                     photometric="rgb", subsampling=(1, 1) if subsampling == "444" else (2, 2), metadata=None,
                     description=aperio_description(w, h, tw_, 90, mpp) if k == 0 else None, extratags=extratags)
    with tifffile.TiffFile(path, mode="r+b") as tf:  # tifffile writes YCbCr for JPEG whatever it is told
        for page in tf.pages:
            page.tags["PhotometricInterpretation"].overwrite(2 if rgb else 6)
    return path
