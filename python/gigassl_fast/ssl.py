"""Slide-level SimCLR (spec §4.3): aggregator, projector with ReLU before batch norm, NT-Xent."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .aggregators import SparseConvMIL
from .aggregators.mlp import GatedAttentionMIL, ResidualMLP
from .distributed import gather_with_grad
from .errors import GigasslError

AGGREGATORS = ("sparse-layer4", "mlp", "abmil")


def build_aggregator(name: str, in_dim: int, resnet18_state: dict | None = None) -> nn.Module:
    if name == "sparse-layer4":
        if in_dim != 256:
            raise GigasslError(f"--aggregator sparse-layer4 takes 256-d tile features (ResNet18 layer3); the store "
                               f"has {in_dim}-d: encode with resnet18-l3, or project with `gigassl-fast pca --dim 256`")
        return SparseConvMIL.from_resnet18(resnet18_state) if resnet18_state else SparseConvMIL()
    if name == "mlp":
        return ResidualMLP(in_dim)
    if name == "abmil":
        return GatedAttentionMIL(in_dim)
    raise GigasslError(f"--aggregator must be one of {', '.join(AGGREGATORS)} (got {name!r})")


class Projector(nn.Sequential):
    """512 -> 512 -> 512 -> 256; ReLU comes before each batch norm, as in the reference."""

    def __init__(self, dim: int = 512, out: int = 256) -> None:
        super().__init__(nn.Linear(dim, dim), nn.ReLU(), nn.BatchNorm1d(dim), nn.Linear(dim, dim), nn.ReLU(),
                         nn.BatchNorm1d(dim), nn.Linear(dim, out))


class SimCLRMIL(nn.Module):
    def __init__(self, aggregator: nn.Module) -> None:
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
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(u.device)
    return F.cross_entropy(sim, target)
