"""The benchmark suite: the references compute what our paths compute, and `bench --quick` writes a
well-formed report (no speed is asserted)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch


def test_original_encode_plain_pass_matches_our_features(synthetic_slide, tmp_path):
    """The reference's plain pass (OpenSlide reads, unfolded NCHW float32 ResNet18) and ours (our decoder,
    folded batch norms, channels_last) encode the same tiles to the same features."""
    from gigassl_fast.benchmarks.reference.encode import FullResNet18, original_encode

    from gigassl_fast.encode import EncodeParams, encode_slide
    from gigassl_fast.slides import Slide
    from gigassl_fast.tiling import TileParams, tile_slide

    torch.manual_seed(0)
    ref_model = FullResNet18().eval()
    torch.save(ref_model.state_dict(), tmp_path / "w.pth")
    params = EncodeParams(encoder="resnet18-l3", weights=str(tmp_path / "w.pth"), naug=1, nt=4, precision="fp32",
                          tiles=TileParams(mpp=2.0, min_tissue=0.5))
    enc = params.tile_encoder()
    with Slide(synthetic_slide) as s:
        grid = tile_slide(s, params.tiles)
        coords = grid.coords[:6]
        batches = s.region_batches(coords, grid.read_level, 224, 224, params.resolved_batch_size())
        ours = encode_slide(grid.tile_size, coords, params, enc, "x",
                            ((torch.from_numpy(t), err) for t, err in batches), {"read": 0, "augment": 0, "encode": 0, "wait": 0})
    assert grid.read_tile_size == 224  # the reference reads 224 px at the level, no resize
    out = original_encode(str(synthetic_slide), coords, grid.read_level, ref_model, str(tmp_path / "o"),
                          naug=2, nt=4, workers=0)
    assert len(coords) >= 2 and len(out["aug_batch_s"]) == 2 and len(out["plain_batch_s"]) == -(-len(coords) // 4)
    assert out["plain_batches_total"] == len(coords) / 4
    stem = os.path.splitext(os.path.basename(str(synthetic_slide)))[0]
    plain = np.load(tmp_path / "o" / "normal" / "tiles" / f"{stem}_embeddings.npy")
    assert plain.dtype == np.float64 and plain.shape == (len(coords), 256)
    rel = np.linalg.norm(ours["features"].astype(np.float32) - plain) / np.linalg.norm(plain)
    assert rel < 5e-3  # float16 storage and two JPEG decoders
    for a in range(2):
        aug = np.load(tmp_path / "o" / "aug" / "tiles" / stem / f"{a}.npy")
        xy = np.load(tmp_path / "o" / "aug" / "coordinates" / stem / f"{a}.npy")
        assert aug.shape == (4, 256) and xy.shape == (4, 2)
        # every drawn location is a tissue tile of the grid
        assert all(any((c == r).all() for c in coords) for r in xy)


def test_kornia_augmentations_share_one_draw_per_batch():
    """same_on_batch: identical tiles stay identical through the chain, and the chain changes them."""
    from gigassl_fast.benchmarks.reference.encode import kornia_augmentations

    torch.manual_seed(3)
    tile = torch.rand(1, 3, 256, 256)
    x = tile.repeat(4, 1, 1, 1)
    for op in kornia_augmentations():
        x = op(x)
    assert x.shape == (4, 3, 224, 224)
    assert torch.equal(x[0], x[3]) and torch.equal(x[1], x[2])
    assert not torch.allclose(x[0], torch.nn.functional.interpolate(tile, size=224)[0], atol=1e-2)


def _fixture_state(fx):
    return {k[2:]: torch.from_numpy(fx[k].astype(np.float32)) for k in fx.files if k.startswith("w/")}


def _rel(a, ref):
    return np.abs(np.asarray(a) - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("case", range(5))
def test_original_sparse_layer4_reproduces_sparseconvnet(fixtures, case):
    """The training reference's SCN stand-in against SparseConvNet's own outputs: train and eval mode,
    the running statistics after a train step, and the batch-of-one forwards the inference reference runs."""
    from gigassl_fast.benchmarks.reference.train import OriginalSparseConvMIL

    p = f"c{case}/"
    feats, locs = torch.from_numpy(fixtures[p + "tile_feats"]), torch.from_numpy(fixtures[p + "locs_input"])
    model = OriginalSparseConvMIL().load_dense_layer4(_fixture_state(fixtures)).eval()
    with torch.no_grad():
        assert _rel(model(feats, locs).numpy(), fixtures[p + "out_eval"]) < 1e-5
        one = np.vstack([model(feats[v:v + 1], locs[v:v + 1]).numpy() for v in range(len(feats))])
        assert _rel(one, fixtures[p + "out_eval_batch1"]) < 1e-5
    model.train()
    assert _rel(model(feats, locs).detach().numpy(), fixtures[p + "out_train"]) < 1e-4
    norms = [model.block0.norm1, model.block0.norm2, model.block0.normd, model.block1.norm1, model.block1.norm2]
    running = np.stack([np.stack([n.running_mean.numpy(), n.running_var.numpy()]) for n in norms])
    assert _rel(running, fixtures[p + "bn_running_after_train"]) < 1e-5


@pytest.mark.parametrize("case", range(5))
def test_original_location_augmentation_reproduces_fixture(fixtures, case):
    from gigassl_fast.benchmarks.reference.train import apply_location_augmentation, location_matrix

    p = f"c{case}/"
    for v, params in enumerate(fixtures[p + "aug_params"]):
        m = location_matrix(*params)
        np.testing.assert_allclose(m.numpy(), fixtures[p + "aug_matrix"][v], rtol=1e-6)
        out = apply_location_augmentation(torch.from_numpy(fixtures[p + "locs_level0"][v]), m,
                                          torch.from_numpy(fixtures[p + "aug_translation"][v]))
        np.testing.assert_array_equal(out.numpy(), fixtures[p + "locs_input"][v])


def test_original_nt_xent_is_the_simclr_loss():
    """Against a float64 numpy statement: l_i = -log(exp(s_ip/T) / sum_{j != i} exp(s_ij/T)), mean over 2N."""
    from gigassl_fast.benchmarks.reference.train import original_nt_xent

    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(7, 16, generator=g), torch.randn(7, 16, generator=g)
    u = np.concatenate([z1.numpy(), z2.numpy()]).astype(np.float64)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    s = u @ u.T / 0.05
    n = len(z1)
    losses = []
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        others = np.delete(s[i], i)
        losses.append(-(s[i, partner] - np.log(np.exp(others).sum())))
    assert abs(original_nt_xent(z1, z2, 0.05).item() - np.mean(losses)) < 1e-4


def test_original_views_read_one_augmentation_file(tmp_path):
    """Each view's five feature rows come from one augmentation file of its slide (the original's
    per-sample loads), with int64 locations; the loader yields (B, 5, D) batches of two views."""
    from gigassl_fast.benchmarks.reference.train import OriginalViews, original_loader, write_reference_dataset

    rng = np.random.default_rng(0)
    feats = rng.random((3, 4, 32, 8)).astype(np.float32)
    coords = rng.integers(0, 50, (3, 4, 32, 2)) * 896
    write_reference_dataset(str(tmp_path), feats, coords)
    ds = OriginalViews(str(tmp_path), naug=4)
    torch.manual_seed(0)
    for idx in range(3):
        (v1, v2), name = ds[idx]
        assert name == f"wsi{idx}"
        for emb, loc in (v1, v2):
            assert emb.shape == (5, 8) and loc.dtype == torch.int64
            rows = emb.numpy()
            assert any(all((feats[idx, a] == r).all(1).any() for r in rows) for a in range(4))
    (b1, _), _ = next(iter(original_loader(str(tmp_path), 4, batch_size=2, workers=0)))
    assert b1[0].shape == (2, 5, 8) and b1[1].shape == (2, 5, 2)


def test_original_embed_averages_one_view_forwards(fixtures, tmp_path):
    """Per slide: coordinates / 4, `views` draws of 5 tiles with replacement (torch.randint, in the
    reference's order), one forward each, the mean of the outputs."""
    from gigassl_fast.benchmarks.reference.embed import original_embed, write_normal_dataset
    from gigassl_fast.benchmarks.reference.train import OriginalSparseConvMIL

    model = OriginalSparseConvMIL().load_dense_layer4(_fixture_state(fixtures)).eval()
    f = [fixtures["c1/tile_feats"][i] for i in range(2)]  # 5 distinct tiles per slide
    xy = [fixtures["c1/locs_level0"][i] * 4 for i in range(2)]
    write_normal_dataset(str(tmp_path), ["a", "b"], f, xy)
    torch.manual_seed(7)
    out = original_embed(model, str(tmp_path), ["a", "b"], views=3)
    torch.manual_seed(7)
    expected = []
    with torch.no_grad():
        for i in range(2):
            vs = []
            for _ in range(3):
                idx = torch.randint(0, 5, (5,))
                vs.append(model(torch.from_numpy(f[i])[idx][None], torch.from_numpy(xy[i] / 4.0).float()[idx][None])[0])
            expected.append(torch.stack(vs).mean(0))
    np.testing.assert_allclose(out, torch.stack(expected).numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(out[0], out[1])


def test_scn_convolution_and_batch_norm_gradients():
    """The hand-written backward passes against numerical gradients (float64)."""
    from gigassl_fast.benchmarks.reference.train import SCNBatchNormFunction, SCNConvolution, split_by_tap

    torch.manual_seed(0)
    x = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 6, 4, dtype=torch.float64, requires_grad=True)
    rules = split_by_tap(np.array([[i % 12, (i * 7) % 10, i % 9] for i in range(40)]), 9, torch.device("cpu"))
    assert torch.autograd.gradcheck(lambda a, b: SCNConvolution.apply(a, b, rules, 10), (x, w))
    y = torch.randn(20, 5, dtype=torch.float64, requires_grad=True)
    g = torch.rand(5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    for training in (True, False):
        assert torch.autograd.gradcheck(lambda a, c, d, t=training: SCNBatchNormFunction.apply(
            a, c, d, torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64), 1e-5, t), (y, g, b))


def test_extrapolation_and_flop_count_by_hand():
    from gigassl_fast.benchmarks.bench_train import layer_gflop
    from gigassl_fast.benchmarks.reference.encode import extrapolated_seconds

    # first batch (with start-up) once, then the median of the others for each batch left
    assert extrapolated_seconds([5.0, 1.0, 3.0, 2.0], 10) == 5.0 + 2.0 * 9
    assert extrapolated_seconds([4.0, 1.0], 2.5) == 4.0 + 1.0 * 1.5  # a partial last batch
    # one view, five tiles on one cell: one input site -> one output site (tap 0), one submanifold pair
    fwd, first = layer_gflop(torch.zeros(1, 5, 2, dtype=torch.int64))
    macs = 256 * 512 + 256 * 512 + 3 * 512 * 512 + (2 * 512 * 512 + 512 * 256)
    assert fwd == pytest.approx(2 * macs / 1e9) and first == pytest.approx(2 * 2 * 256 * 512 / 1e9)


def _bench_report(tmp_path, stages: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-m", "gigassl_fast", "bench", "--quick", "--stages", ",".join(stages),
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    assert {"cpu", "cores"} <= set(report["machine"])
    assert list(report["stages"]) == stages
    for stage in report["stages"].values():
        assert {"ours_s", "reference_s", "speedup", "unit_rate"} <= set(stage)
        assert stage["ours_s"] > 0 and stage["reference_s"] > 0
        assert abs(stage["speedup"] - stage["reference_s"] / stage["ours_s"]) < 1e-9
    assert (tmp_path / "bench.md").read_text().count("|") > 10 and (tmp_path / "bench.png").stat().st_size > 1000
    return report


def test_every_stage_settings_fit_its_benchmark():
    """bench hands each stage benchmark its settings as that module's typed Settings: every quick and
    full setting must be a field (the whole quick suite runs under -m slow)."""
    import importlib

    from gigassl_fast.bench import SETTINGS, STAGES

    modules = {"tile": "bench_tiling", "decode": "bench_decode", "encode": "bench_encode", "train": "bench_train",
               "embed": "bench_embed"}
    assert set(SETTINGS) == set(STAGES) == set(modules)
    for stage, name in modules.items():
        module = importlib.import_module(f"gigassl_fast.benchmarks.{name}")
        for settings in SETTINGS[stage]:
            if stage == "tile":
                assert set(settings) <= {"sizes", "runs", "samples"}
            else:  # bench adds the device where both sides run on it
                module.Settings(**settings, **({} if stage == "decode" else {"device": "cpu"}))


@pytest.mark.slow
def test_bench_quick_report_all_stages(tmp_path):
    _bench_report(tmp_path, ["tile", "decode", "encode", "train", "embed"])


def test_bench_quick_report(tmp_path):
    _bench_report(tmp_path, ["tile", "embed"])
    r = subprocess.run([sys.executable, "-m", "gigassl_fast", "bench", "--stages", "tiles"], capture_output=True, text=True)
    assert r.returncode == 2 and "--stages" in r.stderr


def test_bench_step_runs_and_reports_host_index_time(tmp_path):
    """benchmarks/bench_step.py end to end at a toy size: the host plan's time against the tensor-op
    rulebook's, and an eager step per aggregator with its views/s."""
    from gigassl_fast.benchmarks import bench_step

    out = bench_step.run(bench_step.Settings(batch_sizes=(8,), aggregators=("mlp", "sparse-layer4"), runs=1,
                                             device="cpu", slides=16))
    row = out["results"][0]
    host = row["host_index_ms"]
    assert {"plan_cpp_exact", "plan_cpp_padded", "rulebook_tensor_ops", "prepare_step"} <= set(host)
    assert all(host[k]["median_ms"] > 0 for k in ("plan_cpp_exact", "rulebook_tensor_ops"))
    assert host["padded_shapes"]["sites"][1] > host["padded_shapes"]["sites"][0]
    assert set(row["steps"]) == {"mlp/eager", "sparse-layer4/eager"}
    assert all(r["views_per_s"] > 0 for r in row["steps"].values())
