"""The JPEG tile engine against OpenSlide and cuCIM on generated JPEG-tiled pyramids of every variant we
know (YCbCr 4:2:0 and 4:4:4, RGB tiles that say so only in the TIFF tag, shared JPEG tables, tile sizes
128/240/256, partial edge tiles) and on the sample SVS; its corrupt-tile reports; its fallbacks."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import SVS, require_path

from gigassl_fast.slides import CorruptTilesError, Slide
from gigassl_fast.slides.jpeg_engine import RegionPass, level_positions
from gigassl_fast.slides.slide import ENGINE
from gigassl_fast.synthetic import aperio_description, synthetic_tissue


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


def encode_tile(tile: np.ndarray, rgb: bool, subsampling: str, quality: int = 90) -> bytes:
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


def split_tables(stream: bytes) -> tuple[bytes, bytes]:
    """(tables-only stream, abbreviated stream), as TIFF's JPEGTables and a tile that relies on them."""
    segs = _segments(stream)
    tables = [s for s in segs if s[:2] in (b"\xff\xdb", b"\xff\xc4")]
    rest = [s for s in segs if s[:2] not in (b"\xff\xdb", b"\xff\xc4")]
    return b"\xff\xd8" + b"".join(tables) + b"\xff\xd9", b"\xff\xd8" + b"".join(rest)


def write_jpeg_pyramid(path: str, image: np.ndarray, tile: int = 256, rgb: bool = False, subsampling: str = "420",
                       tables: bool = False, mpp: float = 0.5) -> str:
    """An Aperio-style pyramid (levels 4x apart) of JPEG tiles made here, so that every variant can be had."""
    import tifffile
    from PIL import Image

    levels = [image]
    while min(levels[-1].shape[:2]) >= 4 * tile:
        h, w = levels[-1].shape[:2]
        levels.append(np.asarray(Image.fromarray(levels[-1]).resize((w // 4, h // 4), Image.Resampling.BOX)))
    with tifffile.TiffWriter(path) as tw:
        for k, img in enumerate(levels):
            h, w = img.shape[:2]
            streams = []
            for y in range(0, h, tile):
                for x in range(0, w, tile):
                    block = np.full((tile, tile, 3), 255, np.uint8)
                    part = img[y:y + tile, x:x + tile]
                    block[:part.shape[0], :part.shape[1]] = part
                    streams.append(encode_tile(block, rgb, subsampling))
            extratags = []
            if tables:  # every tile is encoded with the same tables at one quality: keep the first's
                shared, _ = split_tables(streams[0])
                streams = [split_tables(s)[1] for s in streams]
                extratags = [(347, 7, len(shared), shared, True)]
            tw.write(iter(streams), shape=img.shape, dtype=np.uint8, tile=(tile, tile), compression="jpeg",
                     photometric="rgb", subsampling=(1, 1) if subsampling == "444" else (2, 2), metadata=None,
                     description=aperio_description(w, h, tile, 90, mpp) if k == 0 else None, extratags=extratags)
    with tifffile.TiffFile(path, mode="r+b") as tf:  # tifffile writes YCbCr for JPEG whatever it is told
        for page in tf.pages:
            page.tags["PhotometricInterpretation"].overwrite(2 if rgb else 6)
    return path


VARIANTS = {
    "ycbcr420-256": {"tile": 256},
    "ycbcr444-128-tables": {"tile": 128, "subsampling": "444", "tables": True},
    "rgb444-240-tables": {"tile": 240, "rgb": True, "subsampling": "444", "tables": True},
    "rgb420-256": {"tile": 256, "rgb": True},
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    # neither side a multiple of any tile size (partial edge tiles), both of 4: downsamples exactly 4, so that
    # level positions are whole pixels for OpenSlide too (it places regions at fractional ones)
    image = synthetic_tissue(1296, 1040, seed=5)
    path = str(tmp_path_factory.mktemp("jpeg") / f"{request.param}.svs")
    return write_jpeg_pyramid(path, image, **VARIANTS[request.param])


def openslide_regions(path: str, xy: np.ndarray, level: int, size: int) -> np.ndarray:
    """OpenSlide's regions composited on white, as our OpenSlide reader returns them."""
    import openslide

    with openslide.OpenSlide(path) as o:
        rgba = np.stack([np.asarray(o.read_region((int(x), int(y)), level, (size, size))) for x, y in xy])
    alpha = rgba[..., 3:4].astype(np.int32)
    return ((rgba[..., :3].astype(np.int32) * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def positions(slide: Slide, level: int, n: int, size: int, seed: int = 0) -> np.ndarray:
    """Level-0 positions on the level's pixel grid, some past the right and bottom edges and before the
    top-left."""
    ds = int(round(slide.level_downsamples[level]))
    w, h = slide.level_dimensions[level]
    rng = np.random.default_rng(seed)
    lx = rng.integers(-size // 2, w - size // 3, n)
    ly = rng.integers(-size // 2, h - size // 3, n)
    return np.stack([lx, ly], 1).astype(np.int64) * ds


def test_engine_matches_openslide_and_cucim_on_every_variant(variant):
    with Slide(variant) as s:
        for level in range(s.level_count):
            assert s.decode_path(level)[0] == ENGINE, s.decode_path(level)
            size = min(224, *s.level_dimensions[level])
            xy = positions(s, level, 40, size)
            ours = s.read_regions(xy, level, size, size, num_workers=2)
            ref = openslide_regions(variant, xy, level, size)
            diff = np.abs(ours.astype(np.int32) - ref)
            assert diff.max() <= 2 and diff.mean() < 0.5, (level, diff.max(), diff.mean())
            if s.backend_name == "cucim" and "rgb" not in os.path.basename(variant):  # cuCIM assumes YCbCr
                cu = s.backend.read_regions(xy, level, size, size)
                assert np.abs(ours.astype(np.int32) - cu).max() <= 2


def test_engine_matches_openslide_on_the_sample_svs():
    """A real Aperio SVS: RGB JPEG tiles of 240 px with shared tables."""
    path = require_path(SVS, "sample slides")
    with Slide(path) as s:
        assert s.decode_path(0) == (ENGINE, "level 0: JPEG tiles of 240 px")
        xy = positions(s, 0, 60, 224, seed=1)
        ours = s.read_regions(xy, 0, 224, 224, num_workers=2)
        diff = np.abs(ours.astype(np.int32) - openslide_regions(path, xy, 0, 224))
        assert diff.max() <= 2 and diff.mean() < 0.5


def test_each_tile_is_decoded_once_over_a_pass(variant):
    with Slide(variant) as s:
        size = 200
        w, h = s.level_dimensions[0]
        grid = np.stack(np.meshgrid(np.arange(0, w, size), np.arange(0, h, size)), -1).reshape(-1, 2)
        whole = s.read_regions(grid, 0, size, size)
        batches = list(s.region_batches(grid, 0, size, size, batch_size=7, num_workers=2))
        assert all(err is None for _, err in batches)
        np.testing.assert_array_equal(np.concatenate([b for b, _ in batches]), whole)
        lv = s.engine.level(s.level_dimensions[0])
        one_pass = RegionPass(s.engine, lv, level_positions(grid, 1.0), size, size)
        for start in range(0, len(grid), 5):
            one_pass.read(start, min(len(grid), start + 5))
        assert one_pass.tiles_decoded == one_pass.tiles_needed == lv.rows * lv.cols
        assert not one_pass._cache  # every tile dropped after its last batch


def _damage(path: str, tile_index: int, how: str) -> None:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, count = int(page.dataoffsets[tile_index]), int(page.databytecounts[tile_index])
    with open(path, "r+b") as fh:
        if how == "zeroed":
            fh.seek(offset)
            fh.write(b"\0" * count)
        elif how == "garbage":
            fh.seek(offset + count // 2)
            fh.write(np.random.default_rng(0).integers(0, 256, count // 4, dtype=np.uint8).tobytes())
        elif how == "truncated":  # the entropy-coded data cut short: an EOI half-way
            fh.seek(offset + count // 2)
            fh.write(b"\xff\xd9" + b"\0" * (count - count // 2 - 2))


@pytest.mark.parametrize("how", ["zeroed", "garbage", "truncated"])
def test_corrupt_tiles_are_reported_never_decoded_silently(tmp_path, how):
    path = write_jpeg_pyramid(str(tmp_path / "s.svs"), synthetic_tissue(1024, 768, seed=2))
    _damage(path, 5, how)  # row 1, column 1 of the 4 x 3 grid: level-0 pixels (256..511, 256..511)
    with Slide(path) as s:
        xy = np.array([[0, 0], [300, 300], [600, 0], [400, 500], [800, 500]], np.int64)
        with pytest.raises(CorruptTilesError) as err:
            s.read_regions(xy, 0, 100, 100, num_workers=2)
        assert err.value.positions == [(300, 300), (400, 500)]
        assert "JPEG tile 5 of the 1024x768 level" in str(err.value)
        out = list(s.region_batches(xy, 0, 100, 100, batch_size=2))
        assert [e is None for _, e in out] == [False, False, True]  # the damaged batches named, the other read
        assert [e.positions for _, e in out[:2]] == [[(300, 300)], [(400, 500)]]
        ref = openslide_regions(path, xy[[0, 2, 4]], 0, 100).astype(int)
        assert np.abs(out[0][0][0] - ref[0]).max() <= 2  # the sound region of a damaged batch is read
        assert np.abs(s.read_regions(xy[[0, 2, 4]], 0, 100, 100) - ref).max() <= 2


def test_formats_the_engine_does_not_decode_fall_back_with_the_reason(tmp_path):
    import tifffile

    image = synthetic_tissue(512, 384, seed=1)
    lzw = str(tmp_path / "lzw.tif")
    tifffile.imwrite(lzw, image, tile=(128, 128), compression="lzw", photometric="rgb",
                     description=aperio_description(512, 384, 128, 90, 0.5))
    with Slide(lzw) as s:
        who, why = s.decode_path(0)
        assert who != ENGINE and why == "level 0: LZW tiles, not JPEG"
        xy = np.array([[0, 0], [400, 300]], np.int64)
        got = s.read_regions(xy, 0, 128, 128)
        np.testing.assert_array_equal(got[0], image[:128, :128])
    with Slide(require_path(SVS, "sample slides"), reader="openslide") as s:
        assert s.decode_path(0) == ("openslide", "--reader openslide")


def test_engine_decodes_into_the_same_features_as_cucim(tmp_path, synthetic_slide):
    """encode through the engine and through cuCIM's reads: bit-identical features (the pixels are)."""
    from gigassl_fast.cohort import SlideEntry
    from gigassl_fast.encode import EncodeParams, read_features, run_encode
    from gigassl_fast.tiling import TileParams

    params = EncodeParams(naug=2, nt=8, tiles=TileParams(mpp=2.0, min_tissue=0.5))
    feats, notes = {}, {}
    for reader in ("auto", "cucim"):
        summary = run_encode([SlideEntry("syn", str(synthetic_slide))], params, str(tmp_path / reader), reader=reader)
        assert [r.status for r in summary.records] == ["done"]
        notes[reader] = summary.records[0].decode
        feats[reader] = read_features(str(tmp_path / reader / "features" / "syn.h5"))
    assert notes["auto"].startswith(f"{ENGINE} on the CPU (level ")
    assert notes["cucim"] == "cucim on the CPU (--reader cucim)"
    for key in ("coords", "features", "aug_features", "aug_indices"):
        np.testing.assert_array_equal(feats["auto"][key], feats["cucim"][key])


def test_info_says_who_decodes_each_level_and_why(sample_dir):
    from conftest import NDPI, STRIP_TIFF, cli

    r = cli("info", SVS, STRIP_TIFF, NDPI, os.path.join(sample_dir, "missing.svs"))
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert f"{SVS}: cucim, 0.499 um/px" in lines
    assert "  level 0: 2220 x 2967, downsample 1; libjpeg-turbo engine: JPEG tiles of 240 px" in lines
    assert "  level 0: 1493 x 901, downsample 1; tiffslide: stored in strips, not tiles" in lines
    assert "  level 0: 3968 x 4864, downsample 1; openslide: the engine reads SVS and TIFF files only" in lines
    assert r.stderr.strip() == f"error: {os.path.join(sample_dir, 'missing.svs')}: no such file; check the path or the manifest"
