"""gigassl-fast: Giga-SSL slide embeddings for whole-slide image cohorts."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gigassl-fast")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
