"""The pack stage: every slide's feature arrays in one contiguous store, read once by ``train``.

``store.h5``:
    ids            str (S,)                 slide ids, in store order
    offsets        int64 (S + 1,)           slide s owns rows offsets[s]:offsets[s+1] of coords/features
    coords         int64 (T, 2)             level-0 (x, y) of every tissue tile
    features       float16 (T, D)           plain tile features
    aug/indices    int32 (S, Naug, Nt)      per slide, indices into its own tiles
    aug/coords     int64 (S, Naug, Nt, 2)   coordinates of those tiles (gathered once here)
    aug/features   float16 (S, Naug, Nt, D)
    attrs          encoder, out_dim, naug, nt, weights_checksum, tile parameters, version
"""

from __future__ import annotations

import glob
import os

import h5py
import numpy as np
import torch

from . import __version__
from .errors import GigasslError
from .h5files import atomic_h5, open_h5, read_attrs, read_strings, write_attrs

FORMAT = "gigassl-fast/store/1"
#: Attributes every slide of a store must share.
SHARED = ("encoder", "weights_checksum", "out_dim", "naug", "nt", "target_mpp", "tile_size", "pca")


def pack(features_dir: str, out: str, pca: str | None = None) -> dict:
    """Packs every complete feature file of `features_dir` into `out`; returns a summary dict.

    `pca`: a PCA file (from ``gigassl-fast pca``) applied to every feature on the way in, e.g. to give
    the sparse aggregator 256-d inputs from a wider encoder."""
    files = sorted(glob.glob(os.path.join(features_dir, "*.h5")))
    if not files:
        raise GigasslError(f"{features_dir}: no feature files (*.h5); run `gigassl-fast encode` first")
    ref, ref_file = None, None
    ids, counts, skipped, usable = [], [], [], []
    for f in files:
        try:
            fh = open_h5(f, "feature file", "rerun `gigassl-fast encode` for its slide")
        except GigasslError as err:
            skipped.append((f, str(err).removeprefix(f"{f}: ")))
            continue
        with fh:
            attrs = read_attrs(fh)
            if not attrs.get("complete"):
                skipped.append((f, "incomplete file"))
                continue
            n = fh["coords"].shape[0]
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
        ids.append(str(attrs.get("slide_id", os.path.splitext(os.path.basename(f))[0])))
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
            with open_h5(f, "feature file", "rerun `gigassl-fast encode` for its slide") as fh:
                try:
                    c, plain = fh["coords"][:], fh["features"][:]
                    idx, aug = fh["aug/indices"][:], fh["aug/features"][:]
                except (OSError, KeyError) as err:  # damaged data behind a readable header
                    raise GigasslError(f"{f}: cannot read its arrays ({str(err).split('(')[0].strip()}); rerun "
                                       "`gigassl-fast encode` for its slide, or move the file away") from None
                coords[offsets[k]:offsets[k + 1]] = c
                feats[offsets[k]:offsets[k + 1]] = fit(plain)
                a_idx[k] = idx
                a_xy[k] = c[idx]
                a_f[k] = fit(aug)
        pca_attrs = {"pca_file": os.path.abspath(pca), "out_dim": d} if pca else {}
        write_attrs(dst, {**ref, **pca_attrs, "format": FORMAT, "version": __version__, "n_slides": s,
                          "n_tiles": int(offsets[-1]), "source": os.path.abspath(features_dir)})
    return {"slides": s, "tiles": int(offsets[-1]), "skipped": skipped, "out": out, "dim": d, "naug": naug, "nt": nt}


class Store:
    """A packed store in memory: augmented features and coordinates as tensors on one device.

    Loaded once; ``train`` never touches per-slide files. On a GPU the arrays go to device memory
    when they fit, otherwise to pinned host memory.
    """

    def __init__(self, path: str, device: torch.device | str = "cpu") -> None:
        device = torch.device(device)
        try:
            with h5py.File(path, "r") as fh:
                attrs = read_attrs(fh)
                if attrs.get("format") != FORMAT or not attrs.get("complete"):
                    raise GigasslError(f"{path}: not a complete gigassl-fast store; run `gigassl-fast pack`")
                self.ids = read_strings(fh["ids"])
                aug_f = torch.from_numpy(fh["aug/features"][:])
                aug_xy = torch.from_numpy(fh["aug/coords"][:])
        except (OSError, KeyError) as err:
            raise GigasslError(f"{path}: not a readable store ({err}); run `gigassl-fast pack`") from None
        self.attrs = attrs
        self.path = path
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            need = aug_f.numel() * 2 + aug_xy.numel() * 8
            if need < 0.8 * free:
                aug_f, aug_xy = aug_f.to(device), aug_xy.to(device)
            else:
                aug_f, aug_xy = aug_f.pin_memory(), aug_xy.pin_memory()
        self.aug_features = aug_f  # (S, Naug, Nt, D) float16
        self.aug_coords = aug_xy  # (S, Naug, Nt, 2) int64

    @property
    def n_slides(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.aug_features.shape[-1])
