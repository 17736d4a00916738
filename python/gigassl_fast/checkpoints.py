"""Slide-model checkpoints in the layouts they were saved in, detected from their keys and converted
exactly to ours (a ``SimCLRMIL`` state dict: ``backbone.*`` and ``projector.*``):

- ``gigassl-fast``: ours (``train``'s checkpoints).
- ``gigassl``: the original trislaz/gigassl ``SimCLRMIL.state_dict()`` saved as ``{'epoch', 'state_dict',
  'config'}``: the sparse ResNet18 layer4 under ``backbone.net.mil_model.sparse_pooling.0.{0,1}.*`` in
  SparseConvNet layouts (3x3 weights (9, 1, in, out), ``scn[3*kh+kw, 0, i, o] == dense[o, i, kh, kw]``;
  ``norm1/norm2/normd`` batch norms), the projector under ``projector.layer{1,2,3}.*``, and the same
  tensors again under ``encoder.0.*`` / ``encoder.1.*``.
- ``democratizing-wsi``: trislaz/Democratizing_WSI, whose loader keeps the keys under ``backbone.mil.``:
  its sparse-layer4 (``backbone.mil.net.mil_model.sparse_pooling...``, as above) or its residual MLP
  (``backbone.mil.tile_encoder.{0,1}...``). Its projector layout is not in the public code, so only the
  aggregator is read (training from it starts a fresh projector).

The original's ``config`` is a pickled object of its own classes; it is read with an unpickler that
builds plain stand-ins for classes it does not know (and never calls arbitrary functions).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .errors import GigasslError

FORMATS = ("gigassl-fast", "gigassl", "democratizing-wsi")

_SCN_BLOCK = re.compile(r"^sparse_pooling\.0\.([01])\.(conv1|conv2|convd|norm1|norm2|normd)\.(\w+)$")
_SCN_NORM = {"norm1": "bn1", "norm2": "bn2", "normd": "bnd"}
_OUR_NORM = {v: k for k, v in _SCN_NORM.items()}
#: original projector (projection_MLP) -> ours (Projector: Linear, ReLU, BN, Linear, ReLU, BN, Linear)
_PROJECTOR = {"layer1.0": "0", "layer1.2": "2", "layer2.0": "3", "layer2.2": "5", "layer3": "6"}
_OUR_PROJECTOR = {v: k for k, v in _PROJECTOR.items()}
#: Democratizing_WSI ResidualMLP block parts -> ours (ResidualMLPBlock: main = Linear, ReLU, Dropout, BN,
#: Linear, Dropout, BN; skip = Linear, BN)
_DWSI_MLP = {"block.0.block.0": "main.0", "block.0.norm": "main.3", "block.1.block.0": "main.4",
             "block.1.norm": "main.6", "residual_lin.block.0": "skip.0", "residual_lin.norm": "skip.1"}

GIGASSL_MIL = "backbone.net.mil_model."
DWSI_MIL = "backbone.mil."


@dataclass
class SlideCheckpoint:
    """A slide model read from any supported layout, as our SimCLRMIL state dict."""

    path: str
    format: str
    aggregator: str
    in_dim: int
    state: dict[str, torch.Tensor]
    has_projector: bool
    raw: dict = field(default_factory=dict)  # ours: the whole checkpoint (params, optimizer, rng)

    def describe(self) -> str:
        part = "aggregator and projector" if self.has_projector else "aggregator only"
        return f"{self.format} checkpoint, {self.aggregator} on {self.in_dim}-d tiles ({part}): {self.path}"


# -- reading ---------------------------------------------------------------------------------------
class _Stand_in:  # noqa: N801 - stands in for a class of the original code that is not installed
    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


_SAFE_BUILTINS = {"set", "frozenset", "slice", "complex", "range", "bytearray", "tuple", "list", "dict", "int",
                  "float", "str", "bool", "bytes", "object"}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "builtins":
            if name in _SAFE_BUILTINS:
                return super().find_class(module, name)
        elif module.split(".")[0] in ("torch", "collections", "numpy", "_codecs") or module == "argparse":
            return super().find_class(module, name)
        return type(name, (_Stand_in,), {"__module__": module})


class _pickle_module:  # noqa: N801 - what torch.load takes as `pickle_module`
    Unpickler = _Unpickler
    __name__ = "gigassl_fast_unpickler"

    @staticmethod
    def load(fh, **kwargs):
        return _Unpickler(fh, **kwargs).load()


def _load(path: str) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_pickle_module)
    except Exception as err:  # truncated file, not a torch file, ...
        raise GigasslError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(obj, Mapping):
        raise GigasslError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dict")
    return dict(obj)


def detect_format(obj: Mapping) -> str:
    """Which layout a loaded checkpoint dict is in (see the module docstring)."""
    if "params" in obj and "state_dict" in obj:
        return "gigassl-fast"
    state = obj.get("state_dict", obj)
    keys = list(state) if isinstance(state, Mapping) else []
    if any(k.startswith(GIGASSL_MIL) for k in keys):
        return "gigassl"
    if any(k.startswith(DWSI_MIL) for k in keys):
        return "democratizing-wsi"
    sample = ", ".join(keys[:4]) or "no keys"
    raise GigasslError(f"not a slide checkpoint this toolkit knows (keys start {sample}); known: gigassl-fast "
                       f"(train), trislaz/gigassl SimCLRMIL ({GIGASSL_MIL}*), Democratizing_WSI ({DWSI_MIL}*)")


def read_slide_checkpoint(path: str) -> SlideCheckpoint:
    """Any supported slide checkpoint at `path`, as our SimCLRMIL state (`describe()` says what it was)."""
    obj = _load(path)
    try:
        fmt = detect_format(obj)
    except GigasslError as err:
        raise GigasslError(f"{path}: {err}") from None
    if fmt == "gigassl-fast":
        return SlideCheckpoint(path, fmt, obj["params"]["aggregator"], int(obj["in_dim"]), dict(obj["state_dict"]),
                               True, obj)
    state = obj["state_dict"]
    if fmt == "gigassl":
        downmap = getattr(getattr(obj.get("config"), "model", None), "downmap", 224)
        if downmap != 224:
            raise GigasslError(f"{path}: trained with grid cells of {downmap} level-0 px (config.model.downmap); "
                               "gigassl-fast's sparse-layer4 places tiles on 224-px cells, as the released models do")
        ours = from_gigassl(state, path)
        return SlideCheckpoint(path, fmt, "sparse-layer4", 256, ours, any(k.startswith("projector.") for k in ours))
    mil = {k[len(DWSI_MIL):]: v for k, v in state.items() if k.startswith(DWSI_MIL)}
    if any(k.startswith("net.mil_model.") for k in mil):
        ours = _sparse_from_scn({k[len("net.mil_model."):]: v for k, v in mil.items() if k.startswith("net.mil_model.")},
                                path, prefix=DWSI_MIL + "net.mil_model.")
        return SlideCheckpoint(path, fmt, "sparse-layer4", 256, ours, False)
    ours, in_dim = _mlp_from_dwsi(mil, path)
    return SlideCheckpoint(path, fmt, "mlp", in_dim, ours, False)


# -- conversions ------------------------------------------------------------------------------------
def _sparse_from_scn(scn: Mapping[str, torch.Tensor], path: str, prefix: str) -> dict[str, torch.Tensor]:
    """``sparse_pooling.0.{b}.*`` SparseConvNet tensors -> our ``backbone.block{b}.*``."""
    out, unexpected = {}, []
    for key, value in scn.items():
        m = _SCN_BLOCK.match(key)
        if not m:
            unexpected.append(prefix + key)
            continue
        b, layer, field_ = m.groups()
        if layer.startswith("conv"):
            if field_ != "weight":
                unexpected.append(prefix + key)
                continue
            out[f"backbone.block{b}.{layer}"] = _dense_weight(value)
        else:
            out[f"backbone.block{b}.{_SCN_NORM[layer]}.{field_}"] = value.clone()
    _check(out, path, unexpected, "backbone.", {"backbone": _sparse_template()})
    return out


def _dense_weight(scn: torch.Tensor) -> torch.Tensor:
    """SCN (k*k, 1, in, out) -> dense (out, in, k, k)."""
    taps, _, cin, cout = scn.shape
    k = int(round(taps ** 0.5))
    return scn.reshape(k, k, cin, cout).permute(3, 2, 0, 1).contiguous().clone()


def _scn_weight(dense: torch.Tensor) -> torch.Tensor:
    """dense (out, in, k, k) -> SCN (k*k, 1, in, out)."""
    cout, cin, k, _ = dense.shape
    return dense.permute(2, 3, 1, 0).reshape(k * k, 1, cin, cout).contiguous().clone()


def from_gigassl(state: Mapping[str, torch.Tensor], path: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The original SimCLRMIL state dict -> ours. ``encoder.*`` repeats the same tensors and is checked
    to, not read."""
    scn = {k[len(GIGASSL_MIL):]: v for k, v in state.items() if k.startswith(GIGASSL_MIL)}
    ours = _sparse_from_scn(scn, path, prefix=GIGASSL_MIL)
    unexpected = []
    for key, value in state.items():
        if key.startswith(GIGASSL_MIL):
            continue
        if key.startswith("projector."):
            part, _, field_ = key[len("projector."):].rpartition(".")
            if part in _PROJECTOR:
                ours[f"projector.{_PROJECTOR[part]}.{field_}"] = value.clone()
                continue
        if key.startswith(("encoder.", "backbone.net.linear_classifier.")):
            continue
        unexpected.append(key)
    if unexpected:
        raise GigasslError(f"{path}: weights do not fit the original SimCLRMIL layout: unexpected "
                           f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})")
    if any(k.startswith("projector.") for k in ours):
        _check(ours, path, [], "projector.", {"projector": _projector_template()})
    return ours


def to_gigassl(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our sparse-layer4 SimCLRMIL state dict -> the original's ``SimCLRMIL.state_dict()`` keys and layouts
    (``encoder.*`` included, as the original's module tree has it)."""
    out: dict[str, torch.Tensor] = {}
    projector: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked") and key.startswith("backbone."):
            continue  # SparseConvNet's batch norm has no counter
        m = re.match(r"^backbone\.block([01])\.(conv1|conv2|convd|bn1|bn2|bnd)(?:\.(\w+))?$", key)
        if m:
            b, layer, field_ = m.groups()
            if layer.startswith("conv"):
                out[f"{GIGASSL_MIL}sparse_pooling.0.{b}.{layer}.weight"] = _scn_weight(value)
            else:
                out[f"{GIGASSL_MIL}sparse_pooling.0.{b}.{_OUR_NORM[layer]}.{field_}"] = value.clone()
            continue
        m = re.match(r"^projector\.(\d)\.(\w+)$", key)
        if m and m.group(1) in _OUR_PROJECTOR:
            projector[f"{_OUR_PROJECTOR[m.group(1)]}.{m.group(2)}"] = value.clone()
            continue
        raise GigasslError(f"{key}: not part of a sparse-layer4 SimCLRMIL; only sparse-layer4 models export to "
                           "the original layout")
    for key, value in projector.items():
        out[f"projector.{key}"] = value
    # The original registers backbone and projector a second time inside `encoder`.
    for key, value in list(out.items()):
        if key.startswith("backbone."):
            out["encoder.0." + key[len("backbone."):]] = value
        elif key.startswith("projector."):
            out["encoder.1." + key[len("projector."):]] = value
    return out


def _mlp_from_dwsi(mil: Mapping[str, torch.Tensor], path: str) -> tuple[dict[str, torch.Tensor], int]:
    out, unexpected = {}, []
    for key, value in mil.items():
        m = re.match(r"^tile_encoder\.([01])\.(.+)\.(\w+)$", key)
        if m and m.group(2) in _DWSI_MLP:
            out[f"backbone.blocks.{m.group(1)}.{_DWSI_MLP[m.group(2)]}.{m.group(3)}"] = value.clone()
        elif not key.startswith("classifier."):
            unexpected.append(DWSI_MIL + key)
    first = out.get("backbone.blocks.0.main.0.weight")
    if first is None:
        raise GigasslError(f"{path}: a Democratizing_WSI checkpoint without {DWSI_MIL}tile_encoder.0.block.0.block.0.weight")
    in_dim = int(first.shape[1])
    from .aggregators.mlp import ResidualMLP

    _check(out, path, unexpected, "backbone.", {"backbone": ResidualMLP(in_dim)})
    return out, in_dim


def _sparse_template() -> torch.nn.Module:
    from .aggregators import SparseConvMIL

    return SparseConvMIL()


def _projector_template() -> torch.nn.Module:
    from .ssl import Projector

    return Projector()


def _check(ours: Mapping[str, torch.Tensor], path: str, unexpected: list[str], prefix: str,
           templates: Mapping[str, torch.nn.Module]) -> None:
    """Every tensor of the template modules present with its shape; names what is missing, unexpected or
    mis-shaped (in the file's own key names where it has them)."""
    want = {f"{name}.{k}": v for name, m in templates.items() for k, v in m.state_dict().items()
            if not k.endswith("num_batches_tracked")}
    have = {k: v for k, v in ours.items() if k.startswith(prefix)}
    missing = sorted(k for k in want if k not in have)
    unexpected = sorted(unexpected + [k for k in have if k not in want and not k.endswith("num_batches_tracked")])
    wrong = sorted(k for k in have if k in want and tuple(have[k].shape) != tuple(want[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} ({len(keys)})"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise GigasslError(f"{path}: weights do not fit: {'; '.join(parts)}")


# -- writing ----------------------------------------------------------------------------------------
def export_gigassl(ckpt: SlideCheckpoint) -> dict:
    """What the original code's loaders read: ``{'epoch', 'state_dict', 'config'}`` (config as a dict)."""
    if ckpt.aggregator != "sparse-layer4":
        raise GigasslError(f"{ckpt.path}: a {ckpt.aggregator} model has no original-layout counterpart; "
                           "only sparse-layer4 exports to the trislaz/gigassl layout")
    params = ckpt.raw.get("params", {})
    config = {"model": {"downmap": 224, "freeze_pooling": 0}, "dataset": {"nb_tiles": params.get("tiles_per_view", 5)},
              "exported_by": "gigassl-fast", "params": params}
    return {"epoch": int(ckpt.raw.get("epoch", 0)), "state_dict": to_gigassl(ckpt.state), "config": config}


def load_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str = "backbone.") -> None:
    """Loads the tensors of `state` under the `what` prefixes into `model` (a SimCLRMIL); batch-norm
    counters a layout does not carry keep the model's own."""
    prefixes = (what,) if isinstance(what, str) else tuple(what)
    own = model.state_dict()
    chosen = {k: v for k, v in state.items() if k.startswith(prefixes)}
    for key in own:
        if key.startswith(prefixes) and key.endswith("num_batches_tracked") and key not in chosen:
            chosen[key] = own[key]
    missing = [k for k in own if k.startswith(prefixes) and k not in chosen]
    if missing:
        raise GigasslError(f"checkpoint lacks {', '.join(missing[:5])} ({len(missing)})")
    model.load_state_dict({**own, **chosen})
