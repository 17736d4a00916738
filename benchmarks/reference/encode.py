"""The reference way to encode a slide (spec §3, §8.2; gigassl build_dataset/tilers.py).

Each of the Naug x Nt draws is read from the slide separately (OpenSlide-style random access), every
batch gets one augmentation draw, and a full ResNet18 runs in float32 (layer4 and fc included) with the
layer3 output average-pooled, as the reference's forward hook does. The plain (non-augmented) pass
reads and encodes every tissue tile once more, as the reference's NormalTiler does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gigassl_fast.augment import augment, draw_params
from gigassl_fast.encoders.resnet import BasicBlock, ResNet18Layer3


class FullResNet18(ResNet18Layer3):
    """ResNet18 through fc; `forward` returns the pooled layer3 output (the reference's hook)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer4 = nn.Sequential(BasicBlock(256, 512, 2), BasicBlock(512, 512, 1))
        self.fc = nn.Linear(512, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        l3 = self.layer3(self.layer2(self.layer1(x)))
        self.fc(self.layer4(l3).mean(dim=(2, 3)))  # computed and discarded, as in the reference
        return l3.mean(dim=(2, 3))


def reference_encode(slide, coords: np.ndarray, level: int, read_size: int, tile: int, model: FullResNet18,
                     naug: int, nt: int, seed: int, mean, std, device: torch.device | str = "cpu",
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(plain features (N, 256), augmented features (naug, nt, 256)) the reference way; the model (already
    on `device`) runs in float32 there, each read region is sent there as it is read."""
    dev = torch.device(device)
    mean = torch.tensor(mean, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(std, device=dev).view(1, 3, 1, 1)

    def read(i: int) -> torch.Tensor:
        x, y = coords[i]
        region = slide.read_region(int(x), int(y), level, read_size, read_size)
        t = torch.from_numpy(region).to(dev).permute(2, 0, 1).float()[None] / 255
        return F.interpolate(t, size=(tile, tile), mode="bilinear", antialias=True) if read_size != tile else t

    model.eval()
    with torch.inference_mode():
        plain = [model((read(i) - mean) / std) for i in range(len(coords))]
        gen = torch.Generator().manual_seed(seed)
        draws = torch.randint(0, len(coords), (naug, nt), generator=gen)
        aug = []
        for a in range(naug):
            p = draw_params(gen, tile)
            batch = torch.cat([read(int(i)) for i in draws[a]])
            aug.append(model((augment(batch, p, 224) - mean) / std))
    return torch.cat(plain).cpu().numpy(), torch.stack(aug).cpu().numpy()
