"""SparseConvMIL: the Giga-SSL slide encoder, a sparse ResNet18 ``layer4`` over the tiles of a view
(spec §4.2), reproducing SparseConvNet's outputs without depending on it.

Per view, tiles are placed on a grid (level-0 location / 224, per-view minimum subtracted); coincident
tiles are averaged; then

    block 0:  a = ReLU(BN1(Conv3x3_s2(X0)));  a = BN2(Sub3x3(a));  d = BNd(Sub1x1(AvgPool3_s2(X0)) / 9 ...)
              X1 = ReLU(a + d)
    block 1:  a = ReLU(BN1(Sub3x3(X1)));  a = BN2(Sub3x3(a));  X2 = ReLU(a + X1)
    output:   mean of X2 over the view's active sites -> (B, 512)

Batch norm uses the statistics of all active sites of the batch in train mode, the running statistics
in eval mode. The spatial size comes from the whole batch, as in the reference, so a view's eval output
can depend on the batch it is in (fixtures README, observation 1).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.sparse_bag import gather_gemm, tap_scatter
from ..views import StoreRows
from . import rulebook as rb
from .registry import Aggregator, register_aggregator

IN_DIM, OUT_DIM = 256, 512


def _tap_matmul(x: torch.Tensor, weight: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, tap: torch.Tensor,
                n_out: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """out[dst] += scale * x[src] @ W[tap]^T over the rule pairs; W dense (out, in, 3, 3), tap = 3 * kh + kw;
    `scale` (per pair) optional.

    Pairs are grouped by tap and each group is one gather-GEMM (x rows straight into the product, no
    copy), so only products that exist are computed: isolated sites use the centre tap alone, where a
    GEMM against all nine taps would do nine times the work. The products are then summed into their
    output sites.
    """
    cout = weight.shape[0]
    # unbind, not w[t]: each w[t]'s backward would fill and add a gradient the size of all nine taps
    # (9 x in x out), once per tap; unbind's backward stacks the nine tap gradients once.
    w = weight.permute(2, 3, 1, 0).reshape(9, weight.shape[1], cout).unbind(0)  # [tap] -> (in, out)
    order = torch.argsort(tap, stable=True)
    bounds = torch.searchsorted(tap[order], torch.arange(10, device=tap.device)).tolist()
    # Concatenated, not written into slices of one buffer: autograd would copy the whole gradient
    # once per slice.
    prod = torch.cat([gather_gemm(x, src[order[bounds[t]:bounds[t + 1]]], w[t]).to(weight.dtype)
                      for t in range(9) if bounds[t + 1] > bounds[t]])
    if scale is not None:
        prod = prod * scale[order][:, None]
    return tap_scatter(prod[:, None, :], torch.arange(len(order), device=x.device), dst[order],
                       torch.zeros_like(order), n_out)


def _segment_mean(x: torch.Tensor, segment: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of the rows of `x` in each of `n` segments (sites of a cell, sites of a view): the CSR scatter
    kernel on a GPU, which sums each segment in a fixed order (no atomics); its twin on the CPU."""
    sums = tap_scatter(x[:, None, :], torch.arange(len(x), device=x.device), segment, torch.zeros_like(segment), n)
    return sums / torch.bincount(segment, minlength=n).to(x.dtype)[:, None]


class _Block(nn.Module):
    """Conv weights in dense torchvision layout (out, in, kh, kw); kh runs along grid axis 0."""

    def __init__(self, cin: int, cout: int, downsample: bool) -> None:
        super().__init__()
        self.conv1 = nn.Parameter(torch.empty(cout, cin, 3, 3))
        self.bn1 = nn.BatchNorm1d(cout, eps=1e-5, momentum=0.1)
        self.conv2 = nn.Parameter(torch.empty(cout, cout, 3, 3))
        self.bn2 = nn.BatchNorm1d(cout, eps=1e-5, momentum=0.1)
        if downsample:
            self.convd = nn.Parameter(torch.empty(cout, cin, 1, 1))
            self.bnd = nn.BatchNorm1d(cout, eps=1e-5, momentum=0.1)
        for p in self.parameters():
            if p.dim() == 4:
                nn.init.kaiming_normal_(p, mode="fan_out", nonlinearity="relu")


@register_aggregator("sparse-layer4")
class SparseConvMIL(Aggregator):
    """Sparse ResNet18-layer4 MIL aggregator: features (B, k, 256) float32 and level-0 locations
    (B, k, 2) int64 (already augmented) -> pooled (B, 512).

    Args:
        exact_cells: grid cells by exact integer arithmetic instead of the reference's float32 path.

    ``sync_spatial_size`` (set by ``configure_distributed``, i.e. by ``train --sync-bn`` under
    torch.distributed) takes the spatial size over every process's batch, so that several processes
    compute what one would with the whole batch.
    """

    per_view_inference = True

    def __init__(self, exact_cells: bool = False) -> None:
        super().__init__()
        self.block0 = _Block(IN_DIM, OUT_DIM, downsample=True)
        self.block1 = _Block(OUT_DIM, OUT_DIM, downsample=False)
        self.exact_cells = exact_cells
        self.sync_spatial_size = False

    @classmethod
    def build(cls, in_dim: int, resnet18_state: dict | None = None) -> SparseConvMIL:
        """``--aggregator sparse-layer4``: 256-d tiles only; from `resnet18_state`'s layer4 if given."""
        if in_dim != IN_DIM:
            from ..errors import GigasslError

            raise GigasslError(f"--aggregator sparse-layer4 takes 256-d tile features (ResNet18 layer3); the store "
                               f"has {in_dim}-d: encode with resnet18-l3, or project with `gigassl-fast pca --dim 256`")
        return cls.from_resnet18(resnet18_state) if resnet18_state else cls()

    def configure_distributed(self) -> None:
        """The spatial size over every process's batch (``sync_spatial_size``)."""
        self.sync_spatial_size = True

    # -- weights ---------------------------------------------------------------------------------
    @classmethod
    def from_resnet18(cls, state_dict: Mapping[str, torch.Tensor], exact_cells: bool = False) -> SparseConvMIL:
        """Builds the aggregator from a torchvision-layout ResNet18 state dict (only ``layer4.*`` is
        used), e.g. ImageNet weights to start training from, as the reference does."""
        model = cls(exact_cells=exact_cells)
        names = {"conv1.weight": "conv1", "conv2.weight": "conv2", "downsample.0.weight": "convd"}
        bns = {"bn1": "bn1", "bn2": "bn2", "downsample.1": "bnd"}
        missing = []
        for b, block in enumerate((model.block0, model.block1)):
            for src, dst in names.items():
                if dst == "convd" and b == 1:
                    continue
                key = f"layer4.{b}.{src}"
                if key not in state_dict:
                    missing.append(key)
                    continue
                getattr(block, dst).data.copy_(state_dict[key])
            for src, dst in bns.items():
                if dst == "bnd" and b == 1:
                    continue
                bn = getattr(block, dst)
                for field in ("weight", "bias", "running_mean", "running_var"):
                    key = f"layer4.{b}.{src}.{field}"
                    if key not in state_dict:
                        missing.append(key)
                        continue
                    getattr(bn, field).data.copy_(state_dict[key])
        if missing:
            from ..errors import GigasslError

            raise GigasslError(f"ResNet18 state dict lacks {', '.join(missing[:5])}"
                               f"{' ...' if len(missing) > 5 else ''} ({len(missing)} keys)")
        return model

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, features: torch.Tensor | StoreRows, locations: torch.Tensor, trace: dict | None = None,
                per_view: bool = False) -> torch.Tensor:
        """(B, 512) pooled output. `features`: (B, k, 256), or ``StoreRows`` read in place by the first
        layer. `trace`, if a dict, receives the intermediate sparse tensors (tensor features only).
        ``per_view``: each view gets its own spatial size, so a batch of views gives what running them
        one at a time would (the reference's inference) while running as one batch."""
        b = features.shape[0]
        cells = rb.grid_cells(locations, exact=self.exact_cells)
        spatial = None
        if self.sync_spatial_size and torch.distributed.is_initialized():
            spatial = rb.spatial_size(cells)
            torch.distributed.all_reduce(spatial, op=torch.distributed.ReduceOp.MAX)
        rules = rb.build_rules(cells, spatial, per_view=per_view)
        dev = features.device
        inp, out_sites = rules.inp, rules.out
        src, dst, tap = (t.to(dev) for t in rules.strided)
        n1 = len(out_sites.keys)
        blk = self.block0
        if isinstance(features, StoreRows):
            c1, dpre = self._first_layer_in_place(features, rules.tile_site.to(dev), len(inp.keys), src, dst, tap, n1)
        else:
            x0 = _segment_mean(features.reshape(-1, features.shape[-1]), rules.tile_site.to(dev), len(inp.keys))
            c1 = _tap_matmul(x0, blk.conv1, src, dst, tap, n1)
            pooled = tap_scatter(x0[:, None, :], src, dst, torch.zeros_like(src), n1) / 9
            dpre = pooled @ blk.convd[:, :, 0, 0].T
        s_src, s_dst, s_tap = (t.to(dev) for t in rules.submanifold)

        a = F.relu(blk.bn1(c1))
        a = blk.bn2(_tap_matmul(a, blk.conv2, s_src, s_dst, s_tap, n1))
        d = blk.bnd(dpre)
        x1 = F.relu(a + d)
        blk = self.block1
        a = F.relu(blk.bn1(_tap_matmul(x1, blk.conv1, s_src, s_dst, s_tap, n1)))
        a = blk.bn2(_tap_matmul(a, blk.conv2, s_src, s_dst, s_tap, n1))
        x2 = F.relu(a + x1)
        out = _segment_mean(x2, out_sites.sites[:, 0].to(dev), b)
        if trace is not None and not isinstance(features, StoreRows):
            trace.update(cells=cells, spatial_size=rules.size, in_sites=inp.sites, in_feats=x0, conv1_sites=out_sites.sites,
                         conv1_out=c1, avgpool_out=pooled, block1_out=x2)
        return out

    def _first_layer_in_place(self, features: StoreRows, tile_site: torch.Tensor, n0: int, src: torch.Tensor,
                              dst: torch.Tensor, tap: torch.Tensor, n1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block 0's strided conv and its downsample branch (before batch norm), read from the store rows.

        Both are linear in the input sites X0, and a site is the mean of its tiles, so each site-level
        rule pair (i, o, tap) becomes one pair per tile of site i, weighted 1 / (tiles in i): the
        products then take the tiles' rows straight from the table. The downsample branch, 1x1 conv of
        the 3x3 average pool, is the 1x1 conv of each tile pooled the same way.
        """
        table = features.table
        rows = features.rows.reshape(-1).to(table.device)
        n_tiles = len(tile_site)
        per_site = torch.bincount(tile_site, minlength=n0)
        pairs_of_site = torch.bincount(src, minlength=n0)
        order = torch.argsort(src, stable=True)
        first = torch.cumsum(pairs_of_site, 0) - pairs_of_site  # each site's first pair in `order`
        per_tile = pairs_of_site[tile_site]
        tile = torch.repeat_interleave(torch.arange(n_tiles, device=table.device), per_tile)
        offset = torch.arange(len(tile), device=table.device) - (torch.cumsum(per_tile, 0) - per_tile)[tile]
        pair = order[first[tile_site][tile] + offset]
        weight = 1.0 / per_site[tile_site].to(torch.float32)  # per tile
        coincident = bool((per_site > 1).any())
        blk = self.block0
        c1 = _tap_matmul(table, blk.conv1, rows[tile], dst[pair], tap[pair], n1, weight[tile] if coincident else None)
        z = gather_gemm(table, rows, blk.convd[:, :, 0, 0].T) * (weight / 9)[:, None]  # (tiles, C)
        dpre = tap_scatter(z[:, None, :], tile, dst[pair], torch.zeros_like(tile), n1)
        return c1, dpre

    def bn_layers(self) -> list[nn.BatchNorm1d]:
        """In the fixtures' ``bn_order``: block0 norm1, norm2, normd; block1 norm1, norm2."""
        return [self.block0.bn1, self.block0.bn2, self.block0.bnd, self.block1.bn1, self.block1.bn2]
