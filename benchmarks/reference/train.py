"""The reference way to run one slide-level SimCLR step (spec §4, §8.2; gigassl train_dataset.py,
networks.py with SparseConvNet).

Per sample: two views, each loading its augmentation's tile and coordinate arrays from per-slide .npy
files, drawing 5 tiles and augmenting their coordinates in numpy, one view at a time. Per batch: the
sparse rulebooks built in Python dictionaries (as SCN does on the CPU), then the sparse layer4 as
per-offset gather-GEMM-scatter, the projector and NT-Xent. Same maths as gigassl_fast, straightforward code.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F


def write_reference_dataset(root: str, aug_features: np.ndarray, aug_coords: np.ndarray) -> None:
    """tiles/<wsi>/<a>.npy (Nt, D) float32 and coordinates/<wsi>/<a>.npy (Nt, 2) int64, as the reference."""
    s, naug = aug_features.shape[:2]
    for i in range(s):
        for kind in ("tiles", "coordinates"):
            os.makedirs(os.path.join(root, kind, f"wsi{i}"), exist_ok=True)
        for a in range(naug):
            np.save(os.path.join(root, "tiles", f"wsi{i}", f"{a}.npy"), aug_features[i, a].astype(np.float32))
            np.save(os.path.join(root, "coordinates", f"wsi{i}", f"{a}.npy"), aug_coords[i, a])


def reference_view(root: str, wsi: int, naug: int, rng: np.random.Generator, k: int = 5):
    a = int(rng.integers(naug))
    tiles = np.load(os.path.join(root, "tiles", f"wsi{wsi}", f"{a}.npy"))
    coords = np.load(os.path.join(root, "coordinates", f"wsi{wsi}", f"{a}.npy"))
    idx = rng.integers(0, len(tiles), k)
    p = coords[idx]
    theta = rng.uniform(-180, 180)
    m = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    m = m @ np.diag(rng.choice([-1, 1], 2)) @ np.diag(rng.uniform(0.7, 1.3, 2))
    extent = np.maximum(p.max(0) - p.min(0), 1)
    t = np.array([rng.integers(0, e) for e in extent])
    locs = np.trunc((p - t).astype(np.float32) @ m.astype(np.float32)).astype(np.int64)
    return tiles[idx], locs


def _python_rules(cells: np.ndarray):
    """Sites and rule pairs built with Python dictionaries, view by view."""
    b, k, _ = cells.shape
    s = np.maximum(cells.reshape(-1, 2).max(0) + 1, 5)
    s = s + (s % 2 == 0)
    s = s + 2 * ((s // 2) % 2 == 0)
    so = (s - 3) // 2 + 1
    in_sites, tile_site = {}, []
    for v in range(b):
        for j in range(k):
            key = (v, int(cells[v, j, 0]), int(cells[v, j, 1]))
            tile_site.append(in_sites.setdefault(key, len(in_sites)))
    out_sites, strided = {}, []
    for (v, g0, g1), i in in_sites.items():
        for d0 in range(3):
            for d1 in range(3):
                if (g0 - d0) % 2 or (g1 - d1) % 2:
                    continue
                u0, u1 = (g0 - d0) // 2, (g1 - d1) // 2
                if 0 <= u0 < so[0] and 0 <= u1 < so[1]:
                    o = out_sites.setdefault((v, u0, u1), len(out_sites))
                    strided.append((i, o, 3 * d0 + d1))
    sub = []
    for (v, u0, u1), o in out_sites.items():
        for d0 in (-1, 0, 1):
            for d1 in (-1, 0, 1):
                n = out_sites.get((v, u0 + d0, u1 + d1))
                if n is not None:
                    sub.append((n, o, 3 * (d0 + 1) + (d1 + 1)))
    views = np.array([v for (v, _, _) in out_sites])
    return len(in_sites), np.array(tile_site), len(out_sites), np.array(strided), np.array(sub), views


def _conv(x, w, rules, n_out):
    out = torch.zeros(n_out, w.shape[0], device=x.device)
    for t in range(9):
        sel = rules[rules[:, 2] == t]
        if len(sel):
            kh, kw = divmod(t, 3)
            idx = torch.from_numpy(sel).to(x.device)
            out = out.index_add(0, idx[:, 1], x[idx[:, 0]] @ w[:, :, kh, kw].T)
    return out


def reference_forward(model, feats: np.ndarray, locs: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """model: gigassl_fast SimCLRMIL with a SparseConvMIL backbone (its weights and batch norms), on
    `device`; the views' arrays are moved there once the rulebooks are built, as the reference does."""
    q = locs.astype(np.float32) / np.float32(224)
    cells = np.trunc(q - q.min(axis=1, keepdims=True)).astype(np.int64)
    n0, tile_site, n1, strided, sub, views = _python_rules(cells)
    dev = torch.device(device)
    x = torch.from_numpy(feats.reshape(-1, feats.shape[-1])).float().to(dev)
    ts = torch.from_numpy(tile_site).to(dev)
    x0 = torch.zeros(n0, x.shape[1], device=dev).index_add(0, ts, x) / torch.bincount(ts, minlength=n0)[:, None]
    bb = model.backbone
    c1 = _conv(x0, bb.block0.conv1, strided, n1)
    st = torch.from_numpy(strided).to(dev)
    pooled = torch.zeros(n1, x0.shape[1], device=dev).index_add(0, st[:, 1], x0[st[:, 0]]) / 9
    a = F.relu(bb.block0.bn1(c1))
    a = bb.block0.bn2(_conv(a, bb.block0.conv2, sub, n1))
    x1 = F.relu(a + bb.block0.bnd(pooled @ bb.block0.convd[:, :, 0, 0].T))
    a = F.relu(bb.block1.bn1(_conv(x1, bb.block1.conv1, sub, n1)))
    x2 = F.relu(bb.block1.bn2(_conv(a, bb.block1.conv2, sub, n1)) + x1)
    vt = torch.from_numpy(views).to(dev)
    pooled_views = torch.zeros(feats.shape[0], x2.shape[1], device=dev).index_add(0, vt, x2) / torch.bincount(vt)[:, None]
    return model.projector(pooled_views)
