"""Training step: gigassl_fast's train path against the original's (benchmarks/reference/train.py), same
synthetic store, same batch sizes, same run.

    python benchmarks/bench_train.py [--slides 1000] [--naug 10] [--nt 256] [--batch-sizes 64,256] [--runs 5]

Reference: the original's step as it costs: per-sample .npy loads of Nt x 256 float32 files through a
DataLoader (the config's 10 workers, capped by the cores), per-view torch coordinate augmentation,
SparseConvNet-equivalent layer4 with its CPU rulebooks and batch norm over active sites, per-view Python
pooling, the original NT-Xent with its broadcast (2N, 2N, D) similarities, Adam. Ours: the packed store
in memory, batched view sampling, the sparse plan made on the host in C++, gather-GEMMs, the same
model and loss maths.

Reports views/s (two views per slide) both sides per batch size (median of --runs steps after warm-up),
the reference's data wait, and the arithmetic: the step's matrix-product GFLOP (sparse layer4 and
projector, forward and backward, counted from the rulebooks of the sampled views) over its time, against
this machine's float32 and bf16 matmul rates measured in the same run. The reference's GFLOP/s uses
the same count, though SparseConvNet also computes the first layer's input gradient.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import numpy as np
import torch
from gigassl_fast.benchmarks.common import bench_device, machine, matmul_rates, time_runs, write_json
from gigassl_fast.benchmarks.reference.train import (
    OriginalSimCLRMIL,
    corrected_size,
    input_layer,
    original_loader,
    original_step,
    strided_rules,
    submanifold_rules,
    write_reference_dataset,
)

from gigassl_fast.runtime import train_precision
from gigassl_fast.step_inputs import prepare_step
from gigassl_fast.train import build_model
from gigassl_fast.train_step import EagerStep
from gigassl_fast.views import view_pair


def synthetic_store(slides: int, naug: int, nt: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features (S, Naug, Nt, 256) float16, non-negative like pooled ResNet outputs, and level-0 locations
    on a 896 px grid (10x tiles of a 40x scan), tiles of a slide within 60 x 60 cells."""
    rng = np.random.default_rng(seed)
    feats = rng.gamma(1.0, 0.5, size=(slides, naug, nt, 256)).astype(np.float16)
    origin = rng.integers(0, 100, size=(slides, 1, 1, 2)) * 896
    coords = origin + rng.integers(0, 60, size=(slides, naug, nt, 2)) * 896
    return feats, coords


def reference_store(root: str, feats: np.ndarray, coords: np.ndarray) -> str:
    """The original's per-slide folders, written once per size (a 1,000 x 10 store is 2.6 GB)."""
    s, naug, nt = feats.shape[:3]
    path = os.path.join(root, f"store_s{s}_a{naug}_t{nt}")
    done = os.path.join(path, ".complete")
    if not os.path.exists(done):
        write_reference_dataset(path, feats, coords)
        open(done, "w").close()
    return path


def layer_gflop(locations: torch.Tensor) -> tuple[float, float]:
    """Matrix-product GFLOP (2 per MAC) of one forward of sparse layer4 + projector on these views, and
    the part of it in the layers that take the tile features (the stride-2 conv and the shortcut's 1x1),
    whose backward needs no input gradient."""
    locs = locations.cpu().numpy()
    q = locs.astype(np.float32) / np.float32(224)
    cells = np.trunc(q - q.min(axis=1, keepdims=True)).astype(np.int64).reshape(-1, 2)
    batch = np.repeat(np.arange(locs.shape[0]), locs.shape[1])
    size = np.array([corrected_size(int(cells[:, a].max()) + 1) for a in range(2)])
    sites0, _ = input_layer(cells, batch)
    sites1, strided = strided_rules(sites0, size)
    sub = submanifold_rules(sites1)
    first = len(strided) * 256 * 512 + len(sites1) * 256 * 512
    macs = first + 3 * len(sub) * 512 * 512 + locs.shape[0] * (2 * 512 * 512 + 512 * 256)
    return 2 * macs / 1e9, 2 * first / 1e9


def step_gflop(locations: torch.Tensor) -> float:
    """Forward, then backward's weight gradients and input gradients (none for the first layers)."""
    fwd, first = layer_gflop(locations)
    return 3 * fwd - first


@dataclasses.dataclass(frozen=True)
class Settings:
    slides: int = 1000
    naug: int = 10  # augmentation files per slide (the original stores 50)
    nt: int = 256
    batch_sizes: tuple[int, ...] = (64, 256)
    runs: int = 5
    workers: int | None = None  # reference DataLoader workers (default: 10, capped by cores)
    precision: str = "auto"  # ours, as `train --precision`
    workdir: str | None = None  # where the reference store is kept between runs (default /tmp/gigassl_bench_train)
    device: str = "auto"


def run(cfg: Settings) -> dict:
    dev = bench_device(cfg.device)
    sizes = [int(b) for b in cfg.batch_sizes]
    s, naug, nt = cfg.slides, cfg.naug, cfg.nt
    workers = cfg.workers if cfg.workers is not None else min(10, os.cpu_count() or 1)
    feats, coords = synthetic_store(s, naug, nt)
    root = reference_store(cfg.workdir or "/tmp/gigassl_bench_train", feats, coords)
    store_f, store_xy = torch.from_numpy(feats).to(dev), torch.from_numpy(coords).to(dev)
    store_xy_host = torch.from_numpy(coords)
    rates = matmul_rates(dev)
    rows, per_size = [], {}
    for b in sizes:
        torch.manual_seed(0)
        model = build_model("sparse-layer4", 256).to(dev).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        gen = torch.Generator().manual_seed(0)
        bf16 = train_precision(cfg.precision, dev) == "bf16"
        count_gen = torch.Generator().manual_seed(1)
        flops = []
        for _ in range(3):
            v1, v2 = view_pair(store_f, store_xy, torch.randint(0, s, (b,), generator=count_gen), 5, count_gen, dev)
            flops.append(step_gflop(v1[1]) + step_gflop(v2[1]))

        step = EagerStep(model, opt, 0.05, bf16)

        def ours(b=b, gen=gen, step=step, model=model):  # as the train loop: host plan, one copy, the step
            batch = torch.randint(0, s, (b,), generator=gen)
            step(prepare_step(store_f, store_xy_host, batch, 5, gen, dev, model.backbone, pad=dev.type == "cuda"),
                 1e-4).values()

        t_ours = time_runs(ours, runs=cfg.runs, warmup=1)
        gflop = statistics.median(flops)

        # The sparse layer alone (forward and backward of the backbone, no data, no loss).
        batch = torch.randint(0, s, (b,), generator=gen)
        v1, _ = view_pair(store_f, store_xy, batch, 5, gen, dev)

        def layer(model=model, v1=v1, bf16=bf16):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                out = model.backbone(*v1)
            out.float().sum().backward()

        backbone_gflop = step_gflop(v1[1]) - 3 * b * 2 * (2 * 512 * 512 + 512 * 256) / 1e9
        t_layer = time_runs(layer, runs=cfg.runs, warmup=1)

        ref = OriginalSimCLRMIL().to(dev).train()
        ref_opt = torch.optim.Adam(ref.parameters(), lr=0.03)
        loader = original_loader(root, naug, b, workers)
        it = iter(loader)
        phases = {"data_s": [], "step_s": [], "forward_s": [], "backward_s": [], "optimizer_s": []}
        steps_per_epoch = len(loader)
        for i in range(cfg.runs + 2):  # two warm-up steps: worker start-up, first allocations
            t = time.perf_counter()
            try:
                batch_data = next(it)
            except StopIteration:
                it = iter(loader)
                batch_data = next(it)
            t_data = time.perf_counter() - t
            _, parts = original_step(ref, ref_opt, batch_data, i, steps_per_epoch, dev)
            if i >= 2:
                phases["data_s"].append(t_data)
                phases["step_s"].append(time.perf_counter() - t)
                for k, v in parts.items():
                    phases[k].append(v)
        del it, loader
        t_ref = statistics.median(phases["step_s"])
        views = 2 * b
        entry = {
            "batch_size": b,
            "ours": {**t_ours, "views_per_s": views / t_ours["median_s"], "step_gflop": gflop,
                     "gflop_per_s": gflop / t_ours["median_s"], "precision": "bf16" if bf16 else "fp32"},
            "ours_sparse_layer": {**t_layer, "gflop": backbone_gflop, "gflop_per_s": backbone_gflop / t_layer["median_s"]},
            "reference": {"median_s": t_ref, "min_s": min(phases["step_s"]), "max_s": max(phases["step_s"]),
                          "runs": len(phases["step_s"]), "data_wait_median_s": statistics.median(phases["data_s"]),
                          **{f"{k[:-2]}_median_s": statistics.median(phases[k]) for k in ("forward_s", "backward_s",
                                                                                          "optimizer_s")},
                          "views_per_s": views / t_ref, "gflop_per_s": gflop / t_ref, "workers": workers},
            "speedup": t_ref / t_ours["median_s"],
        }
        per_size[b] = entry
        rows += [{"name": "ours", "batch_size": b, **entry["ours"]},
                 {"name": "reference", "batch_size": b, **entry["reference"]}]
        layer_rate = entry["ours_sparse_layer"]["gflop_per_s"]
        print(f"batch {b:4d}: ours {t_ours['median_s'] * 1e3:8.1f} ms ({views / t_ours['median_s']:7.1f} views/s, "
              f"{gflop / t_ours['median_s']:6.1f} GFLOP/s; sparse layer alone {layer_rate:6.1f} GFLOP/s)   "
              f"reference {t_ref * 1e3:8.1f} ms ({views / t_ref:7.1f} views/s, data wait "
              f"{entry['reference']['data_wait_median_s'] * 1e3:.0f} ms, forward {entry['reference']['forward_median_s']:.2f} s, "
              f"backward {entry['reference']['backward_median_s']:.2f} s)   speedup {entry['speedup']:.2f}x")
    print(f"matmul on this machine: {', '.join(f'{k} {v:.3g} GFLOP/s' for k, v in rates.items())}   "
          f"({s} slides, Naug {naug} x Nt {nt}, {workers} reference workers, device {dev})")
    big = per_size[max(sizes)]
    stage = {"ours_s": big["ours"]["median_s"], "reference_s": big["reference"]["median_s"], "speedup": big["speedup"],
             "unit_rate": {"views_per_s": big["ours"]["views_per_s"], "step_s": big["ours"]["median_s"],
                           "reference_views_per_s": big["reference"]["views_per_s"], "batch_size": max(sizes)}}
    return {"stage": stage, "matmul_gflop_per_s": rates, "per_batch_size": {str(k): v for k, v in per_size.items()},
            "results": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=1000)
    ap.add_argument("--naug", type=int, default=10, help="augmentation files per slide (the original stores 50)")
    ap.add_argument("--nt", type=int, default=256)
    ap.add_argument("--batch-sizes", default="64,256")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workers", type=int, default=None, help="reference DataLoader workers (default: 10, capped by cores)")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="ours, as `train --precision`")
    ap.add_argument("--workdir", default="/tmp/gigassl_bench_train", help="where the reference store is kept between runs")
    ap.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu or cuda: both sides run there")
    ap.add_argument("--out", default="bench_out/bench_train.json")
    args = ap.parse_args()
    settings = Settings(**{k: v for k, v in vars(args).items() if k != "out"})
    settings = dataclasses.replace(settings, batch_sizes=tuple(int(b) for b in str(args.batch_sizes).split(",") if b))
    out = run(settings)
    write_json(args.out, {"benchmark": "train", "machine": machine(), "config": dataclasses.asdict(settings), **out})


if __name__ == "__main__":
    main()
