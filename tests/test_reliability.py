"""Nothing silent, nothing lost: odd slide ids, conflicting labels, locks held by others, changed settings on
resume, full disks, unwritable outputs, truncated files, concurrent runs, bad option values."""

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np
import pytest

from conftest import cli
from gigassl_fast.cohort import collect_slides
from gigassl_fast.errors import GigasslError
from gigassl_fast.synthetic import write_synthetic_slide

ENC = ["--encoder", "resnet18-l3", "--weights", "random", "--naug", "2", "--nt", "8", "--tile-size", "112"]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _one_line(r: subprocess.CompletedProcess, *words: str) -> str:
    """The run failed with one `error:` line holding `words`, and no traceback."""
    text = r.stdout + r.stderr
    assert r.returncode != 0 and "Traceback" not in text, text
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, text
    for w in words:
        assert w in errors[0], text
    return errors[0]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """4 small synthetic slides encoded (resnet18-l3, 256-d, random weights), packed, trained one epoch."""
    root = tmp_path_factory.mktemp("rel")
    (root / "slides").mkdir()
    for i in range(4):
        write_synthetic_slide(root / "slides" / f"s{i}.tif", 1536, 1024, mpp=0.5, seed=80 + i)
    r = cli("encode", root / "slides", "--out", root / "out", *ENC)
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("pack", root / "out" / "features", "--out", root / "store.h5")
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("train", root / "store.h5", "--out", root / "run", "--epochs", "2", "--batch-size", "2",
            "--stop-at-epoch", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    return root


@contextlib.contextmanager
def tmpfs(path, size_kb: int, read_only: bool = False):
    """A small tmpfs at `path` (root only): a full disk, or a read-only mount."""
    os.makedirs(path, exist_ok=True)
    opts = f"size={size_kb}k" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


needs_root = pytest.mark.skipif(not IS_ROOT, reason="mounting a small tmpfs needs root (CI runs as root)")


# -- 2. slide ids that are not plain file names --------------------------------------------------
@pytest.mark.parametrize("sid", ["patientA/slide1", "..", "../up", "a\\b", ".", ""])
def test_ids_that_are_not_file_names_are_rejected_naming_the_row(tmp_path, sid):
    slide = tmp_path / "x.svs"
    slide.write_bytes(b"")
    m = tmp_path / "m.csv"
    m.write_text(f"slide_id,path\nok,{slide}\n\"{sid}\",{slide}\n")
    if sid == "":  # an empty id falls back to the file name (x), which is fine
        assert [e.slide_id for e in collect_slides([str(m)])] == ["ok", "x"]
        return
    with pytest.raises(GigasslError, match=r"m\.csv:3: slide_id .* is not a plain file name"):
        collect_slides([str(m)])


def test_manifest_id_with_slash_never_writes_outside(cohort, tmp_path):
    m = tmp_path / "m.csv"
    m.write_text(f"slide_id,path\npatientA/slide1,{cohort / 'slides' / 's0.tif'}\n")
    r = cli("encode", m, "--out", tmp_path / "out", *ENC)
    _one_line(r, "m.csv:2", "patientA/slide1")
    assert not (tmp_path / "out").exists()


# -- 3. conflicting labels -------------------------------------------------------------------------
def test_probe_conflicting_labels_are_an_error_duplicates_a_warning(tmp_path):
    from gigassl_fast.probe import read_labels

    (tmp_path / "l.csv").write_text("slide_id,label\na,x\nb,y\na,y\n")
    with pytest.raises(GigasslError, match=r"l\.csv:4: slide 'a' is labelled 'y' here and 'x' on line 2"):
        read_labels(str(tmp_path / "l.csv"))
    (tmp_path / "d.csv").write_text("slide_id,label\na,x\nb,y\na,x\n")
    warnings = []
    assert read_labels(str(tmp_path / "d.csv"), warn=warnings.append) == {"a": ("x", None), "b": ("y", None)}
    assert len(warnings) == 1 and "'a'" in warnings[0] and "twice" in warnings[0]


# -- 4. slides locked by another process ----------------------------------------------------------
def test_locked_slides_are_not_done_and_the_exit_code_says_so(cohort, tmp_path):
    out = tmp_path / "out"
    (out / "features").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = out / "features" / "s1.h5.lock"
        lock.write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename, "time": time.time()}))
        r = cli("encode", cohort / "slides", "--out", out, *ENC)
        assert r.returncode == 3, r.stdout + r.stderr
        row = next(ln for ln in r.stdout.splitlines() if ln.startswith("s1 "))
        assert "locked" in row and str(holder.pid) in row
        assert "incomplete" in r.stdout
        summary = json.loads((out / "encode_summary.json").read_text())
        assert summary["counts"]["locked"] == 1 and summary["counts"]["done"] == 3
        r = cli("pack", out / "features", "--out", tmp_path / "store.h5")  # packs what is there, naming the gap
        assert r.returncode == 0 and "3 slides" in r.stdout
    finally:
        holder.kill()
        holder.wait()
    r = cli("encode", cohort / "slides", "--out", out, *ENC)  # the holder died: its lock is stale
    assert r.returncode == 0 and "1 done" in r.stdout, r.stdout + r.stderr


def test_stale_locks_own_pid_and_old_age():
    import socket

    from gigassl_fast import locks

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.lock")
        here = socket.gethostname()
        alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            old = time.time() - locks.STALE_AFTER_S - 1
            for info, stale in [({"pid": os.getpid(), "time": time.time()}, True),  # left by an earlier us
                                ({"pid": alive.pid, "time": time.time()}, False),
                                ({"pid": alive.pid, "time": old}, False),  # alive here: however old, still held
                                ({"pid": 2**22 + 7, "time": time.time()}, True),
                                ({"pid": alive.pid, "time": old, "host": "elsewhere"}, True),
                                ({"pid": alive.pid, "time": time.time(), "host": "elsewhere"}, False)]:
                with open(path, "w") as fh:
                    json.dump({"host": here, **info}, fh)
                assert locks.is_stale(path) is stale, info
                with locks.slide_lock(path) as mine:
                    assert mine is stale
            open(path, "w").close()  # created, never filled: its writer was killed in between
            t = time.time()
            assert locks.is_stale(path) and time.time() - t >= locks.EMPTY_GRACE_S
        finally:
            alive.kill()
            alive.wait()


# -- 5. resume with changed settings -----------------------------------------------------------------
def test_resume_refuses_changed_settings_unless_forced(cohort, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cohort / "run", run)
    config = (run / "config.json").read_text()
    r = cli("train", cohort / "store.h5", "--out", run, "--epochs", "2", "--batch-size", "2", "--lr", "0.5",
            "--seed", "3", "--resume")
    _one_line(r, "--lr", "--seed", "--force-resume")
    assert (run / "config.json").read_text() == config
    r = cli("train", cohort / "store.h5", "--out", run, "--epochs", "2", "--batch-size", "2", "--lr", "0.5",
            "--resume", "--force-resume")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (run / "config.json").read_text() == config  # the original settings are kept
    events = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e.get("event") == "resume"]
    assert len(resumed) == 1 and resumed[0]["changed"] == {"base_lr": [0.03, 0.5]}
    steps = [e["step"] for e in events if "step" in e]
    assert steps == sorted(set(steps)), "a step is logged twice"


def test_resume_refuses_another_compute_precision(cohort, tmp_path):
    """--precision is compared as resolved: auto is bf16 on an AMX CPU and float32 elsewhere, so a run
    moved between such machines, or given the other precision, must say so."""
    import torch

    run = tmp_path / "run"
    shutil.copytree(cohort / "run", run)
    saved = torch.load(run / "checkpoint_last.pt", weights_only=False)["compute_precision"]
    other = "fp32" if saved == "bf16" else "bf16"
    r = cli("train", cohort / "store.h5", "--out", run, "--epochs", "2", "--batch-size", "2", "--resume",
            "--precision", other)
    _one_line(r, "--precision", f"{saved} -> {other}", "--force-resume")
    r = cli("train", cohort / "store.h5", "--out", run, "--epochs", "2", "--batch-size", "2", "--resume",
            "--precision", saved)
    assert r.returncode == 0, r.stdout + r.stderr


def test_log_has_no_repeated_steps_after_resume(cohort, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cohort / "run", run)
    ckpt_steps = len((run / "log.jsonl").read_text().splitlines())
    with open(run / "log.jsonl", "a") as fh:  # steps logged after the last checkpoint, by a killed run
        fh.write(json.dumps({"epoch": 1, "step": ckpt_steps + 1, "loss": 1.0}) + "\n")
        fh.write('{"epoch": 1, "step": 9, "lo')  # and a line cut short
    r = cli("train", cohort / "store.h5", "--out", run, "--epochs", "2", "--batch-size", "2", "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    steps = [json.loads(ln)["step"] for ln in (run / "log.jsonl").read_text().splitlines() if '"step"' in ln]
    assert steps == list(range(1, 2 * ckpt_steps + 1))


def test_resume_with_another_store_is_refused(cohort, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cohort / "run", run)
    feats = tmp_path / "features"
    shutil.copytree(cohort / "out" / "features", feats)
    os.remove(feats / "s3.h5")
    assert cli("pack", feats, "--out", tmp_path / "three.h5").returncode == 0
    r = cli("train", tmp_path / "three.h5", "--out", run, "--epochs", "2", "--batch-size", "2", "--resume")
    _one_line(r, "STORE", "(4 slides) -> ", "(3 slides)", "--force-resume")


def test_storage_errors_only_are_relabelled(tmp_path):
    from gigassl_fast.outputs import atomic_file

    target = tmp_path / "x.bin"
    with pytest.raises(KeyError), atomic_file(target) as tmp:
        open(tmp, "wb").close()
        raise KeyError("a bug keeps its own report")
    assert not os.path.exists(str(target) + ".tmp") and not target.exists()
    with pytest.raises(GigasslError, match=r"x\.bin: could not write it \(No space left on device\)"), \
            atomic_file(target) as tmp:
        raise OSError(28, "No space left on device", tmp)


def test_pack_names_a_feature_file_whose_arrays_are_damaged(cohort, tmp_path):
    feats = tmp_path / "features"
    shutil.copytree(cohort / "out" / "features", feats)
    with h5py.File(feats / "s1.h5", "r+") as fh:
        del fh["aug/indices"]
    _one_line(cli("pack", feats, "--out", tmp_path / "store.h5"), str(feats / "s1.h5"), "cannot read aug/indices (missing)")
    assert not (tmp_path / "store.h5").exists() and not (tmp_path / "store.h5.tmp").exists()


def test_stages_take_the_folder_encode_printed(cohort, tmp_path):
    """pack, pca, embed and probe --baseline take encode's --out folder as well as its features/; a file of
    another format among the feature files is named and passed over, not read as one."""
    out = cohort / "out"
    r = cli("pack", out, "--out", tmp_path / "a.h5")
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(cohort / "store.h5") as b:
        assert list(a["ids"][:]) == list(b["ids"][:]) and (a["aug/features"][:] == b["aug/features"][:]).all()
    assert cli("pca", out, "--dim", "4", "--out", tmp_path / "p.npz").returncode == 0
    r = cli("embed", out, "--checkpoint", cohort / "run" / "checkpoint_last.pt", "--out", tmp_path / "e.h5",
            "--views", "3")
    assert r.returncode == 0 and "4 slides embedded" in r.stdout, r.stderr
    (tmp_path / "labels.csv").write_text("slide_id,label\ns0,a\ns1,b\ns2,a\ns3,b\n")
    r = cli("probe", tmp_path / "e.h5", "--labels", tmp_path / "labels.csv", "--baseline", out, "--folds", "2",
            "--out", tmp_path / "report")
    assert r.returncode == 0 and "mean-pool" in r.stdout, r.stderr
    # a store and embeddings written into OUT itself do not hide OUT/features
    beside = tmp_path / "out"
    shutil.copytree(out / "features", beside / "features")
    shutil.copy(tmp_path / "a.h5", beside / "store.h5")
    shutil.copy(tmp_path / "e.h5", beside / "embeddings.h5")
    r = cli("pack", beside, "--out", beside / "store2.h5")
    assert r.returncode == 0 and "4 slides" in r.stdout and "skipped" not in r.stderr, r.stderr
    mixed = tmp_path / "mixed"
    shutil.copytree(out / "features", mixed)
    shutil.copy(cohort / "store.h5", mixed / "store.h5")
    r = cli("pack", mixed, "--out", tmp_path / "b.h5")
    assert r.returncode == 0 and "4 slides" in r.stdout, r.stderr
    assert f"skipped {mixed / 'store.h5'}: not a feature file (a gigassl-fast/store/1 file)" in r.stderr


# -- 6. full disks -----------------------------------------------------------------------------------
@needs_root
@pytest.mark.parametrize("command", ["tile", "encode", "pack", "train", "embed", "probe"])
def test_full_disk_is_one_line_and_leaves_no_tmp(cohort, tmp_path, command):
    with tmpfs(tmp_path / "disk", 64) as disk:
        ballast = disk / "ballast"
        if command == "tile":
            args = ["tile", cohort / "slides", "--out", disk / "o"]
        elif command == "encode":
            args = ["encode", cohort / "slides", "--out", disk / "o", *ENC]
        elif command == "pack":
            args = ["pack", cohort / "out" / "features", "--out", disk / "store.h5"]
        elif command == "train":
            args = ["train", cohort / "store.h5", "--out", disk / "run", "--epochs", "1", "--batch-size", "2"]
        elif command == "embed":
            args = ["embed", cohort / "store.h5", "--checkpoint", cohort / "run" / "checkpoint_last.pt", "--out",
                    disk / "e.h5", "--views", "2"]
        else:
            emb = tmp_path / "e.h5"
            assert cli("embed", cohort / "store.h5", "--checkpoint", cohort / "run" / "checkpoint_last.pt", "--out", emb,
                       "--views", "2").returncode == 0
            (tmp_path / "l.csv").write_text("slide_id,label\ns0,a\ns1,b\ns2,a\ns3,b\n")
            args = ["probe", emb, "--labels", tmp_path / "l.csv", "--folds", "2", "--out", disk / "rep"]
        # leave a little room so the command starts writing and then runs out
        with contextlib.suppress(OSError), open(ballast, "wb") as fh:
            fh.write(b"\0" * (56 * 1024))
        r = cli(*args)
        text = r.stdout + r.stderr
        assert r.returncode != 0 and "Traceback" not in text and r.returncode != -11, text
        assert "No space left on device" in text, text
        left = [os.path.join(dp, f) for dp, _, fs in os.walk(disk) for f in fs if f.endswith(".tmp")]
        assert left == [], left


# -- 7. unwritable outputs -----------------------------------------------------------------------------
def _commands(cohort, out, tmp_path):
    (tmp_path / "l.csv").write_text("slide_id,label\ns0,a\ns1,b\ns2,a\ns3,b\n")
    ck = cohort / "run" / "checkpoint_last.pt"
    return {
        "tile": ["tile", cohort / "slides", "--out", out],
        "encode": ["encode", cohort / "slides", "--out", out, *ENC],
        "pca": ["pca", cohort / "out" / "features", "--dim", "4", "--out", out / "p.npz"],
        "pack": ["pack", cohort / "out" / "features", "--out", out / "store.h5"],
        "train": ["train", cohort / "store.h5", "--out", out, "--epochs", "1", "--batch-size", "2"],
        "embed": ["embed", cohort / "store.h5", "--checkpoint", ck, "--out", out / "e.h5", "--views", "2"],
        "probe": ["probe", cohort / "store.h5", "--labels", tmp_path / "l.csv", "--out", out],
    }


@pytest.mark.parametrize("command", ["tile", "encode", "pca", "pack", "train", "embed", "probe"])
def test_a_file_where_a_folder_is_expected(cohort, tmp_path, command):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    r = cli(*_commands(cohort, blocker / "sub", tmp_path)[command])
    _one_line(r, str(blocker), "not a folder")
    assert blocker.read_text() == "" and r.returncode == 2


@pytest.mark.parametrize("command", ["tile", "encode", "pack", "train", "embed"])
def test_out_under_proc_is_one_line(cohort, tmp_path, command):
    args = _commands(cohort, pathlib.Path("/proc/gigassl_out"), tmp_path)[command]
    _one_line(cli(*args), "/proc/gigassl_out", "cannot write")


@needs_root
@pytest.mark.parametrize("command", ["tile", "encode", "pca", "pack", "train", "embed", "probe"])
def test_read_only_mount_is_one_line_before_any_work(cohort, tmp_path, command):
    with tmpfs(tmp_path / "ro", 64, read_only=True) as ro:
        t = time.time()
        line = _one_line(cli(*_commands(cohort, ro / "o", tmp_path)[command]), str(ro), "cannot write")
        assert "Read-only file system" in line
        assert time.time() - t < 60


# -- 8. truncated feature files ----------------------------------------------------------------------
def test_truncated_feature_file_is_reported_by_pack_and_embed(cohort, tmp_path):
    feats = tmp_path / "features"
    shutil.copytree(cohort / "out" / "features", feats)
    data = (feats / "s2.h5").read_bytes()
    (feats / "s2.h5").write_bytes(data[: len(data) // 2])
    r = cli("pack", feats, "--out", tmp_path / "store.h5")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert f"skipped {feats / 's2.h5'}: " in r.stderr and "truncated or damaged" in r.stderr
    assert "3 slides" in r.stdout
    r = cli("embed", feats, "--checkpoint", cohort / "run" / "checkpoint_last.pt", "--out", tmp_path / "e.h5",
            "--views", "2")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert f"skipped {feats / 's2.h5'}: " in r.stderr
    with h5py.File(tmp_path / "e.h5") as fh:
        assert sorted(v.decode() for v in fh["ids"][:]) == ["s0", "s1", "s3"]
    # arrays damaged behind a readable header: embed names the file and leaves the slide out too
    (feats / "s2.h5").write_bytes(data)
    with h5py.File(feats / "s2.h5", "r+") as fh:
        del fh["features"]
    r = cli("embed", feats, "--checkpoint", cohort / "run" / "checkpoint_last.pt", "--out", tmp_path / "e2.h5",
            "--views", "2")
    assert r.returncode == 0 and f"skipped {feats / 's2.h5'}: cannot read features (missing)" in r.stderr, r.stderr


# -- 9. concurrent tile runs ----------------------------------------------------------------------------
def test_three_concurrent_tile_runs_on_one_folder(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(6):
        write_synthetic_slide(slides / f"t{i}.tif", 1024, 768, mpp=0.5, seed=90 + i)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gigassl_fast", "tile", str(slides), "--out", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(), *p.communicate()) for p in procs]
    for code, stdout, stderr in results:
        assert code in (0, 3) and "Traceback" not in stderr and " 0 failed;" in stdout, stdout + stderr
    assert sorted(os.listdir(out / "tiles")) == [f"t{i}.h5" for i in range(6)]
    summary = json.loads((out / "tile_summary.json").read_text())
    done = {s["slide_id"] for s in summary["slides"] if s["status"] in ("done", "skipped")}
    assert done == {f"t{i}" for i in range(6)}, summary["slides"]
    assert len(summary["runs"]) == 3
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert not [f for f in os.listdir(out / "tiles") if f.endswith((".tmp", ".lock"))]


# -- 10., 11. bad values and smaller things ------------------------------------------------------------
@pytest.mark.parametrize("sizes", ["0,-5,100", "0", "-1", "3,x"])
def test_probe_bad_train_sizes_are_a_usage_error(cohort, tmp_path, sizes):
    (tmp_path / "l.csv").write_text("slide_id,label\ns0,a\ns1,b\n")
    r = cli("probe", cohort / "store.h5", "--labels", tmp_path / "l.csv", "--train-size", sizes)
    assert r.returncode == 2 and "--train-size" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_one_missing_path_or_a_folder_named_like_a_slide_is_one_failed_slide(cohort, tmp_path):
    (tmp_path / "x.svs").mkdir()
    r = cli("tile", cohort / "slides" / "s0.tif", tmp_path / "nope.svs", tmp_path / "x.svs", "--out", tmp_path / "o")
    assert r.returncode == 1, r.stdout + r.stderr
    rows = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.split()}
    assert "done" in rows["s0"] and "failed" in rows["nope"] and "no such file" in rows["nope"]
    assert "failed" in rows["x"] and "folder" in rows["x"]


def test_header_only_manifest_is_an_error(tmp_path):
    (tmp_path / "m.csv").write_text("slide_id,path\n")
    _one_line(cli("tile", tmp_path / "m.csv", "--out", tmp_path / "o"), "m.csv", "no slides")


def test_one_class_message_prints_the_label_plainly(cohort, tmp_path):
    assert cli("embed", cohort / "store.h5", "--checkpoint", cohort / "run" / "checkpoint_last.pt", "--out",
               tmp_path / "e.h5", "--views", "2").returncode == 0
    (tmp_path / "l.csv").write_text("slide_id,label\ns0,a\ns1,a\n")
    line = _one_line(cli("probe", tmp_path / "e.h5", "--labels", tmp_path / "l.csv", "--out", tmp_path / "r"),
                     "only one class ('a')")
    assert "np.str_" not in line


def test_imagenet_weights_for_efficientnet_are_its_shipped_weights():
    from gigassl_fast.encoders import create_encoder

    assert create_encoder("efficientnet-lite0", "imagenet").weights_checksum == \
        create_encoder("efficientnet-lite0").weights_checksum


@pytest.mark.skipif(not (IS_ROOT and shutil.which("setpriv")), reason="needs root and setpriv to act as another user")
def test_unreadable_slide_says_permission_denied(cohort):
    d = tempfile.mkdtemp(dir="/tmp")
    try:
        os.chmod(d, 0o755)
        slide = shutil.copy(cohort / "slides" / "s0.tif", d)
        os.chmod(slide, 0o000)
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                            "gigassl_fast", "tile", slide, "--out", os.path.join(d, "o")], capture_output=True, text=True,
                           env={**os.environ, "HOME": d})
        # the output folder is not writable for nobody either: that is said first, before any work
        assert r.returncode == 2 and "cannot write" in r.stderr, r.stdout + r.stderr
        os.chmod(d, 0o777)
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                            "gigassl_fast", "tile", slide, "--out", os.path.join(d, "o")], capture_output=True, text=True,
                           env={**os.environ, "HOME": d})
        assert r.returncode == 1 and "permission denied" in r.stdout.lower(), r.stdout + r.stderr
        assert "damaged" not in r.stdout
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_qc_picture_killed_mid_write_is_redone(cohort, tmp_path):
    out = tmp_path / "o"
    assert cli("tile", cohort / "slides" / "s0.tif", "--out", out).returncode == 0
    # what kill -9 during the QC write leaves: a 0-byte temporary; the tile file is written after the picture
    (out / "qc" / "s0.png").unlink()
    (out / "qc" / "s0.png.tmp").write_bytes(b"")
    (out / "tiles" / "s0.h5").unlink()
    r = cli("tile", cohort / "slides" / "s0.tif", "--out", out)
    assert r.returncode == 0 and (out / "qc" / "s0.png").stat().st_size > 1000
    assert not (out / "qc" / "s0.png.tmp").exists()


def test_concurrent_encode_summaries_are_merged(cohort, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(cohort / "out", out)
    os.remove(out / "features" / "s3.h5")
    a = cli("encode", cohort / "slides" / "s3.tif", "--out", out, *ENC)
    b = cli("encode", cohort / "slides" / "s0.tif", "--out", out, *ENC)
    assert a.returncode == 0 and b.returncode == 0
    summary = json.loads((out / "encode_summary.json").read_text())
    by_id = {s["slide_id"]: s["status"] for s in summary["slides"]}
    assert by_id["s3"] == "done" and by_id["s0"] in ("done", "skipped") and {"s1", "s2"} <= set(by_id)
    assert np.isfinite(summary["seconds"])
