"""GPU check: the encode stage's GPU path against the CPU path on the same slide (decode and encode rates
measured separately), every Triton kernel against its torch twin (error and time), and a 256-slide
training step. Run on a machine with a CUDA GPU (see gpu_check.sh).

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
    ok = check_kernels() and ok
    time_train_step()
    sys.exit(0 if ok else 1)


def check_kernels() -> bool:
    """Each kernel against its twin on random inputs: relative error, and median time of both."""
    import triton.testing
    from gigassl_fast.kernels import sparse_bag as sb

    dev = torch.device("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(200_000, 256, device=dev, generator=g).half()
    rows = torch.randint(0, 200_000, (256 * 5,), device=dev, generator=g)
    w = torch.randn(256, 512, device=dev, generator=g)
    b = torch.randn(512, device=dev, generator=g)
    y = torch.randn(3000, 9, 512, device=dev, generator=g)
    src = torch.randint(0, 3000, (7000,), device=dev, generator=g)
    dst = torch.randint(0, 2500, (7000,), device=dev, generator=g)
    tap = torch.randint(0, 9, (7000,), device=dev, generator=g)
    scores = torch.randn(1280, device=dev, generator=g)
    values = torch.randn(1280, 512, device=dev, generator=g)
    ptr = torch.arange(0, 1281, 5, device=dev)
    cases = [
        ("gather_gemm", lambda: sb.gather_gemm_triton(x, rows, w), lambda: sb.gather_gemm_reference(x, rows, w)),
        ("gather_linear_relu", lambda: sb.gather_gemm_triton(x, rows, w, bias=b, relu=True),
         lambda: sb.gather_linear_relu_reference(x, rows, w, b)),
        ("tap_scatter", lambda: sb.tap_scatter_triton(y, src, dst, tap, 2500),
         lambda: sb.tap_scatter_reference(y, src, dst, tap, 2500)),
        ("segment_softmax_pool", lambda: sb.segment_softmax_pool_triton(scores, values, ptr),
         lambda: sb.segment_softmax_pool_reference(scores, values, ptr)),
    ]
    ok = True
    print(f"{'kernel':<22} {'rel err':>9} {'triton ms':>10} {'twin ms':>9}")
    for name, kern, twin in cases:
        a, r = kern().double(), twin().double()
        err = ((a - r).norm() / r.norm()).item()
        ok &= err < 1e-2
        tk = triton.testing.do_bench(kern, return_mode="median")
        tt = triton.testing.do_bench(twin, return_mode="median")
        print(f"{name:<22} {err:9.2e} {tk:10.3f} {tt:9.3f}")
    return ok


def time_train_step() -> None:
    from gigassl_fast.train import build_model, contrastive_step
    from gigassl_fast.views import sample_views

    dev = torch.device("cuda")
    store_f = torch.randn(1000, 5, 64, 256, device=dev).half()
    store_xy = torch.randint(0, 100_000, (1000, 5, 64, 2), device=dev)
    model = build_model("sparse-layer4", 256).to(dev).train()
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    gen = torch.Generator().manual_seed(0)

    def step():
        batch = torch.randint(0, 1000, (256,), generator=gen)
        v1 = sample_views(store_f, store_xy, batch, 5, gen, dev)
        v2 = sample_views(store_f, store_xy, batch, 5, gen, dev)
        opt.zero_grad(set_to_none=True)
        contrastive_step(model, v1, v2, 0.05)
        opt.step()

    ms = 1000 / rate(step, 1)
    print(f"training step, batch 256 (512 views): {ms:.1f} ms, {512 / ms * 1000:,.0f} views/s")


if __name__ == "__main__":
    main()
