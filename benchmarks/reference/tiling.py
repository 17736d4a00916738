"""The reference way to mask and tile a thumbnail (spec §2; gigassl build_dataset/utils.py).

scikit-image grey conversion, border clearing, Otsu on 0.02 < grey < 0.98, 2x2 closing then opening,
and a Python loop over the grid that sums the mask under each tile. ``gigassl_fast`` must give the same
mask and the same tiles, faster.
"""

from __future__ import annotations

import math

import numpy as np


def reference_otsu_gray_mask(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """gigassl make_auto_mask on an RGB uint8 thumbnail: (mask uint8 0/1, threshold or NaN)."""
    from skimage.color import rgb2gray
    from skimage.filters import threshold_otsu
    from skimage.morphology import closing, opening

    gray = rgb2gray(rgb)
    r, c = gray.shape
    pr, pc = r // 30, c // 30
    gray[:pr, :] = 0
    gray[r - pr:, :] = 0
    gray[:, :pc] = 0
    gray[:, c - pc:] = 0
    usable = gray[(gray > 0.02) & (gray < 0.98)]
    if usable.size == 0:  # the reference crashes here; an empty mask is the meaningful answer
        return np.zeros(gray.shape, np.uint8), float("nan")
    t = float(threshold_otsu(usable))
    square = np.ones((2, 2), bool)
    mask = opening(closing((gray < t) & (gray > 0.02), square), square)
    return mask.astype(np.uint8), t


def reference_tile_grid(mask: np.ndarray, width0: int, height0: int, tile0: int, step0: int,
                        min_tissue: float) -> np.ndarray:
    """Python loop over the grid: level-0 (x, y) of tiles whose mask footprint has tissue > min_tissue.

    The footprint of a tile is every mask pixel it touches (at least one), as in gigassl_fast.
    """
    h, w = mask.shape
    sx, sy = w / width0, h / height0
    coords = []
    for y in range(0, height0 - tile0 + 1, step0):
        r0 = min(max(math.floor(y * sy), 0), h - 1)
        r1 = min(max(math.ceil((y + tile0) * sy), r0 + 1), h)
        for x in range(0, width0 - tile0 + 1, step0):
            c0 = min(max(math.floor(x * sx), 0), w - 1)
            c1 = min(max(math.ceil((x + tile0) * sx), c0 + 1), w)
            window = mask[r0:r1, c0:c1]
            if window.sum() / window.size > min_tissue:
                coords.append((x, y))
    return np.array(coords, np.int64).reshape(-1, 2)
