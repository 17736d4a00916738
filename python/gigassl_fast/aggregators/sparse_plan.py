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
from . import rulebook as rb

#: Index tensors of a plan (int64), all moved to the device together.
INDEX_FIELDS = ("first_tile", "first_dst", "first_count", "first_block_tap", "first_perm", "first_ptr", "first_seg",
                "sub_src", "sub_dst", "sub_block_tap", "sub_perm", "sub_ptr", "sub_seg", "view_ptr")


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


def plan_cells(cells: torch.Tensor, per_view: bool = False, size: torch.Tensor | None = None,
               pad: bool = False) -> SparsePlan:
    """The plan for int64 grid cells (B, k, 2) on the host. `size` overrides the batch's spatial size
    (distributed training: the size over every process); `per_view` gives every view its own size,
    as if it ran alone (inference)."""
    from .. import _core

    cells_np = np.ascontiguousarray(cells.detach().cpu().numpy(), dtype=np.int64)
    r = _core.sparse_plan(cells_np, per_view=per_view, size=None if size is None else np.asarray(size, np.int64),
                          pad=pad, granule=GROUP)
    view_ptr = r["view_ptr"]
    view_max = int(np.diff(view_ptr).max()) if len(view_ptr) > 1 else 1
    return SparsePlan(
        index={name: torch.from_numpy(r[name]) for name in INDEX_FIELDS},
        n_views=cells_np.shape[0], n_tiles=int(r["n_tiles"]), n_sites=int(r["n_sites"]),
        n_sites_pad=int(r["n_sites_pad"]), first_bounds=tuple(int(b) for b in r["first_tap_bounds"]),
        sub_bounds=tuple(int(b) for b in r["sub_tap_bounds"]), first_max=int(r["first_max"]),
        sub_max=int(r["sub_max"]), view_max=_pow2(max(view_max, 1)) if pad else max(view_max, 1), padded=pad,
        size=torch.from_numpy(r["size"]), out_sites=r["out_sites"])


def plan_locations(locations: torch.Tensor, exact: bool = False, per_view: bool = False,
                   size: torch.Tensor | None = None, pad: bool = False) -> SparsePlan:
    """The plan for level-0 locations (B, k, 2): grid cells as rulebook.grid_cells, on the host."""
    return plan_cells(rb.grid_cells(locations.detach().cpu(), exact=exact), per_view=per_view, size=size, pad=pad)
