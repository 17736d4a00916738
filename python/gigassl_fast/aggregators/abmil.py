"""Gated attention MIL (Ilse et al. 2018), without a spatial model. It takes features (B, k, D) or
``StoreRows`` (locations are ignored) and gives (B, 512); its first layer reads the tiles' rows in place
(gather + linear + ReLU kernel) and the attention pooling is one segment-softmax kernel."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.sparse_bag import gather_linear_relu, segment_softmax_pool
from ..views import StoreRows, tile_features
from .registry import Aggregator, register_aggregator


@register_aggregator("abmil")
class GatedAttentionMIL(Aggregator):
    """Gated attention MIL (Ilse et al. 2018): tile embedding, attention weights softmaxed per view,
    weighted sum."""

    def __init__(self, in_dim: int = 256, dim: int = 512, att_dim: int = 128) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.v = nn.Linear(dim, att_dim)
        self.u = nn.Linear(dim, att_dim)
        self.w = nn.Linear(att_dim, 1)

    def forward(self, features: torch.Tensor | StoreRows, locations: torch.Tensor | None = None) -> torch.Tensor:
        b, k, _ = features.shape
        x = tile_features(features)
        lin = self.embed[0]
        h = gather_linear_relu(x.table, x.rows.reshape(-1), lin.weight.T, lin.bias)  # (B*k, dim)
        scores = self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(1)  # (B*k,)
        ptr = torch.arange(0, b * k + 1, k, device=h.device)
        return segment_softmax_pool(scores, h, ptr, max_len=k)
