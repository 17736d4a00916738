"""Giga-SSL tile augmentations (spec §3.2), batched in torch on CPU or GPU.

One parameter draw is shared by every tile of a batch (kornia's ``same_on_batch=True``): a batch is
one augmented version of the slide. In order:

1. random resized crop to the output size, area scale U(0.5, 1), aspect ratio log-U(3/4, 4/3);
2. colour jitter with p = 0.8: brightness, contrast and saturation factors U(0.6, 1.4), hue shift
   U(-0.2, 0.2) of a turn, applied in a random order;
3. grayscale with p = 0.2;
4. Gaussian blur 5x5 with sigma U(0.1, 1.0), p = 0.5;
5. (Gaussian noise has p = 0 in the reference: not applied.)

Normalisation belongs to the encoder and is applied by the caller. Parameters are drawn from a CPU
``torch.Generator``, so a seed gives the same draws on every device.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass

import torch
import torch.nn.functional as F

#: Column order of ``AugParams.as_row()``, stored as ``aug/params`` in feature files.
PARAM_COLUMNS = ("crop_x", "crop_y", "crop_w", "crop_h", "jitter", "brightness", "contrast", "saturation", "hue",
                 "order", "grayscale", "blur", "sigma")


@dataclass(frozen=True)
class AugParams:
    """One draw of the augmentation parameters (crop box in input pixels; flags 0/1)."""

    crop_x: int
    crop_y: int
    crop_w: int
    crop_h: int
    jitter: bool
    brightness: float
    contrast: float
    saturation: float
    hue: float
    order: int  # permutation of (brightness, contrast, saturation, hue), as an index into _ORDERS
    grayscale: bool
    blur: bool
    sigma: float

    def as_row(self) -> list[float]:
        return [float(v) for v in astuple(self)]


_ORDERS = [(a, b, c, d) for a in range(4) for b in range(4) for c in range(4) for d in range(4)
           if len({a, b, c, d}) == 4]


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def draw_params(gen: torch.Generator, size: int) -> AugParams:
    """Draws one parameter set for `size` x `size` input tiles."""
    area = size * size
    crop = None
    for _ in range(10):  # torchvision's RandomResizedCrop sampling
        target = area * _uniform(gen, 0.5, 1.0)
        ratio = math.exp(_uniform(gen, math.log(3 / 4), math.log(4 / 3)))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= size and 0 < h <= size:
            x = int(torch.randint(0, size - w + 1, (), generator=gen))
            y = int(torch.randint(0, size - h + 1, (), generator=gen))
            crop = (x, y, w, h)
            break
    if crop is None:
        crop = (0, 0, size, size)
    jitter = float(torch.rand((), generator=gen)) < 0.8
    b, c, s = (_uniform(gen, 0.6, 1.4) for _ in range(3))
    hue = _uniform(gen, -0.2, 0.2)
    order = int(torch.randint(0, len(_ORDERS), (), generator=gen))
    gray = float(torch.rand((), generator=gen)) < 0.2
    blur = float(torch.rand((), generator=gen)) < 0.5
    sigma = _uniform(gen, 0.1, 1.0)
    return AugParams(*crop, jitter, b, c, s, hue, order, gray, blur, sigma)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    v = maxc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    dc = delta.clamp_min(1e-12)
    h = torch.where(maxc == r, ((g - b) / dc) % 6, torch.where(maxc == g, (b - r) / dc + 2, (r - g) / dc + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    return torch.stack([h, s, v], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Channel n of (R, G, B) = (5, 3, 1) is v - v s clamp(min(k, 4 - k), 0, 1) with k = (n + 6 h) mod 6:
    the six-sector formula without a per-pixel gather (about 4x faster on CPUs)."""
    h, s, v = x.unbind(1)
    vs, h6 = v * s, h * 6
    return torch.stack([v - vs * torch.minimum(k, 4 - k).clamp(0, 1)
                        for k in (torch.remainder(h6 + n, 6) for n in (5.0, 3.0, 1.0))], 1)


def _jitter_one(x: torch.Tensor, op: int, p: AugParams) -> torch.Tensor:
    if op == 0:
        return (x * p.brightness).clamp(0, 1)
    if op == 1:
        mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        return ((x - mean) * p.contrast + mean).clamp(0, 1)
    if op == 2:
        g = _gray(x)
        return ((x - g) * p.saturation + g).clamp(0, 1)
    hsv = _rgb_to_hsv(x)
    hsv = torch.stack([(hsv[:, 0] + p.hue) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
    return _hsv_to_rgb(hsv).clamp(0, 1)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = torch.arange(5, dtype=x.dtype, device=x.device) - 2
    k = torch.exp(-(k**2) / (2 * sigma * sigma))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    return F.conv2d(x, k.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)


def augment(x: torch.Tensor, p: AugParams, out_size: int) -> torch.Tensor:
    """Applies one parameter draw to a whole batch.

    Args:
        x: float (B, 3, S, S) RGB in [0, 1], any device and float dtype.
        p: parameters from ``draw_params(gen, S)``.
        out_size: side of the output tiles.

    Returns:
        float (B, 3, out_size, out_size) in [0, 1].
    """
    x = x[:, :, p.crop_y:p.crop_y + p.crop_h, p.crop_x:p.crop_x + p.crop_w]
    x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", align_corners=False, antialias=False)
    x = x.clamp(0, 1)
    if p.jitter:
        for op in _ORDERS[p.order]:
            x = _jitter_one(x, op, p)
    if p.grayscale:
        x = _gray(x).expand(-1, 3, -1, -1)
    if p.blur:
        x = _blur(x, p.sigma)
    return x.contiguous(memory_format=torch.channels_last)
