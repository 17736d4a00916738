"""Slide-level aggregators (MIL encoders) of tile features."""

from .sparse_layer4 import SparseConvMIL

__all__ = ["SparseConvMIL"]
