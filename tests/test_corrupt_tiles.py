"""Corrupt JPEG tile data is never encoded silently: every reader detects it, the slide fails naming the
tile's level-0 position, or `--on-corrupt-tile skip` drops the tiles it touches and records them."""

import json
import os
import shutil

import h5py
import numpy as np
import pytest
import tifffile

from conftest import SVS, cli, require_path
from gigassl_fast.errors import SlideError
from gigassl_fast.slides import CorruptTilesError, Slide
from gigassl_fast.synthetic import write_synthetic_slide

ARGS = ["--naug", "2", "--nt", "8", "--batch-size", "16", "--encoder", "resnet18-l3", "--weights", "random"]


def damage_tile(path, tile_xy, mode: str) -> tuple[int, int, int, int]:
    """Damages the level-0 JPEG tile holding level-0 pixel `tile_xy` in place; returns its box (x, y, w, h).

    head: the first 64 bytes zeroed ("Not a JPEG file"); tail: the second half zeroed ("Premature end of
    JPEG file"); garbage: 200 random bytes in the middle ("Corrupt JPEG data")."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        tw, th = page.tilewidth, page.tilelength
        cols = -(-page.imagewidth // tw)
        col, row = tile_xy[0] // tw, tile_xy[1] // th
        i = row * cols + col
        offset, count = page.dataoffsets[i], page.databytecounts[i]
    with open(path, "r+b") as fh:
        if mode == "head":
            fh.seek(offset)
            fh.write(b"\0" * 64)
        elif mode == "tail":
            fh.seek(offset + count // 2)
            fh.write(b"\0" * (count - count // 2))
        else:
            fh.seek(offset + count // 2)
            fh.write(np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes())
    return col * tw, row * th, tw, th


@pytest.fixture(scope="module")
def clean_slides(tmp_path_factory, request):
    """{name: (path, a tissue tile's level-0 (x, y), tile side at level 0)} for a synthetic pyramid written
    by tifffile (its tissue mask comes from level 1, the tiles from level 0) and, when present, the real
    Aperio sample (shared JPEG tables; one level, so the mask is computed on the damaged level too)."""
    folder = tmp_path_factory.mktemp("clean")
    slides = {"syn": write_synthetic_slide(folder / "syn.tif", 4096, 3072, mpp=0.5, seed=21)}
    if os.path.exists(SVS):
        slides["svs"] = str(shutil.copy(SVS, folder / "svs.svs"))

    out = {}
    for name, path in slides.items():
        r = cli("tile", path, "--out", folder / f"tiles_{name}")
        assert r.returncode == 0, r.stdout + r.stderr
        with h5py.File(folder / f"tiles_{name}" / "tiles" / f"{name}.h5") as fh:
            coords, tile0 = fh["coords"][:], int(fh.attrs["tile_size_level0"])
        out[name] = (path, tuple(int(v) for v in coords[len(coords) // 2]), tile0)
    return out


def _damaged(clean_slides, name, mode, tmp_path):
    path, xy, tile0 = clean_slides[name]
    ext = ".svs" if name == "svs" else ".tif"
    copy = tmp_path / f"bad{ext}"
    shutil.copy(path, copy)
    box = damage_tile(copy, xy, mode)
    return copy, xy, tile0, box


def _named(text: str) -> tuple[int, int]:
    """The level-0 position a corrupt-tile message names."""
    return tuple(int(v) for v in text.split("level-0 (")[1].split(")")[0].split(", "))


def _overlaps(xy, tile0, box) -> bool:
    x, y = xy
    bx, by, bw, bh = box
    return x < bx + bw and bx < x + tile0 and y < by + bh and by < y + tile0


@pytest.mark.parametrize("name", ["syn", "svs"])
@pytest.mark.parametrize("mode", ["head", "tail", "garbage"])
def test_default_reader_fails_the_slide_naming_the_tile(clean_slides, name, mode, tmp_path):
    if name not in clean_slides:
        require_path(SVS, "sample slides")  # skips, or fails under GIGASSL_TEST_STRICT=1
    bad, xy, tile0, box = _damaged(clean_slides, name, mode, tmp_path)
    r = cli("encode", bad, "--out", tmp_path / "out", *ARGS)
    assert r.returncode == 1, r.stdout + r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("bad "))
    assert "failed" in line and "corrupt tile data at level-0" in line
    if name == "syn":
        assert "--on-corrupt-tile skip" in line
    else:  # the mask is computed on this level: the slide cannot be tiled
        assert "the level the tissue mask is computed on" in line
    assert _overlaps(_named(line), tile0, box), (line, box)
    assert not (tmp_path / "out" / "features" / "bad.h5").exists()


@pytest.mark.parametrize("name", ["syn"])
def test_skip_drops_and_records_the_corrupt_tiles(clean_slides, name, tmp_path):
    bad, xy, tile0, box = _damaged(clean_slides, name, "tail", tmp_path)
    r = cli("encode", bad, "--out", tmp_path / "out", *ARGS, "--on-corrupt-tile", "skip")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "corrupt" in r.stdout
    with h5py.File(tmp_path / "out" / "features" / "bad.h5") as fh:
        corrupt, coords = fh["corrupt_coords"][:], fh["coords"][:]
        assert fh.attrs["n_corrupt_tiles"] == len(corrupt) and fh["features"].shape[0] == len(coords)
        assert fh["aug/indices"][:].max() < len(coords)
    assert tuple(xy) in {tuple(c) for c in corrupt}
    assert all(_overlaps(tuple(c), tile0, box) for c in corrupt)
    assert not {tuple(c) for c in corrupt} & {tuple(c) for c in coords}
    summary = json.loads((tmp_path / "out" / "encode_summary.json").read_text())
    assert sorted(map(tuple, summary["slides"][0]["corrupt_tiles"])) == sorted(map(tuple, corrupt.tolist()))
    # the file that left tiles out serves --on-corrupt-tile skip only: the default redoes the slide, and fails
    r = cli("encode", bad, "--out", tmp_path / "out", *ARGS)
    assert r.returncode == 1 and "corrupt tile data" in r.stdout, r.stdout + r.stderr
    r = cli("encode", bad, "--out", tmp_path / "out", *ARGS, "--on-corrupt-tile", "skip")
    assert r.returncode == 0 and "up to date; " in r.stdout, r.stdout + r.stderr
    summary = json.loads((tmp_path / "out" / "encode_summary.json").read_text())
    assert summary["slides"][0]["status"] == "skipped" and len(summary["slides"][0]["corrupt_tiles"]) == len(corrupt)
    # the clean slide encodes exactly these tiles plus the dropped ones
    r = cli("encode", clean_slides[name][0], "--out", tmp_path / "clean", *ARGS)
    assert r.returncode == 0, r.stdout + r.stderr
    with h5py.File(tmp_path / "clean" / "features" / f"{name}.h5") as fh:
        assert len(fh["coords"]) == len(coords) + len(corrupt)


@pytest.mark.parametrize("reader", ["cucim", "openslide", "tiffslide"])
def test_every_reader_detects_corrupt_data(clean_slides, reader, tmp_path):
    bad, xy, tile0, box = _damaged(clean_slides, "syn", "tail", tmp_path)
    with Slide(bad, reader=reader) as s:
        coords = np.array([xy, (0, 0)], np.int64)
        with pytest.raises(CorruptTilesError) as err:
            s.backend.read_regions(coords, 0, tile0, tile0)
        assert err.value.positions == [tuple(xy)] and isinstance(err.value, SlideError)
        # the reader stays usable after the error (OpenSlide's handle is reopened)
        assert s.backend.read_regions(coords[1:], 0, tile0, tile0).shape == (1, tile0, tile0, 3)
    r = cli("encode", bad, "--out", tmp_path / "out", "--reader", reader, *ARGS)
    assert r.returncode == 1 and "corrupt tile data at level-0 (" in r.stdout, r.stdout + r.stderr
    # (tiffslide sees one level in this file, so it meets the damage already when computing the mask)
    assert _overlaps(_named(r.stdout), tile0, box), r.stdout
