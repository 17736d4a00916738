"""Slide-level aggregators (MIL encoders) of tile features, in one registry (``--aggregator``)."""

# Importing a module registers its aggregator, in this order: list_aggregators()'s (the default first).
# isort: off
from . import sparse_layer4, mlp, abmil  # noqa: F401
# isort: on
from .registry import Aggregator, build_aggregator, list_aggregators, register_aggregator
from .sparse_layer4 import SparseConvMIL

__all__ = ["Aggregator", "SparseConvMIL", "build_aggregator", "list_aggregators", "register_aggregator"]
