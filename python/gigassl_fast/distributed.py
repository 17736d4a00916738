"""torch.distributed helpers that work on CPUs (gloo) as on GPUs (NCCL): gathering with gradients and a
batch norm whose statistics span every process (torch's SyncBatchNorm runs on GPUs only)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _functional():
    """torch.distributed.nn.functional (differentiable collectives), its deprecation notice silenced:
    the suggested replacement is a private module."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from torch.distributed.nn import functional
    return functional


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(z: torch.Tensor) -> torch.Tensor:
    """All ranks' rows of `z`, in rank order; gradients flow back to each rank's own rows."""
    if not active():
        return z
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(_functional().all_gather(z), dim=0)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d on (N, C) whose training statistics are those of all processes' rows together:
    mean and biased variance from all-reduced sums (differentiable), running variance updated with
    the unbiased estimate, as one process with the whole batch would."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        return batch_norm_rows(self, x)


def batch_norm_rows(bn: nn.BatchNorm1d, x: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor:
    """`bn` over (N, C) rows in training, with statistics over the rows where `live` is 1 only (the others
    pad a static shape; all rows without `live`), and over every process's rows for a GlobalBatchNorm1d
    under torch.distributed. The running statistics are updated from the same rows (unbiased variance),
    as torch's batch norm does. The count stays on the device: nothing is read back. In eval: `bn`."""
    if not bn.training:
        return bn(x)
    c = x.shape[1]
    xf = x.float()
    w = torch.ones(len(x), 1, dtype=torch.float32, device=x.device) if live is None else live.to(torch.float32)[:, None]
    if isinstance(bn, GlobalBatchNorm1d) and active():
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            stats = _functional().all_reduce(torch.cat([(xf * w).sum(0), (xf * xf * w).sum(0), w.sum().reshape(1)]))
        n = stats[2 * c]
        mean = stats[:c] / n
        var = stats[c:2 * c] / n - mean * mean
    else:  # two passes, as torch's own batch norm is accurate when the mean is large against the spread
        n = w.sum()
        mean = (xf * w).sum(0) / n
        var = ((xf - mean) ** 2 * w).sum(0) / n
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked += 1
            # momentum None: the cumulative average, as torch's batch norm
            m = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked
            bn.running_mean.mul_(1 - m).add_(m * mean.detach())
            bn.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))
    y = (xf - mean) / torch.sqrt(var + bn.eps)
    return (y * bn.weight + bn.bias if bn.affine else y).to(x.dtype)


def convert_global_bn(module: nn.Module) -> nn.Module:
    """Replaces every BatchNorm1d in `module` by a GlobalBatchNorm1d with the same state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            new = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats).to(child.weight.device if child.affine else "cpu")
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_global_bn(child)
    return module


__all__ = ["GlobalBatchNorm1d", "active", "batch_norm_rows", "convert_global_bn", "gather_with_grad"]
