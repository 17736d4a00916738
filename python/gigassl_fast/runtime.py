"""Runtime decisions, each made here and nowhere else: the device a stage runs on, this process's place
in a torchrun launch, the seeds derived from ``--seed``, and the compute precision ``auto`` means on
this machine. Stages ask; they do not read the environment or probe the hardware themselves.
"""

from __future__ import annotations

import functools
import math
import os
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import GigasslError

if TYPE_CHECKING:  # torch is imported where a device is needed: `info` must run with a broken torch
    import numpy as np
    import torch

#: What --device accepts, for messages.
DEVICES = "auto, cpu, cuda or cuda:N"
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch (world 1, rank 0 outside one)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def per_rank(self, file_name: str) -> str:
        """`file_name` made distinct per rank under torchrun (summaries written by every rank)."""
        if not self.distributed:
            return file_name
        stem, ext = os.path.splitext(file_name)
        return f"{stem}.rank{self.rank}{ext}"


def launch() -> Launch:
    """The torchrun environment (WORLD_SIZE, RANK, LOCAL_RANK) of this process."""
    def read(key: str, default: int) -> int:
        raw = os.environ.get(key, "")
        try:
            return int(raw) if raw.strip() else default
        except ValueError:
            raise GigasslError(f"environment variable {key}={raw!r} is not a whole number; unset it or launch "
                               "with torchrun") from None

    world = read("WORLD_SIZE", 1)
    if world <= 1:  # RANK alone (e.g. left by a scheduler) does not make a launch
        return Launch()
    rank, local = read("RANK", 0), read("LOCAL_RANK", 0)
    if not 0 <= rank < world or local < 0:
        raise GigasslError(f"torchrun environment out of range (WORLD_SIZE={world}, RANK={rank}, LOCAL_RANK={local})")
    return Launch(world, rank, local)


def init_distributed() -> Launch:
    """Joins the process group when launched by torchrun with several processes (NCCL on GPUs, gloo
    on CPUs); a no-op otherwise, or when the caller already joined one."""
    here = launch()
    if here.distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            import torch

            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return here


def check_device(name: str) -> str:
    """`name` if it is a device this machine has; a one-line GigasslError otherwise."""
    import torch

    if name not in ("auto", "cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise GigasslError(f"--device must be {DEVICES} (got {name!r})")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GigasslError(f"--device {name}: no CUDA device is available here; use --device cpu")
        if ":" in name and int(name[5:]) >= torch.cuda.device_count():
            raise GigasslError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def resolve_device(name: str = "auto") -> torch.device:
    """The device `name` means here. ``auto``: this rank's GPU under torchrun (LOCAL_RANK), else the first
    GPU, else the CPU."""
    import torch

    check_device(name)
    if name != "auto":
        return torch.device(name)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    here = launch()
    return torch.device(f"cuda:{here.local_rank}") if here.distributed else torch.device("cuda")


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on `device`: the same memory on the CPU; to a GPU through pinned memory,
    without the host waiting for the copy."""
    import numpy as np
    import torch

    t = torch.from_numpy(np.ascontiguousarray(array))
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)


def to_device_packed(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Host int64 tensors on `device` in one copy: packed into one pinned buffer, copied without the host
    waiting, and handed back as views of the one device buffer (on the CPU: the tensors themselves).
    Many small index tensors cost one transfer instead of one each."""
    import torch

    wrong = [name for name, t in tensors.items() if t.dtype != torch.int64]
    if wrong:
        raise TypeError(f"to_device_packed packs int64 tensors only; {', '.join(wrong)} are not")
    if device.type == "cpu":
        return dict(tensors)
    flat = torch.empty(sum(t.numel() for t in tensors.values()), dtype=torch.int64, pin_memory=True)
    offset, spans = 0, {}
    for name, t in tensors.items():
        flat[offset:offset + t.numel()].copy_(t.reshape(-1))
        spans[name] = (offset, t.shape)
        offset += t.numel()
    flat = flat.to(device, non_blocking=True)
    return {name: flat[o:o + math.prod(shape)].view(shape) for name, (o, shape) in spans.items()}


def slide_seed(seed: int, slide_id: str) -> int:
    """Per-slide seed: the same for a slide whatever the shard, rank or cohort order (encode's tile draws
    and augmentations, embed's views)."""
    return (seed * 1_000_003 + zlib.crc32(slide_id.encode())) % (2**63)


def rank_seed(seed: int, rank: int) -> int:
    """Seed of a rank's own draws (train's view sampler): distinct per rank, fixed by --seed."""
    return seed * 7919 + rank


@functools.lru_cache(maxsize=4)
def cpu_has_amx_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 matrices in AMX tiles (Sapphire Rapids and later Xeons): there a
    bf16 product runs about 5x float32, elsewhere bf16 convolutions are slower than float32."""
    try:
        with open(cpuinfo, encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise GigasslError(f"--precision must be {', '.join(PRECISIONS)} (got {precision!r})")
    return precision


def resolve_precision(precision: str, device_type: str) -> str:
    """The compute precision of inference (encode) that `auto` means here: bf16 on GPUs and on CPUs with
    AMX, float32 on other CPUs."""
    if check_precision(precision) != "auto":
        return precision
    return "bf16" if device_type == "cuda" or (device_type == "cpu" and cpu_has_amx_bf16()) else "fp32"


def train_precision(precision: str, device: torch.device) -> str:
    """Training's `auto`: bf16 autocast on CPUs with AMX (matrix products about 5x float32 there); float32
    elsewhere, GPUs included, where the step is bound by launches, not arithmetic (BENCHMARKS.md)."""
    return "fp32" if precision == "auto" and device.type != "cpu" else resolve_precision(precision, device.type)


__all__ = ["DEVICES", "Launch", "check_device", "check_precision", "cpu_has_amx_bf16", "init_distributed", "launch",
           "rank_seed", "resolve_device", "resolve_precision", "slide_seed", "to_device", "train_precision"]
