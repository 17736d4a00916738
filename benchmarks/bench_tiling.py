"""Tissue mask + tile grid: gigassl_fast's C++ core against the reference way (scikit-image mask and a
Python loop over the grid, spec §2) on the same thumbnails, same run.

    python benchmarks/bench_tiling.py [--sizes 2048,4096,8192] [--runs 5] [--out bench_out/bench_tiling.json]

Thumbnails: the sample slides (when ../shared/data/slides exists) at 2 µm/px, and synthetic H&E-like
thumbnails of N x N pixels. Both paths must give identical masks and identical tile coordinates; the
script stops if they do not.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine, time_runs, write_json  # noqa: E402
from benchmarks.reference.tiling import reference_otsu_gray_mask, reference_tile_grid  # noqa: E402
from gigassl_fast import _core  # noqa: E402

# Grid geometry for synthetic thumbnails: an 8 µm/px mask of a 0.25 µm/px scan, 224 px tiles at 1 µm/px.
MASK_DOWNSAMPLE = 32
TILE0 = 896


def cases(sizes: list[int]) -> list[tuple[str, np.ndarray, int]]:
    """(name, thumbnail, level-0 downsample of the thumbnail)."""
    out = []
    sample = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "slides")
    if os.path.isdir(sample):
        from gigassl_fast.slides import Slide

        for name, mpp in [("cmu_small_region.svs", None), ("fluorescence_dapi.ndpi", None), ("kidney-48-5.tif", 1.0)]:
            with Slide(os.path.join(sample, name), mpp=mpp) as s:
                thumb = s.thumbnail(max(2.0, s.mpp))
                out.append((name, thumb, s.dimensions[0] / thumb.shape[1]))
    from gigassl_fast.synthetic import synthetic_tissue

    for n in sizes:
        out.append((f"synthetic {n}x{n}", synthetic_tissue(n, n, seed=n), MASK_DOWNSAMPLE))
    return out


def ours(thumb: np.ndarray, ds: float) -> tuple[np.ndarray, np.ndarray]:
    mask, _ = _core.otsu_gray_mask(thumb)
    h, w = mask.shape
    coords, _ = _core.tile_grid(mask, int(w * ds), int(h * ds), TILE0, TILE0, 0.1)
    return mask, coords


def reference(thumb: np.ndarray, ds: float) -> tuple[np.ndarray, np.ndarray]:
    mask, _ = reference_otsu_gray_mask(thumb)
    h, w = mask.shape
    return mask, reference_tile_grid(mask, int(w * ds), int(h * ds), TILE0, TILE0, 0.1)


def run(sizes: list[int], runs: int = 5) -> dict:
    """Times every case; returns the stage summary (totals over the synthetic cases) and the rows."""
    results = []
    print(f"{'thumbnail':<26} {'pixels':>10} {'tiles':>7} {'ours ms':>9} {'ref ms':>9} {'speedup':>8}")
    for name, thumb, ds in cases(sizes):
        m_ours, c_ours = ours(thumb, ds)
        m_ref, c_ref = reference(thumb, ds)
        if not (np.array_equal(m_ours, m_ref) and np.array_equal(c_ours, c_ref)):
            sys.exit(f"{name}: masks or tiles differ between gigassl_fast and the reference")
        t_ours = time_runs(lambda thumb=thumb, ds=ds: ours(thumb, ds), runs=runs)
        t_ref = time_runs(lambda thumb=thumb, ds=ds: reference(thumb, ds), runs=max(3, runs // 2))
        speedup = t_ref["median_s"] / t_ours["median_s"]
        results.append({"case": name, "shape": list(thumb.shape[:2]), "pixels": int(thumb.shape[0] * thumb.shape[1]),
                        "tiles": len(c_ours), "identical": True, "ours": t_ours, "reference": t_ref, "speedup": speedup})
        print(f"{name:<26} {thumb.shape[0] * thumb.shape[1]:>10,} {len(c_ours):>7} "
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
    ap.add_argument("--out", default="bench_out/bench_tiling.json")
    args = ap.parse_args()
    out = run([int(s) for s in args.sizes.split(",") if s], args.runs)
    report = {"benchmark": "tiling", "machine": machine(), **out}
    write_json(args.out, report)
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; results in {args.out}")


if __name__ == "__main__":
    main()
