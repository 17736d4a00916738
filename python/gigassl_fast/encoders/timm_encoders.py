"""``timm:<name>`` encoders: any timm model as a tile encoder, with weights from a local checkpoint.

timm is optional (it needs torchvision); the names exist only when it imports. The classifier head is
removed (``num_classes=0``), so the features are the model's pooled ``num_features``.
"""

from __future__ import annotations

import torch

from ..errors import GigasslError
from .registry import EncoderConfig
from .weights import apply_weights, file_checksum, load_checkpoint, resolve_weights

PREFIX = "timm:"


def timm_module():
    try:
        import timm
    except Exception as err:  # ImportError, or torchvision failing inside timm's import
        raise GigasslError(f"timm encoders need timm (pip install timm); it does not import here "
                           f"({type(err).__name__}: {err})") from None
    return timm


def _model(name: str) -> torch.nn.Module:
    timm = timm_module()
    try:
        return timm.create_model(name, pretrained=False, num_classes=0)
    except Exception as err:  # timm raises RuntimeError/KeyError for unknown names
        raise GigasslError(f"--encoder timm:{name}: timm cannot build it ({err})") from None


def timm_config(full_name: str) -> EncoderConfig:
    name = full_name[len(PREFIX):]
    model = _model(name)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    return EncoderConfig(name=full_name, input_size=size, out_dim=int(model.num_features),
                         mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))), std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
                         licence="see the checkpoint's licence", description=f"timm model {name} (local weights)")


def create_timm_encoder(full_name: str, weights: str | None) -> torch.nn.Module:
    if not weights or weights == "imagenet":
        raise GigasslError(f"{full_name} needs --weights PATH (a local checkpoint; nothing is downloaded)")
    model = _model(full_name[len(PREFIX):])
    if weights != "random":
        path = resolve_weights(weights)

        def drop_head(key: str) -> str | None:
            return None if key.startswith(("head.", "fc.", "classifier.", "head_dist.")) else key

        apply_weights(model, load_checkpoint(path), path, drop_head)
        model.weights_checksum = file_checksum(path)
    else:
        model.weights_checksum = "random"
    return model
