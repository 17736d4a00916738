"""Embedding: gigassl_fast's batched inference against the reference's one view per forward (spec §5.1),
same model, same views, same run.

    python benchmarks/bench_embed.py [--slides 50] [--views 100] [--runs 3]

Both compute, for each slide, the mean over its views of the pooled sparse-layer4 output; the per-view
spatial size makes our batched forward equal the reference's batch-of-one forwards (checked here).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import bench_device, machine, time_runs, write_json  # noqa: E402
from gigassl_fast import SparseConvMIL  # noqa: E402


def run(args: argparse.Namespace) -> dict:
    dev = bench_device(getattr(args, "device", "auto"))
    torch.manual_seed(0)
    model = SparseConvMIL().to(dev).eval()
    g = torch.Generator().manual_seed(0)
    s, v, k = args.slides, args.views, 5
    feats = torch.rand(s, v, k, 256, generator=g).to(dev)
    locs = (torch.randint(0, 40, (s, v, k, 2), generator=g) * 896).to(dev)

    def ours():
        with torch.inference_mode():
            out = model(feats.reshape(s * v, k, 256), locs.reshape(s * v, k, 2), per_view=True)
        return out.view(s, v, -1).mean(1)

    def reference():
        with torch.inference_mode():
            return torch.stack([torch.stack([model(feats[i, j:j + 1], locs[i, j:j + 1])[0] for j in range(v)]).mean(0)
                                for i in range(s)])

    a, b = ours(), reference()
    # tf32 matrix units on GPUs: the two orders of summation agree to about 1e-3 there.
    tol = (1e-4, 1e-5) if dev.type == "cpu" else (3e-3, 1e-4)
    if not torch.allclose(a, b, rtol=tol[0], atol=tol[1]):
        sys.exit("batched and one-view-at-a-time embeddings differ")
    t_ours = time_runs(ours, runs=args.runs)
    t_ref = time_runs(reference, runs=max(1, args.runs // 2), warmup=0)
    speedup = t_ref["median_s"] / t_ours["median_s"]
    print(f"ours       {t_ours['median_s']:8.3f} s  {s / t_ours['median_s']:8.1f} slides/s")
    print(f"reference  {t_ref['median_s']:8.3f} s  {s / t_ref['median_s']:8.1f} slides/s")
    print(f"speedup {speedup:.1f}x  ({s} slides, {v} views of {k} tiles, device {dev})")
    return {"stage": {"ours_s": t_ours["median_s"], "reference_s": t_ref["median_s"], "speedup": speedup,
                      "unit_rate": {"slides_per_s": s / t_ours["median_s"], "views_per_s": s * v / t_ours["median_s"]}},
            "results": [{"name": "ours", **t_ours}, {"name": "reference", **t_ref}]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=50)
    ap.add_argument("--views", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu or cuda")
    ap.add_argument("--out", default="bench_out/bench_embed.json")
    args = ap.parse_args()
    write_json(args.out, {"benchmark": "embed", "machine": machine(), "config": vars(args), **run(args)})


if __name__ == "__main__":
    main()
