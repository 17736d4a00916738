"""Timing and machine description shared by the benchmark scripts."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from gigassl_fast.runtime import cpu_has_amx_bf16

    info = {"cpu": cpu, "cores": os.cpu_count(), "amx_bf16": cpu_has_amx_bf16(), "python": platform.python_version(),
            "os": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["gpu"] = None
    return info


def matmul_rates(device) -> dict:
    """This machine's matrix-product rates in GFLOP/s, measured now: float32 and bf16 square products
    (the peak a benchmark's products are held against) and float32 at the sparse layer's shape
    (4096 x 512 @ 512 x 512). Square products are 2048^3, or 512^3 where one of those would take over a
    second (bf16 on CPUs without bf16 instructions runs at well under 1 GFLOP/s)."""
    import torch

    def rate(m: int, k: int, n: int, dtype) -> tuple[float, float]:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        t = time_runs(lambda: a @ b, runs=5, warmup=1)["median_s"]
        return 2 * m * k * n / t / 1e9, t

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        small, t = rate(512, 512, 512, dtype)
        if t * 64 < 1.0:
            out[f"{name}_2048"] = rate(2048, 2048, 2048, dtype)[0]
        else:
            out[f"{name}_512"] = small
    out["fp32_4096x512x512"] = rate(4096, 512, 512, torch.float32)[0]
    return out


def bench_device(name: str = "auto"):
    """The torch device a benchmark runs both sides on: `auto` is the GPU when there is one."""
    from gigassl_fast.runtime import resolve_device

    return resolve_device(name)


def _sync() -> None:
    # GPU work is asynchronous: a host clock read before it finishes would time the launches only.
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_runs(fn: Callable[[], object], runs: int = 5, warmup: int = 1) -> dict:
    """Median and spread (min, max) in seconds of `runs` calls after `warmup` calls (GPU work included:
    the device is synchronised before each clock read)."""
    for _ in range(warmup):
        fn()
    _sync()
    _reset_peak_memory()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": runs,
            **_peak_memory()}


def _reset_peak_memory() -> None:
    # Linux resets the process's peak resident set (VmHWM) on "5" written to clear_refs.
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def _peak_memory() -> dict:
    """Peak resident memory of the process (MiB) over the timed runs, and peak GPU memory allocated."""
    out = {}
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    out["peak_rss_mib"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
