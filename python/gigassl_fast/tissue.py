"""Tissue masks on slide thumbnails (the C++ core does the work)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from . import _core
from .errors import GigasslError

MASK_METHODS = ("otsu-gray", "otsu-saturation")


@dataclass(frozen=True)
class MaskParams:
    """How the tissue mask is computed.

    Args:
        method: ``otsu-gray`` (the Giga-SSL reference, spec §2) or ``otsu-saturation`` (CLAM family).
        mask_mpp: microns per pixel of the thumbnail the mask is computed on.
        median_ksize, close_size: otsu-saturation filters, in thumbnail pixels.
        min_object_um2, max_hole_um2: otsu-saturation clean-up: tissue pieces smaller than this are
            dropped and holes smaller than this filled; in square microns, so they do not depend on
            the thumbnail's scale.
    """

    method: str = "otsu-gray"
    mask_mpp: float = 8.0
    median_ksize: int = 7
    close_size: int = 4
    min_object_um2: float = 20000.0
    max_hole_um2: float = 20000.0

    def validate(self) -> MaskParams:
        if self.method not in MASK_METHODS:
            raise GigasslError(f"--mask-method must be one of {', '.join(MASK_METHODS)} (got {self.method!r})")
        if not self.mask_mpp > 0:
            raise GigasslError(f"--mask-mpp must be > 0 (got {self.mask_mpp})")
        return self

    def as_attrs(self) -> dict:
        """Only the parameters the method uses, so unrelated defaults do not invalidate old files."""
        d = asdict(self)
        if self.method == "otsu-gray":
            for key in ("median_ksize", "close_size", "min_object_um2", "max_hole_um2"):
                d.pop(key)
        return d


def tissue_mask(thumbnail: np.ndarray, params: MaskParams, thumb_mpp: float | None = None) -> tuple[np.ndarray, float]:
    """Binary tissue mask of an RGB thumbnail.

    Args:
        thumbnail: uint8 (H, W, 3).
        params: the method and its parameters.
        thumb_mpp: microns per thumbnail pixel (defaults to ``params.mask_mpp``), used to turn the
            µm² areas of otsu-saturation into pixels.

    Returns:
        (mask uint8 (H, W) of 0/1, Otsu threshold: grey level in [0, 1] for otsu-gray, NaN when the
        thumbnail has no usable pixel; saturation 0..255 for otsu-saturation).
    """
    thumbnail = np.ascontiguousarray(thumbnail, dtype=np.uint8)
    if params.method == "otsu-gray":
        mask, threshold = _core.otsu_gray_mask(thumbnail)
        return mask, float(threshold)
    px_area = (thumb_mpp or params.mask_mpp) ** 2
    mask, threshold = _core.otsu_saturation_mask(
        thumbnail, params.median_ksize, params.close_size,
        int(round(params.min_object_um2 / px_area)), int(round(params.max_hole_um2 / px_area)))
    return mask, float(threshold)
