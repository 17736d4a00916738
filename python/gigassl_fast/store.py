"""The store format, ``store.h5``: written by ``pack``, read by ``train`` (`Store`: the augmented arrays
as tensors) and ``embed`` (`StoreFile`: slide by slide), through this module only.

    ids            str (S,)                 slide ids, in store order
    offsets        int64 (S + 1,)           slide s owns rows offsets[s]:offsets[s+1] of coords/features
    coords         int64 (T, 2)             level-0 (x, y) of every tissue tile
    features       float16 (T, D)           plain tile features
    aug/indices    int32 (S, Naug, Nt)      per slide, indices into its own tiles
    aug/coords     int64 (S, Naug, Nt, 2)   coordinates of those tiles (gathered once by pack)
    aug/features   float16 (S, Naug, Nt, D)
    attrs          encoder, out_dim, naug, nt, weights_checksum, tile parameters, version; complete last
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .errors import GigasslError
from .h5files import H5Reader, read_strings

FORMAT = "gigassl-fast/store/1"
REDO = "run `gigassl-fast pack` again (`train` takes a store from `pack`; `embed` a store or feature files)"


class StoreFile(H5Reader):
    """A store opened lazily: ids, offsets and attributes on opening, arrays when asked for them (not a
    complete store of this format, or damaged arrays: one GigasslError naming the file and the fix)."""

    what, format, redo = "store", FORMAT, REDO

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        if not self.complete:
            self.close()
            raise GigasslError(f"{self.path}: an incomplete store (its writer stopped); {REDO}")
        try:
            self.ids = read_strings(self.dataset("ids"))
            self.offsets = self.read("offsets")
        except (OSError, KeyError) as err:
            self.close()
            raise self._damaged("ids", err) from None
        except GigasslError:
            self.close()
            raise

    @property
    def n_slides(self) -> int:
        return len(self.ids)

    def slide(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Slide i's plain features float16 (N, D) and level-0 coordinates int64 (N, 2)."""
        rows = slice(int(self.offsets[i]), int(self.offsets[i + 1]))
        return self.read("features", rows), self.read("coords", rows)

    def aug_features(self) -> np.ndarray:
        return self.read("aug/features")

    def aug_coords(self) -> np.ndarray:
        return self.read("aug/coords")


class Store:
    """A packed store in memory: augmented features and coordinates as tensors.

    Loaded once; ``train`` never touches per-slide files. On a GPU the features go to device memory
    when they fit, otherwise to pinned host memory; the coordinates stay on the host.
    """

    def __init__(self, path: str, device: torch.device | str = "cpu") -> None:
        device = torch.device(device)
        with StoreFile(path) as fh:
            self.attrs, self.ids = fh.attrs, fh.ids
            aug_f = torch.from_numpy(fh.aug_features())
            aug_xy = torch.from_numpy(fh.aug_coords())
        self.path = path
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            aug_f = aug_f.to(device) if aug_f.numel() * 2 < 0.8 * free else aug_f.pin_memory()
        self.aug_features = aug_f  # (S, Naug, Nt, D) float16
        # Coordinates stay on the host: each step's views and their sparse plans are made there.
        self.aug_coords = aug_xy  # (S, Naug, Nt, 2) int64

    @property
    def n_slides(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.aug_features.shape[-1])
