"""GPU check for the encode stage: the GPU path against the CPU path on the same slide, and the decode
and encode rates measured separately. Run on a machine with a CUDA GPU (see gpu_check.sh).

    python benchmarks/gpu_check.py [--slide PATH] [--tiles 512]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gigassl_fast.compute import report  # noqa: E402
from gigassl_fast.encode import EncodeParams, TileEncoder  # noqa: E402
from gigassl_fast.slides import Slide  # noqa: E402
from gigassl_fast.synthetic import write_synthetic_slide  # noqa: E402
from gigassl_fast.tiling import TileParams, tile_slide  # noqa: E402


def rate(fn, n_tiles: int, repeats: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return n_tiles / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slide", default=None)
    ap.add_argument("--tiles", type=int, default=512)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device")
    print(report())
    path = args.slide or write_synthetic_slide(os.path.join(tempfile.mkdtemp(), "gpu.tif"), 8192, 8192, mpp=0.25, seed=1)
    params = TileParams(mpp=0.5, tile_size=224, min_tissue=0.0)
    with Slide(path) as s:
        grid = tile_slide(s, params)
        coords = grid.coords[: args.tiles]
        level, size = int(grid.attrs["read_level"]), int(grid.attrs["read_tile_size"])
        gpu = TileEncoder(EncodeParams(encoder="efficientnet-lite0", device="cuda", tiles=params))
        cpu = TileEncoder(EncodeParams(encoder="efficientnet-lite0", device="cpu", precision="fp32", tiles=params))
        print(f"decode path on the GPU: {gpu.decode_note}")
        tiles_gpu = gpu.decode(s, coords, level, size, 8)
        tiles_cpu = s.backend.read_regions_torch(coords, level, size, size, torch.device("cpu"), 8)
        diff = (tiles_gpu.cpu().float() - tiles_cpu.float()).abs().mean().item()
        print(f"decode GPU vs CPU: mean |diff| {diff:.3f} grey levels over {len(coords)} tiles")
        x_gpu = tiles_gpu[:64].permute(0, 3, 1, 2).float().div(255)
        x_cpu = tiles_cpu[:64].permute(0, 3, 1, 2).float().div(255)
        f_gpu, f_cpu = gpu(x_gpu), cpu(x_cpu)
        rel = ((f_gpu - f_cpu).norm() / f_cpu.norm()).item()
        print(f"encoder bf16 GPU vs fp32 CPU: relative error {rel:.2e} (bf16: expect 1e-3 to 1e-2)")
        ok = diff < 2.0 and rel < 3e-2 and np.isfinite(rel)
        decode_rate = rate(lambda: gpu.decode(s, coords, level, size, 8), len(coords))
        batch = tiles_gpu[:256].permute(0, 3, 1, 2).float().div(255)
        encode_rate = rate(lambda: gpu(batch), len(batch))
        print(f"decode {decode_rate:,.0f} tiles/s   encode {encode_rate:,.0f} tiles/s   "
              f"({torch.cuda.get_device_name(0)})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
