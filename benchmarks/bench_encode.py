"""Tile encoding: gigassl_fast's encode against the reference procedure, same slides, same weights,
same run (spec §3, §8.2).

    python benchmarks/bench_encode.py [--naug 50] [--nt 256] [--slides N] [--runs 3] [--out ...]

Reference: every draw read separately, full ResNet18 in float32 with the layer3 hook, one augmentation
draw per batch, plus the plain pass over every tile. Ours: `gigassl_fast.encode.encode_slide` with
resnet18-l3 (each tile decoded once, nothing past layer3, channels_last; bf16 on GPUs). Both use the same
random layer1-3 weights. Prints slides/min and tiles/s for both and the ratio (median of --runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import machine, time_runs, write_json  # noqa: E402
from benchmarks.reference.encode import FullResNet18, reference_encode  # noqa: E402
from gigassl_fast.encode import EncodeParams, TileEncoder, encode_slide  # noqa: E402
from gigassl_fast.slides import Slide  # noqa: E402
from gigassl_fast.synthetic import write_synthetic_slide  # noqa: E402
from gigassl_fast.tiling import TileParams, tile_slide  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--naug", type=int, default=50)
    ap.add_argument("--nt", type=int, default=256)
    ap.add_argument("--slides", type=int, default=1)
    ap.add_argument("--size", type=int, default=6144, help="side of the synthetic slides in pixels (0.5 µm/px)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu or cuda: both sides run there")
    ap.add_argument("--out", default="bench_out/bench_encode.json")
    args = ap.parse_args()
    out = run(args)
    write_json(args.out, {"benchmark": "encode", "machine": machine(), "config": vars(args), **out})


def run(args: argparse.Namespace) -> dict:
    tmp = tempfile.mkdtemp(prefix="bench_encode_")
    paths = [write_synthetic_slide(os.path.join(tmp, f"s{i}.tif"), args.size, args.size, mpp=0.5,
                                   seed=i) for i in range(args.slides)]
    weights = os.path.join(tmp, "w.pth")
    ref_model = FullResNet18()
    torch.save(ref_model.state_dict(), weights)
    params = EncodeParams(encoder="resnet18-l3", weights=weights, naug=args.naug, nt=args.nt, batch_size=64,
                          device=args.device, tiles=TileParams(mpp=1.0)).validate()
    enc = TileEncoder(params)
    ref_model = ref_model.to(enc.device)
    grids = []
    for p in paths:
        with Slide(p) as s:
            grids.append(tile_slide(s, params.tiles))
    n_tiles = sum(len(g.coords) for g in grids)
    work_tiles = n_tiles + args.naug * args.nt * len(paths)

    stage_seconds = []  # per run: seconds spent decoding, augmenting and encoding

    def ours():
        timings = {"read": 0.0, "augment": 0.0, "encode": 0.0}
        for p, g in zip(paths, grids, strict=True):
            with Slide(p) as s:
                encode_slide(s, g.attrs, g.coords, params, enc, os.path.basename(p), timings)
        stage_seconds.append(timings)

    def reference():
        for p, g in zip(paths, grids, strict=True):
            with Slide(p, reader="openslide") as s:
                reference_encode(s, g.coords, int(g.attrs["read_level"]), int(g.attrs["read_tile_size"]), 224,
                                 ref_model, args.naug, args.nt, 0, enc.config.mean, enc.config.std, enc.device)

    # One warm-up call each: the first pays one-time costs (oneDNN primitives; on a GPU the decoding
    # trial, cuDNN's algorithm search and kernel loading). Runs of 50 x 256 are long enough to skip it.
    warm = 0 if args.naug * args.nt > 4096 and enc.device.type == "cpu" else 1
    t_ours = time_runs(ours, runs=args.runs, warmup=warm)
    t_ref = time_runs(reference, runs=args.runs, warmup=warm)
    rows = []
    for name, t in (("ours", t_ours), ("reference", t_ref)):
        rows.append({"name": name, **t, "tiles_per_s": work_tiles / t["median_s"],
                     "slides_per_min": 60 * len(paths) / t["median_s"]})
        print(f"{name:<10} {t['median_s']:8.2f} s  {work_tiles / t['median_s']:8.1f} tiles/s  "
              f"{60 * len(paths) / t['median_s']:6.2f} slides/min")
    speedup = t_ref["median_s"] / t_ours["median_s"]
    print(f"speedup {speedup:.2f}x  ({len(paths)} slides, {n_tiles} tissue tiles, Naug {args.naug} x Nt {args.nt}, "
          f"device {enc.device}, precision {enc.precision}, decoding {enc.decode_note})")
    # Per-stage rates of our path (median over the timed runs): tiles decoded (each tissue tile once),
    # augmented tiles prepared, tiles through the encoder (plain and augmented).
    timed = stage_seconds[-args.runs:]
    aug_tiles = args.naug * args.nt * len(paths)

    def med(key):
        return statistics.median(t[key] for t in timed)

    stage_rates = {"decode_tiles_per_s": n_tiles / med("read") if med("read") else None,
                   "augment_tiles_per_s": aug_tiles / med("augment") if med("augment") else None,
                   "encoder_tiles_per_s": work_tiles / med("encode") if med("encode") else None}
    print("ours by stage: " + ", ".join(f"{k} {v:,.0f}" for k, v in stage_rates.items() if v))
    stage = {"ours_s": t_ours["median_s"], "reference_s": t_ref["median_s"], "speedup": speedup,
             "unit_rate": {"tiles_per_s": work_tiles / t_ours["median_s"],
                           "slides_per_min": 60 * len(paths) / t_ours["median_s"],
                           "reference_tiles_per_s": work_tiles / t_ref["median_s"],
                           **{k: v for k, v in stage_rates.items() if v}}}
    return {"stage": stage, "work_tiles": work_tiles, "results": rows}


if __name__ == "__main__":
    main()
