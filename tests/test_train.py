import json
import math

import h5py
import numpy as np
import pytest
import torch

from conftest import cli
from gigassl_fast.aggregators import build_aggregator, list_aggregators
from gigassl_fast.errors import GigasslError
from gigassl_fast.pack import pack
from gigassl_fast.ssl import nt_xent
from gigassl_fast.store import Store
from gigassl_fast.train import TrainParams, build_model, learning_rate
from gigassl_fast.views import StoreRows, apply_spatial, augmentation_matrix, sample_views, spatial_augment


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """6 synthetic slides encoded with resnet18-l3 (random weights, 256-d), packed."""
    from gigassl_fast.synthetic import write_synthetic_slide

    root = tmp_path_factory.mktemp("train")
    for i in range(6):
        write_synthetic_slide(root / f"s{i}.tif", 2048, 1536, mpp=0.5, seed=40 + i)
    r = cli("encode", root, "--out", root / "out", "--encoder", "resnet18-l3", "--weights", "random", "--naug", "3",
            "--nt", "16", "--tile-size", "112")
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("pack", root / "out" / "features", "--out", root / "store.h5")
    assert r.returncode == 0 and "6 slides" in r.stdout, r.stdout + r.stderr
    return root


def test_store_holds_every_slide(store):
    from gigassl_fast.features import read_features

    s = Store(str(store / "store.h5"))
    assert s.n_slides == 6 and s.dim == 256 and s.aug_features.shape == (6, 3, 16, 256)
    with h5py.File(store / "store.h5") as fh:
        offsets = fh["offsets"][:]
        for i, sid in enumerate(s.ids):
            d = read_features(str(store / "out" / "features" / f"{sid}.h5"))
            np.testing.assert_array_equal(fh["coords"][offsets[i]:offsets[i + 1]], d["coords"])
            np.testing.assert_array_equal(s.aug_features[i].numpy(), d["aug_features"])
            np.testing.assert_array_equal(s.aug_coords[i].numpy(), d["coords"][d["aug_indices"]])


def test_mixed_folder_is_an_error(store, tmp_path):
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(store / "out" / "features", mixed)
    with h5py.File(mixed / "s0.h5", "a") as fh:
        fh.attrs["nt"] = 99
    with pytest.raises(GigasslError, match="made with other settings .*nt"):
        pack(str(mixed), str(tmp_path / "x.h5"))
    assert not (tmp_path / "x.h5").exists()


def test_views_gather_the_right_tiles_and_augment_coordinates():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(4, 3, 7, 8, dtype=torch.float16)
    coords = torch.randint(0, 10**5, (4, 3, 7, 2))
    f, l = sample_views(feats, coords, torch.tensor([2, 0]), 5, gen, torch.device("cpu"))
    assert f.shape == (2, 5, 8) and f.dtype == torch.float32 and l.shape == (2, 5, 2) and l.dtype == torch.int64
    rows = {tuple(r.tolist()) for a in range(3) for r in feats[2, a].float()}
    assert all(tuple(r.tolist()) in rows for r in f[0])
    # spatial augmentation preserves distances up to the per-axis scaling (0.7-1.3) and truncation
    p = torch.tensor([[[0, 0], [896, 0], [0, 896], [896, 896], [448, 448]]] * 500)
    q = spatial_augment(p, torch.Generator().manual_seed(1)).double()
    d = (q[:, 1] - q[:, 0]).norm(dim=1)
    assert d.min() > 0.7 * 896 - 3 and d.max() < 1.3 * 896 + 3
    assert q.std(dim=0).mean() > 100  # rotations and translations vary per view


@pytest.mark.parametrize("case", range(5))
def test_spatial_augmentation_reproduces_the_reference(fixtures, case):
    """The reference's p' = trunc(float32(p - t) @ M) with M = R(theta) diag(flips) diag(scales), theta used
    as radians: from its drawn parameters we rebuild its matrix, and from its matrix and translation its
    network input, exactly."""
    p = f"c{case}/"
    params = torch.from_numpy(fixtures[p + "aug_params"])
    m = augmentation_matrix(params[:, 0], params[:, 1:3], params[:, 3:5])
    np.testing.assert_allclose(m.numpy(), fixtures[p + "aug_matrix"], rtol=0, atol=2e-7)
    out = apply_spatial(torch.from_numpy(fixtures[p + "locs_level0"]), torch.from_numpy(fixtures[p + "aug_matrix"]),
                        torch.from_numpy(fixtures[p + "aug_translation"]))
    np.testing.assert_array_equal(out.numpy(), fixtures[p + "locs_input"])


def test_fused_views_point_at_the_tiles_the_copy_path_gathers():
    feats = torch.randn(4, 3, 7, 8, dtype=torch.float16)
    coords = torch.randint(0, 10**5, (4, 3, 7, 2))
    slides = torch.tensor([2, 0, 3, 2])
    f, l = sample_views(feats, coords, slides, 5, torch.Generator().manual_seed(0), torch.device("cpu"))
    r, l2 = sample_views(feats, coords, slides, 5, torch.Generator().manual_seed(0), torch.device("cpu"), fused=True)
    assert isinstance(r, StoreRows) and r.shape == (4, 5, 8) and r.table.data_ptr() == feats.data_ptr()  # no copy
    assert torch.equal(r.gather(), f) and torch.equal(l, l2)
    assert (r.rows // (3 * 7) == slides[:, None]).all()  # every row belongs to the view's slide


@pytest.mark.parametrize("name", list_aggregators())
def test_aggregators_read_store_rows_in_place_as_from_a_copy(name):
    """The fused first layers (rows read from the table) compute what the copy path computes, forward and
    backward, also where several tiles of a view share a grid cell (sites averaged, pairs weighted)."""
    g = torch.Generator().manual_seed(0)
    table = torch.rand(400, 256, generator=g).half()
    rows = torch.randint(0, 400, (24, 5), generator=g)
    locs = torch.randint(0, 4, (24, 5, 2), generator=g) * 224  # a 4x4 grid: many coincident tiles
    torch.manual_seed(0)
    agg = build_aggregator(name, 256).train()
    r = torch.randn(24, 512, generator=g)
    out_copy = agg(table[rows].float(), locs)
    grads_copy = torch.autograd.grad((out_copy * r).sum(), list(agg.parameters()))
    out_rows = agg(StoreRows(table, rows), locs)
    grads_rows = torch.autograd.grad((out_rows * r).sum(), list(agg.parameters()))
    torch.testing.assert_close(out_rows, out_copy, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_rows, grads_copy, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_nt_xent_matches_the_definition():
    z1, z2 = torch.randn(6, 16), torch.randn(6, 16)
    u = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    n, total = 6, 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        logits = torch.tensor([u[i] @ u[m] / 0.05 for m in range(2 * n) if m != i])
        pos = u[i] @ u[j] / 0.05
        total += -(pos - torch.logsumexp(logits, 0))
    assert nt_xent(z1, z2, 0.05).item() == pytest.approx(total.item() / (2 * n), rel=1e-5)


def test_learning_rate_schedule():
    p = TrainParams(epochs=20, warmup_epochs=10, batch_size=128, base_lr=0.03)
    lrs = [learning_rate(s, 5, p) for s in range(100)]
    assert lrs[0] == 0 and lrs[25] == pytest.approx(0.015 * 0.5) and lrs[50] == pytest.approx(0.015)
    assert lrs[75] == pytest.approx(0.015 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[50:], lrs[51:], strict=False))


@pytest.mark.parametrize("name", list_aggregators())
def test_aggregators_shapes_and_gradients(name):
    agg = build_aggregator(name, 256).train()
    f = torch.randn(4, 5, 256, requires_grad=True)
    loc = torch.randint(0, 20000, (4, 5, 2))
    out = agg(f, loc)
    assert out.shape == (4, 512)
    out.sum().backward()
    assert f.grad is not None and torch.isfinite(f.grad).all()


def test_train_resume_continues_exactly(store, tmp_path):
    common = ["--batch-size", 4, "--epochs", 4, "--warmup-epochs", 1, "--checkpoint-every", 1]
    r = cli("train", store / "store.h5", "--out", tmp_path / "full", *common)
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("train", store / "store.h5", "--out", tmp_path / "split", *common, "--stop-at-epoch", 2)
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("train", store / "store.h5", "--out", tmp_path / "split", *common)
    assert r.returncode == 2 and "--resume" in r.stderr  # nothing overwritten
    r = cli("train", store / "store.h5", "--out", tmp_path / "split", *common, "--resume")
    assert r.returncode == 0, r.stdout + r.stderr

    def losses(run):
        return [json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]

    assert len(losses("full")) == 4 and losses("full") == losses("split")
    ckpt = torch.load(tmp_path / "full" / "checkpoint_last.pt", weights_only=False)
    assert ckpt["epoch"] == 4 and ckpt["params"]["aggregator"] == "sparse-layer4"
    assert sorted(p.name for p in (tmp_path / "full").glob("checkpoint_e*.pt")) == [f"checkpoint_e000{i}.pt" for i in range(1, 5)]


def test_train_bad_inputs(store, tmp_path):
    r = cli("train", store / "store.h5", "--out", tmp_path / "a", "--batch-size", 8)
    assert r.returncode == 2 and "fewer than the batch of 8" in r.stderr
    r = cli("train", store / "store.h5", "--out", tmp_path / "b", "--batch-size", 4, "--epochs", 1)
    assert r.returncode == 0
    r = cli("train", store / "store.h5", "--out", tmp_path / "b", "--batch-size", 4, "--epochs", 2, "--resume",
            "--aggregator", "mlp")
    assert r.returncode == 2 and "trained with --aggregator sparse-layer4" in r.stderr
    (tmp_path / "b" / "checkpoint_last.pt").write_bytes(b"garbage")
    r = cli("train", store / "store.h5", "--out", tmp_path / "b", "--batch-size", 4, "--epochs", 2, "--resume")
    assert r.returncode == 2 and "not a readable checkpoint" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "junk.h5").write_bytes(b"junk")
    r = cli("train", tmp_path / "junk.h5", "--out", tmp_path / "c")
    assert r.returncode == 2 and "not a readable store" in r.stderr


def test_bucketed_step_equals_the_exact_step():
    """The step a GPU runs (plans padded to static buckets, masked batch norm) computes what the exact
    step does: loss, every gradient and the batch-norm running statistics, to float32 rounding; and the
    buckets really pad (padding rows and pairs exist)."""
    from gigassl_fast.step_inputs import prepare_step
    from gigassl_fast.train import contrastive_step

    g = torch.Generator().manual_seed(0)
    store = torch.rand(10, 3, 30, 256, generator=g).half()
    coords = torch.randint(0, 8, (10, 3, 30, 2), generator=g) * 224 + torch.randint(0, 100, (10, 3, 30, 2), generator=g)
    results = {}
    for pad in (False, True):
        torch.manual_seed(0)
        model = build_model("sparse-layer4", 256).train()
        inputs = prepare_step(store, coords, torch.arange(6), 5, torch.Generator().manual_seed(1), torch.device("cpu"),
                              model.backbone, pad=pad)
        loss, _ = contrastive_step(model, *inputs.views, 0.05)
        results[pad] = (loss, torch.cat([p.grad.flatten() for p in model.parameters()]),
                        torch.cat([b.float().flatten() for b in model.buffers()]), inputs.views[0][1])
    exact, padded = results[False], results[True]
    assert padded[3].n_sites_pad > padded[3].n_sites == exact[3].n_sites
    assert len(padded[3].index["sub_src"]) > len(exact[3].index["sub_src"])
    assert abs(exact[0].item() - padded[0].item()) < 1e-5
    # gradients pass through T = 0.05 and batch norm: float32 rounding grows there
    for (a, b), tol in zip(zip(exact[1:3], padded[1:3], strict=True), (1e-4, 1e-5), strict=True):
        assert ((a - b).norm() / a.norm()).item() < tol


def test_cuda_graphs_need_a_gpu(store, tmp_path):
    r = cli("train", store / "store.h5", "--out", tmp_path / "g", "--batch-size", 4, "--epochs", 1, "--cuda-graphs",
            "--device", "cpu")
    assert r.returncode == 2 and "--cuda-graphs needs a CUDA device" in r.stderr and "Traceback" not in r.stderr


def test_log_rates_and_a_diverging_run(store, tmp_path):
    """Each log line's views/s is its own step's (not the gap between two reads a step late, near zero or
    a checkpoint's save); a run whose lr blows it up stops with one line naming the first bad step of
    the log, and no checkpoint with non-finite statistics is left as the last good one."""
    r = cli("train", store / "store.h5", "--out", tmp_path / "ok", "--batch-size", 4, "--epochs", 2,
            "--warmup-epochs", 1, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    rates = [json.loads(line)["views_per_s"] for line in (tmp_path / "ok" / "log.jsonl").read_text().splitlines()]
    assert len(rates) >= 2 and max(rates) < 20 * min(rates)
    r = cli("train", store / "store.h5", "--out", tmp_path / "nan", "--batch-size", 4, "--epochs", 4,
            "--warmup-epochs", 0, "--lr", "1e30", "--device", "cpu")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(errors) == 1, r.stderr
    logged = [json.loads(line) for line in (tmp_path / "nan" / "log.jsonl").read_text().splitlines()]
    if "loss became" in r.stderr:  # the step it names is the first one the log does not hold as finite
        bad = int(r.stderr.split("at step ")[1].split()[0])
        assert all(math.isfinite(rec["loss"]) for rec in logged if rec["step"] < bad)
        assert not any(rec["step"] == bad and math.isfinite(rec["loss"]) for rec in logged)
    else:
        assert "non-finite weights or statistics" in r.stderr
    last = tmp_path / "nan" / "checkpoint_last.pt"
    if last.exists():
        sd = torch.load(last, weights_only=False)["state_dict"]
        assert all(torch.isfinite(t).all() for t in sd.values() if t.is_floating_point())
