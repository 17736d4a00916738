"""Tissue mask + tile grid: gigassl_fast's C++ core against the reference way (spec §2; gigassl
build_dataset/utils.py ``make_auto_mask`` + ``patch_sampling``/``check_patch``) on the same thumbnails,
same run.

    python benchmarks/bench_tiling.py [--sizes 2048,4096,8192] [--runs 5] [--out bench_out/bench_tiling.json]

Ours: ``_core.otsu_gray_mask`` (the mask) then ``_core.tile_grid`` (level-0 grid of 896 px tiles, step
896, kept when the tissue fraction of the mask pixels the tile touches is > 0.1).

Reference: ``reference_otsu_gray_mask`` (scikit-image, as gigassl ``make_auto_mask``) then
``reference_check_patch_grid`` (gigassl's ``check_patch``: one full read of the mask level, converted
from an RGBA image as openslide's ``read_region`` returns it, then a Python loop over every grid cell with
a (2r+1)-pixel window, tissue fraction > 0.1, cells whose window crosses the mask border dropped). The
thumbnail is modelled as a pyramid: level 0, the analysis level (downsample 4, 224 px tiles = 896 level-0
px) and the mask level (the thumbnail). Not modelled: decoding the levels from the slide file, and
openslide's per-access ctypes lookups of ``level_dimensions`` inside the original loop.

Thumbnails: the sample slides (when ../shared/data/slides exists) at 2 µm/px, and synthetic H&E-like
thumbnails of N x N pixels. Masks must be identical (the script stops if not). The two tile rules differ,
so tiles are compared: both counts and the overlap |ours ∩ reference| / |reference| on level-0 (x, y);
the script stops only when the overlap is below 0.5 (a coordinate-convention bug, not a rule difference).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from gigassl_fast.benchmarks.common import machine, time_runs, write_json
from gigassl_fast.benchmarks.reference.tiling import (
    openslide_like_read,
    reference_check_patch_grid,
    reference_otsu_gray_mask,
)

from gigassl_fast import _core

# Grid geometry for synthetic thumbnails: an 8 µm/px mask of a 0.25 µm/px scan, 224 px tiles at 1 µm/px.
MASK_DOWNSAMPLE = 32
TILE0 = 896
# The reference's tile: 224 px at an analysis level of downsample 4 (level 1 of a 40x svs) = TILE0 at level 0.
PATCH = 224
ANALYSE_DOWNSAMPLE = TILE0 / PATCH
MIN_TISSUE = 0.1
# The overlap under which the two grids cannot be the same grid under two rules.
MIN_OVERLAP = 0.5


def cases(sizes: list[int], samples: str | None = None) -> list[tuple[str, np.ndarray, int]]:
    """(name, thumbnail, level-0 downsample of the thumbnail): the slides of `samples` (files, a folder or a
    manifest with their mpp, e.g. data/sample_slides.csv), then synthetic thumbnails of each size."""
    out = []
    if samples:
        from gigassl_fast.cohort import collect_slides
        from gigassl_fast.slides import Slide

        for entry in collect_slides([samples]):
            with Slide(entry.path, mpp=entry.mpp) as s:
                thumb = s.thumbnail(max(2.0, s.mpp))
                out.append((os.path.basename(entry.path), thumb, s.dimensions[0] / thumb.shape[1]))
    from gigassl_fast.synthetic import synthetic_tissue

    for n in sizes:
        out.append((f"synthetic {n}x{n}", synthetic_tissue(n, n, seed=n), MASK_DOWNSAMPLE))
    return out


def ours(thumb: np.ndarray, ds: float) -> tuple[np.ndarray, np.ndarray]:
    mask, _ = _core.otsu_gray_mask(thumb)
    h, w = mask.shape
    coords, _ = _core.tile_grid(mask, int(w * ds), int(h * ds), TILE0, TILE0, MIN_TISSUE)
    return mask, coords


def pyramid(thumb: np.ndarray, ds: float) -> tuple[list[tuple[int, int]], list[float]]:
    """openslide-style (level_dimensions, level_downsamples): level 0, analysis level 1, mask level 2."""
    h, w = thumb.shape[:2]
    w0, h0 = int(w * ds), int(h * ds)
    dims = [(w0, h0), (round(w0 / ANALYSE_DOWNSAMPLE), round(h0 / ANALYSE_DOWNSAMPLE)), (w, h)]
    return dims, [1.0, ANALYSE_DOWNSAMPLE, (w0 / w + h0 / h) / 2]


def reference(thumb: np.ndarray, ds: float) -> tuple[np.ndarray, np.ndarray]:
    mask, _ = reference_otsu_gray_mask(thumb)
    dims, downsamples = pyramid(thumb, ds)
    coords = reference_check_patch_grid(mask, openslide_like_read(thumb), dims, downsamples, mask_level=2,
                                        analyse_level=1, patch_size=PATCH, mask_tolerance=MIN_TISSUE)
    return mask, coords


def overlap(c_ours: np.ndarray, c_ref: np.ndarray) -> float:
    """|ours ∩ reference| / |reference| on level-0 (x, y); 1.0 when the reference keeps nothing."""
    ref = set(map(tuple, c_ref.tolist()))
    return len(ref & set(map(tuple, c_ours.tolist()))) / len(ref) if ref else 1.0


def run(sizes: list[int], runs: int = 5, samples: str | None = None) -> dict:
    """Times every case; returns the stage summary (totals over the synthetic cases) and the rows."""
    results = []
    print(f"{'thumbnail':<26} {'pixels':>10} {'tiles':>7} {'ref':>7} {'overlap':>8} {'ours ms':>9} {'ref ms':>9} "
          f"{'speedup':>8}")
    for name, thumb, ds in cases(sizes, samples):
        m_ours, c_ours = ours(thumb, ds)
        m_ref, c_ref = reference(thumb, ds)
        if not np.array_equal(m_ours, m_ref):
            sys.exit(f"{name}: masks differ between gigassl_fast and the reference")
        ov = overlap(c_ours, c_ref)
        if ov < MIN_OVERLAP:
            sys.exit(f"{name}: only {ov:.1%} of the reference's {len(c_ref)} tiles are among our {len(c_ours)} "
                     "(a coordinate-convention bug?)")
        t_ours = time_runs(lambda thumb=thumb, ds=ds: ours(thumb, ds), runs=runs)
        t_ref = time_runs(lambda thumb=thumb, ds=ds: reference(thumb, ds), runs=max(3, runs // 2))
        speedup = t_ref["median_s"] / t_ours["median_s"]
        results.append({"case": name, "shape": list(thumb.shape[:2]), "pixels": int(thumb.shape[0] * thumb.shape[1]),
                        "tiles": len(c_ours), "tiles_reference": len(c_ref), "tile_overlap": ov,
                        "masks_identical": True, "ours": t_ours, "reference": t_ref, "speedup": speedup})
        print(f"{name:<26} {thumb.shape[0] * thumb.shape[1]:>10,} {len(c_ours):>7} {len(c_ref):>7} {ov:>8.1%} "
              f"{t_ours['median_s'] * 1e3:>9.1f} {t_ref['median_s'] * 1e3:>9.1f} {speedup:>7.1f}x")
    big = max(results, key=lambda r: r["pixels"])
    stage = {"ours_s": big["ours"]["median_s"], "reference_s": big["reference"]["median_s"], "speedup": big["speedup"],
             "unit_rate": {"case": big["case"], "megapixels_per_s": big["pixels"] / big["ours"]["median_s"] / 1e6,
                           "tiles_per_s": big["tiles"] / big["ours"]["median_s"]}}
    return {"stage": stage, "results": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2048,4096,8192")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--samples", default=None,
                    help="real slides too: files, a folder or a manifest with their mpp (e.g. data/sample_slides.csv)")
    ap.add_argument("--out", default="bench_out/bench_tiling.json")
    args = ap.parse_args()
    out = run([int(s) for s in args.sizes.split(",") if s], args.runs, args.samples)
    report = {"benchmark": "tiling", "machine": machine(), **out}
    write_json(args.out, report)
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; results in {args.out}")


if __name__ == "__main__":
    main()
