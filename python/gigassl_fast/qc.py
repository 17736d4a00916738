"""Quality-control pictures: a thumbnail with the tissue outline and the kept tiles drawn on it."""

from __future__ import annotations

import os

import numpy as np

#: QC pictures are enlarged (nearest neighbour) until their long side reaches about this many pixels.
QC_SIZE = 1024


def render_qc(thumbnail: np.ndarray, mask: np.ndarray, coords: np.ndarray, tile0: int,
              width0: int, height0: int) -> np.ndarray:
    """uint8 (H, W, 3): `thumbnail` with the mask outline in green and the tiles as blue boxes.

    Args:
        thumbnail: uint8 (h, w, 3) covering the whole slide (the one the mask was computed on).
        mask: uint8 (h, w) tissue mask.
        coords: int64 (N, 2) level-0 top-left (x, y) of the kept tiles.
        tile0: tile side in level-0 pixels.
        width0, height0: level-0 size of the slide.
    """
    h, w = mask.shape
    k = max(1, QC_SIZE // max(h, w))
    img = np.repeat(np.repeat(thumbnail, k, 0), k, 1).copy()
    big = np.repeat(np.repeat(mask.astype(bool), k, 0), k, 1)
    edge = big & ~(np.roll(big, 1, 0) & np.roll(big, -1, 0) & np.roll(big, 1, 1) & np.roll(big, -1, 1))
    edge |= np.roll(edge, 1, 0) | np.roll(edge, 1, 1)  # two pixels wide, visible when scaled down
    img[edge] = (0, 200, 0)
    sx, sy = img.shape[1] / width0, img.shape[0] / height0
    for x, y in np.asarray(coords, np.int64):
        x0, y0 = int(x * sx), int(y * sy)
        x1 = min(img.shape[1] - 1, max(x0 + 1, int((x + tile0) * sx) - 1))
        y1 = min(img.shape[0] - 1, max(y0 + 1, int((y + tile0) * sy) - 1))
        img[y0, x0:x1 + 1] = img[y1, x0:x1 + 1] = (30, 60, 230)
        img[y0:y1 + 1, x0] = img[y0:y1 + 1, x1] = (30, 60, 230)
    return img


def save_png(path: str, image: np.ndarray) -> None:
    from PIL import Image

    from .outputs import atomic_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_file(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
