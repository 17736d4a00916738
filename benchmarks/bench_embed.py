"""Embedding: gigassl_fast's batched inference against the original's (benchmarks/reference/embed.py),
same slides, same number of views, same run (spec §5.1).

    python benchmarks/bench_embed.py [--slides 50] [--tiles 3000] [--views 100] [--runs 3]

Reference: per slide, the NormalTiler's float64 .npy files loaded, then one view of 5 tiles per forward
(batch of one, eval mode) through the SparseConvNet-equivalent layer4, the views' outputs averaged.
Ours: per slide the HDF5 feature file `encode` writes (float16) read as `embed` reads it, views drawn,
and thousands of views of many slides in one batched forward, as `embed` runs them. Both sides are
checked against SparseConvNet's outputs in the test suite, so this script compares cost only.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile

import numpy as np
import torch
from gigassl_fast.benchmarks.common import bench_device, machine, time_runs, write_json
from gigassl_fast.benchmarks.reference.embed import original_embed, write_normal_dataset
from gigassl_fast.benchmarks.reference.train import OriginalSparseConvMIL

from gigassl_fast import SparseConvMIL
from gigassl_fast.augment import PARAM_COLUMNS
from gigassl_fast.embed import EmbedParams, iter_slides, view_indices
from gigassl_fast.features import write_features
from gigassl_fast.step_inputs import place


@dataclasses.dataclass(frozen=True)
class Settings:
    slides: int = 50
    tiles: int = 3000  # tissue tiles per slide
    views: int = 100
    runs: int = 3
    device: str = "auto"


def run(cfg: Settings) -> dict:
    dev = bench_device(cfg.device)
    s, v, n = cfg.slides, cfg.views, cfg.tiles
    rng = np.random.default_rng(0)
    root = tempfile.mkdtemp(prefix="bench_embed_")
    ids = [f"slide{i}" for i in range(s)]
    feats = [rng.gamma(1.0, 0.5, size=(n, 256)).astype(np.float32) for _ in ids]
    coords = [rng.integers(0, 80, size=(n, 2)) * 896 for _ in ids]
    write_normal_dataset(os.path.join(root, "original"), ids, feats, coords)
    ours_dir = os.path.join(root, "features")
    os.makedirs(ours_dir)
    for i, f, c in zip(ids, feats, coords, strict=True):
        # plain features only (embed reads no augmented ones)
        write_features(os.path.join(ours_dir, f"{i}.h5"),
                       {"coords": c.astype(np.int64), "features": f.astype(np.float16),
                        "indices": np.zeros((0, 1), np.int32), "aug_features": np.zeros((0, 1, f.shape[1]), np.float16),
                        "aug_params": np.zeros((0, len(PARAM_COLUMNS)), np.float32)}, {"slide_id": i})
    torch.manual_seed(0)
    model = SparseConvMIL().to(dev).eval()
    ref_model = OriginalSparseConvMIL().to(dev).eval()
    params = EmbedParams(views=v, with_replacement=True)

    def ours():
        # embed(): every slide's views gathered, then forwarded in batches of `batch_views`.
        gen = torch.Generator().manual_seed(0)
        fs, ls, owner = [], [], []
        for k, (_, f, c, _) in enumerate(iter_slides(ours_dir)):
            idx = torch.stack(view_indices(len(f), params, gen))
            fs.append(torch.from_numpy(f)[idx])
            ls.append(torch.from_numpy(c)[idx])
            owner += [k] * len(idx)
        f_all, l_all = torch.cat(fs), torch.cat(ls)
        out = []
        with torch.inference_mode():
            for start in range(0, len(f_all), params.batch_views):
                where = model.plan(l_all[start:start + params.batch_views], per_view=True, pad=dev.type == "cuda")
                out.append(model(f_all[start:start + params.batch_views].to(dev), place(where, dev)).float().cpu())
        pooled = torch.cat(out)
        return torch.zeros(s, pooled.shape[1]).index_add(0, torch.tensor(owner), pooled) / v

    def reference():
        return original_embed(ref_model, os.path.join(root, "original"), ids, views=v, device=dev)

    t_ours = time_runs(ours, runs=cfg.runs)
    t_ref = time_runs(reference, runs=max(1, cfg.runs // 2), warmup=0)
    speedup = t_ref["median_s"] / t_ours["median_s"]
    print(f"ours       {t_ours['median_s']:8.3f} s  {s / t_ours['median_s']:8.1f} slides/s")
    print(f"reference  {t_ref['median_s']:8.3f} s  {s / t_ref['median_s']:8.1f} slides/s")
    print(f"speedup {speedup:.1f}x  ({s} slides of {n} tiles, {v} views of 5 tiles, device {dev})")
    return {"stage": {"ours_s": t_ours["median_s"], "reference_s": t_ref["median_s"], "speedup": speedup,
                      "unit_rate": {"slides_per_s": s / t_ours["median_s"], "views_per_s": s * v / t_ours["median_s"],
                                    "reference_slides_per_s": s / t_ref["median_s"]}},
            "results": [{"name": "ours", **t_ours}, {"name": "reference", **t_ref}]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=50)
    ap.add_argument("--tiles", type=int, default=3000, help="tissue tiles per slide")
    ap.add_argument("--views", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu or cuda")
    ap.add_argument("--out", default="bench_out/bench_embed.json")
    args = ap.parse_args()
    settings = Settings(**{k: v for k, v in vars(args).items() if k != "out"})
    write_json(args.out, {"benchmark": "embed", "machine": machine(), "config": dataclasses.asdict(settings), **run(settings)})


if __name__ == "__main__":
    main()
