"""The reference way to mask and tile a thumbnail (spec §2; gigassl build_dataset/utils.py).

Mask: scikit-image grey conversion, border clearing, Otsu on 0.02 < grey < 0.98, 2x2 closing then
opening (gigassl ``make_auto_mask``); ``gigassl_fast`` must give the same mask, faster.

Grid: ``reference_check_patch_grid`` follows gigassl ``patch_sampling`` -> ``grid_blob`` ->
``check_patch`` with the same per-cell work and costs: one full-size read of the mask level per call,
then a Python loop over every grid cell with small-array numpy arithmetic, a slice of the mask and its
sum. Its tile rule (a (2r+1)-pixel window from the rounded corner, border cells dropped) is not
``gigassl_fast``'s footprint rule, so its tiles mostly but not exactly match ours.

``reference_tile_grid`` is ``gigassl_fast``'s own footprint rule as a plain Python loop, the oracle that
``tests/test_tile_grid.py`` checks the C++ grid against; it is not the original's cost.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

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


def openslide_like_read(thumbnail: np.ndarray) -> Callable[[], np.ndarray]:
    """What ``np.array(slide.read_region((0, 0), level, dims))[:, :, :3]`` costs once the level is decoded:
    a fresh RGBA image of the whole level, converted to a numpy array, alpha dropped."""
    from PIL import Image

    def read() -> np.ndarray:
        return np.array(Image.fromarray(thumbnail).convert("RGBA"))[:, :, :3]

    return read


def _inside(point: np.ndarray, shape: np.ndarray) -> tuple[int, int]:
    """A slice end point, clamped to [0, shape] only when it falls outside (the original's border check:
    four scalar comparisons per point; the original would then crash on an unimported `warnings`)."""
    a, b = point
    if a < 0 or b < 0 or a > shape[0] or b > shape[1]:
        a, b = min(max(a, 0), shape[0]), min(max(b, 0), shape[1])
    return a, b


def reference_check_patch_grid(mask: np.ndarray, read_mask_level: Callable[[], np.ndarray],
                               level_dims: Sequence[tuple[int, int]], level_downsamples: Sequence[float],
                               mask_level: int, analyse_level: int, patch_size: int = 224,
                               mask_tolerance: float = 0.1) -> np.ndarray:
    """gigassl's grid and tile filter: level-0 (x, y) (openslide order) of the kept tiles, row-major.

    `mask` is the (rows, cols) tissue mask of pyramid level `mask_level`; `level_dims` are openslide's
    (width, height) per level and `level_downsamples` its downsample per level; `read_mask_level` returns
    a fresh copy of the whole mask level as an RGB array (the original reads it once per call, only to
    check its shape). Tiles are `patch_size` pixels square at `analyse_level`.

    The rule, as in the original:
      - the grid starts at 0 and steps by the patch size at level 0 (rounded); its extent is the mask's
        (rows, cols) taken as an (x, y) point and scaled to level 0, so the first grid coordinate runs
        over rows and is scaled with the widths, the second over columns with the heights;
      - each cell's corner is scaled back to the mask level and rounded; r = max(patch at mask level // 2, 1);
        the centre is min(corner + r, mask shape - 1 - r) per axis;
      - the tissue fraction of mask[centre - r : centre + r + 1] (both axes, clamped to the mask) must be
        > mask_tolerance, and the centre must not have been clamped (the window stays inside the mask);
      - a kept cell is stored as (second coordinate, first coordinate), i.e. (x = column, y = row) at level 0.
    """
    rows, cols = mask.shape[:2]
    # patch_sampling: the grid's extent is the mask's shape taken as a point (truncated to int).
    w0, h0 = level_dims[0]
    wm, hm = level_dims[mask_level]
    end_first, end_second = int(rows * float(w0) / wm), int(cols * float(h0) / hm)
    # grid_blob: step = patch size at level 0 (rounded).
    if analyse_level == 0:
        step = patch_size
    else:
        step = round(float(patch_size) * (float(level_downsamples[analyse_level]) / level_downsamples[0]))
    grid = list(itertools.product(range(0, end_first, step), range(0, end_second, step)))

    # check_patch: a full read of the mask level, done once per call.
    level_image = read_mask_level()
    if level_image.shape[:2] != mask.shape[:2]:
        raise ValueError(f"mask shape {mask.shape[:2]} differs from the mask level {level_image.shape[:2]}")
    shape = np.array(mask.shape[:2])
    patch_m = round(float(patch_size) * (float(level_downsamples[analyse_level]) / level_downsamples[mask_level]))
    radius = np.array([max(patch_m // 2, 1), max(patch_m // 2, 1)])
    kept = []
    for first, second in grid:
        # level 0 -> mask level, with the dimensions looked up for every cell as the original does.
        wl, hl = level_dims[mask_level]
        wz, hz = level_dims[0]
        corner = np.array((round(first * wl / float(wz)), round(second * hl / float(hz))))
        centre = np.array([corner + radius, shape - 1 - radius]).min(axis=0)
        r0, c0 = _inside(centre - radius, shape)
        r1, c1 = _inside(centre + radius + 1, shape)
        window = mask[r0:r1, c0:c1]
        n = window.shape[0] * window.shape[1]
        if n and window.sum() / n > mask_tolerance and not (corner + radius != centre).any():
            kept.append((second, first))
    return np.array(kept, np.int64).reshape(-1, 2)


def reference_tile_grid(mask: np.ndarray, width0: int, height0: int, tile0: int, step0: int,
                        min_tissue: float) -> np.ndarray:
    """gigassl_fast's own rule as a Python loop (the oracle for the C++ grid in tests/test_tile_grid.py):
    level-0 (x, y) of tiles whose mask footprint has tissue > min_tissue.

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
