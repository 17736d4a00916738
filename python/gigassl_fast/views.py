"""Views of slides for slide-level SimCLR (spec §4.1), sampled for a whole batch at once.

A view of slide s: one of its Naug augmented versions at random, k of that version's Nt tiles with
replacement, then a random spatial augmentation of their level-0 coordinates: rotation by an angle
drawn in U(-180, 180) and used as radians (as the reference), horizontal and vertical flips with
p = 0.5, per-axis scaling U(0.7, 1.3), and a translation drawn per axis in U{0 .. extent - 1}:
p' = trunc(float32(p - t) @ M) with M = R(theta) diag(flips) diag(scales).

When the packed store sits on the device the model runs on, a view's features are not copied out: the
sampler returns the row numbers it picked (``StoreRows``) and the aggregator's first layer reads those
rows straight from the store (the fused gather-GEMM kernels).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class StoreRows(NamedTuple):
    """Tile features given by reference: rows of a (T, D) table picked for each view."""

    table: torch.Tensor  # (T, D), e.g. the packed store's augmented features, float16
    rows: torch.Tensor  # (B, k) int64 row numbers into `table`

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.rows.shape, self.table.shape[1])

    @property
    def device(self) -> torch.device:
        return self.table.device

    def gather(self) -> torch.Tensor:
        """float32 (B, k, D) copy of the rows: for code that needs the features as a tensor."""
        return self.table[self.rows].float()


def tile_features(features: torch.Tensor | StoreRows) -> StoreRows:
    """Either form as StoreRows (a (B, k, D) tensor becomes its own table, rows in order)."""
    if isinstance(features, StoreRows):
        return features
    b, k, d = features.shape
    return StoreRows(features.reshape(b * k, d), torch.arange(b * k, device=features.device).view(b, k))


def augmentation_matrix(theta: torch.Tensor, flips: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """M = R(theta) diag(flips) diag(scales), float32 (B, 2, 2), from angles (B,) used as radians and
    per-axis flips (+-1) and scales (B, 2)."""
    theta = theta.float()
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (B, 2, 2)
    return rot * (flips.float() * scales.float())[:, None, :]  # diagonal factors scale the columns


def apply_spatial(locs: torch.Tensor, matrix: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """p' = trunc(float32(p - t) @ M) per view: int64 (B, k, 2) coordinates, (B, 2, 2) matrices and int64
    (B, 2) translations -> int64 (B, k, 2), truncated toward zero as the reference does."""
    p = (locs - translation[:, None, :]).to(torch.float32)
    return torch.trunc(torch.bmm(p, matrix.to(torch.float32))).to(torch.int64)


def spatial_augment(locs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """int64 (B, k, 2) level-0 coordinates -> augmented int64 (B, k, 2); one transform per view."""
    b = locs.shape[0]
    dev = locs.device

    def u(*shape):
        return torch.rand(*shape, generator=gen, device=gen.device).to(dev)

    theta = u(b) * 360 - 180
    flips = torch.where(u(b, 2) < 0.5, -1.0, 1.0)
    scales = 0.7 + 0.6 * u(b, 2)
    extent = (locs.max(dim=1).values - locs.min(dim=1).values).clamp(min=1)  # (B, 2)
    t = torch.floor(u(b, 2) * extent.to(torch.float64)).to(torch.int64).clamp(max=extent - 1)
    return apply_spatial(locs, augmentation_matrix(theta, flips, scales), t)


def draw_views(store_shape: tuple[int, int, int], aug_coords: torch.Tensor, slides: torch.Tensor, k: int,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One view per entry of `slides` (B,), on the host: the rows (B, k) of the flattened store (S * Naug *
    Nt rows; `store_shape` = (S, Naug, Nt)) the views take, and their augmented int64 level-0 locations
    (B, k, 2), from the store's coordinates (S, Naug, Nt, 2)."""
    b = slides.shape[0]
    _, naug, nt = store_shape
    a = torch.randint(0, naug, (b,), generator=gen, device=gen.device).cpu()
    t = torch.randint(0, nt, (b, k), generator=gen, device=gen.device).cpu()
    s = slides.cpu()
    dev = aug_coords.device
    locs = aug_coords[s[:, None].to(dev), a[:, None].to(dev), t.to(dev)].cpu()
    return (s[:, None] * naug + a[:, None]) * nt + t, spatial_augment(locs, gen)


def sample_views(aug_features: torch.Tensor, aug_coords: torch.Tensor, slides: torch.Tensor, k: int,
                 gen: torch.Generator, device: torch.device, fused: bool = False,
                 ) -> tuple[torch.Tensor | StoreRows, torch.Tensor]:
    """One view per entry of `slides` (B,): features and augmented int64 coordinates (B, k, 2) on `device`,
    drawn from the store tensors (S, Naug, Nt, D) / (S, Naug, Nt, 2) (the draws of ``draw_views``).

    Features: float32 (B, k, D) on `device`; or, with ``fused`` and the store already on `device`, the
    ``StoreRows`` the aggregators read in place (no copy).
    """
    rows, locs = draw_views(tuple(aug_features.shape[:3]), aug_coords, slides, k, gen)
    return view_features(aug_features, rows, device, fused), locs.to(device, non_blocking=True)


def reads_in_place(aug_features: torch.Tensor, device: torch.device) -> bool:
    """Whether views of the store (S, Naug, Nt, D) are read in place (``StoreRows``) by a model on `device`:
    the store sits there, contiguous."""
    want = torch.device(device)
    return aug_features.is_contiguous() and aug_features.device.type == want.type and \
        want.index in (None, aug_features.device.index)


def view_features(aug_features: torch.Tensor, rows: torch.Tensor, device: torch.device,
                  fused: bool = True) -> torch.Tensor | StoreRows:
    """The features of views given by their store rows (B, k): ``StoreRows`` read in place when `fused`
    and the store (S, Naug, Nt, D) sits on `device`, else a float32 (B, k, D) copy on `device`."""
    table = aug_features.reshape(-1, aug_features.shape[-1])  # a view when contiguous
    if fused and reads_in_place(aug_features, device):
        return StoreRows(table, rows.to(aug_features.device, non_blocking=True))
    picked = table[rows.to(table.device)]
    if picked.device.type == "cpu" and torch.device(device).type == "cuda":
        picked = picked.pin_memory()  # so that the copy does not make the host wait
    return picked.to(device, non_blocking=True).float()


def view_pair(aug_features: torch.Tensor, aug_coords: torch.Tensor, slides: torch.Tensor, k: int,
              gen: torch.Generator, device: torch.device) -> tuple[tuple, tuple]:
    """Two independent views of each slide (spec §4.1), with their locations rather than a plan (the
    train loop itself uses ``step_inputs.prepare_step``): features read in place where the store sits
    on `device`, copied otherwise."""
    return (sample_views(aug_features, aug_coords, slides, k, gen, device, fused=True),
            sample_views(aug_features, aug_coords, slides, k, gen, device, fused=True))
