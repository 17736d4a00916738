"""Trial of cuCIM GPU decoding in a separate process, before `encode` relies on it.

A fault inside cuCIM's GPU decoder (nvJPEG) can abort the process that runs it, which no exception
handler catches; a cohort run must not die that way. So `encode --decode auto` first decodes a few
batches of the first slide here, in a child process, on the run's own batch size and worker count,
compares them with CPU decoding, and times both: GPU decoding is used only where it is right and faster
(on an H100 machine with 16 cores, cuCIM 26.10 decoded about 100 tiles/s on the GPU against 2,000-3,000
on the CPU). The parent reads one JSON line:
{"ok": bool, "mean_abs_diff": float, "tiles": int, "gpu_tiles_per_s": float, "cpu_tiles_per_s": float}
or {"ok": false, "error": "..."}.

    python -m gigassl_fast.slides.gpu_probe SLIDE COORDS.npy LEVEL SIZE WORKERS DEVICE
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

#: Mean absolute difference (grey levels) allowed between GPU and CPU JPEG decoding (IDCT rounding).
MAX_DIFF = 2.0


def probe(path: str, xy: np.ndarray, level: int, size: int, workers: int, device: str,
          timeout: float = 300.0) -> dict:
    """Decodes `xy` on `device` and on the CPU in a child process: {"ok": True, rates, difference} when
    GPU decoding matches, else {"ok": False, "why": one line}."""
    with tempfile.TemporaryDirectory(prefix="gigassl_probe_") as tmp:
        coords = os.path.join(tmp, "xy.npy")
        np.save(coords, np.asarray(xy, np.int64))
        cmd = [sys.executable, "-m", "gigassl_fast.slides.gpu_probe", path, coords, str(level), str(size),
               str(workers), device]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"ok": False, "why": f"GPU decoding did not finish within {timeout:.0f} s in a trial"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        how = f"signal {-r.returncode}" if r.returncode < 0 else f"exit code {r.returncode}"
        tail = (r.stderr.strip().splitlines() or [""])[-1][:160]
        return {"ok": False, "why": f"GPU decoding crashed in a trial ({how}{': ' + tail if tail else ''})"}
    res = json.loads(lines[-1])
    if not res.get("ok"):
        res["why"] = res.get("error") or (f"GPU and CPU decoding differ by {res['mean_abs_diff']:.2f} grey levels "
                                          "on average in a trial")
    return res


def trial(backend, xy: np.ndarray, level: int, size: int, device, workers: int) -> dict:
    """Decodes `xy` on `device` (twice: the first is the warm-up) and on the CPU; compares and times."""
    import time

    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    read = backend.read_regions_torch
    gpu = read(xy, level, size, size, device, workers)
    sync()
    t = time.perf_counter()
    read(xy, level, size, size, device, workers)
    sync()
    t_gpu = time.perf_counter() - t
    t = time.perf_counter()
    cpu = read(xy, level, size, size, torch.device("cpu"), workers)
    t_cpu = time.perf_counter() - t
    diff = (gpu.cpu().float() - cpu.float()).abs().mean().item() if len(xy) else 0.0
    return {"ok": bool(diff <= MAX_DIFF), "mean_abs_diff": diff, "tiles": len(xy),
            "gpu_tiles_per_s": len(xy) / max(t_gpu, 1e-9), "cpu_tiles_per_s": len(xy) / max(t_cpu, 1e-9)}


def main(argv: list[str]) -> int:
    import torch

    from . import Slide

    path, coords, level, size, workers, device = argv
    try:
        with Slide(path, reader="cucim") as s:
            out = trial(s.backend, np.load(coords), int(level), int(size), torch.device(device), int(workers))
    except Exception as err:  # reported to the parent as one line
        out = {"ok": False, "error": f"GPU decoding failed in a trial: {type(err).__name__}: {err}"[:300]}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
