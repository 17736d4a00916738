"""Sparse-bag kernels for the aggregators, each beside its torch twin.

``gather_gemm``: Y = X[rows] @ W. The rows a view sampler picked are read straight from the packed store
X (T, D), with no (B, k, D) copy in memory; ``gather_linear_relu`` adds the bias and ReLU (mlp, abmil).

``tap_gemm``: the same with one weight matrix per block of GROUP rows, W (taps, D, C): the sparse
3x3 convolutions' products, rule pairs grouped by tap (aggregators/sparse_plan.py lays them out).

``csr_sum``: out[o] = sum of Y[perm[j]] for j in [ptr[o], ptr[o+1]), the products summed into their
output sites. The order and bounds come from the host plan, so each output is summed by one program in
a fixed order: deterministic, no atomics, nothing sorted or read back on the device. Its kernel is the
general tap scatter (a tap per pair; ``tap_scatter_twin``).

``segment_softmax_pool``: attention pooling of each view's tiles (abmil).

Every shape comes from the caller's host values (a plan's padded sizes on GPUs), so a training step
reads nothing back and can be captured in a CUDA graph. The twins define what the kernels compute and
are the CPU path; autograd goes through custom Functions whose backward passes are torch ops or the
same kernels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .availability import use_triton

_EXACT_DOTS = False

#: Rows per block of the gather-GEMM kernel, and so the granule of a planned tap group (one weight per block).
GROUP = 64


@contextlib.contextmanager
def exact_dots() -> Iterator[None]:
    """Within this block the gather-GEMM kernel multiplies in full float32 (IEEE) instead of tf32, so
    that whole-model results can be compared with the twins' float32 arithmetic (tf32's 10-bit mantissa
    leaves about 3e-4 relative error per product, which batch norm can amplify in gradients)."""
    global _EXACT_DOTS
    saved, _EXACT_DOTS = _EXACT_DOTS, True
    try:
        yield
    finally:
        _EXACT_DOTS = saved

# ---------------------------------------------------------------------------------------------- twins


def gather_gemm_twin(x: torch.Tensor, rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """float32 (len(rows), N): x[rows] @ w, computed in float32."""
    return x[rows].float() @ w.float()


def gather_linear_relu_twin(x: torch.Tensor, rows: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32 (len(rows), N): relu(x[rows] @ w + b), for the mlp and abmil aggregators' first layer."""
    return torch.relu(x[rows].float() @ w.float() + b.float())


def segment_softmax_pool_twin(scores: torch.Tensor, values: torch.Tensor, ptr: torch.Tensor) -> torch.Tensor:
    """(S, C): for each segment [ptr[s], ptr[s+1]), softmax of its scores weighting the sum of its values
    (attention pooling of the tiles of each view)."""
    n = len(ptr) - 1
    # each row's segment by a search, not repeat_interleave(lengths): its output size would be read back
    seg = torch.searchsorted(ptr, torch.arange(len(scores), device=ptr.device), right=True) - 1
    mx = torch.full((n,), float("-inf"), dtype=scores.dtype, device=scores.device).scatter_reduce(
        0, seg, scores, reduce="amax")
    e = torch.exp(scores - mx[seg])
    denom = torch.zeros(n, dtype=e.dtype, device=e.device).index_add_(0, seg, e)
    a = e / denom[seg]
    return torch.zeros(n, values.shape[1], dtype=values.dtype, device=values.device).index_add_(0, seg, a[:, None] * values)


def tap_scatter_twin(y: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, tap: torch.Tensor,
                     n_out: int) -> torch.Tensor:
    """(n_out, C): out[dst[p]] += y[src[p], tap[p]] for every pair p; y is (N_in, 9, C)."""
    out = torch.zeros(n_out, y.shape[2], dtype=y.dtype, device=y.device)
    return out.index_add_(0, dst, y[src, tap])


def tap_gemm_twin(x: torch.Tensor, rows: torch.Tensor, w: torch.Tensor, block_tap: torch.Tensor) -> torch.Tensor:
    """float32 (len(rows), N): row block i (GROUP rows) is x[rows of block i] @ w[block_tap[i]]; w is
    (taps, K, N). One batched product over the blocks, so its shapes do not depend on the data."""
    blocks = len(block_tap)
    a = x[rows].float().view(blocks, GROUP, x.shape[1])
    return torch.bmm(a, w.float()[block_tap]).view(len(rows), w.shape[-1])


def csr_sum_twin(y: torch.Tensor, perm: torch.Tensor, ptr: torch.Tensor, seg: torch.Tensor, n_out: int) -> torch.Tensor:
    """(n_out, C): out[o] = sum of y[perm[j]] for j in [ptr[o], ptr[o+1]); `seg[j]` is the output of entry
    j, and entries from ptr[-1] on are padding (left out)."""
    live = (torch.arange(len(perm), device=perm.device) < ptr[-1]).to(y.dtype)
    out = torch.zeros(n_out, y.shape[1], dtype=y.dtype, device=y.device)
    return out.index_add_(0, seg, y[perm] * live[:, None])


# -------------------------------------------------------------------------------------------- kernels


def _kernels():
    from . import _sparse_bag_triton

    return {"gather_gemm": _sparse_bag_triton.gather_gemm_kernel, "tap_scatter": _sparse_bag_triton.tap_scatter_kernel,
            "segment_softmax_pool": _sparse_bag_triton.segment_softmax_pool_kernel}


def gather_gemm_triton(x: torch.Tensor, rows: torch.Tensor, w: torch.Tensor, ieee: bool = False,
                       bias: torch.Tensor | None = None, relu: bool = False,
                       block_tap: torch.Tensor | None = None) -> torch.Tensor:
    """`block_tap` given: `w` is (taps, K, N) and rows block i (of GROUP rows) uses w[block_tap[i]]."""
    import triton

    m, k, n = rows.shape[0], x.shape[1], w.shape[-1]
    y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    x, w, rows = x.contiguous(), w.contiguous(), rows.contiguous()
    bm, bn, bk = GROUP, 128, 32
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _kernels()["gather_gemm"][grid](x, rows, w, y, bias if bias is not None else y,
                                    block_tap if block_tap is not None else rows, m, n, k, x.stride(0),
                                    w.stride(-2), y.stride(0), w.stride(0) if block_tap is not None else 0,
                                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IEEE=ieee, BIAS=bias is not None,
                                    RELU=relu, GROUPED=block_tap is not None)
    return y


def _scatter_csr_triton(y: torch.Tensor, ptr: torch.Tensor, src: torch.Tensor, tap: torch.Tensor, n_out: int,
                        max_pairs: int) -> torch.Tensor:
    """out[o] = sum of y[src[j], tap[j]] for j in [ptr[o], ptr[o+1]): pairs already grouped by output."""
    import triton

    y = y.contiguous()
    c = y.shape[2]
    out = torch.empty(n_out, c, dtype=torch.float32, device=y.device)
    if n_out == 0:
        return out
    bo, bc = 32, 128
    grid = (triton.cdiv(n_out, bo), triton.cdiv(c, bc))
    _kernels()["tap_scatter"][grid](y, ptr, src.contiguous(), tap.contiguous(), out, n_out, c,
                                    y.stride(0), y.stride(1), out.stride(0),
                                    MAX_PAIRS=triton.next_power_of_2(max(max_pairs, 1)), BLOCK_O=bo, BLOCK_C=bc)
    return out.to(y.dtype)


# ------------------------------------------------------------------------------------------ autograd


class _GatherGemm(torch.autograd.Function):
    """y = x[rows] @ w (+ b) (ReLU optional) by the Triton kernel; the backward in torch ops."""

    @staticmethod
    def forward(ctx, x, rows, w, b, relu):
        y = gather_gemm_triton(x, rows, w, ieee=_EXACT_DOTS, bias=b, relu=relu)
        ctx.relu = relu
        ctx.save_for_backward(x, rows, w, y if relu else None)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, rows, w, y = ctx.saved_tensors
        g = grad.float() * (y > 0) if ctx.relu else grad.float()
        gx = torch.zeros_like(x, dtype=torch.float32).index_add_(0, rows, g @ w.float().T).to(x.dtype) \
            if ctx.needs_input_grad[0] else None
        gw = (x[rows].float().T @ g).to(w.dtype) if ctx.needs_input_grad[2] else None
        gb = g.sum(0).to(w.dtype) if ctx.needs_input_grad[3] else None
        return gx, None, gw, gb, None


class _TapGemm(torch.autograd.Function):
    """The grouped gather-GEMM (one weight per block of GROUP rows) by the kernel; backward: the input
    gradient by the same kernel on the transposed weights, the weight gradient per block (batched) and
    summed per tap. Every shape is fixed by the plan's padded sizes, none by the data. (The input
    gradient's index_add_ still adds with atomics on a GPU, as the other kernels' backward passes do.)"""

    @staticmethod
    def forward(ctx, x, rows, w, block_tap):
        ctx.save_for_backward(x, rows, w, block_tap)
        return gather_gemm_triton(x, rows, w, ieee=_EXACT_DOTS, block_tap=block_tap)

    @staticmethod
    def backward(ctx, grad):
        x, rows, w, block_tap = ctx.saved_tensors
        g = grad.float().contiguous()
        gx = gw = None
        if ctx.needs_input_grad[0]:
            per_row = gather_gemm_triton(g, torch.arange(len(rows), device=g.device), w.float().transpose(1, 2),
                                         ieee=_EXACT_DOTS, block_tap=block_tap)
            gx = torch.zeros_like(x, dtype=torch.float32).index_add_(0, rows, per_row).to(x.dtype)
        if ctx.needs_input_grad[2]:
            blocks = len(block_tap)
            a = x[rows].float().view(blocks, GROUP, x.shape[1])
            partial = torch.bmm(a.transpose(1, 2), g.view(blocks, GROUP, g.shape[1]))  # (blocks, K, N)
            # summed per tap by a product with the one-hot tap of each block: a fixed order (index_add_
            # would add with atomics, and the gradient would vary from run to run)
            onehot = (block_tap[:, None] == torch.arange(w.shape[0], device=w.device)).to(torch.float32)
            gw = (onehot.T @ partial.view(blocks, -1)).view(w.shape).to(w.dtype)
        return gx, None, gw, None


class _CsrSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, perm, ptr, seg, n_out, max_len):
        ctx.save_for_backward(perm, ptr, seg)
        ctx.rows = len(y)
        return _scatter_csr_triton(y[:, None, :], ptr, perm, torch.zeros_like(perm), n_out, max_len)

    @staticmethod
    def backward(ctx, grad):
        perm, ptr, seg = ctx.saved_tensors
        live = (torch.arange(len(perm), device=perm.device) < ptr[-1]).to(grad.dtype)
        # perm is a permutation of the rows (padding included): each row receives exactly one gradient
        gy = torch.zeros(ctx.rows, grad.shape[1], dtype=grad.dtype, device=grad.device)
        return gy.index_copy_(0, perm, grad[seg] * live[:, None]), None, None, None, None, None


def tap_gemm(x: torch.Tensor, rows: torch.Tensor, w: torch.Tensor, block_tap: torch.Tensor) -> torch.Tensor:
    """float32 (len(rows), N): x[rows] @ w[tap of the row's block] (blocks of GROUP rows), the weights w
    (taps, K, N): the grouped Triton kernel where it runs, else the twin."""
    return _TapGemm.apply(x, rows, w, block_tap) if use_triton(x) else tap_gemm_twin(x, rows, w, block_tap)


def csr_sum(y: torch.Tensor, perm: torch.Tensor, ptr: torch.Tensor, seg: torch.Tensor, n_out: int,
            max_len: int) -> torch.Tensor:
    """(n_out, C): the rows of `y` summed per output in CSR order (see ``csr_sum_twin``); `max_len` bounds
    the entries of one output (it sizes the kernel: given by the caller, never read back)."""
    if use_triton(y):
        return _CsrSum.apply(y, perm, ptr, seg, n_out, max_len)
    return csr_sum_twin(y, perm, ptr, seg, n_out)


def gather_gemm(x: torch.Tensor, rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """float32 (len(rows), N) = x[rows] @ w: the Triton kernel where it runs, else the twin."""
    return _GatherGemm.apply(x, rows, w, None, False) if use_triton(x) else gather_gemm_twin(x, rows, w)


def segment_softmax_pool_triton(scores: torch.Tensor, values: torch.Tensor, ptr: torch.Tensor,
                                max_len: int | None = None) -> torch.Tensor:
    """`max_len`, the longest segment, sizes the kernel; without it, it is read back from the device (a
    host synchronisation): callers that know it (views of k tiles) pass it."""
    import triton

    n, c = len(ptr) - 1, values.shape[1]
    out = torch.empty(n, c, dtype=torch.float32, device=values.device)
    if max_len is None:
        max_len = int((ptr[1:] - ptr[:-1]).max().item()) if n else 1
    bc = 64
    _kernels()["segment_softmax_pool"][(n, triton.cdiv(c, bc))](
        scores.contiguous(), values.contiguous(), ptr.contiguous(), out, c, values.stride(0), out.stride(0),
        MAX_LEN=triton.next_power_of_2(max(max_len, 2)), BLOCK_C=bc)
    return out.to(values.dtype)


class _SegmentSoftmaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, values, ptr, max_len):
        ctx.save_for_backward(scores, values, ptr)
        return segment_softmax_pool_triton(scores, values, ptr, max_len)

    @staticmethod
    def backward(ctx, grad):
        scores, values, ptr = ctx.saved_tensors
        with torch.enable_grad():
            s, v = scores.detach().requires_grad_(True), values.detach().requires_grad_(True)
            out = segment_softmax_pool_twin(s, v, ptr)
            gs, gv = torch.autograd.grad(out, (s, v), grad)
        return gs, gv, None, None


def gather_linear_relu(x: torch.Tensor, rows: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """relu(x[rows] @ w + b): the fused Triton kernel where it runs, else the twin."""
    return _GatherGemm.apply(x, rows, w, b, True) if use_triton(x) else gather_linear_relu_twin(x, rows, w, b)


def segment_softmax_pool(scores: torch.Tensor, values: torch.Tensor, ptr: torch.Tensor,
                         max_len: int | None = None) -> torch.Tensor:
    """Attention pooling per segment: the Triton kernel where it runs, else the twin. `max_len`: the
    longest segment, if the caller knows it (saves reading it back from the device)."""
    return _SegmentSoftmaxPool.apply(scores, values, ptr, max_len) if use_triton(values) else \
        segment_softmax_pool_twin(scores, values, ptr)
