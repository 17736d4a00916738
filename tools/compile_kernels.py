"""Compiles every Triton kernel, in each variant the launchers use, for a CUDA GPU, without a GPU.

Triton versions differ in what their compiler accepts (tap_scatter once compiled with Triton 3.9 and
failed in 3.6's layout pass, found only on the GPU machine). This runs the whole compiler pipeline down to
a cubin on any machine, so a kernel change can be checked against the Triton the GPU machines run:

    python tools/compile_kernels.py [--capability 90]
    make check-kernels TRITON=3.6.0     # the same with another Triton version, installed under build/
"""

from __future__ import annotations

import argparse
import itertools
import sys

GATHER_GEMM = {"x_ptr": "*fp16", "rows_ptr": "*i64", "w_ptr": "*fp32", "y_ptr": "*fp32", "bias_ptr": "*fp32",
               "block_tap_ptr": "*i64", "m": "i32", "n": "i32", "k": "i32", "stride_x": "i32", "stride_w": "i32",
               "stride_y": "i32", "stride_wt": "i32"}
TAP_SCATTER = {"y_ptr": "*fp32", "ptr_ptr": "*i64", "src_ptr": "*i64", "tap_ptr": "*i64", "out_ptr": "*fp32",
               "n_out": "i32", "c": "i32", "stride_y_row": "i32", "stride_y_tap": "i32", "stride_out": "i32"}
SEGMENT_POOL = {"score_ptr": "*fp32", "value_ptr": "*fp32", "ptr_ptr": "*i64", "out_ptr": "*fp32", "c": "i32",
                "stride_v": "i32", "stride_out": "i32"}


def variants():
    """(name, kernel attribute, signature, constexprs), as sparse_bag.py launches them."""
    for x, ieee, fused in itertools.product(("*fp16", "*bf16", "*fp32"), (False, True), (False, True)):
        yield (f"gather_gemm x={x[1:]} ieee={ieee} bias+relu={fused}", "gather_gemm_kernel", {**GATHER_GEMM, "x_ptr": x},
               {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "IEEE": ieee, "BIAS": fused, "RELU": fused,
                "GROUPED": False})
    for x, ieee in itertools.product(("*fp16", "*bf16", "*fp32"), (False, True)):  # the planned tap GEMMs
        yield (f"gather_gemm grouped x={x[1:]} ieee={ieee}", "gather_gemm_kernel", {**GATHER_GEMM, "x_ptr": x},
               {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "IEEE": ieee, "BIAS": False, "RELU": False,
                "GROUPED": True})
    for y, pairs in itertools.product(("*fp32", "*fp16"), (1, 4, 16, 64)):
        yield (f"tap_scatter y={y[1:]} max_pairs={pairs}", "tap_scatter_kernel", {**TAP_SCATTER, "y_ptr": y},
               {"MAX_PAIRS": pairs, "BLOCK_O": 32, "BLOCK_C": 128})
    for length in (2, 8, 64):
        yield (f"segment_softmax_pool max_len={length}", "segment_softmax_pool_kernel", SEGMENT_POOL,
               {"MAX_LEN": length, "BLOCK_C": 64})


def compile_all(capability: int = 90) -> list[tuple[str, str | None]]:
    """[(variant, None when it compiled else the compiler's last line)]."""
    import triton
    from gigassl_fast.kernels import _sparse_bag_triton as k
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", capability, 32)
    results = []
    for name, attr, sig, const in variants():
        fn = getattr(k, attr)
        if not hasattr(fn, "cache_key"):  # imported under TRITON_INTERPRET=1: an interpreted function
            from triton.runtime.jit import JITFunction

            fn = JITFunction(fn.fn)
        signature = {**sig, **{c: "constexpr" for c in const}}
        try:
            src = ASTSource(fn, signature=signature, constexprs={(fn.arg_names.index(c),): v for c, v in const.items()})
            triton.compile(src, target=target)
            results.append((name, None))
        except Exception as err:  # the compiler's message is the finding
            results.append((name, (str(err).strip().splitlines() or [type(err).__name__])[-1][:200]))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capability", type=int, default=90, help="CUDA compute capability (90: H100/H200)")
    args = ap.parse_args()
    import triton

    results = compile_all(args.capability)
    for name, err in results:
        print(f"{'ok    ' if err is None else 'FAILED'} {name}{'' if err is None else ': ' + err}")
    failed = sum(err is not None for _, err in results)
    print(f"Triton {triton.__version__}, sm_{args.capability}: {len(results) - failed} of {len(results)} variants compiled")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
