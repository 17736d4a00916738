"""Pathology foundation models as named tile encoders, built through timm (optional) with the constructor
arguments their model cards give (LayerScale, register tokens, SwiGLU, patch and image size), their
normalisation and their output rule, and loaded from a local checkpoint (nothing is downloaded:
these weights are gated or licensed per user).

Wide features (1024-2560-d) reach the sparse-layer4 aggregator through `gigassl-fast pca --dim 256`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import GigasslError
from .registry import IMAGENET_MEAN, IMAGENET_STD, EncoderConfig, register_encoder
from .timm_encoders import timm_module
from .weights import apply_weights, file_checksum, load_checkpoint, resolve_weights


@dataclass(frozen=True)
class Preset:
    """How to build one foundation model with timm, and what it outputs."""

    name: str
    timm_name: str
    kwargs: dict = field(default_factory=dict)
    out_dim: int = 0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    #: "class": the class token (timm's pooled output with num_classes=0); "class+mean": the class token
    #: concatenated with the mean of the patch tokens (after the register tokens).
    output: str = "class"
    licence: str = ""
    card: str = ""
    #: file layout -> timm's (e.g. Hugging Face transformers' ViT names); given the state and the model
    convert: Callable[[dict, nn.Module], dict] | None = None


class ConvStem(nn.Module):
    """CTransPath's patch embedding (TransPath): two 3x3 stride-2 convolutions with batch norm and ReLU,
    then a 1x1 projection, in place of Swin's 4x4 patchify. Returns NHWC, as timm's Swin expects."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None, **_) -> None:
        super().__init__()
        if patch_size not in (4, (4, 4)) or embed_dim % 8:
            raise GigasslError(f"ConvStem needs patch size 4 and embed_dim divisible by 8 (got {patch_size}, {embed_dim})")
        size = img_size if isinstance(img_size, tuple) else (img_size, img_size)
        self.img_size, self.patch_size = size, (4, 4)
        self.grid_size = (size[0] // 4, size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        stem, cin, cout = [], in_chans, embed_dim // 8
        for _ in range(2):
            stem += [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin, cout = cout, cout * 2
        stem.append(nn.Conv2d(cin, embed_dim, 1))
        self.proj = nn.Sequential(*stem)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def _old_swin_to_timm(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """CTransPath was saved from timm 0.5.4; timm's own filter moves its Swin layout to today's (patch
    merging at the start of the next stage, no stored index and mask buffers)."""
    timm = timm_module()
    filt = getattr(getattr(getattr(timm, "models", None), "swin_transformer", None), "checkpoint_filter_fn", None)
    state = {k: v for k, v in state.items() if not k.endswith(("relative_position_index", "attn_mask"))}
    return dict(filt(state, model)) if filt is not None else state


def _swiglu():
    timm = timm_module()
    return {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": nn.SiLU}


def hf_vit_to_timm(state: Mapping[str, torch.Tensor], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Hugging Face ``ViTModel`` keys (e.g. owkin/phikon) -> timm ``VisionTransformer`` keys: query, key
    and value become one qkv projection; the pooler is not part of the feature extractor."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    simple = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
              "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
              "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
              "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    parts = {"attention.output.dense": "attn.proj", "layernorm_before": "norm1", "layernorm_after": "norm2",
             "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
    for key, value in state.items():
        key = key[len("vit."):] if key.startswith("vit.") else key
        if key.startswith("pooler.") or key.startswith("classifier."):
            continue
        if key in simple:
            out[simple[key]] = value
            continue
        m = re.match(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", key)
        if not m:
            out[key] = value  # left for the strict key check to name
            continue
        i, part, kind = m.groups()
        q = re.match(r"^attention\.attention\.(query|key|value)$", part)
        if q:
            qkv.setdefault(f"blocks.{i}.attn.qkv.{kind}", {})[q.group(1)] = value
        elif part in parts:
            out[f"blocks.{i}.{parts[part]}.{kind}"] = value
        else:
            out[key] = value
    for key, pieces in qkv.items():
        if set(pieces) != {"query", "key", "value"}:
            raise GigasslError(f"{key}: the checkpoint lacks {sorted({'query', 'key', 'value'} - set(pieces))}")
        out[key] = torch.cat([pieces["query"], pieces["key"], pieces["value"]])
    return out


PRESETS = {p.name: p for p in (
    Preset("uni", "vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": 1e-5,
                                            "dynamic_img_size": True},
           out_dim=1024, licence="CC-BY-NC-ND-4.0, gated (MahmoodLab/UNI)", card="UNI: ViT-L/16, class token"),
    Preset("uni2-h", "vit_giant_patch14_224", {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24,
                                               "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2,
                                               "no_embed_class": True, "reg_tokens": 8, "dynamic_img_size": True,
                                               "swiglu": True},
           out_dim=1536, licence="CC-BY-NC-ND-4.0, gated (MahmoodLab/UNI2-h)",
           card="UNI2-h: ViT-H/14, 8 registers, SwiGLU, class token"),
    Preset("virchow2", "vit_huge_patch14_224", {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375,
                                                "reg_tokens": 4, "dynamic_img_size": True, "swiglu": True,
                                                "global_pool": ""},
           out_dim=2560, output="class+mean", licence="CC-BY-NC-ND-4.0, gated (paige-ai/Virchow2)",
           card="Virchow2: ViT-H/14, 4 registers, SwiGLU; class token + mean of patch tokens"),
    Preset("h-optimus-0", "vit_giant_patch14_reg4_dinov2", {"img_size": 224, "init_values": 1e-5,
                                                            "dynamic_img_size": False},
           out_dim=1536, mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
           licence="Apache-2.0 (bioptimus/H-optimus-0)", card="H-optimus-0: ViT-g/14, 4 registers, class token"),
    Preset("gigapath", "vit_giant_patch14_dinov2", {"img_size": 224, "in_chans": 3, "patch_size": 16,
                                                    "embed_dim": 1536, "depth": 40, "num_heads": 24,
                                                    "init_values": 1e-5, "mlp_ratio": 5.33334},
           out_dim=1536, licence="Apache-2.0, gated (prov-gigapath tile encoder)",
           card="Prov-GigaPath tile encoder: ViT-g/16, class token"),
    Preset("phikon", "vit_base_patch16_224", {"img_size": 224, "patch_size": 16}, out_dim=768,
           licence="Owkin non-commercial (owkin/phikon)", card="Phikon: ViT-B/16 (iBOT), class token; "
           "Hugging Face checkpoint layout", convert=hf_vit_to_timm),
    Preset("ctranspath", "swin_tiny_patch4_window7_224", {"img_size": 224, "convstem": True}, out_dim=768,
           licence="GPL-3.0 (Xiyue-Wang/TransPath)", card="CTransPath: Swin-T with a convolutional stem, pooled "
           "(checkpoint saved from timm 0.5.4; its layout is converted by timm's own filter)",
           convert=_old_swin_to_timm),
)}


class FoundationEncoder(nn.Module):
    """A timm model and its output rule: (B, 3, S, S) normalised images -> (B, out_dim)."""

    def __init__(self, model: nn.Module, preset: Preset) -> None:
        super().__init__()
        self.model = model
        self.output = preset.output
        self.prefix = int(getattr(model, "num_prefix_tokens", 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output == "class":
            return self.model(x)
        tokens = self.model.forward_features(x)  # (B, prefix + patches, D)
        return torch.cat([tokens[:, 0], tokens[:, self.prefix:].mean(dim=1)], dim=-1)


def build_timm(preset: Preset) -> nn.Module:
    timm = timm_module()
    kwargs = dict(preset.kwargs)
    if kwargs.pop("swiglu", False):
        kwargs.update(_swiglu())
    if kwargs.pop("convstem", False):
        kwargs["embed_layer"] = ConvStem
    try:
        return timm.create_model(preset.timm_name, pretrained=False, num_classes=0, **kwargs)
    except Exception as err:  # an older timm lacking an argument or a model name
        raise GigasslError(f"--encoder {preset.name}: timm {getattr(timm, '__version__', '?')} cannot build "
                           f"{preset.timm_name} with {sorted(kwargs)} ({err}); install a recent timm") from None


def _drop_head(key: str) -> str | None:
    return None if key.startswith(("head.", "fc.", "classifier.", "head_dist.")) else key


def _strip_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoints saved from wrappers carry a prefix on every key (``model.``, ``module.``, ``backbone.``)."""
    state = dict(state)
    for prefix in ("module.", "model.", "backbone.", "encoder."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _builder(preset: Preset):
    def build(weights: str | None) -> FoundationEncoder:
        if not weights or weights == "imagenet":
            raise GigasslError(f"--encoder {preset.name} needs --weights PATH: its checkpoint ({preset.licence}) is "
                               "downloaded by you from its model card; nothing is downloaded here")
        model = build_timm(preset)
        if weights == "random":
            model.weights_checksum = "random"
        else:
            path = resolve_weights(weights)
            state = _strip_wrappers(load_checkpoint(path))
            if preset.convert is not None:
                state = preset.convert(state, model)
            apply_weights(model, state, path, _drop_head)
            model.weights_checksum = file_checksum(path)
        enc = FoundationEncoder(model, preset)
        enc.weights_checksum = model.weights_checksum
        return enc

    return build


for _p in PRESETS.values():
    register_encoder(EncoderConfig(
        name=_p.name, input_size=int(_p.kwargs.get("img_size", 224)), out_dim=_p.out_dim, mean=_p.mean, std=_p.std,
        licence=_p.licence, description=f"{_p.card}; timm + --weights PATH; {_p.licence}"))(
        _builder(_p))
