"""--precision auto: bf16 where the hardware multiplies bf16 fast (GPUs, CPUs with AMX), float32
elsewhere; and what bf16 costs in accuracy against float32 (features, loss)."""

import copy

import pytest
import torch

from gigassl_fast import runtime
from gigassl_fast.errors import GigasslError


@pytest.mark.parametrize("amx", [True, False])
def test_auto_follows_the_hardware(monkeypatch, amx):
    from gigassl_fast.runtime import train_precision

    monkeypatch.setattr(runtime, "cpu_has_amx_bf16", lambda: amx)
    assert runtime.resolve_precision("auto", "cpu") == ("bf16" if amx else "fp32")
    assert runtime.resolve_precision("auto", "cuda") == "bf16"
    assert runtime.resolve_precision("fp32", "cuda") == "fp32"
    assert train_precision("auto", torch.device("cpu")) == ("bf16" if amx else "fp32")
    # training on GPUs is bound by launches, not arithmetic: auto keeps float32 there
    assert train_precision("auto", torch.device("cuda")) == "fp32"
    assert train_precision("bf16", torch.device("cuda")) == "bf16"


def test_amx_flag_is_read_from_cpuinfo(tmp_path):
    head = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
    amx = tmp_path / "amx"
    amx.write_text(head + "flags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\n")
    no_amx = tmp_path / "no_amx"
    no_amx.write_text(head + "flags\t\t: fpu avx2 amx_tile_like\n")
    assert runtime.cpu_has_amx_bf16(str(amx)) is True
    assert runtime.cpu_has_amx_bf16(str(no_amx)) is False
    assert runtime.cpu_has_amx_bf16(str(tmp_path / "missing")) is False


def test_encoder_bf16_features_close_to_float32(tmp_path):
    from gigassl_fast.encoders.inference import TileEncoder

    torch.manual_seed(0)
    x = torch.rand(2, 3, 96, 96)  # small tiles: bf16 convolutions are slow on CPUs without AMX
    feats = {}
    for p in ("fp32", "bf16"):
        torch.manual_seed(1)  # the same random weights for both
        enc = TileEncoder("resnet18-l3", "random", "cpu", precision=p)
        assert enc.precision == p
        feats[p] = enc(x)
    rel = (feats["bf16"] - feats["fp32"]).norm() / feats["fp32"].norm()
    assert 0 < rel < 1e-2


def test_training_loss_bf16_close_to_float32():
    from gigassl_fast.train import build_model, contrastive_step

    torch.manual_seed(0)
    model = build_model("sparse-layer4", 256).train()
    g = torch.Generator().manual_seed(1)
    views = [(torch.rand(16, 5, 256, generator=g), torch.randint(0, 40, (16, 5, 2), generator=g) * 896) for _ in range(2)]
    losses = {}
    for bf16 in (False, True):
        m = copy.deepcopy(model)
        loss, z1 = contrastive_step(m, views[0], views[1], 0.05, bf16)
        assert z1.dtype == torch.float32 and all(p.grad is not None for p in m.parameters())
        losses[bf16] = loss.item()
    assert losses[True] != losses[False]  # bf16 did run
    assert abs(losses[True] - losses[False]) < 1e-2 * abs(losses[False])


def test_train_rejects_an_unknown_precision():
    from gigassl_fast.train import TrainParams

    with pytest.raises(GigasslError, match="--precision"):
        TrainParams(precision="fp16").validate()
