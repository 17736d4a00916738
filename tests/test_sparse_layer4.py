"""SparseConvMIL against the reference SparseConvNet outputs in ../shared/fixtures/scn_layer4.npz."""


import numpy as np
import pytest
import torch

from gigassl_fast import SparseConvMIL
from gigassl_fast.aggregators import rulebook as rb


@pytest.fixture(scope="module")
def fx(fixtures):
    return fixtures


def _state(fx):
    return {k[2:]: torch.from_numpy(fx[k].astype(np.float32)) for k in fx.files if k.startswith("w/")}


def _close(ours, ref):
    ref = np.asarray(ref)
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4 * np.abs(ref).max() + 1e-5


@pytest.mark.parametrize("case", range(5))
def test_reproduces_sparseconvnet(fx, case):
    p = f"c{case}/"
    feats, locs = torch.from_numpy(fx[p + "tile_feats"]), torch.from_numpy(fx[p + "locs_input"])
    model = SparseConvMIL.from_resnet18(_state(fx)).eval()
    trace = {}
    with torch.no_grad():
        out_eval = model(feats, locs, trace)
    np.testing.assert_array_equal(trace["cells"].numpy(), fx[p + "grid_coords"])
    np.testing.assert_array_equal(trace["spatial_size"].numpy(), fx[p + "spatial_size"])
    np.testing.assert_array_equal(trace["in_sites"].numpy(), fx[p + "in_sites"])
    np.testing.assert_array_equal(trace["conv1_sites"].numpy(), fx[p + "conv1_sites"])
    for key, ref in (("in_feats", "in_feats"), ("conv1_out", "conv1_out"), ("avgpool_out", "avgpool_out"),
                     ("block1_out", "block1_out_eval")):
        _close(trace[key].numpy(), fx[p + ref])
    _close(out_eval.numpy(), fx[p + "out_eval"])
    with torch.no_grad():  # inference calls the encoder one view at a time
        alone = torch.cat([model(feats[i:i + 1], locs[i:i + 1]) for i in range(len(feats))])
    _close(alone.numpy(), fx[p + "out_eval_batch1"])
    model.train()
    with torch.no_grad():
        out_train = model(feats, locs, trace)
    _close(out_train.numpy(), fx[p + "out_train"])
    _close(trace["block1_out"].numpy(), fx[p + "block1_out_train"])
    running = np.stack([np.stack([bn.running_mean.numpy(), bn.running_var.numpy()]) for bn in model.bn_layers()])
    _close(running, fx[p + "bn_running_after_train"])


def test_exact_cells_option_differs_where_float32_rounding_bites(fx):
    p = "c4/"
    locs = torch.from_numpy(fx[p + "locs_input"])
    np.testing.assert_array_equal(rb.grid_cells(locs, exact=True).numpy(), fx[p + "grid_coords_exact"])
    assert (rb.grid_cells(locs).numpy() != fx[p + "grid_coords_exact"]).any()
    model = SparseConvMIL.from_resnet18(_state(fx), exact_cells=True).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(fx[p + "tile_feats"]), locs).numpy()
    ref = fx[p + "out_eval"]
    assert np.abs(out - ref).max() > 1e-3 * np.abs(ref).max()


def test_negative_control_swapped_taps_do_not_match(fx):
    state = _state(fx)
    swapped = {k: (v.transpose(2, 3) if v.dim() == 4 else v) for k, v in state.items()}
    model = SparseConvMIL.from_resnet18(swapped).eval()
    p = "c1/"
    with torch.no_grad():
        out = model(torch.from_numpy(fx[p + "tile_feats"]), torch.from_numpy(fx[p + "locs_input"])).numpy()
    ref = fx[p + "out_eval"]
    assert np.abs(out - ref).max() > 0.05 * np.abs(ref).max()


def test_gradients_flow_and_missing_weights_are_named(fx):
    model = SparseConvMIL.from_resnet18(_state(fx)).train()
    feats = torch.from_numpy(fx["c0/tile_feats"]).requires_grad_(True)
    model(feats, torch.from_numpy(fx["c0/locs_input"])).sum().backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()
    assert model.block0.conv1.grad is not None and model.block1.conv2.grad.abs().sum() > 0
    from gigassl_fast.errors import GigasslError

    state = _state(fx)
    del state["layer4.1.bn2.running_var"]
    with pytest.raises(GigasslError, match="layer4.1.bn2.running_var"):
        SparseConvMIL.from_resnet18(state)


@pytest.mark.parametrize("seed", range(6))
def test_cpp_rulebooks_equal_the_tensor_rulebooks(seed):
    g = torch.Generator().manual_seed(seed)
    b, k = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
    span = int(torch.randint(1, 30, (1,), generator=g))
    cells = torch.randint(0, span, (b, k, 2), generator=g)
    cells -= cells.min(dim=1, keepdim=True).values
    fast = rb.build_rules(cells)
    size = rb.spatial_size(cells)
    inp, tile_site = rb.input_sites(cells, size)
    out, src, dst, tap = rb.strided_rules(inp)
    sub = rb.submanifold_rules(out)
    assert torch.equal(fast.size, size) and torch.equal(fast.inp.sites, inp.sites) and torch.equal(fast.tile_site, tile_site)
    assert torch.equal(fast.out.sites, out.sites)

    def as_set(triple):
        return set(zip(*(t.tolist() for t in triple), strict=True))

    assert as_set(fast.strided) == as_set((src, dst, tap))
    assert as_set(fast.submanifold) == as_set(sub)


@pytest.mark.parametrize("case", range(5))
def test_per_view_batch_equals_views_run_alone(fx, case):
    p = f"c{case}/"
    model = SparseConvMIL.from_resnet18(_state(fx)).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(fx[p + "tile_feats"]), torch.from_numpy(fx[p + "locs_input"]), per_view=True)
    _close(out.numpy(), fx[p + "out_eval_batch1"])
