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
from gigassl_fast.synthetic import write_jpeg_variant_pyramid as write_jpeg_pyramid

VARIANTS = {
    "ycbcr420-256": {"tile": 256},
    "ycbcr444-128-tables": {"tile": 128, "subsampling": "444", "tables": True},
    "rgb444-240-tables": {"tile": 240, "rgb": True, "subsampling": "444", "tables": True},
    "rgb420-256": {"tile": 256, "rgb": True},
    "ycbcr420-128x256": {"tile": (128, 256)},  # tiles wider than high
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
    from gigassl_fast.encode import EncodeParams
    from gigassl_fast.encode_pipeline import run_encode
    from gigassl_fast.features import read_features
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


def _cpu_twin_decode(tile_width: int, tile_height: int):
    """The GPU path's batch decoder, on the CPU: libjpeg-turbo into a tensor (what nvImageCodec returns)."""
    import simplejpeg
    import torch

    def decode(streams):
        out = torch.full((len(streams), tile_height, tile_width, 3), 255, dtype=torch.uint8)
        failed = {}
        for k, data in enumerate(streams):
            try:
                img = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
            except ValueError as err:
                failed[k] = str(err)
                continue
            out[k, :img.shape[0], :img.shape[1]] = torch.from_numpy(img)
        return out, failed

    return decode


def test_gpu_path_gathers_the_regions_the_cpu_engine_assembles(variant):
    """The GPU path's slot pool and gather (torch ops only) with a CPU twin of nvImageCodec: the regions
    are those of the CPU engine, bit for bit, with each tile decoded once and the pool sized for the peak."""
    import torch

    from gigassl_fast.slides.gpu_jpeg import DeviceRegionPass

    with Slide(variant) as s:
        for level in range(s.level_count):
            size = min(200, *s.level_dimensions[level])
            xy = positions(s, level, 70, size, seed=3)
            lv = s.engine.level(s.level_dimensions[level])
            pos = level_positions(xy, s.level_downsamples[level])
            cpu = RegionPass(s.engine, lv, pos, size, size)
            plan = RegionPass(s.engine, lv, pos, size, size)
            gpu = DeviceRegionPass(plan, _cpu_twin_decode(lv.tile_width, lv.tile_height), torch.device("cpu"), 16)
            for start in range(0, len(xy), 16):
                stop = min(len(xy), start + 16)
                ref, bad_ref = cpu.read(start, stop)
                got, bad = gpu.read(start, stop)
                assert bad == bad_ref == {}
                np.testing.assert_array_equal(got.numpy(), ref)
            assert gpu.tiles_decoded == plan.tiles_needed
            assert gpu.pool.shape[0] == plan.peak_tiles(16) + 1 and len(gpu._free) == plan.peak_tiles(16)


@pytest.mark.parametrize("how", ["zeroed", "truncated", "garbage"])
def test_gpu_path_reports_damaged_streams(tmp_path, how):
    import torch

    from gigassl_fast.slides.gpu_jpeg import DeviceRegionPass, stream_problem

    path = write_jpeg_pyramid(str(tmp_path / "s.svs"), synthetic_tissue(1024, 768, seed=2))
    with Slide(path) as s:  # a stream's structure is checked on the CPU, damage inside it by the decoder
        sound = s.engine.tile_stream(s.engine.level((1024, 768)), 5)
        assert stream_problem(sound, 256, 256) is None and stream_problem(sound + b"\0" * 9, 256, 256) is None
        assert stream_problem(sound[:len(sound) // 2], 256, 256).startswith("the stream is cut short")
        assert stream_problem(b"\0" * len(sound), 256, 256).startswith("not a JPEG stream")
        assert stream_problem(sound, 128, 256) == "256 x 256 pixels in a 128 x 256 tile"
    _damage(path, 5, how)
    with Slide(path) as s:
        lv = s.engine.level(s.level_dimensions[0])
        xy = np.array([[0, 0], [300, 300], [600, 0], [400, 500], [800, 500]], np.int64)
        regions = DeviceRegionPass(RegionPass(s.engine, lv, xy, 100, 100), _cpu_twin_decode(256, 256),
                                   torch.device("cpu"), 5)
        out, bad = regions.read(0, 5)
        assert sorted(bad) == [1, 3] and "JPEG tile 5 of the 1024x768 level" in bad[1]
        ref = openslide_regions(path, xy[[0, 2, 4]], 0, 100).astype(int)
        assert np.abs(out.numpy()[[0, 2, 4]] - ref).max() <= 2


def test_decode_gpu_needs_a_gpu(synthetic_slide, tmp_path):
    from conftest import cli

    r = cli("encode", synthetic_slide, "--out", tmp_path, "--decode", "gpu", "--device", "cpu", "--naug", "1")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --decode gpu: the encoder runs on the CPU; use --decode auto or cpu"
