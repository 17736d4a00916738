"""Type stubs for the compiled core (csrc/)."""

import numpy as np
import numpy.typing as npt

openmp: bool

def otsu_gray_mask(rgb: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.uint8], float]: ...
def otsu_saturation_mask(
    rgb: npt.NDArray[np.uint8], median_ksize: int, close_size: int, min_object_px: int, max_hole_px: int
) -> tuple[npt.NDArray[np.uint8], int]: ...
def tile_grid(
    mask: npt.NDArray[np.uint8], width0: int, height0: int, tile0: int, step0: int, min_tissue: float
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]: ...
def sparse_plan(
    cells: npt.NDArray[np.int64], per_view: bool = False, size: npt.NDArray[np.int64] | None = None, pad: bool = False,
    granule: int = 64,
) -> dict[str, npt.NDArray[np.int64] | int]: ...
