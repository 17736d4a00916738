"""The benchmark workloads (benchmarks/workloads.py): small slides of both kinds are real Aperio-style
pyramids of the promised resolution, tile to the promised number of tissue tiles in every reader, and a
cohort folder is reused, never left half-written."""

import os

import numpy as np
import pytest
from gigassl_fast.benchmarks import workloads

from conftest import require_module
from gigassl_fast.slides import Slide
from gigassl_fast.tiling import TileParams, tile_slide

TISSUE_TILES = 40
MPP = {"40x": 0.25, "20x": 0.5}
READ_LEVEL = {"40x": 1, "20x": 0}  # 1 µm/px is exactly level 1 at 40x; at 20x it is read from level 0


def fullest_tile(grid) -> tuple[int, int]:
    """Level-0 (x, y) of the kept tile with the most tissue in the mask (the first ones lie on borders)."""
    dx, dy = grid.attrs["mask_downsample"]
    t = grid.tile_size_level0
    share = [grid.mask[int(y / dy):int((y + t) / dy), int(x / dx):int((x + t) / dx)].mean() for x, y in grid.coords]
    x, y = grid.coords[int(np.argmax(share))]
    return int(x), int(y)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """{kind: path} of a two-slide cohort, 40x then 20x."""
    paths = workloads.realistic_cohort(tmp_path_factory.mktemp("workloads"), n_slides=2, tissue_tiles=TISSUE_TILES)
    return {"40x": paths[0], "20x": paths[1]}


def test_full_size_geometry():
    g40 = workloads.slide_geometry("40x", 3000)
    g20 = workloads.slide_geometry("20x", 3000)
    assert (g40.mpp, g40.tile0, g20.mpp, g20.tile0) == (0.25, 896, 0.5, 448)
    assert 3.5e9 < g40.width * g40.height < 6e9  # the size of a real 40x scan
    assert g20.width * 2 == pytest.approx(g40.width, abs=g40.tile0) and g20.height * 2 == pytest.approx(g40.height, abs=g40.tile0)
    for g in (g40, g20):
        shapes = [g.level_shape(level) for level in range(g.levels)]
        assert max(shapes[-1]) <= workloads.THUMB_MAX_SIDE < max(shapes[-2])
        assert all(h * 4**k == g.height and w * 4**k == g.width for k, (h, w) in enumerate(shapes))
    with pytest.raises(ValueError, match="kind"):
        workloads.slide_geometry("60x", 10)


@pytest.mark.parametrize("kind", ["40x", "20x"])
def test_pyramid_pages(cohort, kind):
    import tifffile

    with tifffile.TiffFile(cohort[kind]) as tif:
        first = tif.pages[0]
        assert first.description.startswith("Aperio Image Library")
        assert f"|AppMag = {10 / MPP[kind]:g}|MPP = {MPP[kind]}" in first.description
        assert not tif.pages[1].is_tiled  # the SVS thumbnail page, where readers expect it
        levels = [p for p in tif.pages if p.is_tiled]
        assert len(levels) >= 2
        for k, page in enumerate(levels):
            assert page.tile == (256, 256)
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert page.subfiletype == 0
            assert page.shape[0] * 4**k == first.shape[0] and page.shape[1] * 4**k == first.shape[1]
        assert max(levels[-1].shape[:2]) <= workloads.THUMB_MAX_SIDE
        assert levels[0].asarray(maxworkers=1).shape == first.shape  # every tile decodes


@pytest.mark.parametrize("reader", ["cucim", "openslide", "tiffslide"])
@pytest.mark.parametrize("kind", ["40x", "20x"])
def test_every_reader_sees_the_slide_and_its_tissue_tiles(cohort, kind, reader):
    require_module(reader)
    with Slide(cohort[kind], reader=reader) as s:
        assert s.mpp == pytest.approx(MPP[kind])
        assert s.level_downsamples == pytest.approx([4.0**k for k in range(s.level_count)])
        assert s.level_count >= 2
        grid = tile_slide(s, TileParams(mpp=1.0))
        assert TISSUE_TILES <= len(grid.coords) <= 1.6 * TISSUE_TILES
        assert grid.attrs["read_level"] == READ_LEVEL[kind]
        assert grid.tile_size_level0 == round(224 / MPP[kind])
        region = s.read_region(*fullest_tile(grid), READ_LEVEL[kind], 224, 224).reshape(-1, 3).astype(float)
    r, g, b = region.mean(axis=0)
    assert r - g > 30 and b - g > 15  # pink stroma and purple nuclei, not glass (242, 240, 244)


def test_openslide_reads_an_aperio_slide(cohort):
    openslide = require_module("openslide")
    with openslide.OpenSlide(cohort["40x"]) as s:
        assert s.properties["openslide.vendor"] == "aperio"
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert float(s.properties["openslide.objective-power"]) == pytest.approx(40)
        assert s.level_downsamples == pytest.approx([4.0**k for k in range(s.level_count)])
        assert "thumbnail" in s.associated_images
    with Slide(cohort["40x"], reader="openslide") as sl:
        xy = fullest_tile(tile_slide(sl, TileParams(mpp=1.0)))
    with openslide.OpenSlide(cohort["40x"]) as s:
        region = np.asarray(s.read_region(xy, 1, (224, 224)))[..., :3].reshape(-1, 3).astype(float)
    grey = region @ [0.299, 0.587, 0.114]
    assert (grey < 215).mean() > 0.8  # tissue (grey about 180, nuclei darker), not glass (about 241)


def test_cohort_alternates_kinds_and_reuses_finished_slides(cohort, capsys):
    folder = os.path.dirname(cohort["40x"])
    assert os.path.basename(cohort["40x"]) == f"realistic_40x_t{TISSUE_TILES}_s0_v{workloads.VERSION}.tif"
    assert os.path.basename(cohort["20x"]) == f"realistic_20x_t{TISSUE_TILES}_s1_v{workloads.VERSION}.tif"
    before = {p: os.stat(p).st_mtime_ns for p in cohort.values()}
    capsys.readouterr()
    again = workloads.realistic_cohort(folder, n_slides=2, tissue_tiles=TISSUE_TILES)
    assert again == [cohort["40x"], cohort["20x"]]
    assert {p: os.stat(p).st_mtime_ns for p in again} == before
    assert "wrote" not in capsys.readouterr().out
    assert sorted(os.listdir(folder)) == sorted(os.path.basename(p) for p in again)  # no temporary files


def test_cohort_replaces_a_foreign_file_under_a_workload_name(tmp_path):
    path = tmp_path / workloads.workload_name("20x", 12, 0)
    path.write_bytes(b"II*\x00 not a slide")
    [got] = workloads.realistic_cohort(tmp_path, n_slides=1, tissue_tiles=12, kinds=("20x",))
    assert got == str(path) and os.path.getsize(path) > 100_000
    with Slide(got) as s:
        assert s.mpp == pytest.approx(0.5)


def test_same_seed_same_slide(tmp_path):
    a = workloads.write_realistic_slide(tmp_path / "a.tif", "20x", 12, seed=5)
    b = workloads.write_realistic_slide(tmp_path / "b.tif", "20x", 12, seed=5)
    c = workloads.write_realistic_slide(tmp_path / "c.tif", "20x", 12, seed=6)
    with open(a, "rb") as fa, open(b, "rb") as fb, open(c, "rb") as fc:
        da, db, dc = fa.read(), fb.read(), fc.read()
    assert da == db and da != dc


def test_the_final_name_appears_only_when_the_file_is_complete(tmp_path, monkeypatch):
    path = tmp_path / "slide.tif"
    seen = []
    real = workloads._level_tiles

    def watched(*args, **kwargs):
        for i, tile in enumerate(real(*args, **kwargs)):
            seen.append(path.exists())
            if fail and i == 5:
                raise RuntimeError("disk full")
            yield tile

    monkeypatch.setattr(workloads, "_level_tiles", watched)
    fail = True
    with pytest.raises(RuntimeError, match="disk full"):
        workloads.write_realistic_slide(path, "20x", 12)
    assert os.listdir(tmp_path) == []  # neither the final name nor the temporary one
    fail = False
    workloads.write_realistic_slide(path, "20x", 12)
    assert seen and not any(seen)
    assert os.listdir(tmp_path) == ["slide.tif"]
    with Slide(path) as s:
        assert s.level_count >= 2
