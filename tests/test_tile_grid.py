import numpy as np
import pytest
from gigassl_fast.benchmarks.reference.tiling import reference_tile_grid

from gigassl_fast import _core


@pytest.mark.parametrize("seed", range(25))
def test_grid_matches_python_loop(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 120, size=2)
    mask = (rng.random((h, w)) < rng.uniform(0.05, 0.9)).astype(np.uint8)
    ds = rng.uniform(1, 40)
    width0, height0 = int(w * ds) + int(rng.integers(0, 5)), int(h * ds) + int(rng.integers(0, 5))
    tile0 = int(rng.integers(1, max(2, min(width0, height0))))
    step0 = int(rng.integers(max(1, tile0 // 2), tile0 + 1))
    min_tissue = float(rng.choice([0.0, 0.1, 0.5, 0.9]))
    coords, fractions = _core.tile_grid(mask, width0, height0, tile0, step0, min_tissue)
    ref = reference_tile_grid(mask, width0, height0, tile0, step0, min_tissue)
    np.testing.assert_array_equal(coords, ref)
    assert coords.dtype == np.int64 and fractions.dtype == np.float32
    assert (fractions > min_tissue).all()
    if len(coords):
        assert (coords[:, 0] + tile0 <= width0).all() and (coords[:, 1] + tile0 <= height0).all()
        assert (coords % step0 == 0).all()


def test_full_mask_gives_complete_grid_and_overlap_adds_tiles():
    mask = np.ones((10, 10), np.uint8)
    coords, _ = _core.tile_grid(mask, 1000, 800, 100, 100, 0.1)
    assert len(coords) == 10 * 8
    assert coords[:3].tolist() == [[0, 0], [100, 0], [200, 0]]  # row-major (x, y)
    overlapped, _ = _core.tile_grid(mask, 1000, 800, 100, 50, 0.1)
    assert len(overlapped) == 19 * 15


def test_tile_larger_than_slide_gives_no_tiles():
    coords, fractions = _core.tile_grid(np.ones((5, 5), np.uint8), 100, 100, 200, 200, 0.0)
    assert coords.shape == (0, 2) and fractions.shape == (0,)


def test_min_tissue_threshold_is_strict():
    mask = np.zeros((2, 2), np.uint8)
    mask[0, 0] = 1  # the top-left tile of a 2x2 grid is 100% tissue, the rest 0%
    assert len(_core.tile_grid(mask, 200, 200, 100, 100, 0.0)[0]) == 1
    assert len(_core.tile_grid(mask, 200, 200, 100, 100, 0.99)[0]) == 1
    coords, fractions = _core.tile_grid(mask, 200, 200, 200, 200, 0.25)  # one tile, 25% tissue
    assert len(coords) == 0


def test_bad_grid_arguments():
    with pytest.raises(ValueError, match="step"):
        _core.tile_grid(np.ones((4, 4), np.uint8), 100, 100, 10, 0, 0.1)
    with pytest.raises(ValueError, match="2-D"):
        _core.tile_grid(np.ones((4,), np.uint8), 100, 100, 10, 10, 0.1)
