"""ResNet18 truncated after layer3 (the paper's tile encoder, spec §3.1): stem, layer1-3, global
average pooling, 256-d. Nothing past layer3 is built or computed."""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import GigasslError
from .registry import EncoderConfig, register_encoder
from .weights import apply_weights, file_checksum, load_checkpoint, resolve_weights

TORCHVISION_RESNET18 = "https://download.pytorch.org/models/resnet18-f37072fd.pth"


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18Layer3(nn.Module):
    """torchvision ResNet18 up to layer3 with torchvision's module names, then global average pooling."""

    out_dim = 256

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(64, 64, 1), BasicBlock(64, 64, 1))
        self.layer2 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128, 1))
        self.layer3 = nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256, 1))
        self.weights_checksum = "random"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(2, 3))


def _remap_resnet(key: str) -> str | None:
    """torchvision names pass; MoCo's ``module.encoder_q.`` prefix is stripped, its momentum encoder
    (``encoder_k``) and queue dropped; layer4 and fc (MoCo's MLP head too) are dropped."""
    if re.match(r"^(module\.)?(encoder_k\.|queue$|queue_ptr$)", key):
        return None
    for prefix in ("module.encoder_q.", "encoder_q.", "module.", "backbone."):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    if key.startswith(("layer4.", "fc.")):
        return None
    return key


@register_encoder(EncoderConfig(
    name="resnet18-l3", input_size=224, out_dim=256, default_weights=None,
    licence="torchvision ImageNet weights: BSD-3-Clause",
    description="ResNet18 to layer3 + average pooling, 256-d (the Giga-SSL paper's encoder); "
                "--weights imagenet | PATH (torchvision or MoCo checkpoint)"))
def resnet18_l3(weights: str | None) -> ResNet18Layer3:
    model = ResNet18Layer3()
    if weights is None:
        raise GigasslError("resnet18-l3 needs weights: --weights imagenet (torchvision, downloaded once) or "
                           "--weights PATH (torchvision or MoCo checkpoint); --weights random for tests")
    if weights != "random":
        path = resolve_weights(TORCHVISION_RESNET18 if weights == "imagenet" else weights)
        apply_weights(model, load_checkpoint(path), path, _remap_resnet)
        model.weights_checksum = file_checksum(path)
    return model
