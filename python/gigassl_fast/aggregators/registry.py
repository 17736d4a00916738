"""One registry of slide aggregators: a name and an ``Aggregator`` class, filled by a decorator (as the
tile encoders' registry)."""

from __future__ import annotations

import difflib

import torch
from torch import nn

from ..errors import GigasslError


class Aggregator(nn.Module):
    """What every registered aggregator shares: features (B, k, D) or ``StoreRows`` and locations
    (B, k, 2) -> (B, 512), built from a name and the tiles' feature dimension."""

    #: Whether ``forward`` takes ``per_view=True``: each view computed as if it were alone in its batch
    #: (an aggregator whose output depends on the batch, as sparse-layer4's spatial size does); ``embed``
    #: then runs views of many slides together without changing any view's embedding.
    per_view_inference = False

    @classmethod
    def build(cls, in_dim: int, resnet18_state: dict | None = None) -> Aggregator:
        """The aggregator on `in_dim`-d tile features; `resnet18_state` (a torchvision ResNet18 state dict)
        is used by aggregators that start from ResNet18 weights, ignored by the others."""
        return cls(in_dim)

    def plan(self, locations: torch.Tensor, per_view: bool = False, pad: bool = False) -> torch.Tensor | object:
        """What ``forward`` takes as its locations, made on the host from the views' level-0 locations
        (B, k, 2) before a step, so that the step reads nothing back: the locations themselves by default;
        sparse-layer4 returns the plan of every index its forward needs. `pad`: static shapes (buckets)."""
        return locations

    def configure_distributed(self) -> None:
        """Called by training when several processes train one model with batch-norm statistics over all
        of them (``train --sync-bn`` under torch.distributed), once the model is on its device: whatever
        else the forward computes over the batch is then computed over every process's batch. Nothing to
        do by default."""


_REGISTRY: dict[str, type[Aggregator]] = {}


def register_aggregator(name: str):
    """Class decorator: registers an ``Aggregator`` subclass under `name` (``--aggregator``)."""

    def wrap(cls: type[Aggregator]) -> type[Aggregator]:
        if not (isinstance(cls, type) and issubclass(cls, Aggregator)):
            raise TypeError(f"aggregator {name!r}: {cls!r} is not an Aggregator subclass")
        if name in _REGISTRY:
            raise ValueError(f"aggregator {name!r} registered twice")
        _REGISTRY[name] = cls
        return cls

    return wrap


def list_aggregators() -> list[str]:
    """The registered names, in registration order (the default, sparse-layer4, first)."""
    return list(_REGISTRY)


def build_aggregator(name: str, in_dim: int, resnet18_state: dict | None = None) -> Aggregator:
    """The aggregator `name` on `in_dim`-d tile features (train mode, as built by torch)."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise GigasslError(f"--aggregator: unknown aggregator {name!r}{hint} (known: {', '.join(list_aggregators())})")
    return _REGISTRY[name].build(in_dim, resnet18_state)
