"""Training step of each aggregator: the host's index work per step, and the step itself, eager and (on a
GPU) replayed from CUDA graphs.

    python benchmarks/bench_step.py [--batch-sizes 64,256,1024] [--aggregators sparse-layer4,mlp,abmil] [--runs 5]

Host index work (sparse-layer4, per step, i.e. two view batches of B views x 5 tiles): the plan made in
one C++ call (``_core.sparse_plan``), exact and padded to buckets, and the whole ``prepare_step`` (view
draws, plans, packing; its copy to the device on a GPU); against the rulebook made with tensor ops
(rulebook.build_rules' torch path, what a GPU step ran on the device before the plan) on this
machine's CPU. Step: ``EagerStep`` (as ``train``), and ``GraphedStep`` on a CUDA GPU, views/s = 2B / step
time (median of --runs steps after warm-up; the graphed side's warm-up includes its capture). The store
is synthetic: --slides (512) slides x 10 augmentations x 256 tiles of 256-d, tiles of a slide within 60 x 60 cells.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from gigassl_fast.benchmarks import bench_train
from gigassl_fast.benchmarks.common import bench_device, machine, time_runs, write_json

from gigassl_fast.aggregators import list_aggregators
from gigassl_fast.aggregators import rulebook as rb
from gigassl_fast.aggregators.sparse_plan import plan_cells
from gigassl_fast.runtime import train_precision
from gigassl_fast.step_inputs import prepare_step
from gigassl_fast.train import build_model
from gigassl_fast.train_step import EagerStep, GraphedStep, make_optimizer
from gigassl_fast.views import draw_views


@dataclasses.dataclass
class Settings:
    batch_sizes: tuple[int, ...] = (64, 256, 1024)
    aggregators: tuple[str, ...] = ("sparse-layer4", "mlp", "abmil")
    runs: int = 5
    tiles_per_view: int = 5
    device: str = "auto"
    precision: str = "auto"
    slides: int = 512  # in the synthetic store (10 augmentations x 256 tiles each)


def synthetic_store(slides: int = 512, naug: int = 10, nt: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """bench_train's synthetic store, as tensors."""
    feats, coords = bench_train.synthetic_store(slides, naug, nt)
    return torch.from_numpy(feats), torch.from_numpy(coords)


def _ms(fn, runs: int) -> dict:
    t = time_runs(fn, runs=runs, warmup=2)
    return {"median_ms": 1e3 * t["median_s"], "min_ms": 1e3 * t["min_s"], "max_ms": 1e3 * t["max_s"]}


def host_index_time(feats: torch.Tensor, coords: torch.Tensor, b: int, k: int, runs: int, dev) -> dict:
    """Milliseconds of host index work per step (two view batches) for sparse-layer4."""
    gen = torch.Generator().manual_seed(0)
    slides = torch.randint(0, feats.shape[0], (b,), generator=gen)
    cells = [rb.grid_cells(draw_views(tuple(feats.shape[:3]), coords, slides, k, gen)[1]) for _ in range(2)]
    model = build_model("sparse-layer4", 256).backbone
    out = {
        "plan_cpp_exact": _ms(lambda: [plan_cells(c) for c in cells], runs),
        "plan_cpp_padded": _ms(lambda: [plan_cells(c, pad=True) for c in cells], runs),
        # the rulebook by tensor ops (spatial given: the torch path), as the device used to build it
        "rulebook_tensor_ops": _ms(lambda: [rb.build_rules(c, rb.spatial_size(c)) for c in cells], runs),
        "prepare_step": _ms(lambda: prepare_step(feats, coords, slides, k, gen, dev, model, pad=dev.type == "cuda"),
                            runs),
    }
    plan = plan_cells(cells[0], pad=True)
    out["padded_shapes"] = {"sites": [plan.n_sites, plan.n_sites_pad],
                            "first_pairs_padded": len(plan.index["first_tile"]),
                            "sub_pairs_padded": len(plan.index["sub_src"])}
    return out


def step_time(feats: torch.Tensor, coords: torch.Tensor, name: str, b: int, cfg: Settings, dev, graphed: bool) -> dict:
    torch.manual_seed(0)
    model = build_model(name, 256).to(dev).train()
    opt = make_optimizer(model, 0.0, graphed)
    bf16 = train_precision(cfg.precision, dev) == "bf16"
    step = (GraphedStep if graphed else EagerStep)(model, opt, 0.05, bf16)
    gen = torch.Generator().manual_seed(1)
    pad = dev.type == "cuda"

    def one():
        slides = torch.randint(0, feats.shape[0], (b,), generator=gen)
        step(prepare_step(feats, coords, slides, cfg.tiles_per_view, gen, dev, model.backbone, pad=pad), 1e-4)

    # warm-up: kernel compilation and, graphed, the captures of the buckets a run meets most (2 to 6 of
    # them over 60 steps at B = 64 to 1,024); steps that still meet a new bucket are in the median's spread
    t = time_runs(one, runs=cfg.runs, warmup=12 if graphed else 3)
    out = {"median_ms": 1e3 * t["median_s"], "min_ms": 1e3 * t["min_s"], "max_ms": 1e3 * t["max_s"],
           "views_per_s": 2 * b / t["median_s"], "precision": "bf16" if bf16 else "fp32"}
    if graphed:
        out.update(graphs=len(step.graphs), eager_fallback_steps=step.eager_steps)
    return out


def run(cfg: Settings) -> dict:
    dev = bench_device(cfg.device)
    feats, coords = synthetic_store(cfg.slides)
    feats_dev = feats.to(dev)
    rows = []
    for b in cfg.batch_sizes:
        host = host_index_time(feats_dev, coords, b, cfg.tiles_per_view, cfg.runs, dev)
        row = {"batch_size": b, "host_index_ms": host, "steps": {}}
        print(f"B={b:5d} host: plan C++ {host['plan_cpp_exact']['median_ms']:.2f} ms exact, "
              f"{host['plan_cpp_padded']['median_ms']:.2f} ms padded; rulebook by tensor ops "
              f"{host['rulebook_tensor_ops']['median_ms']:.2f} ms; prepare_step {host['prepare_step']['median_ms']:.2f} ms")
        for name in cfg.aggregators:
            for graphed in ((False, True) if dev.type == "cuda" else (False,)):
                t0 = time.perf_counter()
                r = step_time(feats_dev, coords, name, b, cfg, dev, graphed)
                mode = "graphed" if graphed else "eager"
                row["steps"][f"{name}/{mode}"] = r
                print(f"B={b:5d} {name:14s} {mode:8s} {r['median_ms']:9.2f} ms  {r['views_per_s']:10.0f} views/s "
                      f"({time.perf_counter() - t0:.0f} s)")
        rows.append(row)
    return {"device": str(dev), "results": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="64,256,1024")
    ap.add_argument("--aggregators", default=",".join(Settings.aggregators))
    ap.add_argument("--runs", type=int, default=Settings.runs)
    ap.add_argument("--slides", type=int, default=Settings.slides, help="slides in the synthetic store (>= batch)")
    ap.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu or cuda")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--out", default="bench_out/bench_step.json")
    args = ap.parse_args()
    names = tuple(a for a in args.aggregators.split(",") if a)
    unknown = [a for a in names if a not in list_aggregators()]
    if unknown:
        ap.error(f"--aggregators: unknown {', '.join(unknown)} (known: {', '.join(list_aggregators())})")
    cfg = Settings(batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")), aggregators=names, runs=args.runs,
                   device=args.device, precision=args.precision, slides=args.slides)
    write_json(args.out, {"benchmark": "step", "machine": machine(), "config": dataclasses.asdict(cfg), **run(cfg)})


if __name__ == "__main__":
    main()
