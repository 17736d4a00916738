"""The original way to train Giga-SSL (spec §4; trislaz/gigassl main_sharedaug.py, train_dataset.py,
networks.py on SparseConvNet, simclr.py), rebuilt so that it costs what the original costs.

What the original does, and so what this module does, per step:

- **Data.** A DataLoader (the config's 10 workers, capped by the machine's cores) over one item per
  slide. Each item builds two views; each view draws an augmentation with ``torch.randint``, loads
  ``tiles/<wsi>/<a>.npy`` (Nt x 256 float32) and ``coordinates/<wsi>/<a>.npy`` (Nt x 2 int64) from
  disk, draws 5 rows with replacement and augments their coordinates with 2 x 2 torch matrices
  (rotation with the angle drawn in degrees and used as radians, flips, per-axis scale, translation,
  then ``torch.mm`` in float32 and truncation).
- **Model.** Two separate forwards, as ``SimCLRMIL.forward`` does. Each one: coordinates / 224 and the
  per-view minimum subtracted view by view in Python; batch indices built by a list comprehension;
  SparseConvNet's input layer (coincident tiles averaged), its rulebooks (built on the CPU, here with
  vectorised numpy where SCN uses C++ hash maps) and its convolutions as one gather-GEMM-scatter per
  filter tap; SCN batch norm over the active sites (variance as E[x²] - mean²); the shortcut's average
  pooling divided by 9; then ``SparseAdaptiveAvgPool``: a Python loop over the views, a boolean mask
  over all sites for each. The projector is ``projection_MLP`` (ReLU before batch norm).
- **Loss.** ``NT_XentLoss``: cosine similarities of (2N, 1, D) against (1, 2N, D) broadcast tensors
  (the (2N, 2N, D) temporaries are most of the original's backward pass), positives off the two
  diagonals, negatives by a boolean mask, cross-entropy summed and divided by 2N.
- **Update.** Adam, then the per-iteration learning-rate schedule.

None of it uses gigassl_fast code: the tests check it against the SparseConvNet fixture arrays and a
numpy statement of the loss, not against our implementation.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# -- data: EmbWSISharedAug + LocationsAugmentation ---------------------------------------------------------


def write_reference_dataset(root: str, aug_features: np.ndarray, aug_coords: np.ndarray) -> None:
    """tiles/wsi<i>/<a>.npy (Nt, D) float32 and coordinates/wsi<i>/<a>.npy (Nt, 2) int64, the layout and
    sizes SharedAugTiler writes (Nt 256 in the paper: 262 KB per file)."""
    s, naug = aug_features.shape[:2]
    for i in range(s):
        for kind in ("tiles", "coordinates"):
            os.makedirs(os.path.join(root, kind, f"wsi{i}"), exist_ok=True)
        for a in range(naug):
            np.save(os.path.join(root, "tiles", f"wsi{i}", f"{a}.npy"), aug_features[i, a].astype(np.float32))
            np.save(os.path.join(root, "coordinates", f"wsi{i}", f"{a}.npy"), aug_coords[i, a].astype(np.int64))


def location_matrix(theta: float, flip_h: float, flip_v: float, scale_h: float, scale_v: float) -> torch.Tensor:
    """R(theta) @ diag(flips) @ diag(scales) as the original composes it (theta used as radians)."""
    theta, flip_h, flip_v, scale_h, scale_v = map(float, (theta, flip_h, flip_v, scale_h, scale_v))
    m = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    m = torch.mm(m, torch.tensor([[flip_h, 0.0], [0.0, flip_v]]).float())
    return torch.mm(m, torch.tensor([[scale_h, 0.0], [0.0, scale_v]]))


def apply_location_augmentation(locations: torch.Tensor, matrix: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """p' = long(float(p - t) @ M): the original's last step, truncation toward zero included."""
    return torch.mm((locations - translation).float(), matrix).long()


class OriginalViews(torch.utils.data.Dataset):
    """One item per slide: two independently drawn views ((5, D) float32 features, (5, 2) int64 locations)."""

    def __init__(self, root: str, naug: int, ntiles: int = 5) -> None:
        self.naug, self.ntiles = naug, ntiles
        self.files = sorted(os.listdir(os.path.join(root, "tiles")))
        self.tiles = [os.path.join(root, "tiles", f) for f in self.files]
        self.coords = [os.path.join(root, "coordinates", f) for f in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def _view(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = int(torch.randint(self.naug, (1,))[0])
        mat = np.load(os.path.join(self.tiles[idx], f"{a}.npy"))
        info = np.load(os.path.join(self.coords[idx], f"{a}.npy"))
        sel = torch.randint(0, mat.shape[0], (self.ntiles,))
        emb, loc = torch.Tensor(mat[sel, :]).clone(), torch.Tensor(info[sel, :]).clone()
        theta = (torch.rand((1,)) * 360 - 180).item()
        flip_h = float(np.array([-1.0, 1.0])[torch.randint(0, 2, (1,))])
        flip_v = float(np.array([-1.0, 1.0])[torch.randint(0, 2, (1,))])
        scale_h = 0.6 * torch.rand((1,)).item() + 0.7
        scale_v = 0.6 * torch.rand((1,)).item() + 0.7
        extent = loc.max(dim=0)[0] - loc.min(dim=0)[0]
        t = torch.tensor([torch.randint(0, max(int(e), 1), (1,)).item() for e in extent])
        return emb, apply_location_augmentation(loc, location_matrix(theta, flip_h, flip_v, scale_h, scale_v), t)

    def __getitem__(self, idx: int):
        return (self._view(idx), self._view(idx)), self.files[idx]


def original_loader(root: str, naug: int, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    # pin_memory as the original's dataloader_kwargs; workers are not persistent (restarted each epoch)
    return torch.utils.data.DataLoader(OriginalViews(root, naug), batch_size=batch_size, shuffle=True,
                                       num_workers=workers, drop_last=True, pin_memory=torch.cuda.is_available())


# -- model: SparseConvMIL on SparseConvNet ------------------------------------------------------------------


def corrected_size(s: int) -> int:
    """SparseConvMIL's spatial size correction: at least 5, odd, and half of it odd."""
    s = max(s, 5)
    s += s % 2 == 0
    return s + 2 * ((s // 2) % 2 == 0)


def _keys(view: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (view.astype(np.int64) << 40) | (a.astype(np.int64) << 20) | b.astype(np.int64)


def input_layer(cells: np.ndarray, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SCN InputLayer(mode=4): active sites (view, g0, g1) sorted, and each tile's site."""
    keys = _keys(batch, cells[:, 0], cells[:, 1])
    uniq, tile_site = np.unique(keys, return_inverse=True)
    sites = np.stack([uniq >> 40, (uniq >> 20) & 0xFFFFF, uniq & 0xFFFFF], 1)
    return sites, tile_site


def strided_rules(sites: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 stride-2 windows (SCN Convolution / AveragePooling rules): output sites and (in, out, tap) pairs."""
    out_size = (size - 3) // 2 + 1
    src, outs, taps = [], [], []
    for d0 in range(3):
        for d1 in range(3):
            u0, u1 = sites[:, 1] - d0, sites[:, 2] - d1
            ok = (u0 % 2 == 0) & (u1 % 2 == 0) & (u0 >= 0) & (u1 >= 0)
            ok &= (u0 // 2 < out_size[0]) & (u1 // 2 < out_size[1])
            idx = np.nonzero(ok)[0]
            src.append(idx)
            outs.append(_keys(sites[idx, 0], u0[idx] // 2, u1[idx] // 2))
            taps.append(np.full(len(idx), 3 * d0 + d1))
    keys = np.concatenate(outs)
    uniq, dst = np.unique(keys, return_inverse=True)
    out_sites = np.stack([uniq >> 40, (uniq >> 20) & 0xFFFFF, uniq & 0xFFFFF], 1)
    return out_sites, np.stack([np.concatenate(src), dst, np.concatenate(taps)], 1)


def submanifold_rules(sites: np.ndarray) -> np.ndarray:
    """3x3 submanifold rules: (in, out, tap) for every active neighbour of every active site."""
    keys = _keys(sites[:, 0], sites[:, 1], sites[:, 2])  # sorted: the sites come from np.unique
    pairs = []
    for d0 in (-1, 0, 1):
        for d1 in (-1, 0, 1):
            nb = _keys(sites[:, 0], sites[:, 1] + d0, sites[:, 2] + d1)
            pos = np.minimum(np.searchsorted(keys, nb), len(keys) - 1)
            hit = np.nonzero(keys[pos] == nb)[0]
            pairs.append(np.stack([pos[hit], hit, np.full(len(hit), 3 * (d0 + 1) + (d1 + 1))], 1))
    return np.concatenate(pairs)


def split_by_tap(rules: np.ndarray, taps: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(in, out, tap) rows -> per tap (input rows, output rows): the rulebook's layout in SCN."""
    return [(torch.from_numpy(rules[rules[:, 2] == t, 0]).to(device), torch.from_numpy(rules[rules[:, 2] == t, 1]).to(device))
            for t in range(taps)]


class SCNConvolution(torch.autograd.Function):
    """SparseConvNet's CPU convolution, forward and backward as its C++ does them: per tap, the input
    rows gathered, one GEMM, the products added into the output rows in place; backward writes each
    tap's weight gradient into its slice and adds the input gradient (always computed, as SCN does) in
    place. `weight` in SCN layout (taps, in, out)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, rules: list, n_out: int) -> torch.Tensor:
        out = x.new_zeros(n_out, weight.shape[-1])
        for t, (src, dst) in enumerate(rules):
            if len(src):
                out.index_add_(0, dst, x.index_select(0, src) @ weight[t])
        ctx.save_for_backward(x, weight)
        ctx.rules = rules
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        dx, dw = torch.zeros_like(x), torch.zeros_like(weight)
        for t, (src, dst) in enumerate(ctx.rules):
            if len(src):
                g = grad.index_select(0, dst)
                torch.mm(x.index_select(0, src).T, g, out=dw[t])
                dx.index_add_(0, src, g @ weight[t].T)
        return dx, dw, None, None


def sparse_conv(x: torch.Tensor, weight: torch.Tensor, rules: list, n_out: int) -> torch.Tensor:
    return SCNConvolution.apply(x, weight, rules, n_out)


class SCNBatchNormFunction(torch.autograd.Function):
    """SCN BatchNormalization's forward and backward passes over the active sites, one pass each."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps: float, training: bool):
        if training:
            n = x.shape[0]
            mean = x.mean(0)
            var = (x * x).mean(0) - mean * mean  # SCN: E[x²] - mean², biased, to normalise
            running_mean.mul_(0.9).add_(0.1 * mean)
            running_var.mul_(0.9).add_(0.1 * var * n / max(n - 1, 1))  # unbiased into the running variance
        else:
            mean, var = running_mean, running_var
        inv = torch.rsqrt(var + eps)
        xhat = (x - mean) * inv
        ctx.save_for_backward(xhat, inv, weight)
        ctx.training = training
        return xhat * weight + bias

    @staticmethod
    def backward(ctx, grad):
        xhat, inv, weight = ctx.saved_tensors
        dbias = grad.sum(0)
        dweight = (grad * xhat).sum(0)
        if ctx.training:
            n = grad.shape[0]
            dx = weight * inv * (grad - dbias / n - xhat * dweight / n)
        else:
            dx = grad * weight * inv
        return dx, dweight, dbias, None, None, None, None


class SCNBatchNorm(nn.Module):
    """SCN BatchNormalization over the active sites; momentum 0.9 in SCN's convention (0.1 of the batch)."""

    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight, self.bias = nn.Parameter(torch.ones(n)), nn.Parameter(torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SCNBatchNormFunction.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps,
                                          self.training)


class SparseBlock(nn.Module):
    """One sparse BasicBlock of ResNet18 layer4 with SCN-layout weights (taps, in, out)."""

    def __init__(self, cin: int, cout: int, downsample: bool) -> None:
        super().__init__()
        self.conv1 = nn.Parameter(torch.empty(9, cin, cout))
        self.norm1 = SCNBatchNorm(cout)
        self.conv2 = nn.Parameter(torch.empty(9, cout, cout))
        self.norm2 = SCNBatchNorm(cout)
        self.downsample = downsample
        if downsample:
            self.convd = nn.Parameter(torch.empty(1, cin, cout))
            self.normd = SCNBatchNorm(cout)
        for p in self.parameters():
            if p.dim() == 3:
                nn.init.normal_(p, 0.0, math.sqrt(2.0 / (p.shape[0] * p.shape[2])))


class OriginalSparseConvMIL(nn.Module):
    """gigassl SparseConvMIL(FullSparseConvMIL): (B, 5, 256) features, (B, 5, 2) int64 locations -> (B, 512)."""

    def __init__(self) -> None:
        super().__init__()
        self.block0 = SparseBlock(256, 512, downsample=True)
        self.block1 = SparseBlock(512, 512, downsample=False)
        self.pool = nn.AdaptiveAvgPool1d(1)

    def load_dense_layer4(self, state: dict[str, torch.Tensor]) -> OriginalSparseConvMIL:
        """Copies a torchvision-layout ``layer4.*`` state dict, as the original's cut_resnet_dense_sparse."""
        with torch.no_grad():
            for b, block in enumerate((self.block0, self.block1)):
                convs = {"conv1": "conv1", "conv2": "conv2"} | ({"convd": "downsample.0"} if b == 0 else {})
                for ours, dense in convs.items():
                    w = state[f"layer4.{b}.{dense}.weight"].float()
                    getattr(block, ours).copy_(w.permute(2, 3, 1, 0).reshape(-1, w.shape[1], w.shape[0]))
                norms = {"norm1": "bn1", "norm2": "bn2"} | ({"normd": "downsample.1"} if b == 0 else {})
                for ours, dense in norms.items():
                    for f in ("weight", "bias", "running_mean", "running_var"):
                        getattr(getattr(block, ours), f).copy_(state[f"layer4.{b}.{dense}.{f}"])
        return self

    def forward(self, tile_embeddings: torch.Tensor, tile_locations: torch.Tensor) -> torch.Tensor:
        locs = [t.clone() / 224 for t in tile_locations]
        locs = [t - torch.min(t, dim=0, keepdim=True)[0] for t in locs]
        batch = torch.tensor([[b] for b, t in enumerate(locs) for _ in range(len(t))])
        # SCN's input layer takes the coordinates to the CPU and truncates them to integers.
        cells = torch.vstack(locs).cpu().long().numpy()
        batch = batch.numpy()[:, 0]
        x = tile_embeddings.reshape(-1, tile_embeddings.shape[-1])
        size = np.array([corrected_size(int(cells[:, a].max()) + 1) for a in range(2)])
        sites0, tile_site = input_layer(cells, batch)
        sites1, strided = strided_rules(sites0, size)
        sub = submanifold_rules(sites1)
        dev = x.device
        n0, n1 = len(sites0), len(sites1)
        tile_site = torch.from_numpy(tile_site).to(dev)
        strided_t = torch.from_numpy(strided).to(dev)
        strided, sub = split_by_tap(strided, 9, dev), split_by_tap(sub, 9, dev)
        counts = torch.bincount(tile_site, minlength=n0).to(x.dtype)
        x0 = x.new_zeros(n0, x.shape[1]).index_add(0, tile_site, x) / counts[:, None]
        b0, b1 = self.block0, self.block1
        a = F.relu(b0.norm1(sparse_conv(x0, b0.conv1, strided, n1)))
        a = b0.norm2(sparse_conv(a, b0.conv2, sub, n1))
        pooled = x0.new_zeros(n1, x0.shape[1]).index_add(0, strided_t[:, 1], x0[strided_t[:, 0]]) / 9
        centre = [(torch.arange(n1, device=dev), torch.arange(n1, device=dev))]
        x1 = F.relu(a + b0.normd(sparse_conv(pooled, b0.convd, centre, n1)))
        a = F.relu(b1.norm1(sparse_conv(x1, b1.conv1, sub, n1)))
        x2 = F.relu(b1.norm2(sparse_conv(a, b1.conv2, sub, n1)) + x1)
        # SparseAdaptiveAvgPool: one view at a time.
        views = torch.from_numpy(sites1[:, 0]).to(dev)
        res = [self.pool(x2[views == v].transpose(0, 1).unsqueeze(0)) for v in torch.unique(views)]
        return torch.flatten(torch.cat(res, dim=0), start_dim=1)


class OriginalProjector(nn.Module):
    """projection_MLP(512, 256): Linear -> ReLU -> BatchNorm1d twice, then Linear."""

    def __init__(self, dim: int = 512, out: int = 256) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.BatchNorm1d(dim))
        self.layer2 = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.BatchNorm1d(dim))
        self.layer3 = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer3(self.layer2(self.layer1(x)))


def original_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """NT_XentLoss as the original computes it, broadcast (2N, 2N, D) cosine similarities included."""
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    n = z1.shape[0]
    reps = torch.cat([z1, z2], dim=0)
    sim = F.cosine_similarity(reps.unsqueeze(1), reps.unsqueeze(0), dim=-1)
    positives = torch.cat([torch.diag(sim, n), torch.diag(sim, -n)]).view(2 * n, 1)
    mask = torch.eye(2 * n, dtype=torch.bool, device=sim.device)
    mask[n:, :n] = mask[:n, n:] = mask[:n, :n]
    logits = torch.cat([positives, sim[~mask].view(2 * n, -1)], dim=1) / temperature
    labels = torch.zeros(2 * n, dtype=torch.int64, device=sim.device)
    return F.cross_entropy(logits, labels, reduction="sum") / (2 * n)


class OriginalSimCLRMIL(nn.Module):
    def __init__(self, temperature: float = 0.05) -> None:
        super().__init__()
        self.backbone = OriginalSparseConvMIL()
        self.projector = OriginalProjector()
        self.temperature = temperature

    def forward(self, x1, x2) -> dict:
        z1 = self.projector(self.backbone(*x1))
        z2 = self.projector(self.backbone(*x2))
        loss = original_nt_xent(z1, z2, self.temperature)
        out = F.normalize(z1.detach(), dim=1)
        return {"loss": loss, "output_std": torch.std(out, 0).mean()}


def cosine_lr(step: int, steps_per_epoch: int, base_lr: float = 0.03, warmup_epochs: int = 10,
              epochs: int = 3000) -> float:
    """The original's per-iteration schedule: linear warm-up from 0, then cosine to 0."""
    warm = warmup_epochs * steps_per_epoch
    if step < warm:
        return base_lr * step / warm
    total = (epochs - warmup_epochs) * steps_per_epoch
    return 0.5 * base_lr * (1 + math.cos(math.pi * (step - warm) / total))


def original_step(model: OriginalSimCLRMIL, opt: torch.optim.Optimizer, batch, step: int, steps_per_epoch: int,
                  device: torch.device) -> tuple[float, dict]:
    """One iteration of main_sharedaug's loop: move the views, forward both, backward, Adam, schedule.
    Returns the loss and the seconds of each phase (forward includes the loss)."""

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    t0 = now()
    (images1, images2), _ = batch
    images1 = [x.to(device, non_blocking=True) for x in images1]
    images2 = [x.to(device, non_blocking=True) for x in images2]
    model.zero_grad()
    out = model(images1, images2)
    loss = out["loss"].mean()
    t1 = now()
    loss.backward()
    t2 = now()
    opt.step()
    for group in opt.param_groups:
        group["lr"] = cosine_lr(step, steps_per_epoch)
    out["output_std"].item()  # the original logs it every step (a host sync on a GPU)
    t3 = now()
    return float(loss.detach()), {"forward_s": t1 - t0, "backward_s": t2 - t1, "optimizer_s": t3 - t2}
