"""The pack stage: every slide's feature arrays in one contiguous store (format: store.py), read once
by ``train``."""

from __future__ import annotations

import os

import h5py
import numpy as np

from . import __version__
from .errors import GigasslError
from .features import FeatureFile, feature_files
from .h5files import atomic_h5, write_attrs
from .store import FORMAT

#: Attributes every slide of a store must share.
SHARED = ("encoder", "weights_checksum", "out_dim", "naug", "nt", "target_mpp", "tile_size", "pca")


def pack(features_dir: str, out: str, pca: str | None = None) -> dict:
    """Packs every complete feature file of `features_dir` into `out`; returns a summary dict.

    `pca`: a PCA file (from ``gigassl-fast pca``) applied to every feature on the way in, e.g. to give
    the sparse aggregator 256-d inputs from a wider encoder."""
    files = feature_files(features_dir)
    ref, ref_file = None, None
    ids, counts, skipped, usable = [], [], [], []
    for f in files:
        try:
            fh = FeatureFile(f)
        except GigasslError as err:
            skipped.append((f, str(err).removeprefix(f"{f}: ")))
            continue
        with fh:
            attrs = fh.attrs
            if not fh.complete:
                skipped.append((f, "incomplete file"))
                continue
            n, slide_id = fh.n_tiles, fh.slide_id
        if n == 0:
            skipped.append((f, "no tissue tiles"))
            continue
        shared = {k: attrs.get(k) for k in SHARED}
        if ref is None:
            ref, ref_file = shared, f
        elif shared != ref:
            diff = [k for k in SHARED if shared[k] != ref[k]]
            raise GigasslError(f"{f}: made with other settings than {ref_file} ({', '.join(diff)}: "
                               f"{[shared[k] for k in diff]} vs {[ref[k] for k in diff]}); pack one encoder setting per store")
        ids.append(slide_id)
        counts.append(n)
        usable.append(f)
    if not ids:
        raise GigasslError(f"{features_dir}: no usable feature file ({'; '.join(f'{a}: {b}' for a, b in skipped[:3])})")
    if ref["naug"] == 0:
        raise GigasslError(f"{features_dir}: features were encoded with --naug 0; training needs augmented versions")
    s, d, naug, nt = len(ids), int(ref["out_dim"]), int(ref["naug"]), int(ref["nt"])
    proj = None
    if pca:
        from .pca import load_pca, project

        proj = load_pca(pca, d)
        d = int(proj["components"].shape[0])

    def fit(a: np.ndarray) -> np.ndarray:
        return a if proj is None else project(a, proj).astype(np.float16)

    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    nbytes = int(offsets[-1]) * (16 + 2 * d) + s * naug * nt * (4 + 16 + 2 * d)
    with atomic_h5(out, nbytes) as dst:
        dst.create_dataset("ids", data=np.array(ids, dtype=h5py.string_dtype()))
        dst.create_dataset("offsets", data=offsets)
        coords = dst.create_dataset("coords", (offsets[-1], 2), np.int64)
        feats = dst.create_dataset("features", (offsets[-1], d), np.float16)
        a_idx = dst.create_dataset("aug/indices", (s, naug, nt), np.int32)
        a_xy = dst.create_dataset("aug/coords", (s, naug, nt, 2), np.int64)
        a_f = dst.create_dataset("aug/features", (s, naug, nt, d), np.float16)
        for k, f in enumerate(usable):
            with FeatureFile(f) as fh:
                c, plain, idx, aug = fh.coords(), fh.features(), fh.aug_indices(), fh.aug_features()
                coords[offsets[k]:offsets[k + 1]] = c
                feats[offsets[k]:offsets[k + 1]] = fit(plain)
                a_idx[k] = idx
                a_xy[k] = c[idx]
                a_f[k] = fit(aug)
        pca_attrs = {"pca_file": os.path.abspath(pca), "out_dim": d} if pca else {}
        write_attrs(dst, {**ref, **pca_attrs, "format": FORMAT, "version": __version__, "n_slides": s,
                          "n_tiles": int(offsets[-1]), "source": os.path.abspath(os.path.dirname(files[0]))})
    return {"slides": s, "tiles": int(offsets[-1]), "skipped": skipped, "out": out, "dim": d, "naug": naug, "nt": nt}
