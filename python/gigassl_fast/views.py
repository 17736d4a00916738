"""Views of slides for slide-level SimCLR (spec §4.1), sampled for a whole batch at once.

A view of slide s: one of its Naug augmented versions at random, k of that version's Nt tiles with
replacement, then a random spatial augmentation of their level-0 coordinates: rotation by an angle
drawn in U(-180, 180) and used as radians (as the reference), horizontal and vertical flips with
p = 0.5, per-axis scaling U(0.7, 1.3), and a translation drawn per axis in U{0 .. extent - 1}:
p' = trunc(float32(p - t) @ M) with M = R(theta) diag(flips) diag(scales).
"""

from __future__ import annotations

import torch


def spatial_augment(locs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """int64 (B, k, 2) level-0 coordinates -> augmented int64 (B, k, 2); one transform per view."""
    b = locs.shape[0]
    dev = locs.device

    def u(*shape):
        return torch.rand(*shape, generator=gen, device=gen.device).to(dev)

    theta = (u(b) * 360 - 180).float()
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (B, 2, 2)
    flips = torch.where(u(b, 2) < 0.5, -1.0, 1.0)
    scales = 0.7 + 0.6 * u(b, 2)
    m = rot * (flips * scales)[:, None, :]  # R @ diag(flips) @ diag(scales): scales columns
    extent = (locs.max(dim=1).values - locs.min(dim=1).values).clamp(min=1)  # (B, 2)
    t = torch.floor(u(b, 2) * extent.to(torch.float64)).to(torch.int64).clamp(max=extent - 1)
    p = (locs - t[:, None, :]).to(torch.float32)
    return torch.trunc(torch.bmm(p, m.to(torch.float32))).to(torch.int64)


def sample_views(aug_features: torch.Tensor, aug_coords: torch.Tensor, slides: torch.Tensor, k: int,
                 gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One view per entry of `slides` (B,): float32 features (B, k, D) and augmented int64 coordinates
    (B, k, 2) on `device`, gathered straight from the store tensors (S, Naug, Nt, D) / (S, Naug, Nt, 2)."""
    b = slides.shape[0]
    naug, nt = aug_features.shape[1], aug_features.shape[2]
    a = torch.randint(0, naug, (b,), generator=gen, device=gen.device).to(aug_features.device)
    t = torch.randint(0, nt, (b, k), generator=gen, device=gen.device).to(aug_features.device)
    s = slides.to(aug_features.device)
    feats = aug_features[s[:, None], a[:, None], t].to(device, non_blocking=True).float()
    locs = aug_coords[s[:, None], a[:, None], t].to(device, non_blocking=True)
    return feats, spatial_augment(locs, gen)
