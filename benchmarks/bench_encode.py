"""Tile encoding on a realistic cohort: `gigassl-fast encode` against the original's SharedAugTiler +
NormalTiler (benchmarks/reference/encode.py), same slides, same run (spec §3, §8.2).

    python benchmarks/bench_encode.py [--slides 4] [--tissue-tiles 3000] [--naug 50] [--nt 256]
                                      [--ref-batches 3] [--quick] [--out ...]

Workload: generated 40x-like and 20x-like pyramids (benchmarks/workloads.py), alternating, each with
about `--tissue-tiles` tiles of 224 px at 1 µm/px, kept between runs in --workdir.

Ours: `run_encode` as the CLI runs it (tiling, decoding, the Naug x Nt augmented batches and the plain
pass, resnet18-l3, HDF5 writes), end to end, reported as slides per hour. In the same run: our encoder
alone on tiles already in memory (its ceiling), and the decode, augment and encoder rates inside the run.

Reference: per slide, the original's mask and check_patch grid (run by both of its tilers, so counted
twice), then its DataLoader of 5 workers reading every draw with OpenSlide at level 1, kornia
augmentations and a full float32 NCHW ResNet18. The reference takes about 15 minutes per slide at
50 x 256 on 2 cores, so it runs `--ref-batches` batches of each pass and its time per slide is
extrapolated: the first batch (worker start-up included) plus the median of the others for every
batch left. Both sides use the same random ResNet18 weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from gigassl_fast.benchmarks.common import machine, time_runs, write_json
from gigassl_fast.benchmarks.reference.encode import FullResNet18, extrapolated_seconds, original_encode
from gigassl_fast.benchmarks.reference.tiling import reference_check_patch_grid, reference_otsu_gray_mask
from gigassl_fast.benchmarks.workloads import realistic_cohort

from gigassl_fast.cohort import collect_slides
from gigassl_fast.encode import EncodeParams
from gigassl_fast.encode_pipeline import run_encode
from gigassl_fast.encoders.inference import TileEncoder
from gigassl_fast.features import FeatureFile, features_path
from gigassl_fast.tiling import TileParams, read_tile_file, tile_path

QUICK = {"slides": 2, "tissue_tiles": 60, "naug": 2, "nt": 16, "ref_batches": 2}


def reference_tiling(path: str) -> float:
    """Seconds of the original's make_auto_mask + patch_sampling on this slide (OpenSlide reads)."""
    import openslide

    t = time.perf_counter()
    with openslide.OpenSlide(path) as s:
        ml = s.level_count - 1
        mask, _ = reference_otsu_gray_mask(np.array(s.read_region((0, 0), ml, s.level_dimensions[ml]))[:, :, :3])

        def blank_read() -> np.ndarray:
            # check_patch is given mask_level=-1, which OpenSlide answers with a blank image, not a decode
            return np.array(s.read_region((0, 0), -1, s.level_dimensions[ml]))[:, :, :3]

        reference_check_patch_grid(mask, blank_read, s.level_dimensions, s.level_downsamples, ml, 1, 224, 0.1)
    return time.perf_counter() - t


def encoder_ceiling(enc: TileEncoder, batch_size: int, batches: int = 6) -> float:
    """Tiles/s of our encoder alone on float tiles already in memory at its input size."""
    x = torch.rand(batch_size, 3, enc.config.input_size, enc.config.input_size, device=enc.device)
    t = time_runs(lambda: enc(x), runs=batches, warmup=1)
    return batch_size / t["median_s"]


@dataclasses.dataclass(frozen=True)
class Settings:
    slides: int = 4
    tissue_tiles: int = 3000  # per slide, at 1 µm/px
    naug: int = 50
    nt: int = 256
    runs: int = 1  # end-to-end runs of ours (median)
    ref_batches: int | None = None  # per reference pass and slide (default: 3 on a CPU, 2 x workers + 3 on a GPU)
    ref_workers: int = 5  # the original's DataLoader workers
    quick: bool = False  # QUICK's cohort and 2 x 16 (CI)
    workdir: str | None = None  # where the generated slides are kept (default /tmp/gigassl_bench_workloads)
    device: str = "auto"

    def effective(self) -> Settings:
        """The settings a run uses: QUICK's where `quick` is set."""
        return dataclasses.replace(self, **QUICK) if self.quick else self


def run(cfg: Settings) -> dict:
    cfg = cfg.effective()
    workdir = cfg.workdir or "/tmp/gigassl_bench_workloads"
    paths = realistic_cohort(workdir, n_slides=cfg.slides, tissue_tiles=cfg.tissue_tiles)
    tmp = tempfile.mkdtemp(prefix="bench_encode_")
    weights = os.path.join(tmp, "w.pth")
    torch.manual_seed(0)
    ref_model = FullResNet18()
    torch.save(ref_model.state_dict(), weights)
    params = EncodeParams(encoder="resnet18-l3", weights=weights, naug=cfg.naug, nt=cfg.nt,
                          device=cfg.device, tiles=TileParams(mpp=1.0)).validate()
    entries = collect_slides(paths)

    # ours, end to end as the CLI runs it (a fresh output folder per run: nothing reused)
    summaries = []

    def ours():
        out = os.path.join(tmp, f"ours{len(summaries)}")
        summaries.append(run_encode(entries, params, out, overwrite=True))

    t_ours = time_runs(ours, runs=cfg.runs, warmup=0)
    last = summaries[-1]
    failed = [r.slide_id for r in last.records if r.status != "done"]
    if failed:
        sys.exit(f"encode failed on {failed}: see {last.config['out']}")
    out_dir = last.config["out"]
    n_tiles = {e.slide_id: len(read_tile_file(tile_path(out_dir, e.slide_id)).coords) for e in entries}
    # ours encodes each distinct tile of an augmented batch once: count the encoder's real passes
    passes = 0
    for e in entries:
        with FeatureFile(features_path(out_dir, e.slide_id)) as fh:
            passes += fh.n_tiles + sum(len(np.unique(row)) for row in fh.aug_indices())
    seconds = last.config["throughput"]["seconds"]
    enc = params.tile_encoder()
    ceiling = encoder_ceiling(enc, params.resolved_batch_size())
    total_tiles = sum(n_tiles.values())
    work_tiles = total_tiles + cfg.naug * cfg.nt * len(entries)

    # the reference, slide by slide. Its workers prefetch 2 batches each: on a GPU, where the pass waits
    # on reads, the first batches after the first arrive early, so time more than that first wave there.
    ref_batches = cfg.ref_batches or (3 if enc.device.type == "cpu" else 2 * cfg.ref_workers + 3)
    ref_rows = []
    for e in entries:
        grid = read_tile_file(tile_path(out_dir, e.slide_id)).coords
        t_tile = reference_tiling(e.path)
        out = original_encode(e.path, grid, 1, ref_model, os.path.join(tmp, "ref"), cfg.naug, cfg.nt,
                              enc.device, workers=cfg.ref_workers, aug_batches=ref_batches, plain_batches=ref_batches)
        aug_s = extrapolated_seconds(out["aug_batch_s"], out["aug_batches_total"])
        plain_s = extrapolated_seconds(out["plain_batch_s"], out["plain_batches_total"])
        ref_rows.append({"slide": e.slide_id, "tissue_tiles": n_tiles[e.slide_id], "tiling_s": t_tile,
                         "aug_s": aug_s, "plain_s": plain_s, "total_s": 2 * t_tile + aug_s + plain_s,
                         "aug_batch_s": out["aug_batch_s"], "plain_batch_s": out["plain_batch_s"]})
        print(f"reference {e.slide_id}: {n_tiles[e.slide_id]} tiles, tiling {t_tile:.1f} s x 2, augmented pass "
              f"{aug_s:.0f} s, plain pass {plain_s:.0f} s (from {len(out['aug_batch_s'])} + {len(out['plain_batch_s'])}"
              " batches)")
    shutil.rmtree(tmp, ignore_errors=True)
    ref_s = sum(r["total_s"] for r in ref_rows)
    ours_s = t_ours["median_s"]
    n = len(entries)
    rates = {"slides_per_hour": 3600 * n / ours_s, "tiles_per_s": work_tiles / ours_s,
             "encoder_passes": passes, "encoder_ceiling_tiles_per_s": ceiling,
             "fraction_of_encoder_ceiling": passes / ours_s / ceiling,
             "decode_tiles_per_s": total_tiles / seconds["read"] if seconds["read"] else None,
             "augment_tiles_per_s": cfg.naug * cfg.nt * n / seconds["augment"] if seconds["augment"] else None,
             "encoder_in_run_tiles_per_s": passes / seconds["encode"] if seconds["encode"] else None,
             "reference_slides_per_hour": 3600 * n / ref_s, "reference_tiles_per_s": work_tiles / ref_s}
    speedup = ref_s / ours_s
    print(f"ours       {ours_s:8.1f} s  {rates['slides_per_hour']:7.1f} slides/h  {rates['tiles_per_s']:7.1f} tiles/s "
          f"({100 * rates['fraction_of_encoder_ceiling']:.0f}% of the encoder alone, {ceiling:.0f} tiles/s)")
    print(f"reference  {ref_s:8.1f} s  {rates['reference_slides_per_hour']:7.1f} slides/h (extrapolated)")
    print(f"speedup {speedup:.2f}x  ({n} slides, {total_tiles} tissue tiles, Naug {cfg.naug} x Nt {cfg.nt}, device "
          f"{enc.device}, precision {enc.precision})")
    print("ours by stage: " + ", ".join(f"{k} {v:,.0f}" for k, v in rates.items()
                                        if v and k.endswith("tiles_per_s") and not k.startswith("reference")))
    stage = {"ours_s": ours_s, "reference_s": ref_s, "speedup": speedup, "unit_rate": rates}
    return {"stage": stage, "work_tiles": work_tiles, "tissue_tiles": n_tiles, "seconds_in_run": seconds,
            "precision": enc.precision, "reference": ref_rows,
            "results": [{"name": "ours", **t_ours, "tiles_per_s": work_tiles / ours_s},
                        {"name": "reference", "median_s": ref_s, "extrapolated": True,
                         "tiles_per_s": work_tiles / ref_s}]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--tissue-tiles", type=int, default=3000, help="tissue tiles per slide at 1 µm/px")
    ap.add_argument("--naug", type=int, default=50)
    ap.add_argument("--nt", type=int, default=256)
    ap.add_argument("--runs", type=int, default=1, help="end-to-end runs of ours (median)")
    ap.add_argument("--ref-batches", type=int, default=None,
                    help="batches of each reference pass that run per slide (default: 3 on a CPU, 2 x workers + 3 on a GPU)")
    ap.add_argument("--ref-workers", type=int, default=5, help="the original's DataLoader workers")
    ap.add_argument("--quick", action="store_true", help="a small cohort and 2 x 16 (CI)")
    ap.add_argument("--workdir", default="/tmp/gigassl_bench_workloads", help="where the generated slides are kept")
    ap.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu or cuda: both sides run there")
    ap.add_argument("--out", default="bench_out/bench_encode.json")
    args = ap.parse_args()
    settings = Settings(**{k: v for k, v in vars(args).items() if k != "out"})
    out = run(settings)
    write_json(args.out, {"benchmark": "encode", "machine": machine(), "config": dataclasses.asdict(settings.effective()), **out})


if __name__ == "__main__":
    main()
