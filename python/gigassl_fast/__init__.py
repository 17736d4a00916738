"""gigassl-fast: Giga-SSL slide embeddings for whole-slide image cohorts."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gigassl-fast")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["SparseConvMIL", "__version__"]


def __getattr__(name: str):
    # Lazy, so that `import gigassl_fast` stays light (no torch) for the tiling stage.
    if name == "SparseConvMIL":
        from .aggregators import SparseConvMIL

        return SparseConvMIL
    raise AttributeError(f"module 'gigassl_fast' has no attribute {name!r}")
