"""The reference's residual MLP (spec §7.2), without a spatial model (gated attention MIL is in abmil.py).
It takes features (B, k, D) or ``StoreRows`` (locations are ignored) and gives (B, 512); its first layer
reads the tiles' rows in place (gather + linear + ReLU kernel)."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.sparse_bag import gather_gemm, gather_linear_relu
from ..views import StoreRows, tile_features
from .registry import Aggregator, register_aggregator


class ResidualMLPBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.main = nn.Sequential(nn.Linear(cin, cout), nn.ReLU(), nn.Dropout(dropout), nn.BatchNorm1d(cout),
                                  nn.Linear(cout, cout), nn.Dropout(dropout), nn.BatchNorm1d(cout))
        self.skip = nn.Sequential(nn.Linear(cin, cout), nn.BatchNorm1d(cout)) if cin != cout else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor | StoreRows) -> torch.Tensor:
        if not isinstance(x, StoreRows):
            return self.relu(self.main(x) + self.skip(x))
        # main = Linear, ReLU, Dropout, BN, Linear, Dropout, BN: its first two fused over the rows
        rows = x.rows.reshape(-1)
        lin = self.main[0]
        h = self.main[2:](gather_linear_relu(x.table, rows, lin.weight.T, lin.bias))
        if isinstance(self.skip, nn.Identity):
            skip = x.table[rows].float()
        else:
            skip = self.skip[1](gather_gemm(x.table, rows, self.skip[0].weight.T) + self.skip[0].bias)
        return self.relu(h + skip)


@register_aggregator("mlp")
class ResidualMLP(Aggregator):
    """Tile-wise residual MLP (D -> 512 -> 512), then the mean over the view's tiles."""

    def __init__(self, in_dim: int = 256, dim: int = 512) -> None:
        super().__init__()
        self.blocks = nn.Sequential(ResidualMLPBlock(in_dim, dim), ResidualMLPBlock(dim, dim))

    def forward(self, features: torch.Tensor | StoreRows, locations: torch.Tensor | None = None) -> torch.Tensor:
        b, k, _ = features.shape
        return self.blocks[1](self.blocks[0](tile_features(features))).view(b, k, -1).mean(dim=1)
