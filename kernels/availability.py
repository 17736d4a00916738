"""Whether the Triton kernels can run here, decided once, with the reason when they cannot."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

_FORCE_TWINS = False


@functools.lru_cache(maxsize=1)
def triton_status() -> tuple[bool, str]:
    """(usable, why). Triton kernels run on CUDA GPUs, or anywhere under TRITON_INTERPRET=1 (slow;
    for tests)."""
    import torch

    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    # Checked before importing Triton: it reads TRITON_INTERPRET once, at import.
    if not interpret and not torch.cuda.is_available():
        return False, "no CUDA device (the torch twins run instead)"
    try:
        import triton  # noqa: F401
    except Exception as err:  # ImportError or a broken install
        return False, f"Triton does not import ({type(err).__name__})"
    if interpret:
        return True, "Triton interpreter (TRITON_INTERPRET=1)"
    return True, f"Triton on {torch.cuda.get_device_name(0)}"


@contextlib.contextmanager
def twins_only() -> Iterator[None]:
    """Within this block the torch twins run everywhere: to compare a whole model's kernel path with its
    twin path in one process (tests, gpu_check)."""
    global _FORCE_TWINS
    saved, _FORCE_TWINS = _FORCE_TWINS, True
    try:
        yield
    finally:
        _FORCE_TWINS = saved


def use_triton(t) -> bool:
    """Kernels for tensors on a CUDA device (or any device under the interpreter)."""
    if _FORCE_TWINS:
        return False
    ok, _ = triton_status()
    if not ok:
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
