"""Slide-level SimCLR (spec §4.3): aggregator, projector with ReLU before batch norm, NT-Xent."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .aggregators import Aggregator
from .distributed import gather_with_grad


class Projector(nn.Sequential):
    """512 -> 512 -> 512 -> 256; ReLU comes before each batch norm, as in the reference."""

    def __init__(self, dim: int = 512, out: int = 256) -> None:
        super().__init__(nn.Linear(dim, dim), nn.ReLU(), nn.BatchNorm1d(dim), nn.Linear(dim, dim), nn.ReLU(),
                         nn.BatchNorm1d(dim), nn.Linear(dim, out))


class SimCLRMIL(nn.Module):
    def __init__(self, aggregator: Aggregator) -> None:
        super().__init__()
        self.backbone = aggregator
        self.projector = Projector()

    def forward(self, features: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(features, locations))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """SimCLR loss over the global batch: u = normalize([z1; z2]); for each i, -log softmax over j != i
    of u_i . u_j / T at its partner; mean over the 2N anchors."""
    u = F.normalize(torch.cat([gather_with_grad(z1), gather_with_grad(z2)]), dim=1)
    n = u.shape[0] // 2
    sim = u @ u.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = (torch.arange(2 * n, device=u.device) + n) % (2 * n)  # made where u is: no copy inside the step
    return F.cross_entropy(sim, target)
