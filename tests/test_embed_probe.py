import json
import os

import h5py
import numpy as np
import pytest
import torch

from conftest import cli
from gigassl_fast.embed import EmbedParams, view_indices
from gigassl_fast.errors import GigasslError
from gigassl_fast.probe import ProbeParams, cv_splits, evaluate, few_shot_splits


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """6 slides encoded (resnet18-l3, 256-d), packed, trained 2 epochs."""
    from gigassl_fast.synthetic import write_synthetic_slide

    root = tmp_path_factory.mktemp("emb")
    for i in range(6):
        write_synthetic_slide(root / f"s{i}.tif", 1536, 1024, mpp=0.5, seed=60 + i)
    assert cli("encode", root, "--out", root / "out", "--encoder", "resnet18-l3", "--weights", "random", "--naug", "2",
               "--nt", "8", "--tile-size", "112").returncode == 0
    assert cli("pack", root / "out" / "features", "--out", root / "store.h5").returncode == 0
    r = cli("train", root / "store.h5", "--out", root / "run", "--epochs", "2", "--batch-size", "3")
    assert r.returncode == 0, r.stderr
    return root


def test_embeddings_shape_norm_determinism(trained, tmp_path):
    ck = trained / "run" / "checkpoint_last.pt"
    for name, src in (("a", trained / "store.h5"), ("b", trained / "store.h5"), ("c", trained / "out" / "features")):
        r = cli("embed", src, "--checkpoint", ck, "--out", tmp_path / f"{name}.h5", "--views", "7", "--format", "npy")
        assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b, h5py.File(tmp_path / "c.h5") as c:
        ea = a["embeddings"][:]
        assert ea.shape == (6, 512) and ea.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(ea, axis=1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(ea, b["embeddings"][:])
        np.testing.assert_allclose(ea, c["embeddings"][:], atol=1e-5)  # a folder and its store give the same
        assert a.attrs["views"] == 7 and a.attrs["tiles_per_view"] == 5 and "checkpoint_checksum" in a.attrs
    assert np.load(tmp_path / "embeddings.npy").shape == (6, 512) and len(np.load(tmp_path / "ids.npy")) == 6


def test_views_without_and_with_replacement():
    g = torch.Generator().manual_seed(0)
    views = view_indices(23, EmbedParams(views=10, tiles_per_view=5), g)
    assert [len(v) for v in views] == [5, 5, 5, 5, 3]  # 23 tiles, none twice
    assert len(torch.cat(views).unique()) == 23
    assert [len(v) for v in view_indices(3, EmbedParams(views=10), g)] == [3]  # fewer tiles than a view
    assert view_indices(0, EmbedParams(), g) == []
    rep = view_indices(4, EmbedParams(views=6, with_replacement=True), g)
    assert len(rep) == 6 and all(len(v) == 5 for v in rep)


def _blobs(n=60, sep=3.0, seed=0, classes=2):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.normal(size=(n, 8)) + sep * np.eye(8)[y]
    return [f"s{i}" for i in range(n)], x, y


def test_probe_equals_direct_scikit_learn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    ids, x, y = _blobs(sep=0.6)
    labels = {s: (str(v), None) for s, v in zip(ids, y, strict=True)}
    settings, _ = evaluate(ids, x, labels, ProbeParams(folds=5), warn=lambda m: None)
    aucs = []
    for train, test in cv_splits(y, None, 5, 0):
        clf = LogisticRegression(C=10, class_weight="balanced", max_iter=1000).fit(x[train], y[train])
        aucs.append(roc_auc_score(y[test], clf.predict_proba(x[test])[:, 1]))
    assert settings["cv5"].summary()["auc_mean"] == pytest.approx(np.mean(aucs))


def test_separable_gives_auc_one_shuffled_near_half():
    ids, x, y = _blobs(n=120, sep=4.0)
    labels = {s: (str(v), None) for s, v in zip(ids, y, strict=True)}
    assert evaluate(ids, x, labels, ProbeParams(folds=5), warn=lambda m: None)[0]["cv5"].summary()["auc_mean"] > 0.99
    shuffled = {s: (str(v), None) for s, v in zip(ids, np.random.default_rng(1).permutation(y), strict=True)}
    auc = evaluate(ids, x, shuffled, ProbeParams(folds=5), warn=lambda m: None)[0]["cv5"].summary()["auc_mean"]
    assert 0.3 < auc < 0.7
    ids3, x3, y3 = _blobs(n=90, sep=4.0, classes=3)
    labels3 = {s: (str(v), None) for s, v in zip(ids3, y3, strict=True)}
    assert evaluate(ids3, x3, labels3, ProbeParams(folds=3), warn=lambda m: None)[0]["cv3"].summary()["auc_mean"] > 0.95


def test_patients_never_on_both_sides_and_few_shot_sizes():
    y = np.array([0, 1] * 30)
    groups = np.repeat(np.arange(20), 3)
    for train, test in cv_splits(y, groups, 4, 0):
        assert not set(groups[train]) & set(groups[test])
    for train, test in few_shot_splits(y, groups, 12, 10, 0):
        assert len(train) == 12 and not set(groups[train]) & set(groups[test])
    splits = few_shot_splits(y, None, 10, 15, 0)
    assert len(splits) == 15 and all(len(t) == 10 and len(np.unique(y[t])) == 2 for t, _ in splits)


def test_probe_bad_inputs():
    ids, x, y = _blobs(n=20)
    labels = {s: (str(v), None) for s, v in zip(ids, y, strict=True)}
    with pytest.raises(GigasslError, match="only one class"):
        evaluate(ids, x, {s: ("a", None) for s in ids}, ProbeParams(), warn=lambda m: None)
    with pytest.raises(GigasslError, match="no slide has both"):
        evaluate(ids, x, {"zz": ("a", None)}, ProbeParams(), warn=lambda m: None)
    bad = x.copy()
    bad[3, 0] = np.nan
    with pytest.raises(GigasslError, match="NaN"):
        evaluate(ids, bad, labels, ProbeParams(), warn=lambda m: None)
    warnings = []
    settings, _ = evaluate(ids + ["extra"], np.vstack([x, x[:1]]), {**labels, "ghost": ("1", None)},
                           ProbeParams(folds=50), warn=warnings.append)
    assert "cv10" in settings  # 50 folds asked, 10 per class available: what can run, runs
    assert any("no label" in w for w in warnings) and any("no embedding" in w for w in warnings)
    assert any("--folds 50" in w for w in warnings)


def test_probe_cli_report_and_reference_npy(trained, tmp_path):
    ck = trained / "run" / "checkpoint_last.pt"
    assert cli("embed", trained / "store.h5", "--checkpoint", ck, "--out", tmp_path / "e.h5", "--views", "5",
               "--format", "npy").returncode == 0
    (tmp_path / "labels.csv").write_text("slide_id,label,patient_id\n" +
                                         "".join(f"s{i},{'ab'[i % 2]},p{i // 2}\n" for i in range(6)))
    r = cli("probe", tmp_path / "e.h5", "--labels", tmp_path / "labels.csv", "--folds", "2", "--train-size", "2",
            "--out", tmp_path / "rep", "--baseline", trained / "out" / "features")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "rep" / "probe.json").read_text())
    first = next(iter(rep["settings"]))
    assert first == "cv2" and set(rep["settings"][first]) == {"auc_mean", "auc_std", "balanced_accuracy_mean",
                                                               "n_train", "n_splits"}
    assert "mean-pool/cv2" in rep["settings"] and rep["config"]["grouped"] is True
    assert (tmp_path / "rep" / "probe.md").exists() and (tmp_path / "rep" / "roc.png").stat().st_size > 1000
    r = cli("probe", tmp_path / "embeddings.npy", "--labels", tmp_path / "labels.csv", "--folds", "2", "--out",
            tmp_path / "rep2")
    assert r.returncode == 0, r.stderr
    (tmp_path / "one.csv").write_text("slide_id,label\ns0,a\ns1,a\n")
    r = cli("probe", tmp_path / "e.h5", "--labels", tmp_path / "one.csv")
    assert r.returncode == 2 and "only one class" in r.stderr


def test_demo_quick_end_to_end(tmp_path, sample_dir):
    """The demo with the checkout's sample-slide manifest: its mpp column lets the strip TIFF, which has no
    resolution, be tiled like the others."""
    manifest = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample_slides.csv")
    r = cli("demo", "--out", tmp_path / "demo", "--quick", "--sample-slides", manifest)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "mean-pool/cv2" in r.stdout and "cv2" in r.stdout
    for f in ("store.h5", "embeddings.h5", "report/probe.json", "run/checkpoint_last.pt", "samples/tile_summary.json"):
        assert (tmp_path / "demo" / f).exists(), f
    for sid in ("cmu_small_region", "kidney-48-5", "fluorescence_dapi"):
        assert (tmp_path / "demo" / "samples" / "tiles" / f"{sid}.h5").exists(), sid
