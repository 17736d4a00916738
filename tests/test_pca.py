
import numpy as np
import pytest

from conftest import cli
from gigassl_fast.errors import GigasslError
from gigassl_fast.features import read_features
from gigassl_fast.pca import load_pca, project, save_pca


def test_projection_matches_scikit_learn(tmp_path):
    from sklearn.decomposition import PCA

    x = np.random.default_rng(0).normal(size=(300, 40)).astype(np.float32) @ np.diag(np.linspace(3, 0.1, 40))
    pca = PCA(8).fit(x)
    save_pca(str(tmp_path / "p.npz"), {"mean": pca.mean_, "components": pca.components_})
    loaded = load_pca(str(tmp_path / "p.npz"), in_dim=40)
    np.testing.assert_allclose(project(x, loaded), pca.transform(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(GigasslError, match="made for 40-d features"):
        load_pca(str(tmp_path / "p.npz"), in_dim=1280)


def test_fit_then_encode_with_pca(small_cohort, tmp_path):
    r = cli("encode", small_cohort / "s0.tif", small_cohort / "s1.tif", "--out", tmp_path / "a", "--naug", "0",
            "--tile-size", "112")
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("pca", tmp_path / "a" / "features", "--dim", "16", "--out", tmp_path / "p.npz")
    assert r.returncode == 0 and "1280 -> 16" in r.stdout, r.stdout + r.stderr
    r = cli("encode", small_cohort / "s2.tif", "--out", tmp_path / "b", "--naug", "2", "--nt", "4", "--pca",
            tmp_path / "p.npz", "--tile-size", "112")
    assert r.returncode == 0, r.stdout + r.stderr
    d = read_features(str(tmp_path / "b" / "features" / "s2.h5"))
    assert d["features"].shape[1] == 16 and d["aug_features"].shape == (2, 4, 16)
    assert d["attrs"]["out_dim"] == 16 and "+pca" in d["attrs"]["weights_checksum"]
    r = cli("pca", tmp_path / "a" / "features", "--dim", "5000", "--out", tmp_path / "q.npz")
    assert r.returncode == 2 and "--dim 5000" in r.stderr
