"""``gigassl-fast bench``: every stage against its reference on this machine, in one run and one report.

The stage benchmarks are the modules of ``gigassl_fast.benchmarks`` (the source tree's ``benchmarks/``
folder, installed with the package; the original's way of each stage in its ``reference/``). Each also
runs alone: ``python -m gigassl_fast.benchmarks.bench_encode --help``.
"""

from __future__ import annotations

import json
import os
import time

from .errors import GigasslError

STAGES = ("tile", "decode", "encode", "train", "embed")

#: Settings per stage: (quick, full). Quick finishes the whole suite in about a minute on 2 cores; full is
#: the work users have (a 4-slide cohort of 3,000-tile slides at 50 x 256, batches of 64 and 256) and
#: takes about an hour on 2 cores.
SETTINGS = {
    "tile": ({"sizes": [1024, 2048], "runs": 3}, {"sizes": [2048, 4096, 8192], "runs": 7}),
    "decode": ({"tissue_tiles": 60, "runs": 1, "workdir": None}, {"tissue_tiles": 3000, "runs": 3, "workdir": None}),
    "encode": ({"quick": True, "slides": 2, "tissue_tiles": 60, "naug": 2, "nt": 16, "runs": 1, "ref_batches": 2,
                "ref_workers": 2},
               {"slides": 4, "tissue_tiles": 3000, "naug": 50, "nt": 256, "runs": 1, "ref_batches": None,
                "ref_workers": 5}),
    "train": ({"slides": 64, "naug": 2, "nt": 16, "batch_sizes": [32], "runs": 3, "workers": 0},
              {"slides": 1000, "naug": 10, "nt": 256, "batch_sizes": [64, 256], "runs": 5}),
    "embed": ({"slides": 8, "tiles": 200, "views": 20, "runs": 2}, {"slides": 50, "tiles": 3000, "views": 100, "runs": 3}),
}


def run_bench(stages: list[str], quick: bool, out_dir: str, log=print, device: str = "auto") -> dict:
    """Runs the stage benchmarks; `device` (auto, cpu, cuda) is where both sides of encode, train and
    embed run (tiling is CPU code on both sides)."""
    import importlib.util

    # the references run what the original runs; these come with the dev extra (make install)
    needs = {"encode": ("kornia", "the original's kornia augmentations"),
             "tile": ("skimage", "the original's scikit-image Otsu threshold")}
    for stage, (module, what) in needs.items():
        if stage in stages and importlib.util.find_spec(module) is None:
            raise GigasslError(f"the {stage} benchmark's reference runs {what}: pip install "
                               f"{'scikit-image' if module == 'skimage' else module} (the dev extra has it: make "
                               f"install), or leave {stage} out of --stages")
    from .benchmarks import bench_decode, bench_embed, bench_encode, bench_tiling, bench_train
    from .benchmarks.common import machine

    report = {"machine": machine(), "quick": quick, "device": device, "stages": {}, "details": {}}
    for stage in stages:
        settings = dict(SETTINGS[stage][0 if quick else 1])
        if stage not in ("tile", "decode"):
            settings["device"] = device
        log(f"== {stage} {json.dumps(settings)}")
        t = time.time()
        if stage == "tile":
            out = bench_tiling.run(settings["sizes"], settings["runs"])
        else:
            module = {"decode": bench_decode, "encode": bench_encode, "train": bench_train, "embed": bench_embed}[stage]
            out = module.run(module.Settings(**settings))
        # the last of ours' rows is the largest setting, the one the stage summary reports
        ours = next((r for r in reversed(out["results"]) if r.get("name") == "ours"), {})
        out["stage"]["peak_memory_mib"] = {k: round(v, 1) for k, v in ours.items() if k.startswith("peak_")}
        report["stages"][stage] = out["stage"]
        report["details"][stage] = {"settings": settings, "results": out["results"], "seconds": time.time() - t}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    table = render_table(report)
    with open(os.path.join(out_dir, "bench.md"), "w", encoding="utf-8") as fh:
        m = report["machine"]
        fh.write(f"# gigassl-fast bench\n\nMachine: {m['cpu']}, {m['cores']} cores, GPU {m.get('gpu') or 'none'}, "
                 f"torch {m.get('torch')}, Python {m['python']}.{' Quick settings.' if quick else ''}\n\n{table}\n")
    bar_chart(os.path.join(out_dir, "bench.png"), report)
    report["table"] = table
    return report


def render_table(report: dict) -> str:
    lines = ["| stage | ours (s) | reference (s) | speedup | rates | peak memory (MiB) |", "|---|---|---|---|---|---|"]
    for stage, s in report["stages"].items():
        rates = ", ".join(f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in s["unit_rate"].items())
        mem = ", ".join(f"{k.removeprefix('peak_').removesuffix('_mib')} {v:,.0f}"
                        for k, v in s.get("peak_memory_mib", {}).items())
        lines.append(f"| {stage} | {s['ours_s']:.3f} | {s['reference_s']:.3f} | {s['speedup']:.1f}x | {rates} | {mem} |")
    return "\n".join(lines)


def bar_chart(path: str, report: dict) -> None:
    """Speedup per stage as horizontal bars (log scale), drawn with PIL."""
    import math

    from PIL import Image, ImageDraw

    stages = list(report["stages"].items())
    w, row, left = 640, 40, 90
    img = Image.new("RGB", (w, 60 + row * max(1, len(stages))), "white")
    d = ImageDraw.Draw(img)
    m = report["machine"]
    d.text((10, 10), f"speedup over the reference (log scale) - {m['cpu']}, {m['cores']} cores, GPU {m.get('gpu') or 'none'}",
           fill="black")
    top = max(10.0, max((s["speedup"] for _, s in stages), default=10.0))
    scale = (w - left - 80) / math.log10(top * 1.2)
    x1 = left + scale * math.log10(1.0)
    for i, (name, s) in enumerate(stages):
        y = 40 + i * row
        length = scale * math.log10(max(s["speedup"], 1.0))
        d.text((10, y + 10), name, fill="black")
        d.rectangle([x1, y + 5, x1 + max(2, length), y + row - 10], fill=(31, 119, 180))
        d.text((x1 + length + 6, y + 10), f"{s['speedup']:.1f}x", fill="black")
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)
