"""The reference grid (gigassl check_patch, benchmarks/reference/tiling.py) against the rule stated
independently, on hand-made masks.

Geometry of the hand-made cases: mask level downsample 8, analysis level downsample 4, 16 px patches.
So the level-0 step is 16 * 4 = 64, a grid cell's corner on the mask is its level-0 coordinate / 8
(multiples of 8), the patch on the mask is 16 * 4 / 8 = 8 px, r = 4, and the window tested is the
2r + 1 = 9 px square starting at the corner (it overlaps the next cell's window by one pixel).
"""

import numpy as np
import pytest
from gigassl_fast.benchmarks import bench_tiling
from gigassl_fast.benchmarks.reference.tiling import reference_check_patch_grid

STEP0, MASK_DS, WIN = 64, 8, 9


def pyramid(rows, cols, sx=MASK_DS, sy=MASK_DS):
    """openslide-style dims/downsamples: level 0 is (cols * sx, rows * sy), level 2 is the mask
    (its downsample, which sets the window size, is MASK_DS whatever sx and sy)."""
    w0, h0 = cols * sx, rows * sy
    return [(w0, h0), (w0 // 4, h0 // 4), (cols, rows)], [1.0, 4.0, float(MASK_DS)]


def grid(mask, tol=0.1, sx=MASK_DS, sy=MASK_DS, reader=None):
    dims, downsamples = pyramid(*mask.shape, sx, sy)
    if reader is None:
        def reader():
            return np.zeros((*mask.shape, 3), np.uint8)
    return reference_check_patch_grid(mask, reader, dims, downsamples, mask_level=2, analyse_level=1,
                                      patch_size=16, mask_tolerance=tol)


def as_set(coords):
    return set(map(tuple, np.asarray(coords).tolist()))


def expected(mask, tol):
    """The rule stated on its own: corners every 8 mask px on both axes; keep a corner (row a, col b) when
    the 9x9 window from it lies inside the mask and has tissue fraction > tol; report (x, y) = (8b, 8a)."""
    rows, cols = mask.shape
    keep = set()
    for a in range(0, rows, 8):
        for b in range(0, cols, 8):
            if a + WIN <= rows and b + WIN <= cols and mask[a:a + WIN, b:b + WIN].mean() > tol:
                keep.add((b * MASK_DS, a * MASK_DS))
    return keep


def test_tissue_rectangle_matches_the_rule_stated_independently():
    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 5:50] = 1
    got = grid(mask)
    assert as_set(got) == expected(mask, 0.1)
    # by hand: corner rows 8, 16, 24 and cols 0..48 see > 10% of the rectangle; the row-0 windows
    # (rows 0-8) miss it, the row-32 windows cross the border.
    assert as_set(got) == {(8 * b, 8 * a) for a in (8, 16, 24) for b in (0, 8, 16, 24, 32, 40, 48)}
    # row-major order, (x, y) columns
    assert got.tolist() == sorted(got.tolist(), key=lambda xy: (xy[1], xy[0]))


def test_full_tissue_cells_whose_window_crosses_the_border_are_dropped():
    mask = np.ones((40, 60), np.uint8)
    got = as_set(grid(mask))
    # corner row 32 (32 + 9 > 40) and corner col 56 (56 + 9 > 60) are dropped though all tissue:
    # 4 rows x 7 cols of the 5 x 8 grid.
    assert got == {(8 * b, 8 * a) for a in (0, 8, 16, 24) for b in range(0, 56, 8)}
    assert (8 * 56, 0) not in got and (0, 8 * 32) not in got
    # a mask one pixel taller keeps the whole row-32 line (32 + 9 <= 41)
    got41 = as_set(grid(np.ones((41, 60), np.uint8)))
    assert {(8 * b, 8 * 32) for b in range(0, 56, 8)} <= got41


def test_tolerance_is_strict_and_windows_are_2r_plus_1_wide():
    tol = 9 / 81
    mask = np.zeros((40, 60), np.uint8)
    mask[0:9, 12] = 1  # 9 px inside the window of corner (0, 8) only: fraction exactly 9/81
    assert as_set(grid(mask, tol)) == set()
    assert as_set(grid(mask, tol - 1e-9)) == {(64, 0)}
    mask[0, 13] = 1  # 10/81 > tol
    assert as_set(grid(mask, tol)) == {(64, 0)}
    # column 8 is in the windows of corners (0, 0) and (0, 8) (cols 0-8 and 8-16): both see 9/81
    shared = np.zeros((40, 60), np.uint8)
    shared[0:9, 8] = 1
    assert as_set(grid(shared, 0.1)) == {(0, 0), (64, 0)} == expected(shared, 0.1)


def test_rows_are_y_and_columns_are_x():
    mask = np.zeros((40, 60), np.uint8)  # 40 rows (y), 60 columns (x)
    mask[16:25, 40:49] = 1  # exactly the window of corner row 16, col 40
    assert grid(mask, 0.5).tolist() == [[40 * MASK_DS, 16 * MASK_DS]]  # (x, y) = (320, 128)
    assert grid(mask.T.copy(), 0.5).tolist() == [[16 * MASK_DS, 40 * MASK_DS]]


def test_original_scales_the_row_axis_with_the_widths():
    # Anisotropic pyramid: level 0 is 8x the mask in width, 16x in height. The original builds the grid
    # from (rows, cols) taken as an (x, y) point, so the row axis is scaled with the widths (8) and the
    # column axis with the heights (16): 5 row cells (0..256 step 64 -> mask rows 0..32) and 15 column
    # cells (0..896 step 64 -> mask cols 0, 4, ..., 56).
    mask = np.ones((40, 60), np.uint8)
    got = as_set(grid(mask, sx=8, sy=16))
    rows_kept = [a for a in range(0, 320, 64) if a // 8 + WIN <= 40]  # 0, 64, 128, 192
    cols_kept = [b for b in range(0, 960, 64) if b // 16 + WIN <= 60]  # 0 .. 768 (13 cells)
    assert len(rows_kept) == 4 and len(cols_kept) == 13
    assert got == {(b, a) for a in rows_kept for b in cols_kept}


def test_reads_the_mask_level_once_per_call_and_checks_its_shape():
    mask = np.ones((40, 60), np.uint8)
    calls = []

    def reader():
        calls.append(1)
        return np.zeros((40, 60, 3), np.uint8)

    grid(mask, reader=reader)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="shape"):
        grid(mask, reader=lambda: np.zeros((60, 40, 3), np.uint8))


def test_mask_smaller_than_the_window_keeps_nothing():
    assert grid(np.ones((5, 5), np.uint8)).shape == (0, 2)


def test_real_thumbnail_keeps_mostly_our_tiles():
    from gigassl_fast.synthetic import synthetic_tissue

    thumb = synthetic_tissue(512, 512, seed=1)
    m_ours, c_ours = bench_tiling.ours(thumb, bench_tiling.MASK_DOWNSAMPLE)
    m_ref, c_ref = bench_tiling.reference(thumb, bench_tiling.MASK_DOWNSAMPLE)
    np.testing.assert_array_equal(m_ours, m_ref)
    assert len(c_ref) > 20
    assert bench_tiling.overlap(c_ours, c_ref) > 0.8
    assert bench_tiling.overlap(c_ref, c_ours) > 0.8  # and ours mostly the reference's
