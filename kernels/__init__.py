"""Triton kernels, each beside the pure-torch twin that defines what it computes.

Installed as ``gigassl_fast.kernels``. Triton is imported inside the launchers, so this package
imports on machines without a GPU or Triton; ``availability.triton_status()`` says which path runs.
"""
