import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import SVS, cli
from gigassl_fast.cohort import SlideEntry
from gigassl_fast.encode import EncodeParams
from gigassl_fast.encode_pipeline import run_encode
from gigassl_fast.features import features_path, read_features
from gigassl_fast.h5files import is_complete
from gigassl_fast.tiling import TileParams

FAST = ["--naug", "3", "--nt", "8", "--batch-size", "16"]



def test_feature_file_shapes_dtypes_and_attributes(synthetic_slide, tmp_path):
    params = EncodeParams(naug=3, nt=8, batch_size=16, tiles=TileParams(mpp=2.0))
    summary = run_encode([SlideEntry("syn", synthetic_slide)], params, str(tmp_path))
    assert summary.counts["done"] == 1
    d = read_features(features_path(str(tmp_path), "syn"))
    n = len(d["coords"])
    assert n > 5
    assert d["coords"].dtype == np.int64 and d["features"].shape == (n, 1280) and d["features"].dtype == np.float16
    assert d["aug_indices"].shape == (3, 8) and d["aug_indices"].dtype == np.int32
    assert d["aug_indices"].min() >= 0 and d["aug_indices"].max() < n
    assert d["aug_features"].shape == (3, 8, 1280) and d["aug_features"].dtype == np.float16
    assert np.isfinite(d["features"]).all() and np.isfinite(d["aug_features"]).all()
    a = d["attrs"]
    for key in ("encoder", "weights_checksum", "naug", "nt", "seed", "mpp0", "target_mpp", "tile_size_level0",
                "read_level", "slide_path", "version", "device"):
        assert key in a, key
    assert a["encoder"] == "efficientnet-lite0" and a["read_level"] == 1  # 2 µm/px from the 4x level
    # augmented versions differ from the plain features of the same tiles, and from each other
    plain = d["features"][d["aug_indices"][0]].astype(np.float32)
    assert np.abs(d["aug_features"][0].astype(np.float32) - plain).mean() > 1e-3
    # the same tile twice in one augmented batch gets the same features (one draw per batch)
    idx = d["aug_indices"][0]
    dup = [(i, j) for i in range(8) for j in range(i + 1, 8) if idx[i] == idx[j]]
    for i, j in dup:
        np.testing.assert_array_equal(d["aug_features"][0, i], d["aug_features"][0, j])


def test_same_seed_same_output_other_seed_other_draws(small_cohort, tmp_path):
    slide = str(small_cohort / "s0.tif")
    for out in ("a", "b"):
        assert cli("encode", slide, "--out", tmp_path / out, *FAST, "--seed", "7").returncode == 0
    assert cli("encode", slide, "--out", tmp_path / "c", *FAST, "--seed", "8").returncode == 0
    a, b, c = (read_features(str(tmp_path / o / "features" / "s0.h5")) for o in "abc")
    for key in ("features", "aug_indices", "aug_features", "aug_params"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["aug_indices"], c["aug_indices"])
    np.testing.assert_array_equal(a["features"], c["features"])  # plain features do not depend on the seed


def test_rerun_skips_changed_parameters_need_overwrite(small_cohort, tmp_path):
    out = tmp_path / "out"
    r = cli("encode", small_cohort, "--out", out, *FAST)
    assert r.returncode == 0 and "3 done" in r.stdout, r.stdout + r.stderr
    assert "throughput" in r.stdout
    r = cli("encode", small_cohort, "--out", out, *FAST)
    assert "3 skipped" in r.stdout
    r = cli("encode", small_cohort, "--out", out, "--naug", "2", "--nt", "8")
    assert r.returncode == 1 and "--overwrite" in r.stdout
    r = cli("encode", small_cohort, "--out", out, "--naug", "2", "--nt", "8", "--overwrite")
    assert r.returncode == 0 and "3 done" in r.stdout
    assert read_features(str(out / "features" / "s1.h5"))["aug_indices"].shape == (2, 8)
    summary = json.loads((out / "encode_summary.json").read_text())
    assert summary["config"]["throughput"]["encode_tiles_per_s"] > 0


def test_shards_cover_each_slide_once(small_cohort, tmp_path):
    done = []
    for i in range(3):
        r = cli("encode", small_cohort, "--out", tmp_path, *FAST, "--shard", f"{i}/3")
        assert r.returncode == 0
        s = json.loads((tmp_path / f"encode_summary.shard{i}of3.json").read_text())
        done += [x["slide_id"] for x in s["slides"] if x["status"] == "done"]
    assert sorted(done) == ["s0", "s1", "s2"]


def test_concurrent_runs_share_one_folder(small_cohort, tmp_path):
    cmd = [sys.executable, "-m", "gigassl_fast", "encode", str(small_cohort), "--out", str(tmp_path), *FAST]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    # 0, or 3 when the other process held a slide's lock (the cohort is incomplete for this one)
    assert all(p.returncode in (0, 3) for p in procs), outs
    for p, (stdout, _) in zip(procs, outs, strict=True):
        assert (p.returncode == 3) == (" locked " in stdout), stdout
    # every slide finished exactly once between the two processes; the other one skipped it
    done = sum(o[0].count(" done ") for o in outs)
    r = cli("encode", small_cohort, "--out", tmp_path, *FAST)
    assert r.returncode == 0, r.stdout + r.stderr
    finished_late = r.stdout.count(" done ")
    assert done + finished_late == 3
    for s in ("s0", "s1", "s2"):
        assert is_complete(tmp_path / "features" / f"{s}.h5", {"naug": 3})
    assert not list((tmp_path / "features").glob("*.lock"))


def test_kill_minus_9_leaves_nothing_that_looks_done(small_cohort, tmp_path):
    args = ["encode", small_cohort, "--naug", "6", "--nt", "32", "--batch-size", "16"]
    feats = tmp_path / "killed" / "features"
    proc = subprocess.Popen([sys.executable, "-m", "gigassl_fast", *map(str, args), "--out", str(tmp_path / "killed")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Killed while a slide is being worked on: its lock is the observable sign (taken before the slide's
    # tiling, released after its feature file is renamed into place).
    deadline = time.time() + 300
    while not (feats.exists() and list(feats.glob("*.lock"))) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    locks = list(feats.glob("*.lock"))
    assert len(locks) == 1, "the run was not killed mid-slide"
    killed = locks[0].name[: -len(".h5.lock")]
    assert not is_complete(feats / f"{killed}.h5", {}), "the slide being encoded when killed looks done"
    for f in feats.glob("*.h5"):
        assert is_complete(f, {}), f"{f} looks done but is not complete"

    r = cli(*args, "--out", tmp_path / "killed")  # takes over the dead process's lock and finishes
    assert r.returncode == 0, r.stdout + r.stderr
    assert not list(feats.glob("*.tmp")) and not list(feats.glob("*.lock"))
    r = cli(*args, "--out", tmp_path / "clean")
    assert r.returncode == 0, r.stdout + r.stderr
    for s in ("s0", "s1", "s2"):
        assert is_complete(feats / f"{s}.h5", {"naug": 6, "nt": 32})
        resumed, clean = read_features(str(feats / f"{s}.h5")), read_features(str(tmp_path / "clean" / "features" / f"{s}.h5"))
        for key in ("coords", "features", "aug_indices", "aug_features", "aug_params"):
            np.testing.assert_array_equal(resumed[key], clean[key], err_msg=f"{s} {key}: resumed run differs")


def test_bad_slides_in_a_cohort(small_cohort, tmp_path):
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    os.symlink(small_cohort / "s0.tif", cohort / "s0.tif")
    (cohort / "corrupt.svs").write_text("garbage")
    with open(small_cohort / "s1.tif", "rb") as fh:
        (cohort / "cut.tif").write_bytes(fh.read()[:200000])
    from gigassl_fast.synthetic import write_pyramidal_tiff

    write_pyramidal_tiff(cohort / "blank.tif", np.full((1024, 1024, 3), 245, np.uint8), mpp=0.5)
    r = cli("encode", cohort, "--out", tmp_path / "out", *FAST)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    rows = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.split() and ln.split()[0] in
            {"s0", "corrupt", "cut", "blank"}}
    assert "done" in rows["s0"] and "failed" in rows["corrupt"] and "failed" in rows["cut"]
    assert "empty" in rows["blank"]
    # a progress line per slide, including those written while the next was being read (whose reader's
    # native output is captured through the process's stderr)
    shown = [ln.split("] ", 1)[1].split(":")[0] for ln in r.stderr.splitlines() if ln.startswith("encode [")]
    assert sorted(shown) == ["blank", "corrupt", "cut", "s0"]
    assert sorted(os.listdir(tmp_path / "out" / "features")) == ["blank.h5", "s0.h5"]
    with h5py.File(tmp_path / "out" / "features" / "blank.h5") as fh:
        assert fh["features"].shape == (0, 1280)


@pytest.mark.parametrize("args,words", [
    (["--encoder", "resnet18"], "unknown encoder 'resnet18'; did you mean resnet18-l3"),
    (["--encoder", "resnet18-l3", "--weights", "/nope.pth"], "no such file"),
    (["--device", "tpu"], "--device"),
    (["--nt", "0"], "--nt"),
])
def test_bad_options(small_cohort, tmp_path, args, words):
    r = cli("encode", small_cohort, "--out", tmp_path, *args)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "features").exists()


def test_list_encoders_and_sample_svs(sample_dir, tmp_path):
    r = cli("encode", "--list-encoders")
    assert r.returncode == 0 and "efficientnet-lite0" in r.stdout and "resnet18-l3" in r.stdout
    r = cli("encode", SVS, "--out", tmp_path, "--naug", "2", "--nt", "4", "--encoder", "resnet18-l3", "--weights", "random")
    assert r.returncode == 0, r.stdout + r.stderr
    d = read_features(str(tmp_path / "features" / "cmu_small_region.h5"))
    assert d["features"].shape[1] == 256 and len(d["coords"]) == 15


def test_full_disk_is_one_line_and_leaves_nothing(small_cohort, tmp_path, monkeypatch):
    import errno

    import gigassl_fast.encode_pipeline as encode_mod

    real = encode_mod.write_features

    def full(path, arrays, attrs):
        def boom(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(h5py.Group, "create_dataset", boom)
        try:
            real(path, arrays, attrs)
        finally:
            monkeypatch.undo()

    monkeypatch.setattr(encode_mod, "write_features", full)
    summary = run_encode([SlideEntry("s0", str(small_cohort / "s0.tif"))], EncodeParams(naug=1, nt=4), str(tmp_path))
    rec = summary.records[0]
    assert rec.status == "failed" and "No space left on device" in rec.message and "\n" not in rec.message
    assert not list((tmp_path / "features").glob("*.h5*"))


def test_an_interrupt_mid_cohort_leaves_no_lock_and_no_partial_file(small_cohort, tmp_path, monkeypatch):
    """Ctrl-C while the second slide is encoded (the third being prepared and decoded meanwhile): the
    first slide's file is whole, no other feature file exists, and no slide stays locked."""
    import gigassl_fast.encode_pipeline as pipeline

    real, calls = pipeline.encode_slide, []

    def interrupted(*args, **kwargs):
        calls.append(args[4])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "encode_slide", interrupted)
    entries = [SlideEntry(f"s{i}", str(small_cohort / f"s{i}.tif")) for i in range(3)]
    params = EncodeParams(naug=1, nt=4, tiles=TileParams(mpp=2.0))
    with pytest.raises(KeyboardInterrupt):
        run_encode(entries, params, str(tmp_path))
    assert calls == ["s0", "s1"]
    features = tmp_path / "features"
    assert sorted(p.name for p in features.iterdir()) == ["s0.h5"]
    assert is_complete(str(features / "s0.h5"), {})
