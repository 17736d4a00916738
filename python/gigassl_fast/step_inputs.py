"""What one training step reads, prepared on the host before the step: the two views' store rows and
what the aggregator makes of their locations (sparse-layer4: its plan, every index of the forward),
moved to the device in one pinned, non-blocking copy. The train loop prepares step i + 1 while the
device runs step i, and the step itself then reads nothing back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .aggregators.sparse_plan import SparsePlan, pad_alike
from .runtime import to_device_packed
from .views import StoreRows, draw_views, reads_in_place, view_features

View = tuple[torch.Tensor | StoreRows, torch.Tensor | SparsePlan | None]


@dataclass
class StepInputs:
    """Two views (features, locations or plan), on the device, and the key of their static shapes: steps
    with equal keys have equal shapes (a CUDA graph per key)."""

    views: tuple[View, View]
    key: tuple

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor that changes from step to step (indices; features when copied), in a fixed order:
        what a captured step copies its inputs from. The store itself is not among them."""
        out = []
        for feats, where in self.views:
            out.append(feats.rows if isinstance(feats, StoreRows) else feats)
            if isinstance(where, SparsePlan):
                out.extend(where.index[name] for name in sorted(where.index))
            elif isinstance(where, torch.Tensor):
                out.append(where)
        return out


def place(where: torch.Tensor | SparsePlan, device: torch.device) -> torch.Tensor | SparsePlan:
    """Locations, or a plan's indices, on `device` in one copy."""
    return where.to(device) if isinstance(where, SparsePlan) else where.to(device, non_blocking=True)


def prepare_step(aug_features: torch.Tensor, aug_coords: torch.Tensor, slides: torch.Tensor, k: int,
                 gen: torch.Generator, device: torch.device, aggregator: torch.nn.Module,
                 pad: bool = False) -> StepInputs:
    """Two independent views of each slide (spec §4.1, the draws of ``views.sample_views``) from the store
    tensors (S, Naug, Nt, D) on any device and (S, Naug, Nt, 2) on the host, with the aggregator's plan
    of their locations when it makes one (``plan``); `pad` pads plans to static buckets."""
    device = torch.device(device)
    in_place = reads_in_place(aug_features, device)
    host: dict[str, torch.Tensor] = {}
    parts, copied = [], []
    for v in range(2):
        rows, locs = draw_views(tuple(aug_features.shape[:3]), aug_coords, slides, k, gen)
        parts.append(aggregator.plan(locs, pad=pad))
        if in_place:
            host[f"{v}/rows"] = rows
        else:  # the store did not fit on the device: the views' rows are gathered on the host and copied
            copied.append(view_features(aug_features, rows, device))
    if pad and all(isinstance(p, SparsePlan) for p in parts):
        parts = pad_alike(parts)  # one bucket for both views
    for v, where in enumerate(parts):
        if isinstance(where, SparsePlan):
            host.update({f"{v}/{name}": t for name, t in where.index.items()})
        else:
            host[f"{v}/locs"] = where
    moved = to_device_packed(host, device)
    views, key = [], []
    for v, where in enumerate(parts):
        feats = view_features(aug_features, moved[f"{v}/rows"], device) if in_place else copied[v]
        if isinstance(where, SparsePlan):
            where = where.with_index({name: moved[f"{v}/{name}"] for name in where.index})
            key.append(where.shape_key)
        else:
            where = moved[f"{v}/locs"]
            key.append(tuple(where.shape))
        views.append((feats, where))
    return StepInputs((views[0], views[1]), tuple(key))
