import pytest
import torch

from gigassl_fast.encoders import create_encoder, get_config, list_encoders
from gigassl_fast.encoders.foundation import PRESETS
from gigassl_fast.encoders.resnet import ResNet18Layer3
from gigassl_fast.errors import GigasslError


def test_efficientnet_lite0_shipped_weights_classify_a_cat():
    from skimage import data

    model = create_encoder("efficientnet-lite0")
    cfg = get_config("efficientnet-lite0")
    img = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float()[None] / 255
    img = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    x = (img - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = model.classify(x).softmax(-1)[0]
    assert int(probs.argmax()) in {281, 282, 285}  # tabby, tiger cat, Egyptian cat
    assert float(probs[[281, 282, 285]].sum()) > 0.8
    assert model(x).shape == (1, 1280) and model.weights_checksum != "random"


@pytest.mark.parametrize("name", [n for n in list_encoders() if n not in PRESETS])
def test_every_encoder_gives_its_declared_dimension(name):
    """The plain-torch encoders (the timm-built presets: tests/test_foundation_encoders.py)."""
    model = create_encoder(name, "random")
    cfg = get_config(name)
    with torch.no_grad():
        out = model(torch.rand(2, 3, cfg.input_size, cfg.input_size))
    assert out.shape == (2, cfg.out_dim) and torch.isfinite(out).all()


def _torchvision_layout_state(tmp_path, prefix="", extra=True):
    ref = ResNet18Layer3()
    state = {prefix + k: torch.randn_like(v) if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    if extra:  # what a full torchvision ResNet18 or a MoCo checkpoint also holds
        state[prefix + "layer4.0.conv1.weight"] = torch.randn(512, 256, 3, 3)
        state[prefix + "fc.weight"] = torch.randn(1000, 512)
    return state


def test_resnet18_l3_loads_torchvision_and_moco_checkpoints(tmp_path):
    tv = _torchvision_layout_state(tmp_path)
    torch.save(tv, tmp_path / "tv.pth")
    moco = {"state_dict": _torchvision_layout_state(tmp_path, prefix="module.encoder_q.")}
    torch.save(moco, tmp_path / "moco.pth.tar")
    m = create_encoder("resnet18-l3", str(tmp_path / "tv.pth"))
    torch.testing.assert_close(m.conv1.weight, tv["conv1.weight"])
    m2 = create_encoder("resnet18-l3", str(tmp_path / "moco.pth.tar"))
    torch.testing.assert_close(m2.layer3[1].conv2.weight, moco["state_dict"]["module.encoder_q.layer3.1.conv2.weight"])
    assert m.weights_checksum != m2.weights_checksum


def test_weight_errors_name_the_problem(tmp_path):
    state = _torchvision_layout_state(tmp_path, extra=False)
    del state["layer2.0.bn1.running_var"]
    state["head.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(GigasslError, match=r"missing: layer2.0.bn1.running_var .*unexpected: head.weight"):
        create_encoder("resnet18-l3", str(tmp_path / "bad.pth"))
    with pytest.raises(GigasslError, match="no such file"):
        create_encoder("resnet18-l3", str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(GigasslError, match="not a readable PyTorch checkpoint"):
        create_encoder("resnet18-l3", str(tmp_path / "junk.pth"))
    with pytest.raises(GigasslError, match="did you mean resnet18-l3"):
        create_encoder("resnet18-l4")
    with pytest.raises(GigasslError, match="needs weights"):
        create_encoder("resnet18-l3")


def test_imagenet_download_failure_is_one_clear_line(monkeypatch, tmp_path):
    import urllib.error

    import torch.hub

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(GigasslError, match="could not download weights .* pass --weights PATH"):
        create_encoder("resnet18-l3", "imagenet")


def test_timm_encoders_through_a_stand_in_timm(monkeypatch, tmp_path):
    """timm needs torchvision, which does not install beside the CPU torch here: a stand-in module
    with timm's create_model contract checks our side (config, head removal, weight loading)."""
    import sys
    import types

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 12, 4, 4)
            self.num_features = 12
            self.pretrained_cfg = {"input_size": (3, 96, 96), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}

        def forward(self, x):
            return self.stem(x).mean(dim=(2, 3))

    fake = types.ModuleType("timm")
    fake.create_model = lambda name, pretrained, num_classes: Tiny() if name == "tiny" else (_ for _ in ()).throw(
        RuntimeError(f"Unknown model ({name})"))
    monkeypatch.setitem(sys.modules, "timm", fake)
    cfg = get_config("timm:tiny")
    assert (cfg.input_size, cfg.out_dim, cfg.std) == (96, 12, (0.25, 0.25, 0.25))
    state = {**Tiny().state_dict(), "head.weight": torch.zeros(5, 12)}
    torch.save(state, tmp_path / "tiny.pth")
    model = create_encoder("timm:tiny", str(tmp_path / "tiny.pth"))
    torch.testing.assert_close(model.stem.weight, state["stem.weight"])
    assert model(torch.rand(2, 3, 96, 96)).shape == (2, 12)
    with pytest.raises(GigasslError, match="needs --weights PATH"):
        create_encoder("timm:tiny")
    with pytest.raises(GigasslError, match="timm cannot build it"):
        get_config("timm:nope")


@pytest.mark.parametrize("name", ["efficientnet-lite0", "resnet18-l3"])
def test_encode_folds_batch_norms_without_changing_features(name):
    """TileEncoder folds each batch norm into its convolution (efficientnet-lite0 by its own method,
    resnet18-l3 through torch.fx): no batch norm is left, and the features are those of the plain model."""
    from gigassl_fast.encoders.inference import TileEncoder

    weights = "random" if name == "resnet18-l3" else None
    torch.manual_seed(0)  # the same random weights for both models
    enc = TileEncoder(name, weights, "cpu")
    torch.manual_seed(0)
    plain = create_encoder(name, weights).eval()
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.model.modules())
    x = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = plain((x - enc.mean) / enc.std)
    torch.testing.assert_close(enc(x), ref, rtol=1e-4, atol=1e-4)
