"""The feature-file format, ``features/<slide_id>.h5``: written by ``encode``, read by ``pca``, ``pack``,
``embed`` and ``probe --baseline`` through `FeatureFile` only.

    coords         int64 (N, 2)          level-0 top-left (x, y) of every tissue tile
    features       float16 (N, D)        every tile, no augmentation (what ``embed`` reads)
    aug/indices    int32 (Naug, Nt)      tiles drawn with replacement for augmented version a
    aug/features   float16 (Naug, Nt, D) batch a encoded under augmentation a
    aug/params     float32 (Naug, 13)    the augmentation parameters (columns: augment.PARAM_COLUMNS)
    corrupt_coords int64 (K, 2)          tiles left out for corrupt image data (--on-corrupt-tile skip)
    attrs          the tile file's attributes plus encoder, weights checksum, Naug, Nt, seed, compute
                   precision, device, version; ``complete`` last (CLAM/TRIDENT names for the first two).
"""

from __future__ import annotations

import glob
import os

import numpy as np

from .augment import PARAM_COLUMNS
from .errors import GigasslError
from .h5files import H5Reader, atomic_h5, write_attrs

FORMAT = "gigassl-fast/features/1"
#: What to do about a feature file that cannot be read.
REDO = "rerun `gigassl-fast encode` for its slide (or give encode's --out folder or its features/)"


def features_path(out_dir: str, slide_id: str) -> str:
    """Where ``encode --out OUT`` writes a slide's feature file."""
    return os.path.join(out_dir, "features", f"{slide_id}.h5")


def write_features(path: str, arrays: dict, attrs: dict) -> None:
    """Writes one slide's arrays (keys: coords, features, indices, aug_features, aug_params and optionally
    corrupt_coords) atomically."""
    nbytes = sum(a.nbytes for a in arrays.values() if isinstance(a, np.ndarray))
    with atomic_h5(path, nbytes) as fh:
        fh.create_dataset("coords", data=arrays["coords"])
        fh.create_dataset("corrupt_coords", data=arrays.get("corrupt_coords", np.zeros((0, 2), np.int64)))
        fh.create_dataset("features", data=arrays["features"])
        g = fh.create_group("aug")
        g.create_dataset("indices", data=arrays["indices"])
        g.create_dataset("features", data=arrays["aug_features"])
        g.create_dataset("params", data=arrays["aug_params"])
        g.attrs["param_columns"] = ",".join(PARAM_COLUMNS)
        write_attrs(fh, {**attrs, "format": FORMAT})


def feature_folder(path: str) -> str:
    """The folder holding the feature files: `path` itself, or ``path/features`` when `path` is the
    output folder of ``encode --out`` (what encode prints is accepted either way)."""
    if not os.path.isdir(path):
        raise GigasslError(f"{path}: not a folder; give encode's output folder or its features/ subfolder")
    inner = os.path.join(path, "features")
    # encode's --out folder may hold other .h5 files too (a store, embeddings): its features/ wins
    if glob.glob(os.path.join(inner, "*.h5")):
        return inner
    return path


def feature_files(path: str) -> list[str]:
    """The feature files of `path` (encode's output folder or its features/), sorted; an error if none."""
    folder = feature_folder(path)
    files = sorted(glob.glob(os.path.join(folder, "*.h5")))
    if not files:
        raise GigasslError(f"{path}: no feature files (*.h5) in it or in its features/ subfolder; run "
                           "`gigassl-fast encode` first")
    return files


class FeatureFile(H5Reader):
    """One feature file, opened lazily: its attributes on opening, each array when asked for it (a file
    that cannot be read, or of another format, is one GigasslError naming it and the fix)."""

    what, format, redo = "feature file", FORMAT, REDO

    @property
    def slide_id(self) -> str:
        return str(self.attrs.get("slide_id", os.path.splitext(os.path.basename(self.path))[0]))

    @property
    def n_tiles(self) -> int:
        return int(self.dataset("coords").shape[0])

    @property
    def dim(self) -> int:
        return int(self.dataset("features").shape[1])

    def coords(self) -> np.ndarray:
        return self.read("coords")

    def features(self, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Plain tile features, float16 (N, D); `rows` (sorted indices or a slice) reads only those."""
        return self.read("features", rows)

    def aug_indices(self) -> np.ndarray:
        return self.read("aug/indices")

    def aug_features(self) -> np.ndarray:
        return self.read("aug/features")

    def aug_params(self) -> np.ndarray:
        return self.read("aug/params")

    def corrupt_coords(self) -> np.ndarray:
        """Tiles left out for corrupt image data; files written before this array existed have none."""
        return self.read("corrupt_coords") if self.has("corrupt_coords") else np.zeros((0, 2), np.int64)

    def arrays(self) -> dict:
        """Every array and the attributes, in memory."""
        return {"coords": self.coords(), "features": self.features(), "aug_indices": self.aug_indices(),
                "aug_features": self.aug_features(), "aug_params": self.aug_params(),
                "corrupt_coords": self.corrupt_coords(), "attrs": dict(self.attrs)}


def read_features(path: str | os.PathLike) -> dict:
    """Every array and the attributes of one feature file (`FeatureFile.arrays`)."""
    with FeatureFile(path) as f:
        return f.arrays()
