import json
import os

import h5py
import numpy as np
import pytest

from conftest import NDPI, STRIP_TIFF, SVS, cli
from gigassl_fast.cohort import SlideEntry
from gigassl_fast.slides import Slide
from gigassl_fast.tiling import TileParams, read_tile_file, run_tile, tile_slide


def test_tile_all_sample_slides_from_the_cli(sample_dir, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide_id,path,mpp\nsvs,{SVS},\nndpi,{NDPI},\nkidney,{STRIP_TIFF},1.0\n")
    r = cli("tile", manifest, "--out", tmp_path / "out", "--tile-size", 64)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "3 slides: 3 done" in r.stdout
    for sid, mpp0 in [("svs", 0.499), ("ndpi", 0.22817), ("kidney", 1.0)]:
        grid = read_tile_file(str(tmp_path / "out" / "tiles" / f"{sid}.h5"))
        a = grid.attrs
        assert a["mpp0"] == pytest.approx(mpp0, rel=1e-3)
        assert a["tile_size_level0"] == round(64 * 1.0 / a["mpp0"])
        assert len(grid.coords) == a["n_tiles"] > 0
        assert (grid.coords[:, 0] + a["tile_size_level0"] <= a["width0"]).all()
        assert (grid.coords[:, 1] + a["tile_size_level0"] <= a["height0"]).all()
        assert os.path.getsize(tmp_path / "out" / "qc" / f"{sid}.png") > 1000
    summary = json.loads((tmp_path / "out" / "tile_summary.json").read_text())
    assert summary["counts"]["done"] == 3 and summary["stage"] == "tile"


def test_tile_file_format(synthetic_slide, tmp_path):
    params = TileParams(mpp=1.0, tile_size=224, min_tissue=0.1)
    run_tile([SlideEntry("syn", synthetic_slide)], params, str(tmp_path))
    with h5py.File(tmp_path / "tiles" / "syn.h5", "r") as fh:
        coords, mask, attrs = fh["coords"][:], fh["mask"][:], dict(fh.attrs)
    assert coords.dtype == np.int64 and coords.ndim == 2 and coords.shape[1] == 2 and len(coords) > 10
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    expected = {"slide_path", "slide_bytes", "width0", "height0", "mpp0", "target_mpp", "read_level", "tile_size",
                "tile_size_level0", "read_tile_size", "mask_method", "mask_params", "mask_downsample", "version",
                "complete", "slide_id", "reader"}
    assert expected <= set(attrs)
    assert attrs["tile_size_level0"] == 448 and attrs["read_level"] == 0 and attrs["read_tile_size"] == 448
    assert (coords % 448 == 0).all()
    # at 2 µm/px the tiles come from level 1 (downsample 4)
    with Slide(synthetic_slide) as s:
        grid = tile_slide(s, TileParams(mpp=2.0))
    assert grid.attrs["read_level"] == 1 and grid.attrs["read_tile_size"] == 224 and grid.tile_size_level0 == 896


def test_rerun_skips_and_changed_parameters_redo(small_cohort, tmp_path):
    out = tmp_path / "out"
    r = cli("tile", small_cohort, "--out", out)
    assert r.returncode == 0 and "3 done" in r.stdout
    before = os.path.getmtime(out / "tiles" / "s0.h5")
    r = cli("tile", small_cohort, "--out", out)
    assert "3 skipped" in r.stdout and os.path.getmtime(out / "tiles" / "s0.h5") == before
    r = cli("tile", small_cohort, "--out", out, "--min-tissue", 0.5)
    assert "3 done" in r.stdout
    assert read_tile_file(str(out / "tiles" / "s0.h5")).attrs["min_tissue"] == 0.5
    r = cli("tile", small_cohort, "--out", out, "--min-tissue", 0.5, "--overwrite")
    assert "3 done" in r.stdout
    assert not list(out.rglob("*.tmp"))


def test_bad_slides_are_recorded_and_the_cohort_goes_on(small_cohort, tmp_path):
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for name in os.listdir(small_cohort):
        os.symlink(small_cohort / name, cohort / name)
    (cohort / "broken.svs").write_text("garbage")
    with open(small_cohort / "s0.tif", "rb") as fh:
        (cohort / "cut.tif").write_bytes(fh.read()[:40000])
    from gigassl_fast.synthetic import write_pyramidal_tiff

    write_pyramidal_tiff(cohort / "nompp.tif", np.full((600, 800, 3), 200, np.uint8), mpp=None)
    write_pyramidal_tiff(cohort / "blank.tif", np.full((1024, 1024, 3), 245, np.uint8), mpp=0.5)
    r = cli("tile", cohort, "--out", tmp_path / "out")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr + r.stdout
    lines = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln and ln.split()[0] in
             {"broken", "cut", "nompp", "blank", "s0", "s1", "s2"}}
    assert "failed" in lines["broken"] and "broken.svs" in lines["broken"]
    assert "failed" in lines["cut"] and "cut.tif" in lines["cut"]
    assert "failed" in lines["nompp"] and "--slide-mpp" in lines["nompp"]
    assert "empty" in lines["blank"] and "no tissue" in lines["blank"]
    assert all("done" in lines[s] for s in ("s0", "s1", "s2"))
    tiles = sorted(os.listdir(tmp_path / "out" / "tiles"))
    assert tiles == ["blank.h5", "s0.h5", "s1.h5", "s2.h5"]  # nothing half-written for failures
    summary = json.loads((tmp_path / "out" / "tile_summary.json").read_text())
    assert summary["counts"] == {"done": 3, "skipped": 0, "empty": 1, "locked": 0, "failed": 3}


def test_slide_mpp_option_and_shards(small_cohort, sample_dir, tmp_path):
    r = cli("tile", STRIP_TIFF, "--out", tmp_path / "o", "--slide-mpp", 1.0, "--tile-size", 64)
    assert r.returncode == 0 and "1 done" in r.stdout
    seen = []
    for i in range(2):
        r = cli("tile", small_cohort, "--out", tmp_path / "sh", "--shard", f"{i}/2")
        assert r.returncode == 0
        assert (tmp_path / "sh" / f"tile_summary.shard{i}of2.json").exists()
        seen += [s["slide_id"] for s in json.loads((tmp_path / "sh" / f"tile_summary.shard{i}of2.json").read_text())["slides"]]
    assert sorted(seen) == ["s0", "s1", "s2"]


@pytest.mark.parametrize("args,words", [
    (["--mpp", "0"], "--mpp"),
    (["--tile-size", "2"], "--tile-size"),
    (["--min-tissue", "1.5"], "--min-tissue"),
    (["--mask-method", "magic"], "--mask-method"),
    (["--shard", "3/2"], "--shard"),
    (["--overlap", "224"], "--overlap"),
])
def test_bad_options_one_line_no_traceback(small_cohort, tmp_path, args, words):
    r = cli("tile", small_cohort, "--out", tmp_path / "o", *args)
    assert r.returncode == 2
    assert words in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "tiles").exists()


def test_missing_path_and_finer_than_scan(small_cohort, tmp_path):
    r = cli("tile", tmp_path / "nope.svs", "--out", tmp_path / "o")  # one failed slide, as a manifest row
    assert r.returncode == 1 and "nope.svs: no such file" in r.stdout and "Traceback" not in r.stderr
    r = cli("tile", small_cohort / "s0.tif", "--out", tmp_path / "o", "--mpp", 0.25)
    assert r.returncode == 1 and "finer than the scan" in r.stdout


def test_info_and_help():
    r = cli("info")
    assert r.returncode == 0
    assert "compute paths" in r.stdout and "C++ core" in r.stdout and "slide decoding" in r.stdout
    r = cli("--help")
    assert r.returncode == 0 and "tile" in r.stdout and "info" in r.stdout
