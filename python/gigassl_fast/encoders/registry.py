"""One registry of tile encoders: a name, a config and a builder, filled by a decorator (as timm)."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import GigasslError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderConfig:
    """What a tile encoder needs and gives.

    Args:
        name: registry name (``--encoder``).
        input_size: tile side in pixels the encoder expects.
        mean, std: per-channel normalisation of [0, 1] RGB input.
        out_dim: feature dimension.
        dtype: preferred compute dtype on GPU.
        default_weights: weight source used when none is given (``package:...``, a URL, or None).
        licence: licence of the default weights.
        description: one line for ``--list-encoders``.
    """

    name: str
    input_size: int
    out_dim: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    dtype: str = "bfloat16"
    default_weights: str | None = None
    licence: str = ""
    description: str = ""


_REGISTRY: dict[str, tuple[EncoderConfig, Callable[..., torch.nn.Module]]] = {}


def register_encoder(config: EncoderConfig):
    """Decorator: registers `builder(weights: str | None) -> nn.Module` under ``config.name``."""

    def wrap(builder: Callable[..., torch.nn.Module]):
        if config.name in _REGISTRY:
            raise ValueError(f"encoder {config.name!r} registered twice")
        _REGISTRY[config.name] = (config, builder)
        return builder

    return wrap


def list_encoders(pattern: str = "*") -> list[str]:
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_config(name: str) -> EncoderConfig:
    if name.startswith("timm:"):
        from .timm_encoders import timm_config

        return timm_config(name)
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise GigasslError(f"--encoder: unknown encoder {name!r}{hint} (known: {', '.join(list_encoders())}, "
                           "or timm:<name> with timm installed)")
    return _REGISTRY[name][0]


def create_encoder(name: str, weights: str | None = None) -> torch.nn.Module:
    """The encoder `name` in eval mode, with `weights` (a path, ``imagenet``, or None for the default).

    The module maps float (B, 3, S, S) normalised images to (B, out_dim) features.
    """
    if name.startswith("timm:"):
        from .timm_encoders import create_timm_encoder

        return create_timm_encoder(name, weights).eval()
    config = get_config(name)
    model = _REGISTRY[name][1](weights if weights is not None else config.default_weights)
    return model.eval()
