"""The original way to encode a slide's tiles (spec §3, §8.2; trislaz/gigassl build_dataset/tilers.py),
rebuilt so that it costs what the original costs.

SharedAugTiler: a DataLoader (5 workers) with ``RandomSampler(replacement=True, num_samples=Naug*Nt)``
and batches of Nt; each item is one OpenSlide ``read_region`` of 224 px at the pyramid level the
original is given (level 1), RGBA -> numpy -> float tensor. Each batch goes to the device, through
kornia's RandomResizedCrop, ColorJitter, RandomGrayscale and RandomGaussianBlur with ``same_on_batch``
(the original's parameters), ImageNet normalisation, and a full torchvision-layout ResNet18 in float32,
NCHW (layer4 and fc computed and thrown away; the layer3 output averaged over space is the feature, as
the original's forward hook takes it). Every batch is saved as two .npy files.

NormalTiler: the same reads, once per tissue tile in order, batches of Nt, same network; saved as float64.
Its as-shipped augmentation (spec §7.4, item 2) is left out: the plain pass only normalises, which makes
this reference cheaper than the original, never dearer.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch import nn

from gigassl_fast.encoders.resnet import BasicBlock, ResNet18Layer3

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class FullResNet18(ResNet18Layer3):
    """torchvision's ResNet18 module tree through fc, plain float32 NCHW (no folded batch norms);
    `forward` returns the pooled layer3 output (the original's hook) after running the whole network."""

    def __init__(self) -> None:
        super().__init__()
        self.layer4 = nn.Sequential(BasicBlock(256, 512, 2), BasicBlock(512, 512, 1))
        self.fc = nn.Linear(512, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        l3 = self.layer3(self.layer2(self.layer1(x)))
        self.fc(self.layer4(l3).mean(dim=(2, 3)))  # computed and discarded, as in the original
        return l3.mean(dim=(2, 3))


def kornia_augmentations() -> list[nn.Module]:
    """SharedAugTiler._get_transforms(aug=True): one parameter draw per batch (same_on_batch)."""
    from kornia.augmentation import ColorJitter, RandomGaussianBlur, RandomGaussianNoise, RandomGrayscale, RandomResizedCrop

    return [RandomResizedCrop((224, 224), (0.5, 1.0), p=1.0, same_on_batch=True),
            ColorJitter(0.4, 0.4, 0.4, 0.2, p=0.8, same_on_batch=True),
            RandomGrayscale(p=0.2, same_on_batch=True),
            RandomGaussianBlur((5, 5), (0.1, 1.0), p=0.5, same_on_batch=True),
            RandomGaussianNoise(0.0, 0.1, p=0.0, same_on_batch=True)]


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class OriginalTiles(torch.utils.data.Dataset):
    """WSI_dataset: item i is the 224 px region at `level` whose level-0 top-left is coords[i]."""

    def __init__(self, path: str, coords: np.ndarray, level: int, size: int = 224) -> None:
        self.path, self.coords, self.level, self.size = path, coords, level, size
        self.slide = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, idx: int):
        import openslide

        if self.slide is None:  # one handle per worker process
            self.slide = openslide.OpenSlide(self.path)
        x, y = (int(v) for v in self.coords[idx])
        image = np.array(self.slide.read_region((x, y), self.level, (self.size, self.size)))[:, :, :3]
        return torch.from_numpy(image).permute(2, 0, 1).contiguous().float().div(255), np.array([x, y])


def original_encode(path: str, coords: np.ndarray, level: int, model: FullResNet18, out_dir: str, naug: int,
                    nt: int, device: torch.device | str = "cpu", workers: int = 5, aug_batches: int | None = None,
                    plain_batches: int | None = None) -> dict:
    """Runs both tilers on one slide, writing the original's files under `out_dir`. Returns the seconds
    each batch took (from the end of the previous one; the first includes the workers' start-up) for
    the augmented and the plain pass, and their batch totals: `aug_batches`/`plain_batches` stop early,
    for benchmarks that extrapolate the reference from its per-batch cost."""
    dev = torch.device(device)
    model = model.to(dev).eval()
    name = os.path.splitext(os.path.basename(path))[0]
    for sub in ("tiles", "coordinates"):
        os.makedirs(os.path.join(out_dir, "aug", sub, name), exist_ok=True)
        os.makedirs(os.path.join(out_dir, "normal", sub), exist_ok=True)
    augs = kornia_augmentations()
    data = OriginalTiles(path, coords, level)

    def forward(batch: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return model(batch).squeeze().cpu().numpy()

    aug_times: list[float] = []
    t = time.perf_counter()
    loader = torch.utils.data.DataLoader(data, batch_size=nt, num_workers=workers, sampler=torch.utils.data.RandomSampler(
        data, replacement=True, num_samples=naug * nt))
    for a, (batch, paras) in enumerate(loader):
        batch = batch.to(dev)
        for op in augs:
            batch = op(batch)
        emb = forward(normalize(batch))
        np.save(os.path.join(out_dir, "aug", "tiles", name, f"{a}.npy"), emb)
        np.save(os.path.join(out_dir, "aug", "coordinates", name, f"{a}.npy"), paras.numpy())
        aug_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        if aug_batches is not None and len(aug_times) >= aug_batches:
            break
    del loader

    plain_times: list[float] = []
    t = time.perf_counter()
    loader = torch.utils.data.DataLoader(data, batch_size=nt, num_workers=workers)
    e, p = np.zeros((len(data), 256)), np.zeros((len(data), 2))
    for b, (batch, paras) in enumerate(loader):
        e[b * nt:(b + 1) * nt] = forward(normalize(batch.to(dev)))
        p[b * nt:(b + 1) * nt] = paras.numpy()
        plain_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        if plain_batches is not None and len(plain_times) >= plain_batches:
            break
    del loader
    np.save(os.path.join(out_dir, "normal", "tiles", f"{name}_embeddings.npy"), e)
    np.save(os.path.join(out_dir, "normal", "coordinates", f"{name}_xy.npy"), p)
    # the last plain batch is partial: count the pass in batches of nt, fractionally
    return {"aug_batch_s": aug_times, "aug_batches_total": naug, "plain_batch_s": plain_times,
            "plain_batches_total": len(data) / nt}


def extrapolated_seconds(batch_s: list[float], total: float) -> float:
    """A pass's seconds from the batches that ran: the first (with the workers' start-up) plus the
    median of the others for each batch left."""
    if not batch_s:
        return 0.0
    if len(batch_s) >= total:  # the whole pass ran
        return float(sum(batch_s))
    steady = float(np.median(batch_s[1:])) if len(batch_s) > 1 else batch_s[0]
    return batch_s[0] + steady * (total - 1)
