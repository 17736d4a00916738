"""The original way to compute slide embeddings (spec §5.1; trislaz/gigassl inference.py), rebuilt so that
it costs what the original costs.

Per slide: the NormalTiler's float64 ``<id>_embeddings.npy`` and ``<id>_xy.npy`` loaded and converted to
float32 tensors, coordinates divided by 4 (as shipped); then, for each view, 5 tiles drawn with
replacement and ONE view forwarded through the sparse layer4 in eval mode (batch of one), its pooled
512-d output read back to the host; the slide's embedding is the mean over its views. The views are the
documented 20 x 5 (the shipped script swaps the two numbers, spec §7.4).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .train import OriginalSparseConvMIL


def write_normal_dataset(root: str, ids: list[str], features: list[np.ndarray], coords: list[np.ndarray]) -> None:
    """tiles/<id>_embeddings.npy and coordinates/<id>_xy.npy, both float64, as NormalTiler writes them."""
    for kind in ("tiles", "coordinates"):
        os.makedirs(os.path.join(root, kind), exist_ok=True)
    for i, f, c in zip(ids, features, coords, strict=True):
        np.save(os.path.join(root, "tiles", f"{i}_embeddings.npy"), f.astype(np.float64))
        np.save(os.path.join(root, "coordinates", f"{i}_xy.npy"), c.astype(np.float64))


def original_embed(model: OriginalSparseConvMIL, root: str, ids: list[str], views: int = 20, ntiles: int = 5,
                   device: torch.device | str = "cpu", coord_divisor: float = 4.0) -> np.ndarray:
    """(len(ids), 512) float: per slide, the mean over `views` one-view forwards of the pooled output."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in ids:
            im = torch.Tensor(np.load(os.path.join(root, "tiles", f"{i}_embeddings.npy")))
            xy = torch.Tensor(np.load(os.path.join(root, "coordinates", f"{i}_xy.npy"))) / coord_divisor
            reps = []
            for _ in range(views):
                sample = torch.randint(0, im.shape[0], (ntiles,))
                reps.append(model(im[sample, :].unsqueeze(0).to(device), xy[sample, :].unsqueeze(0).to(device)).cpu())
            out.append(np.vstack([r[0].numpy() for r in reps]).mean(0))
    return np.vstack(out)
