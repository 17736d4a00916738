"""Sparse-grid bookkeeping for the sparse ResNet18-layer4, with SparseConvNet's exact semantics
(spec §4.2, fixtures README): tile coordinates to grid cells, the batch-wide spatial size, active sites
and the (input, output, tap) pairs of strided and submanifold 3x3 convolutions. Pure torch tensor ops.

This is the definition. The forward itself runs on a plan made on the host in one C++ call
(sparse_plan.py, which tests/test_sparse_plan.py checks against these functions); ``grid_cells`` is
shared, and ``build_rules`` serves traces and checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Level-0 pixels per grid cell (the reference's ``downmap``).
DOWNMAP = 224


def grid_cells(locations: torch.Tensor, exact: bool = False, downmap: int = DOWNMAP) -> torch.Tensor:
    """int64 (B, k, 2) grid cells of level-0 locations (B, k, 2).

    The reference way (default) divides in float32 and subtracts the per-view minimum in float32, then
    truncates; ``exact`` uses integer arithmetic, floor((p - min p) / downmap), which differs for about
    0.3% of augmented views.
    """
    if exact:
        shifted = locations - locations.min(dim=1, keepdim=True).values
        return torch.div(shifted, downmap, rounding_mode="floor")
    q = locations.to(torch.float32) / torch.tensor(downmap, dtype=torch.float32, device=locations.device)
    q = q - q.min(dim=1, keepdim=True).values
    return torch.trunc(q).to(torch.int64)


def spatial_size(cells: torch.Tensor) -> torch.Tensor:
    """int64 (2,): per axis, max cell + 1 over the whole batch, then at least 5, odd, with an odd half."""
    s = cells.reshape(-1, 2).max(dim=0).values + 1
    s = torch.clamp(s, min=5)
    s = s + (s % 2 == 0).long()
    s = s + 2 * ((s // 2) % 2 == 0).long()
    return s


@dataclass
class SiteSet:
    """Active sites of a sparse tensor: (view, a0, a1) rows sorted lexicographically, and their keys."""

    sites: torch.Tensor  # int64 (N, 3)
    keys: torch.Tensor  # int64 (N,), sorted
    size: torch.Tensor  # int64 (2,) grid size


def _keys(sites: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    return (sites[:, 0] * size[0] + sites[:, 1]) * size[1] + sites[:, 2]


def input_sites(cells: torch.Tensor, size: torch.Tensor) -> tuple[SiteSet, torch.Tensor]:
    """Active input sites and, for each of the B*k tiles, the index of its site (tiles in one cell of
    one view share it; SCN's input layer mode 4 averages them)."""
    b, k, _ = cells.shape
    view = torch.arange(b, device=cells.device).repeat_interleave(k)
    sites = torch.cat([view[:, None], cells.reshape(-1, 2)], dim=1)
    keys, tile_site = torch.unique(_keys(sites, size), sorted=True, return_inverse=True)
    return SiteSet(_unkey(keys, size), keys, size), tile_site


def _unkey(keys: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    a1 = keys % size[1]
    rest = keys // size[1]
    return torch.stack([rest // size[0], rest % size[0], a1], dim=1)


def strided_rules(inp: SiteSet, view_size: torch.Tensor | None = None) -> tuple[SiteSet, torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    """3x3 stride-2 convolution without padding: output sites and (input, output, tap) pairs, tap =
    3 * (g0 - 2 u0) + (g1 - 2 u1), for every output u in range whose window holds input g.

    `view_size` (B, 2), if given, is each view's own spatial size: outputs are clipped as if every view
    were run alone (the reference's inference, one view per forward)."""
    out_size = (inp.size - 3) // 2 + 1
    limit = out_size if view_size is None else ((view_size - 3) // 2 + 1)[inp.sites[:, 0]]
    g = inp.sites[:, 1:]
    pairs_in, pairs_u, pairs_tap = [], [], []
    for d0 in range(3):
        for d1 in range(3):
            u = torch.stack([g[:, 0] - d0, g[:, 1] - d1], dim=1)
            ok = (u % 2 == 0).all(dim=1)
            u = torch.div(u, 2, rounding_mode="floor")
            ok &= (u >= 0).all(dim=1) & (u < limit).all(dim=1)
            idx = ok.nonzero().squeeze(1)
            pairs_in.append(idx)
            pairs_u.append(torch.cat([inp.sites[idx, :1], u[idx]], dim=1))
            pairs_tap.append(torch.full_like(idx, 3 * d0 + d1))
    src = torch.cat(pairs_in)
    u_sites = torch.cat(pairs_u)
    tap = torch.cat(pairs_tap)
    keys, dst = torch.unique(_keys(u_sites, out_size), sorted=True, return_inverse=True)
    return SiteSet(_unkey(keys, out_size), keys, out_size), src, dst, tap


def submanifold_rules(sites: SiteSet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """3x3 submanifold convolution: (input, output, tap) pairs between active sites of one view at
    Chebyshev distance <= 1; tap = 3 * (o'0 - o0 + 1) + (o'1 - o1 + 1) for input o' and output o."""
    srcs, dsts, taps = [], [], []
    n = len(sites.keys)
    for d0 in (-1, 0, 1):
        for d1 in (-1, 0, 1):
            nb = sites.sites + torch.tensor([0, d0, d1], device=sites.sites.device)
            inside = (nb[:, 1] >= 0) & (nb[:, 2] >= 0) & (nb[:, 1] < sites.size[0]) & (nb[:, 2] < sites.size[1])
            key = _keys(nb, sites.size)
            pos = torch.searchsorted(sites.keys, key).clamp(max=max(n - 1, 0))
            found = inside & (sites.keys[pos] == key)
            out_idx = found.nonzero().squeeze(1)
            srcs.append(pos[out_idx])
            dsts.append(out_idx)
            taps.append(torch.full_like(out_idx, 3 * (d0 + 1) + (d1 + 1)))
    return torch.cat(srcs), torch.cat(dsts), torch.cat(taps)


@dataclass
class Rules:
    """Everything the sparse layer4 needs for one batch of grid cells."""

    size: torch.Tensor
    inp: SiteSet
    tile_site: torch.Tensor
    out: SiteSet
    strided: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    submanifold: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def view_spatial_size(cells: torch.Tensor) -> torch.Tensor:
    """int64 (B, 2): the spatial size each view would get alone."""
    s = torch.clamp(cells.max(dim=1).values + 1, min=5)
    s = s + (s % 2 == 0).long()
    return s + 2 * ((s // 2) % 2 == 0).long()


def build_rules(cells: torch.Tensor, spatial: torch.Tensor | None = None, per_view: bool = False) -> Rules:
    """Rules for int64 cells (B, k, 2), by the tensor ops above, wherever the cells are. `spatial` overrides
    the batch's spatial size (distributed training); `per_view` gives every view its own spatial size, as
    if each ran alone (inference)."""
    if per_view:
        size = spatial_size(cells)
        inp, tile_site = input_sites(cells, size)
        out, src, dst, tap = strided_rules(inp, view_spatial_size(cells))
        return Rules(size, inp, tile_site, out, (src, dst, tap), submanifold_rules(out))
    size = spatial_size(cells) if spatial is None else spatial
    inp, tile_site = input_sites(cells, size)
    out, src, dst, tap = strided_rules(inp)
    return Rules(size, inp, tile_site, out, (src, dst, tap), submanifold_rules(out))
