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

from ..distributed import batch_norm_rows
from ..kernels.sparse_bag import csr_sum, gather_gemm, tap_gemm
from ..views import StoreRows, tile_features
from . import rulebook as rb
from .registry import Aggregator, register_aggregator
from .sparse_plan import SparsePlan, plan_cells

IN_DIM, OUT_DIM = 256, 512


def _tap_products(x: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, plan: SparsePlan,
                  which: str) -> torch.Tensor:
    """(pairs, out): x[rows[p]] @ W[tap of p]^T for the plan's `which` ("first" or "sub") pairs, which are
    grouped by tap; W dense (out, in, 3, 3), tap = 3 * kh + kw.

    Only products that exist are computed: isolated sites use the centre tap alone, where a GEMM
    against all nine taps would do nine times the work. A padded plan runs one grouped GEMM (one tap
    per block of rows, from the plan's device indices); an exact one, one gather-GEMM per tap, sliced
    by the plan's host bounds.
    """
    cout, cin = weight.shape[:2]
    w = weight.permute(2, 3, 1, 0).reshape(9, cin, cout)  # [tap] -> (in, out)
    if plan.padded:
        return tap_gemm(x, rows, w, plan.index[f"{which}_block_tap"]).to(weight.dtype)
    b = plan.first_bounds if which == "first" else plan.sub_bounds
    # unbind, not w[t]: each w[t]'s backward would fill and add a gradient the size of all nine taps
    # (9 x in x out), once per tap; unbind's backward stacks the nine tap gradients once.
    # Concatenated, not written into slices of one buffer: autograd would copy the whole gradient once
    # per slice.
    w = w.unbind(0)
    return torch.cat([gather_gemm(x, rows[b[t]:b[t + 1]], w[t]).to(weight.dtype) for t in range(9) if b[t + 1] > b[t]])


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
        self._host_group = None  # the default process group

    @classmethod
    def build(cls, in_dim: int, resnet18_state: dict | None = None) -> SparseConvMIL:
        """``--aggregator sparse-layer4``: 256-d tiles only; from `resnet18_state`'s layer4 if given."""
        if in_dim != IN_DIM:
            from ..errors import GigasslError

            raise GigasslError(f"--aggregator sparse-layer4 takes 256-d tile features (ResNet18 layer3); the store "
                               f"has {in_dim}-d: encode with resnet18-l3, or project with `gigassl-fast pca --dim 256`")
        return cls.from_resnet18(resnet18_state) if resnet18_state else cls()

    def configure_distributed(self) -> None:
        """The spatial size over every process's batch (``sync_spatial_size``), agreed on the host (a gloo
        group beside NCCL). Called by every process, as it makes a process group."""
        self.sync_spatial_size = True
        dist = torch.distributed
        self._host_group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

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
    def plan(self, locations: torch.Tensor, per_view: bool = False, pad: bool = False) -> SparsePlan:
        """The host plan of a forward over level-0 locations (B, k, 2) on the host (see sparse_plan.py):
        made before the step, so that the step reads nothing back. Under ``sync_spatial_size`` the
        spatial size is agreed with the other processes here, outside the step."""
        cells = rb.grid_cells(locations.detach().cpu(), exact=self.exact_cells)
        size = None
        if self.sync_spatial_size and torch.distributed.is_initialized() and not per_view:
            # host tensors over gloo: an NCCL all-reduce would queue behind the step the device is running
            size = rb.spatial_size(cells)
            torch.distributed.all_reduce(size, op=torch.distributed.ReduceOp.MAX, group=self._host_group)
        return plan_cells(cells, per_view=per_view, size=size, pad=pad)

    def forward(self, features: torch.Tensor | StoreRows, locations: torch.Tensor | SparsePlan,
                trace: dict | None = None, per_view: bool = False) -> torch.Tensor:
        """(B, 512) pooled output. `features`: (B, k, 256), or ``StoreRows`` read in place by the first
        layer. `locations`: level-0 locations (B, k, 2), or their plan (``plan``), already on the
        features' device: with a plan the forward makes no host synchronisation. ``per_view`` (with
        locations): each view gets its own spatial size, so a batch of views gives what running them one
        at a time would (the reference's inference) while running as one batch. `trace`, if a dict,
        receives the intermediate sparse tensors (tensor features and locations only)."""
        if isinstance(locations, SparsePlan):
            if per_view or trace is not None:
                raise ValueError("per_view and trace go with locations; a plan is made per_view or not (plan())")
            plan = locations
        else:
            plan = self.plan(locations, per_view=per_view, pad=features.device.type == "cuda").to(features.device)
        x = tile_features(features)
        c1, x2, out = self._planned(x.table, x.rows.reshape(-1), plan)
        if trace is not None and not isinstance(features, StoreRows):
            n, cells = plan.n_sites, rb.grid_cells(locations.cpu(), exact=self.exact_cells)
            trace.update(cells=cells, spatial_size=plan.size, conv1_sites=torch.from_numpy(plan.out_sites),
                         conv1_out=c1[:n], block1_out=x2[:n],
                         **self._first_layer_inputs(features, cells, plan, per_view))
        return out

    def _planned(self, table: torch.Tensor, rows: torch.Tensor, plan: SparsePlan
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block 0's first layer straight from the tiles' rows, both blocks, the mean per view: (c1, x2,
        pooled). Every shape comes from the plan's host values; padding rows are left out of batch norm
        and of the means.

        Block 0's strided conv and its downsample branch are linear in the input sites, and a site is
        the mean of its tiles, so each site-level rule pair becomes one pair per tile of the site,
        weighted 1 / (tiles in the site): the products take the tiles' rows straight from the table.
        The downsample, a 1x1 conv of the 3x3 average pool, is the 1x1 conv of each tile pooled the same
        way."""
        ix, n1 = plan.index, plan.n_sites_pad
        count = ix["first_count"]
        share = torch.where(count > 0, 1.0 / count.clamp(min=1).to(torch.float32), 0.0)  # 0 for padding
        tile = ix["first_tile"]
        first = (ix["first_perm"], ix["first_ptr"], ix["first_seg"], n1, plan.first_max)
        sub = (ix["sub_perm"], ix["sub_ptr"], ix["sub_seg"], n1, plan.sub_max)
        live = (torch.arange(n1, device=table.device) < ix["view_ptr"][-1]).to(torch.float32) if plan.padded else None

        def conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return csr_sum(_tap_products(x, ix["sub_src"], weight, plan, "sub"), *sub)

        def norm(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
            return bn(x) if live is None else batch_norm_rows(bn, x, live)

        blk = self.block0
        c1 = csr_sum(_tap_products(table, rows[tile], blk.conv1, plan, "first") * share[:, None], *first)
        z = gather_gemm(table, rows, blk.convd[:, :, 0, 0].T)  # (tiles, C)
        dpre = csr_sum(z[tile] * (share / 9)[:, None], *first)
        a = F.relu(norm(blk.bn1, c1))
        a = norm(blk.bn2, conv(a, blk.conv2))
        x1 = F.relu(a + norm(blk.bnd, dpre))
        blk = self.block1
        a = F.relu(norm(blk.bn1, conv(x1, blk.conv1)))
        a = norm(blk.bn2, conv(a, blk.conv2))
        x2 = F.relu(a + x1)
        view_ptr = ix["view_ptr"]
        sites = torch.arange(n1, device=x2.device)
        view = (torch.searchsorted(view_ptr, sites, right=True) - 1).clamp(0, plan.n_views - 1)
        sums = csr_sum(x2, sites, view_ptr, view, plan.n_views, plan.view_max)
        return c1, x2, sums / (view_ptr[1:] - view_ptr[:-1]).clamp(min=1).to(sums.dtype)[:, None]

    def _first_layer_inputs(self, features: torch.Tensor, cells: torch.Tensor, plan: SparsePlan,
                            per_view: bool) -> dict:
        """For traces: the input sites, their features (mean of their tiles) and the 3x3 average pool that
        the planned forward folds into its tile-level first layer; from the rulebook, as SparseConvNet."""
        rules = rb.build_rules(cells.cpu(), plan.size, per_view=per_view)
        x0 = features.reshape(-1, features.shape[-1]).cpu().float()
        n0 = len(rules.inp.keys)
        per_site = torch.bincount(rules.tile_site, minlength=n0).to(x0.dtype)[:, None]
        x0 = torch.zeros(n0, x0.shape[1]).index_add_(0, rules.tile_site, x0) / per_site
        src, dst, _ = rules.strided
        pooled = torch.zeros(len(rules.out.keys), x0.shape[1]).index_add_(0, dst, x0[src]) / 9
        return {"in_sites": rules.inp.sites, "in_feats": x0, "avgpool_out": pooled}

    def bn_layers(self) -> list[nn.BatchNorm1d]:
        """In the fixtures' ``bn_order``: block0 norm1, norm2, normd; block1 norm1, norm2."""
        return [self.block0.bn1, self.block0.bn2, self.block0.bnd, self.block1.bn1, self.block1.bn2]
