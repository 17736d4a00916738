"""PCA projections of tile features: wide foundation-model features reduced (e.g. to the 256 the
sparse ResNet18-layer4 aggregator takes), as the maintained reference does with released PCAs.

A projection is an .npz with ``mean`` (D,) and ``components`` (K, D) float32: z = (x - mean) @ components.T.
"""

from __future__ import annotations

import numpy as np

from .errors import GigasslError
from .features import FeatureFile, feature_files
from .outputs import atomic_file


def fit_pca(features_dir: str, dim: int, max_rows: int = 200_000, seed: int = 0) -> dict[str, np.ndarray]:
    """Fits a `dim`-component PCA on the plain ``features`` of every feature file in `features_dir`
    (a random subset of at most `max_rows` tiles, drawn evenly over slides)."""
    from sklearn.decomposition import PCA

    files = feature_files(features_dir)
    rng = np.random.default_rng(seed)
    per_slide = max(1, max_rows // len(files))
    rows = []
    for f in files:
        with FeatureFile(f) as fh:
            n = fh.n_tiles
            take = np.sort(rng.choice(n, size=min(n, per_slide), replace=False)) if n else np.zeros(0, int)
            rows.append(fh.features(take).astype(np.float32) if n else np.zeros((0, fh.dim), np.float32))
    x = np.concatenate(rows)
    if len(x) < dim:
        raise GigasslError(f"--dim {dim} needs at least {dim} tiles; {features_dir} has {len(x)}")
    if x.shape[1] < dim:
        raise GigasslError(f"--dim {dim} is larger than the features' dimension {x.shape[1]}")
    pca = PCA(n_components=dim, random_state=seed).fit(x)
    return {"mean": pca.mean_.astype(np.float32), "components": pca.components_.astype(np.float32),
            "explained_variance_ratio": pca.explained_variance_ratio_.astype(np.float32)}


def save_pca(path: str, pca: dict[str, np.ndarray]) -> None:
    with atomic_file(path, sum(a.nbytes for a in pca.values())) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **pca)


def load_pca(path: str, in_dim: int | None = None) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as z:
            pca = {"mean": z["mean"].astype(np.float32), "components": z["components"].astype(np.float32)}
    except (OSError, KeyError, ValueError, EOFError) as err:
        raise GigasslError(f"--pca {path}: not a PCA file with 'mean' and 'components' ({err})") from None
    if pca["components"].ndim != 2 or pca["mean"].shape != (pca["components"].shape[1],):
        raise GigasslError(f"--pca {path}: mean {pca['mean'].shape} and components {pca['components'].shape} do not fit")
    if in_dim is not None and pca["components"].shape[1] != in_dim:
        raise GigasslError(f"--pca {path}: made for {pca['components'].shape[1]}-d features, the encoder gives {in_dim}-d")
    return pca


def project(x: np.ndarray, pca: dict[str, np.ndarray]) -> np.ndarray:
    """float (..., D) -> float32 (..., K)."""
    return (np.asarray(x, np.float32) - pca["mean"]) @ pca["components"].T
