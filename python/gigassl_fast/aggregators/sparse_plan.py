"""The plan of one sparse-layer4 forward, made on the host before the step: every index the forward needs,
from the views' grid cells, in one C++ call (``gigassl_fast._core.sparse_plan``).

A plan holds the first layer's tile-level rule pairs and the submanifold pairs, each grouped by tap
(for the gather-GEMMs) and ordered by output site (CSR, for the sums), and the sites of each view. With
``pad`` every group is padded to whole blocks of ``GROUP`` rows and every length to a bucket (quarter
octaves), with masked entries: the device then sees a handful of static shapes, reads nothing back,
and a step can be captured in a CUDA graph once per bucket (``shape_key``). Without it (the CPU's
default) the lengths are exact and the tap groups are sliced by the host-known bounds.

Semantics are those of rulebook.py (SparseConvNet's); tests/test_sparse_plan.py compares the two.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..kernels.sparse_bag import GROUP

#: Index tensors of a plan (int64) that the device reads, all moved there together.
INDEX_FIELDS = ("first_tile", "first_count", "first_block_tap", "first_perm", "first_ptr", "first_seg",
                "sub_src", "sub_block_tap", "sub_perm", "sub_ptr", "sub_seg", "view_ptr")
#: Per pair group: the fields padded with zeros, and the permutation (padding entries point at themselves).
_PAIR_FIELDS = {"first": ("first_tile", "first_count", "first_seg"), "sub": ("sub_src", "sub_seg")}


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class SparsePlan:
    """Indices of one sparse-layer4 forward (see the module docstring); ``index`` on the host or the
    device, the rest host values that size kernels and shapes (never read back from the device)."""

    index: dict[str, torch.Tensor]
    n_views: int
    n_tiles: int
    n_sites: int  # real output sites
    n_sites_pad: int  # rows of every activation (n_sites when not padded)
    first_bounds: tuple[int, ...]  # start of each tap's group of first-layer pairs, and the end (10 values)
    sub_bounds: tuple[int, ...]
    first_max: int  # most pairs summed into one output site (the CSR kernels' loop bound)
    sub_max: int
    view_max: int  # most sites of one view
    padded: bool
    size: torch.Tensor  # (2,) spatial size
    out_sites: np.ndarray  # (n_sites, 3) (view, a0, a1), for traces and tests

    @property
    def shape_key(self) -> tuple:
        """Equal keys, equal shapes and kernel sizes: the bucket of a padded plan."""
        return (self.n_views, self.n_tiles, self.n_sites_pad, len(self.index["first_tile"]),
                len(self.index["sub_src"]), self.first_max, self.sub_max, self.view_max, self.padded)

    def with_index(self, index: dict[str, torch.Tensor]) -> SparsePlan:
        return replace(self, index=index)

    def to(self, device: torch.device) -> SparsePlan:
        """The plan with its indices on `device`, in one copy."""
        from ..runtime import to_device_packed

        return self.with_index(to_device_packed(self.index, torch.device(device)))

    def grown(self, n_sites_pad: int, first_len: int, sub_len: int) -> SparsePlan:
        """The same plan padded further (host indices): more padding rows and padding pairs."""
        ix = dict(self.index)
        for group, length in (("first", first_len), ("sub", sub_len)):
            extra = length - len(ix[f"{group}_perm"])
            for name in _PAIR_FIELDS[group]:
                ix[name] = torch.cat([ix[name], ix[name].new_zeros(extra)])
            ix[f"{group}_perm"] = torch.cat([ix[f"{group}_perm"], torch.arange(length - extra, length)])
            block_tap = ix[f"{group}_block_tap"]
            ix[f"{group}_block_tap"] = torch.cat([block_tap, block_tap.new_zeros(extra // GROUP)])
            ptr = ix[f"{group}_ptr"]
            ix[f"{group}_ptr"] = torch.cat([ptr, ptr[-1:].expand(n_sites_pad - self.n_sites_pad)])
        return replace(self, index=ix, n_sites_pad=n_sites_pad)


def pad_alike(plans: list[SparsePlan]) -> list[SparsePlan]:
    """Padded plans grown to one shape (the largest of each size): the two views of a step then share one
    bucket, and a step's key is one shape rather than a pair of them."""
    n = max(p.n_sites_pad for p in plans)
    first = max(len(p.index["first_perm"]) for p in plans)
    sub = max(len(p.index["sub_perm"]) for p in plans)
    return [p.grown(n, first, sub) for p in plans]


def plan_cells(cells: torch.Tensor, per_view: bool = False, size: torch.Tensor | None = None,
               pad: bool = False) -> SparsePlan:
    """The plan for int64 grid cells (B, k, 2) on the host. `size` overrides the batch's spatial size
    (distributed training: the size over every process); `per_view` gives every view its own size,
    as if it ran alone (inference)."""
    from .. import _core

    cells_np = np.ascontiguousarray(cells.detach().cpu().numpy(), dtype=np.int64)
    try:
        r = _core.sparse_plan(cells_np, per_view=per_view, size=None if size is None else np.asarray(size, np.int64),
                              pad=pad, granule=GROUP)
    except ValueError as err:
        if "overflow" not in str(err):
            raise
        from ..errors import GigasslError

        raise GigasslError(f"sparse-layer4: the tiles of a view span {int(cells_np.max()) + 1} grid cells of 224 px "
                           f"(B = {cells_np.shape[0]} views), more than its int64 grid keys hold; check the store's "
                           "level-0 coordinates") from None
    b, k = cells_np.shape[:2]
    if pad:
        # Loop bounds of the sums from k alone, not from the data, so that they do not split buckets: an
        # output site takes at most one pair from each tile of its view (k), a submanifold output at
        # most 9 pairs, and a view has at most 4 output sites per tile.
        first_max, sub_max, view_max = _pow2(k), 16, _pow2(4 * k)
        if r["first_max"] > first_max or r["sub_max"] > sub_max:
            raise RuntimeError(f"internal: sparse plan bounds exceeded ({r['first_max']} > {first_max} or "
                               f"{r['sub_max']} > {sub_max})")
    else:
        first_max, sub_max = int(r["first_max"]), int(r["sub_max"])
        view_max = max(int(np.diff(r["view_ptr"]).max()), 1)
    return SparsePlan(
        index={name: torch.from_numpy(r[name]) for name in INDEX_FIELDS},
        n_views=b, n_tiles=int(r["n_tiles"]), n_sites=int(r["n_sites"]), n_sites_pad=int(r["n_sites_pad"]),
        first_bounds=tuple(int(x) for x in r["first_tap_bounds"]), sub_bounds=tuple(int(x) for x in r["sub_tap_bounds"]),
        first_max=first_max, sub_max=sub_max, view_max=view_max, padded=pad, size=torch.from_numpy(r["size"]),
        out_sites=r["out_sites"])
