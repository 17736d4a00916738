"""The benchmark suite: the references compute what our paths compute, and `bench --quick` writes a
well-formed report (no speed is asserted)."""

import json
import subprocess
import sys

import numpy as np
import torch

from gigassl_fast.encoders import get_config


def test_reference_encode_computes_our_features(synthetic_slide, tmp_path):
    from benchmarks.reference.encode import FullResNet18, reference_encode

    from gigassl_fast.encode import EncodeParams, TileEncoder, encode_slide
    from gigassl_fast.slides import Slide
    from gigassl_fast.tiling import TileParams, tile_slide

    torch.manual_seed(0)
    ref_model = FullResNet18().eval()
    torch.save(ref_model.state_dict(), tmp_path / "w.pth")
    params = EncodeParams(encoder="resnet18-l3", weights=str(tmp_path / "w.pth"), naug=1, nt=4, precision="fp32",
                          tiles=TileParams(mpp=2.0, min_tissue=0.5))
    enc = TileEncoder(params)
    with Slide(synthetic_slide) as s:
        grid = tile_slide(s, params.tiles)
        coords = grid.coords[:6]
        ours = encode_slide(s, grid.attrs, coords, params, enc, "x", {"read": 0, "augment": 0, "encode": 0})
    with Slide(synthetic_slide, reader="openslide") as s:
        cfg = get_config("resnet18-l3")
        plain, _ = reference_encode(s, coords, int(grid.attrs["read_level"]), int(grid.attrs["read_tile_size"]), 224,
                                    ref_model, 1, 4, 0, cfg.mean, cfg.std)
    rel = np.linalg.norm(ours["features"].astype(np.float32) - plain) / np.linalg.norm(plain)
    assert rel < 5e-3  # float16 storage and two JPEG decoders


def test_reference_training_forward_equals_ours():
    from benchmarks.reference.train import reference_forward

    from gigassl_fast.ssl import nt_xent
    from gigassl_fast.train import build_model

    torch.manual_seed(0)
    model = build_model("sparse-layer4", 256).train()
    g = torch.Generator().manual_seed(1)
    f = torch.rand(6, 5, 256, generator=g)
    loc = torch.randint(0, 40, (6, 5, 2), generator=g) * 896
    f2 = torch.rand(6, 5, 256, generator=g)
    loc2 = torch.randint(0, 40, (6, 5, 2), generator=g) * 896
    ours = nt_xent(model(f, loc), model(f2, loc2), 0.05)
    ref = nt_xent(reference_forward(model, f.numpy(), loc.numpy()), reference_forward(model, f2.numpy(), loc2.numpy()), 0.05)
    assert abs(ours.item() - ref.item()) < 1e-4 * abs(ref.item())


def test_bench_quick_report(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gigassl_fast", "bench", "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    assert {"cpu", "cores"} <= set(report["machine"])
    assert list(report["stages"]) == ["tile", "encode", "train", "embed"]
    for stage in report["stages"].values():
        assert {"ours_s", "reference_s", "speedup", "unit_rate"} <= set(stage)
        assert stage["ours_s"] > 0 and stage["reference_s"] > 0
        assert abs(stage["speedup"] - stage["reference_s"] / stage["ours_s"]) < 1e-9
    assert (tmp_path / "bench.md").read_text().count("|") > 20 and (tmp_path / "bench.png").stat().st_size > 1000
    r = subprocess.run([sys.executable, "-m", "gigassl_fast", "bench", "--stages", "tiles"], capture_output=True, text=True)
    assert r.returncode == 2 and "--stages" in r.stderr
