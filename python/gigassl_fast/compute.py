"""The compute path each stage takes on this machine, decided once and explained (``gigassl-fast info``)."""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import os
import platform
from dataclasses import dataclass

from .runtime import cpu_has_amx_bf16, resolve_precision


@dataclass(frozen=True)
class ComputePath:
    """One stage's compute path on this machine and why it is taken."""

    stage: str
    path: str
    why: str


def _version(module: str) -> str | None:
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            mod = importlib.import_module(module)
        return str(getattr(mod, "__version__", "installed"))
    except Exception:  # any import failure means "not usable here"
        return None


@functools.lru_cache(maxsize=1)
def cuda_device() -> str | None:
    """Name of the first CUDA device torch can use, else None. Tests for a device, not an import."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # a broken CUDA install is reported as "no GPU"
        return None
    return None


@functools.lru_cache(maxsize=1)
def cucim_gpu_decode() -> tuple[bool, str]:
    """Whether cuCIM can decode on the GPU here, and why not when it cannot."""
    if _version("cucim") is None:
        return False, "cuCIM is not installed"
    if cuda_device() is None:
        return False, "no CUDA device"
    if _version("cupy") is None:
        return False, "CuPy is not installed (needed to hand GPU tiles to torch)"
    try:
        import cupy

        cupy.zeros(1).sum()
    except Exception as err:  # CuPy imports without a GPU and fails on first use
        return False, f"CuPy cannot use the GPU ({type(err).__name__})"
    return True, "cuCIM + CuPy on " + str(cuda_device())


def versions() -> dict[str, str | None]:
    from . import __version__

    mods = ["numpy", "torch", "triton", "h5py", "click", "cucim", "cupy", "openslide", "tiffslide", "tifffile",
            "sklearn", "PIL"]
    out: dict[str, str | None] = {"gigassl-fast": __version__, "python": platform.python_version()}
    for m in mods:
        out[m] = _version(m)
    try:
        import openslide

        out["openslide (library)"] = openslide.__library_version__
    except Exception:  # reported as missing below
        out["openslide (library)"] = None
    return out


def compute_paths() -> list[ComputePath]:
    from . import _core

    threads = os.cpu_count() or 1
    core = f"C++ core (_core{', OpenMP' if _core.openmp else ', no OpenMP'}, {threads} threads)"
    paths = [ComputePath("tile: mask + grid", core, "always")]
    cpu_reader = "cuCIM CPU reader" if _version("cucim") else "tiffslide"
    gpu, why = cucim_gpu_decode()
    gpu_note = (f"GPU decoding possible ({why}): `encode --decode auto` uses it where a trial finds it right and "
                "faster") if gpu else f"GPU decoding unavailable: {why}"
    paths.append(ComputePath("slide decoding", f"{cpu_reader} for SVS/TIFF, OpenSlide for NDPI/MRXS/SCN/...", gpu_note))
    device = cuda_device()
    precision = {"bf16": "bf16", "fp32": "float32"}[resolve_precision("auto", "cuda" if device else "cpu")]
    where = f"the {'GPU' if device else 'CPU'}, {precision}, channels_last"
    amx = "AMX bf16" if cpu_has_amx_bf16() else "no AMX"
    paths.append(ComputePath("encode: tile encoder", f"torch on {where}", device or f"no CUDA device; CPU has {amx}"))
    from .kernels.availability import triton_status

    ok, why = triton_status()
    paths.append(ComputePath("train: aggregators", "Triton gather-GEMM, tap-scatter and pooling kernels" if ok
                      else "torch twins of the kernels", why))
    return paths


def report() -> str:
    lines = ["versions:"]
    for name, v in versions().items():
        lines.append(f"  {name:<22} {v or 'not installed'}")
    lines.append("devices:")
    lines.append(f"  {'cpu':<22} {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    lines.append(f"  {'cuda':<22} {cuda_device() or 'none'}")
    lines.append("compute paths:")
    for p in compute_paths():
        lines.append(f"  {p.stage:<22} {p.path}  [{p.why}]")
    return "\n".join(lines)
