"""Tile decoding: the JPEG tile engine against cuCIM's batched ``read_regions``, OpenSlide and the raw
libjpeg-turbo decoder, on the realistic slides of ``workloads.py``, same run.

    python benchmarks/bench_decode.py [--tissue-tiles 3000] [--runs 3] [--out bench_out/bench_decode.json]

The regions are what ``encode`` decodes: the tissue tile grid of the tile stage's defaults (224 px at
1 µm/px), read at the slide's read level: exactly at level 1 of the 40x-like slide (0.25 µm/px, 224-px
regions on 256-px JPEG tiles), at level 0 of the 20x-like one (0.5 µm/px, 448-px regions, resized later).
Each is timed on one thread and on every core:

    engine     ``Slide.region_batches`` in batches of 64 (what encode runs): each tile fetched and decoded
               once over the pass, regions copied out of the decoded tiles
    cucim      ``read_regions`` of cuCIM (batch 64, its worker threads): every tile a region touches,
               decoded for that region
    openslide  ``read_region`` per region (one thread; a sample of the regions)
    raw        simplejpeg (libjpeg-turbo) decoding, from memory, each source tile the regions touch, once:
               the decoder's own cost for the work, nothing else (no file reads, no copies)

Rates are regions per second (raw: regions per second of decoding what they need). Goals (issue 13): the
engine >= 90% of raw per core, >= 3.5x cuCIM at level-exact reads, >= 1.7x from 1 to 2 threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gigassl_fast.benchmarks.common import machine, time_runs, write_json
from gigassl_fast.benchmarks.workloads import realistic_cohort

from gigassl_fast.slides import Slide
from gigassl_fast.slides.backends import OpenSlideBackend
from gigassl_fast.tiling import TileParams, tile_slide

BATCH = 64
#: Regions OpenSlide reads per run (it is timed on a sample: at 150-550 regions/s the whole grid is slow).
OPENSLIDE_SAMPLE = 400


def engine_pass(slide: Slide, xy: np.ndarray, level: int, size: int, workers: int) -> None:
    for _, err in slide.region_batches(xy, level, size, size, BATCH, workers):
        if err is not None:
            raise SystemExit(f"{slide.path}: {err}")


def raw_streams(slide: Slide, xy: np.ndarray, level: int, size: int) -> list[bytes]:
    """The complete JPEG streams of every source tile the regions touch, read into memory."""
    engine = slide.engine
    regions = slide.region_pass(xy, level, size, size)
    lv = regions.level
    tiles = sorted({t for i in range(len(xy)) for t in regions.tiles_of(i)})
    return [engine.tile_stream(lv, t) for t in tiles if lv.counts[t]]


def raw_decode(streams: list[bytes], workers: int) -> None:
    import simplejpeg

    def one(data: bytes) -> None:
        simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)

    if workers == 1:
        for data in streams:
            one(data)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, streams, chunksize=16))


def timed_readers(s: Slide, xy: np.ndarray, level: int, size: int, streams: list[bytes], threads: list[int],
                  runs: int):
    """(reader_threads, timing, regions) for each reader and thread count."""
    sample = xy[:OPENSLIDE_SAMPLE]
    osl = OpenSlideBackend(s.path)
    readers = [("engine", lambda w: engine_pass(s, xy, level, size, w), len(xy), threads),
               ("cucim", lambda w: s.backend.read_regions(xy, level, size, size, w), len(xy), threads),
               ("raw", lambda w: raw_decode(streams, w), len(xy), threads),
               ("openslide", lambda w: [osl.read_region(int(x), int(y), level, size, size) for x, y in sample],
                len(sample), [1])]
    try:
        for name, fn, count, ws in readers:
            for w in ws:
                yield f"{name}_{w}t", time_runs(lambda w=w, fn=fn: fn(w), runs=runs, warmup=1), count
    finally:
        osl.close()


@dataclasses.dataclass(frozen=True)
class Settings:
    tissue_tiles: int = 3000  # per slide, at 1 µm/px
    runs: int = 3
    workdir: str | None = None  # where the generated slides are kept (default /tmp/gigassl_bench_workloads)


def run(cfg: Settings) -> dict:
    cores = os.cpu_count() or 1
    threads = sorted({1, cores})
    workdir = cfg.workdir or "/tmp/gigassl_bench_workloads"
    paths = realistic_cohort(workdir, 2, cfg.tissue_tiles, ("40x", "20x"))
    results = []
    for path in paths:
        kind = "40x" if "_40x_" in os.path.basename(path) else "20x"
        with Slide(path) as s:
            grid = tile_slide(s, TileParams())
            level, size = grid.read_level, grid.read_tile_size
            xy = grid.coords
            assert s.decode_path(level)[0].startswith("libjpeg-turbo"), s.decode_path(level)
            streams = raw_streams(s, xy, level, size)
            n = len(xy)
            row = {"slide": kind, "path": path, "regions": n, "source_tiles": len(streams), "level": level,
                   "region_px": size, "rates": {}, "timings": {}}
            for key, t, count in timed_readers(s, xy, level, size, streams, threads, cfg.runs):
                row["timings"][key] = t
                row["rates"][key] = count / t["median_s"]
                print(f"{kind} {key:<14} {count / t['median_s']:9.0f} regions/s  (median of {cfg.runs}, "
                      f"{t['min_s']:.2f}-{t['max_s']:.2f} s)", flush=True)
            r = row["rates"]
            row["ratios"] = {
                "engine_vs_raw_1t": r["engine_1t"] / r["raw_1t"],
                "engine_vs_cucim_1t": r["engine_1t"] / r["cucim_1t"],
                f"engine_vs_cucim_{cores}t": r[f"engine_{cores}t"] / r[f"cucim_{cores}t"],
                "engine_vs_openslide_1t": r["engine_1t"] / r["openslide_1t"],
                f"engine_scaling_1_to_{cores}t": r[f"engine_{cores}t"] / r["engine_1t"],
                f"raw_scaling_1_to_{cores}t": r[f"raw_{cores}t"] / r["raw_1t"],
                f"cucim_scaling_1_to_{cores}t": r[f"cucim_{cores}t"] / r["cucim_1t"],
            }
            print(f"{kind} " + ", ".join(f"{k} {v:.2f}" for k, v in row["ratios"].items()), flush=True)
            results.append(row)
    exact = results[0]
    stage = {"ours_s": exact["timings"]["engine_1t"]["median_s"],
             "reference_s": exact["timings"]["cucim_1t"]["median_s"],
             "speedup": exact["ratios"]["engine_vs_cucim_1t"],
             "unit_rate": {"case": "40x, level-exact, 1 thread", "regions_per_s": exact["rates"]["engine_1t"],
                           "fraction_of_raw_decoder": exact["ratios"]["engine_vs_raw_1t"]}}
    return {"stage": stage, "results": [{"name": "ours", **exact["timings"]["engine_1t"]}], "slides": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tissue-tiles", type=int, default=3000, help="tissue tiles per slide at 1 µm/px")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/gigassl_bench_workloads", help="where the generated slides are kept")
    ap.add_argument("--out", default="bench_out/bench_decode.json")
    args = ap.parse_args()
    settings = Settings(**{k: v for k, v in vars(args).items() if k != "out"})
    t = time.time()
    out = run(settings)
    report = {"benchmark": "decode", "machine": machine(), "settings": dataclasses.asdict(settings),
              "seconds": time.time() - t, **out}
    write_json(args.out, report)
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; results in {args.out}")


if __name__ == "__main__":
    main()
