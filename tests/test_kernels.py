"""Triton kernels against their torch twins, under the Triton interpreter on CPU (on a GPU machine they
run compiled). float32 with IEEE dots must agree tightly, bf16 within 1e-2; gradients too."""

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, require_module
from gigassl_fast.aggregators import list_aggregators


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    old = os.environ.get("TRITON_INTERPRET")
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: it reads the variable then
    require_module("triton")
    from gigassl_fast.kernels import availability

    availability.triton_status.cache_clear()
    yield
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old
    availability.triton_status.cache_clear()


def _dev():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("m,k,n", [(37, 48, 72), (130, 256, 9 * 40)])
def test_gather_gemm_float32(m, k, n):
    from gigassl_fast.kernels.sparse_bag import gather_gemm_triton, gather_gemm_twin

    g = torch.Generator().manual_seed(m)
    x = torch.randn(500, k, generator=g).to(_dev())
    w = torch.randn(k, n, generator=g).to(_dev())
    rows = torch.randint(0, 500, (m,), generator=g).to(_dev())
    ref = (x.double()[rows] @ w.double())
    assert _rel(gather_gemm_triton(x, rows, w, ieee=True), ref) < 1e-6
    assert _rel(gather_gemm_twin(x, rows, w), ref) < 1e-6


def test_gather_gemm_bf16_store():
    from gigassl_fast.kernels.sparse_bag import gather_gemm_triton

    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 64, generator=g).to(_dev(), torch.bfloat16)
    w = torch.randn(64, 96, generator=g).to(_dev(), torch.bfloat16)
    rows = torch.randint(0, 300, (50,), generator=g).to(_dev())
    ref = x.double()[rows] @ w.double()
    assert _rel(gather_gemm_triton(x, rows, w), ref) < 1e-2


def _csr(dst, n_out):
    """The CSR order of pairs by output, as a host plan gives it: (order, ptr, longest run)."""
    order = torch.argsort(dst, stable=True)
    counts = torch.bincount(dst, minlength=n_out)
    return order, torch.cat([counts.new_zeros(1), counts.cumsum(0)]), int(counts.max())


@pytest.mark.parametrize("n_in,n_out,c", [(23, 17, 40), (200, 150, 130)])
def test_tap_scatter_kernel_matches_twin(n_in, n_out, c):
    """The scatter kernel in its general form (a tap per pair, pairs in CSR order) against its twin."""
    from gigassl_fast.kernels.sparse_bag import _scatter_csr_triton, tap_scatter_twin

    g = torch.Generator().manual_seed(n_in)
    y = torch.randn(n_in, 9, c, generator=g).to(_dev())
    pairs = 4 * n_out
    src = torch.randint(0, n_in, (pairs,), generator=g).to(_dev())
    dst = torch.randint(0, n_out, (pairs,), generator=g).to(_dev())
    tap = torch.randint(0, 9, (pairs,), generator=g).to(_dev())
    order, ptr, longest = _csr(dst, n_out)
    ours = _scatter_csr_triton(y, ptr, src[order], tap[order], n_out, longest)
    ref = tap_scatter_twin(y.double(), src, dst, tap, n_out)
    assert _rel(ours, ref) < 1e-6
    assert torch.isfinite(ours).all() and ours.shape == (n_out, c)


def test_backward_matches_twin():
    """gather-GEMM then CSR sum (exact plans' per-tap path), gradients of the weights: kernels against twins."""
    from gigassl_fast.kernels.availability import twins_only
    from gigassl_fast.kernels.sparse_bag import csr_sum, gather_gemm

    g = torch.Generator().manual_seed(5)
    x = torch.randn(60, 32, generator=g).to(_dev())
    w = torch.randn(32, 16, generator=g).to(_dev())
    rows = torch.randint(0, 60, (90,), generator=g).to(_dev())
    dst = torch.randint(0, 25, (90,), generator=g).to(_dev())
    order, ptr, longest = _csr(dst, 25)
    target = torch.randn(25, 16, generator=g).to(_dev())
    grads = []
    for ctx in (contextlib.nullcontext(), twins_only()):
        wk = w.clone().requires_grad_(True)
        with ctx:
            out = csr_sum(gather_gemm(x, rows, wk), order, ptr, dst[order], 25, longest)
        ((out - target) ** 2).sum().backward()
        grads.append(wk.grad)
    assert _rel(grads[0], grads[1].double()) < 1e-5


def test_gather_linear_relu_matches_twin():
    from gigassl_fast.kernels.sparse_bag import gather_gemm_triton, gather_linear_relu_twin

    g = torch.Generator().manual_seed(7)
    x = torch.randn(200, 48, generator=g).to(_dev())
    w = torch.randn(48, 70, generator=g).to(_dev())
    b = torch.randn(70, generator=g).to(_dev())
    rows = torch.randint(0, 200, (33,), generator=g).to(_dev())
    ours = gather_gemm_triton(x, rows, w, ieee=True, bias=b, relu=True)
    ref = torch.relu(x.double()[rows] @ w.double() + b.double())
    assert _rel(ours, ref) < 1e-6 and _rel(gather_linear_relu_twin(x, rows, w, b), ref) < 1e-6
    assert (ours >= 0).all()


@pytest.mark.parametrize("lengths", [[5, 5, 5, 5], [1, 7, 3, 12, 2]])
def test_segment_softmax_pool_forward_and_backward(lengths):
    from gigassl_fast.kernels.sparse_bag import segment_softmax_pool, segment_softmax_pool_twin

    g = torch.Generator().manual_seed(len(lengths))
    n = sum(lengths)
    ptr = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()]).to(_dev())
    grads = []
    cotangent = torch.randn(len(lengths), 40, generator=g).to(_dev())
    for fn in (segment_softmax_pool, segment_softmax_pool_twin):
        s = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(_dev()).requires_grad_(True)
        v = torch.randn(n, 40, generator=torch.Generator().manual_seed(2)).to(_dev()).requires_grad_(True)
        out = fn(s, v, ptr)
        (out * cotangent).sum().backward()
        grads.append((out.detach(), s.grad, v.grad))
    for a, b in zip(grads[0], grads[1], strict=True):
        assert _rel(a, b) < 1e-5
    # each output is a convex combination of its segment's values
    s0 = grads[1][0][0]
    v = torch.randn(n, 40, generator=torch.Generator().manual_seed(2)).to(_dev())
    assert (s0 <= v[: lengths[0]].max(0).values + 1e-5).all()


def test_abmil_uses_the_kernels_and_matches_plain_torch():
    from gigassl_fast.aggregators.abmil import GatedAttentionMIL

    torch.manual_seed(0)
    m = GatedAttentionMIL(32, 64, 16).to(_dev())
    f = torch.randn(3, 5, 32, device=_dev())
    out = m(f)
    h = m.embed(f)
    a = m.w(torch.tanh(m.v(h)) * torch.sigmoid(m.u(h))).softmax(dim=1)
    assert _rel(out, (a * h).sum(dim=1)) < 1e-3  # tf32 dot in the kernel


# sparse-layer4 padded only: a GPU always pads its plans; exact plans are the CPU's, which runs the twins
@pytest.mark.parametrize("name,pad", [(n, n == "sparse-layer4") for n in list_aggregators()])
def test_whole_aggregator_kernel_path_matches_twin_path(name, pad):
    """Each aggregator's kernel path (views read in place from the store) against its twin path, outputs
    and the gradients of every parameter, compared as one vector (biases just before a batch norm have a
    true gradient of zero, so per-parameter ratios would compare noise)."""
    from gigassl_fast.kernels.availability import twins_only
    from gigassl_fast.kernels.sparse_bag import exact_dots

    from gigassl_fast.aggregators import build_aggregator
    from gigassl_fast.views import StoreRows

    g = torch.Generator().manual_seed(5)
    table = torch.rand(300, 256, generator=g).half().to(_dev())
    rows = torch.randint(0, 300, (8, 5), generator=g).to(_dev())
    locs = (torch.randint(0, 5, (8, 5, 2), generator=g) * 224).to(_dev())
    r = torch.randn(8, 512, generator=g).to(_dev())
    torch.manual_seed(0)
    agg = build_aggregator(name, 256).to(_dev()).train()

    where = agg.plan(locs.cpu(), pad=pad)  # pad: the static buckets a GPU uses (grouped tap GEMMs)
    where = where.with_index({k: v.to(_dev()) for k, v in where.index.items()}) if pad else locs

    def run():
        out = agg(StoreRows(table, rows), where)
        grads = torch.autograd.grad((out * r).sum(), list(agg.parameters()))
        return out, torch.cat([t.flatten() for t in grads])

    # padded, as on a GPU: the kernel path also reads nothing back (the step test covers the twins)
    with exact_dots(), NoHostSync() if pad else contextlib.nullcontext():
        out_k, grad_k = run()
    with twins_only():
        out_t, grad_t = run()
    assert _rel(out_k, out_t) < 1e-5 and _rel(grad_k, grad_t) < 1e-4


def test_every_kernel_variant_compiles_for_hopper():
    """The whole Triton pipeline to a cubin for sm_90 (H100/H200), with no GPU: compile errors surface
    here rather than on a GPU machine (`make check-kernels TRITON=3.6.0` does it with the GPU machines'
    Triton). It runs in a fresh interpreter without TRITON_INTERPRET: Triton reads that variable once, at
    import, and a process that has run interpreted kernels cannot compile them (21 variants failed with
    "'value' object has no attribute 'dtype'" once this module's interpreter fixture had run first)."""
    require_module("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "compile_kernels.py"), "--capability", "90"],
                       capture_output=True, text=True, env=env, timeout=600)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines and "FAILED" not in r.stdout, r.stdout + r.stderr
    compiled = [line for line in lines if line.startswith("ok")]
    assert len(compiled) >= 20, r.stdout


class HostSync(AssertionError):
    pass


class NoHostSync(torch.overrides.TorchFunctionMode):
    """Inside it, every call that reads device data back to the host raises: .item(), .tolist(), truth
    values and int()/float() of tensors, nonzero, repeat_interleave with tensor repeats, boolean-mask
    indexing; so does a tensor factory without a device (a host tensor the device would wait for). A mode,
    not patched methods: Python code run by backward is covered too."""

    READ_BACK = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "argwhere",
                 "masked_select", "unique", "bincount"}
    #: Made without a device, a tensor is made on the host: on a GPU its first use is a blocking copy.
    FACTORIES = {"arange", "zeros", "ones", "full", "empty", "tensor", "as_tensor", "rand", "randn", "randint", "eye",
                 "linspace"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in self.READ_BACK:
            raise HostSync(f"host synchronisation inside the step: {name}")
        if name in self.FACTORIES and kwargs.get("device") is None:
            raise HostSync(f"a host tensor made inside the step: torch.{name} without device=")
        if name == "repeat_interleave" and isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"), torch.Tensor):
            raise HostSync("host synchronisation inside the step: repeat_interleave with tensor repeats")
        if name in ("__getitem__", "__setitem__"):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                raise HostSync("host synchronisation inside the step: boolean-mask indexing")
        return func(*args, **kwargs)


@pytest.mark.parametrize("name,path", [(n, p) for n in list_aggregators() for p in ("kernels", "twins")
                                       if (n, p) != ("sparse-layer4", "kernels")])
def test_training_step_reads_nothing_back_from_the_device(name, path):
    """A training step (two forwards, NT-Xent, backward) makes no host synchronisation once its inputs are
    prepared (``prepare_step``: store rows and, for sparse-layer4, the host plan padded to buckets as on
    a GPU), on the kernel path (interpreted here) and the twin path, for every aggregator. (sparse-layer4's
    padded kernel path, forward and backward, is checked under the same mode, and against its twins, in
    test_whole_aggregator_kernel_path_matches_twin_path: 15 s less of interpreted kernels.)"""
    from gigassl_fast.kernels.availability import twins_only

    from gigassl_fast.aggregators import build_aggregator
    from gigassl_fast.ssl import SimCLRMIL
    from gigassl_fast.step_inputs import prepare_step
    from gigassl_fast.train import contrastive_step

    g = torch.Generator().manual_seed(3)
    store = torch.rand(4, 2, 20, 256, generator=g).half().to(_dev())
    coords = torch.randint(0, 4, (4, 2, 20, 2), generator=g) * 224
    torch.manual_seed(0)
    model = SimCLRMIL(build_aggregator(name, 256)).to(_dev()).train()
    inputs = prepare_step(store, coords, torch.tensor([0, 1, 3]), 2, g, _dev(), model.backbone, pad=True)
    with twins_only() if path == "twins" else contextlib.nullcontext(), NoHostSync():
        loss, _ = contrastive_step(model, *inputs.views, 0.05)
    grads = [p.grad for p in model.parameters()]
    assert all(gr is not None for gr in grads) and loss.dim() == 0


def test_no_host_sync_mode_catches_rulebooks_made_on_the_device():
    """The mode is a real check: the rulebook made with tensor ops where the data lives (what a GPU step
    did before the host plan: nonzero and unique, sized by the data) trips it."""
    from gigassl_fast.aggregators import rulebook as rb

    cells = torch.randint(0, 4, (3, 4, 2)).to(_dev())
    with pytest.raises(HostSync), NoHostSync():
        rb.build_rules(cells, rb.spatial_size(cells))


def test_planned_tap_gemm_and_csr_sum_match_their_twins():
    """The grouped gather-GEMM (a weight per block of GROUP rows) and the CSR sum with given order and
    bounds, forward and backward, against their twins on a real padded plan."""
    from gigassl_fast.kernels.availability import twins_only
    from gigassl_fast.kernels.sparse_bag import csr_sum, exact_dots, tap_gemm

    from gigassl_fast.aggregators.sparse_plan import plan_cells

    g = torch.Generator().manual_seed(8)
    plan = plan_cells(torch.randint(0, 6, (5, 6, 2), generator=g), pad=True)
    ix = {k: v.to(_dev()) for k, v in plan.index.items()}
    x = torch.randn(plan.n_sites_pad, 32, generator=g).to(_dev())
    w = torch.randn(9, 32, 24, generator=g).to(_dev())
    cot = torch.randn(plan.n_sites_pad, 24, generator=g).to(_dev())

    def run():
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = tap_gemm(xs, ix["sub_src"], ws, ix["sub_block_tap"])
        out = csr_sum(y, ix["sub_perm"], ix["sub_ptr"], ix["sub_seg"], plan.n_sites_pad, plan.sub_max)
        gx, gw = torch.autograd.grad((out * cot).sum(), (xs, ws))
        return out, gx, gw

    with exact_dots():
        kern = run()
    with twins_only():
        twin = run()
    for a, b in zip(kern, twin, strict=True):
        assert _rel(a, b) < 1e-5
    # padding rows receive nothing, real rows do
    assert kern[0][plan.n_sites:].abs().max() == 0 and kern[0][:plan.n_sites].abs().max() > 0
