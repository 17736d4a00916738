"""Triton kernels of sparse_bag.py (imported only by its launchers, so the package imports without
Triton). What they compute is defined by the twins in sparse_bag.py."""

import triton
import triton.language as tl


@triton.jit
def gather_gemm_kernel(x_ptr, rows_ptr, w_ptr, y_ptr, bias_ptr, block_tap_ptr, m, n, k, stride_x, stride_w,
                       stride_y, stride_wt, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       IEEE: tl.constexpr, BIAS: tl.constexpr, RELU: tl.constexpr, GROUPED: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if GROUPED:  # each BLOCK_M block of rows has its own weight matrix (its tap): w_ptr is (taps, k, n)
        w_ptr += tl.load(block_tap_ptr + pid_m).to(tl.int64) * stride_wt
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.load(rows_ptr + offs_m, mask=offs_m < m, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rows[:, None] * stride_x + offs_k[None, :],
                    mask=(offs_m[:, None] < m) & (offs_k[None, :] < k), other=0.0)
        b = tl.load(w_ptr + offs_k[:, None] * stride_w + offs_n[None, :],
                    mask=(offs_k[:, None] < k) & (offs_n[None, :] < n), other=0.0)
        # Store rows (float16/bf16) and weights are widened to float32; the dot runs in tf32 on tensor
        # cores, or exactly (IEEE) for checks against the twin.
        if IEEE:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    if BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < n, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    tl.store(y_ptr + offs_m[:, None] * stride_y + offs_n[None, :], acc,
             mask=(offs_m[:, None] < m) & (offs_n[None, :] < n))

@triton.jit
def tap_scatter_kernel(y_ptr, ptr_ptr, src_ptr, tap_ptr, out_ptr, n_out, c, stride_y_row, stride_y_tap,
                       stride_out, MAX_PAIRS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_o = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    # Pair indices are kept 2-D (BLOCK_O, 1) from the start: expanding loaded 1-D index vectors inside
    # the loop trips Triton 3.6's layout pass ("mask type matches ptr type").
    o2 = offs_o[:, None]
    start = tl.load(ptr_ptr + o2, mask=o2 < n_out, other=0)
    end = tl.load(ptr_ptr + o2 + 1, mask=o2 < n_out, other=0)
    c_live = offs_c[None, :] < c
    acc = tl.zeros((BLOCK_O, BLOCK_C), dtype=tl.float32)
    for j in range(MAX_PAIRS):
        p = start + j
        live = p < end
        s = tl.load(src_ptr + p, mask=live, other=0).to(tl.int64)
        t = tl.load(tap_ptr + p, mask=live, other=0).to(tl.int64)
        v = tl.load(y_ptr + s * stride_y_row + t * stride_y_tap + offs_c[None, :], mask=live & c_live, other=0.0)
        acc += v.to(tl.float32)
    tl.store(out_ptr + offs_o[:, None] * stride_out + offs_c[None, :], acc,
             mask=(offs_o[:, None] < n_out) & (offs_c[None, :] < c))


@triton.jit
def segment_softmax_pool_kernel(score_ptr, value_ptr, ptr_ptr, out_ptr, c, stride_v, stride_out,
                                MAX_LEN: tl.constexpr, BLOCK_C: tl.constexpr):
    seg = tl.program_id(0)
    pid_c = tl.program_id(1)
    start = tl.load(ptr_ptr + seg)
    end = tl.load(ptr_ptr + seg + 1)
    offs = start + tl.arange(0, MAX_LEN)
    live = offs < end
    s = tl.load(score_ptr + offs, mask=live, other=float("-inf")).to(tl.float32)
    e = tl.exp(s - tl.max(s, axis=0))
    e = tl.where(live, e, 0.0)
    a = e / tl.sum(e, axis=0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    v = tl.load(value_ptr + offs[:, None].to(tl.int64) * stride_v + offs_c[None, :],
                mask=live[:, None] & (offs_c[None, :] < c), other=0.0).to(tl.float32)
    tl.store(out_ptr + seg * stride_out + offs_c, tl.sum(a[:, None] * v, axis=0), mask=offs_c < c)
