"""Training step: gigassl_fast's train path against the reference way (spec §8.2), same synthetic store,
same model, same batch size, same run.

    python benchmarks/bench_train.py [--slides 1000] [--naug 5] [--nt 64] [--batch-size 256] [--runs 5]

Reference: per-slide per-augmentation .npy files loaded per sample, per-view numpy coordinate
augmentation, Python-dictionary rulebooks, per-offset sparse convolutions. Ours: the packed store in
memory, batched view sampling, tensor rulebooks, the same step (two forwards, NT-Xent, backward, Adam).
Reports views/s (two views per slide) and the ratio, median of --runs steps after a warm-up step.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import bench_device, machine, time_runs, write_json  # noqa: E402
from benchmarks.reference.train import reference_forward, reference_view, write_reference_dataset  # noqa: E402
from gigassl_fast.ssl import nt_xent  # noqa: E402
from gigassl_fast.train import build_model, contrastive_step  # noqa: E402
from gigassl_fast.views import view_pair  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=1000)
    ap.add_argument("--naug", type=int, default=5)
    ap.add_argument("--nt", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu or cuda: both sides run there")
    ap.add_argument("--out", default="bench_out/bench_train.json")
    args = ap.parse_args()
    out = run(args)
    write_json(args.out, {"benchmark": "train", "machine": machine(), "config": vars(args), **out})


def run(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(0)
    s, naug, nt = args.slides, args.naug, args.nt
    feats = rng.gamma(1.0, 0.5, size=(s, naug, nt, 256)).astype(np.float16)
    origin = rng.integers(0, 100, size=(s, 1, 1, 2)) * 896
    coords = origin + rng.integers(0, 60, size=(s, naug, nt, 2)) * 896
    root = tempfile.mkdtemp(prefix="bench_train_")
    write_reference_dataset(root, feats, coords)
    dev = bench_device(getattr(args, "device", "auto"))
    # Ours keeps the packed store on the device, as `train` does when it fits.
    store_f, store_xy = torch.from_numpy(feats).to(dev), torch.from_numpy(coords).to(dev)
    torch.manual_seed(0)
    model = build_model("sparse-layer4", 256).to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    b = args.batch_size

    def ours():
        batch = torch.randint(0, s, (b,), generator=gen)
        v1, v2 = view_pair(store_f, store_xy, batch, 5, gen, dev)
        opt.zero_grad(set_to_none=True)
        contrastive_step(model, v1, v2, 0.05)
        opt.step()

    def reference():
        batch = rng.integers(0, s, b)
        pairs = [(reference_view(root, int(w), naug, rng), reference_view(root, int(w), naug, rng)) for w in batch]
        f1 = np.stack([p[0][0] for p in pairs]).astype(np.float32)
        l1 = np.stack([p[0][1] for p in pairs])
        f2 = np.stack([p[1][0] for p in pairs]).astype(np.float32)
        l2 = np.stack([p[1][1] for p in pairs])
        opt.zero_grad(set_to_none=True)
        loss = nt_xent(reference_forward(model, f1, l1, dev), reference_forward(model, f2, l2, dev), 0.05)
        loss.backward()
        opt.step()

    t_ours = time_runs(ours, runs=args.runs, warmup=1)
    t_ref = time_runs(reference, runs=max(2, args.runs // 2), warmup=1)
    views = 2 * b
    rows = []
    for name, t in (("ours", t_ours), ("reference", t_ref)):
        rows.append({"name": name, **t, "views_per_s": views / t["median_s"]})
        print(f"{name:<10} step {t['median_s'] * 1e3:8.1f} ms   {views / t['median_s']:8.1f} views/s")
    speedup = t_ref["median_s"] / t_ours["median_s"]
    print(f"speedup {speedup:.1f}x  ({s} slides, Naug {naug} x Nt {nt}, batch {b}, device {dev})")
    stage = {"ours_s": t_ours["median_s"], "reference_s": t_ref["median_s"], "speedup": speedup,
             "unit_rate": {"views_per_s": views / t_ours["median_s"], "step_s": t_ours["median_s"],
                           "reference_views_per_s": views / t_ref["median_s"]}}
    return {"stage": stage, "results": rows}


if __name__ == "__main__":
    main()
