"""Released models as they were saved: the original trislaz/gigassl SimCLRMIL checkpoint (SparseConvNet
layouts, written here from the fixture weights through the fixture's key map), Democratizing_WSI's
``backbone.mil.*`` checkpoints, MoCo tile-encoder checkpoints; exact conversion both ways."""

import sys
import types

import numpy as np
import pytest
import torch

from conftest import cli
from gigassl_fast.checkpoints import from_gigassl, read_slide_checkpoint, to_gigassl
from gigassl_fast.embed import load_backbone
from gigassl_fast.errors import GigasslError
from gigassl_fast.ssl import Projector


def _scn(dense: np.ndarray) -> torch.Tensor:
    """The fixture README's rule: scn[3*kh+kw, 0, i, o] == dense[o, i, kh, kw] (1x1: scn[0, 0, i, o])."""
    d = torch.from_numpy(dense.astype(np.float32))
    o, i, kh, kw = d.shape
    out = torch.empty(kh * kw, 1, i, o)
    for a in range(kh):
        for b in range(kw):
            out[kw * a + b, 0] = d[:, :, a, b].T
    return out


def original_state(fx, projector: bool = True, prefix: str = "backbone.net.mil_model.") -> dict:
    """A trislaz/gigassl SimCLRMIL state dict built from the fixture weights, with its key names."""
    state = {}
    for dense_key, scn_key, shape in zip(fx["keymap_dense"], fx["keymap_scn"], fx["keymap_scn_shape"], strict=True):
        w = fx["w/" + str(dense_key)]
        t = _scn(w) if w.ndim == 4 else torch.from_numpy(w.astype(np.float32))
        assert tuple(t.shape) == tuple(int(v) for v in shape if v), (scn_key, t.shape, shape)
        state[prefix + str(scn_key)] = t
    if projector:
        torch.manual_seed(5)
        p = Projector().state_dict()
        names = {"0": "layer1.0", "2": "layer1.2", "3": "layer2.0", "5": "layer2.2", "6": "layer3"}
        for k, v in p.items():
            idx, field = k.split(".", 1)
            state[f"projector.{names[idx]}.{field}"] = torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v
        for k in list(state):  # the original's module tree holds backbone and projector twice
            if k.startswith("backbone."):
                state["encoder.0." + k[len("backbone."):]] = state[k]
            elif k.startswith("projector."):
                state["encoder.1." + k[len("projector."):]] = state[k]
    return state


def save_original(path, fx) -> None:
    """Saved as the original does: {'epoch', 'state_dict', 'config'}, config an object of one of its own
    classes (a module that is not installed where the file is read)."""
    module = types.ModuleType("arguments")

    class Namespace:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    Namespace.__module__, Namespace.__qualname__ = "arguments", "Namespace"
    module.Namespace = Namespace
    sys.modules["arguments"] = module
    try:
        config = Namespace(model=Namespace(downmap=224, freeze_pooling=0), dataset=Namespace(nb_tiles=5))
        torch.save({"epoch": 1000, "state_dict": original_state(fx), "config": config}, path)
    finally:
        del sys.modules["arguments"]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("case", range(5))
def test_original_checkpoint_reproduces_the_reference_outputs(fixtures, tmp_path, case):
    path = tmp_path / "t5e1000.pth"
    save_original(path, fixtures)
    backbone, ckpt = load_backbone(str(path), torch.device("cpu"))
    assert ckpt.format == "gigassl" and ckpt.aggregator == "sparse-layer4" and ckpt.has_projector
    p = f"c{case}/"
    feats = torch.from_numpy(fixtures[p + "tile_feats"])
    locs = torch.from_numpy(fixtures[p + "locs_input"])
    with torch.no_grad():
        assert _rel(backbone(feats, locs), fixtures[p + "out_eval"]) < 1e-5
        assert _rel(backbone(feats, locs, per_view=True), fixtures[p + "out_eval_batch1"]) < 1e-5


def test_ours_to_original_to_ours_is_identical(tmp_path):
    torch.manual_seed(0)
    from gigassl_fast.aggregators import build_aggregator
    from gigassl_fast.ssl import SimCLRMIL

    model = SimCLRMIL(build_aggregator("sparse-layer4", 256))
    for t in model.state_dict().values():
        if t.is_floating_point():
            t.copy_(torch.randn_like(t))
    ours = {k: v for k, v in model.state_dict().items() if not (k.startswith("backbone.") and "num_batches" in k)}
    back = from_gigassl(to_gigassl(ours))
    assert set(back) == set(ours)
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    orig = to_gigassl(ours)
    assert orig["backbone.net.mil_model.sparse_pooling.0.0.conv1.weight"].shape == (9, 1, 256, 512)
    assert torch.equal(orig["encoder.0.net.mil_model.sparse_pooling.0.1.norm2.running_var"],
                       ours["backbone.block1.bn2.running_var"])


def test_democratizing_wsi_checkpoints(fixtures, tmp_path):
    # sparse-layer4 under backbone.mil.net.mil_model.*
    sd = original_state(fixtures, projector=False, prefix="backbone.mil.net.mil_model.")
    torch.save({"state_dict": sd, "config": {"downmap": 224}}, tmp_path / "scm.pth")
    backbone, ckpt = load_backbone(str(tmp_path / "scm.pth"), torch.device("cpu"))
    assert (ckpt.format, ckpt.aggregator, ckpt.has_projector) == ("democratizing-wsi", "sparse-layer4", False)
    with torch.no_grad():
        out = backbone(torch.from_numpy(fixtures["c1/tile_feats"]), torch.from_numpy(fixtures["c1/locs_input"]))
    assert _rel(out, fixtures["c1/out_eval"]) < 1e-5
    # its residual MLP: tile_encoder.{0,1}.block.{0,1}.{block.0,norm}, residual_lin, classifier
    from gigassl_fast.aggregators.mlp import ResidualMLP

    torch.manual_seed(1)
    ref = ResidualMLP(384).eval()
    for t in ref.state_dict().values():
        if t.is_floating_point():
            t.copy_(torch.rand_like(t) + 0.1)
    names = {"main.0": "block.0.block.0", "main.3": "block.0.norm", "main.4": "block.1.block.0", "main.6": "block.1.norm",
             "skip.0": "residual_lin.block.0", "skip.1": "residual_lin.norm"}
    dw = {}
    for k, v in ref.state_dict().items():
        _, i, a, b, field = k.split(".")
        dw[f"backbone.mil.tile_encoder.{i}.{names[a + '.' + b]}.{field}"] = v
    dw["backbone.mil.classifier.weight"] = torch.zeros(2, 512)
    torch.save({"state_dict": dw, "config": {"feature_depth": 384}}, tmp_path / "mlp.pth")
    backbone, ckpt = load_backbone(str(tmp_path / "mlp.pth"), torch.device("cpu"))
    assert (ckpt.aggregator, ckpt.in_dim) == ("mlp", 384)
    x = torch.randn(3, 5, 384)
    with torch.no_grad():
        assert torch.allclose(backbone(x, None), ref(x), rtol=1e-6, atol=1e-6)
    # a file that does not fit names the keys
    del dw["backbone.mil.tile_encoder.1.block.1.norm.running_var"]
    dw["backbone.mil.tile_encoder.1.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": dw}, tmp_path / "bad.pth")
    with pytest.raises(GigasslError, match=r"missing: backbone\.blocks\.1\.main\.6\.running_var.*unexpected: "
                                           r"backbone\.mil\.tile_encoder\.1\.extra\.weight"):
        read_slide_checkpoint(str(tmp_path / "bad.pth"))


def test_unknown_checkpoint_is_one_line(tmp_path):
    torch.save({"state_dict": {"fc.weight": torch.zeros(1)}}, tmp_path / "x.pth")
    with pytest.raises(GigasslError, match="not a slide checkpoint this toolkit knows"):
        read_slide_checkpoint(str(tmp_path / "x.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(GigasslError, match="not a readable checkpoint"):
        read_slide_checkpoint(str(tmp_path / "junk.pth"))


def test_original_checkpoint_never_runs_code(tmp_path):
    """A pickle that would call os.system is read as data, not executed."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (__import__("os").system, (f"touch {tmp_path / 'pwned'}",))

    with open(tmp_path / "evil.pth", "wb") as fh:
        pickle.dump({"state_dict": {"backbone.net.mil_model.x": Evil()}}, fh)
    with pytest.raises(GigasslError):
        read_slide_checkpoint(str(tmp_path / "evil.pth"))
    assert not (tmp_path / "pwned").exists()


def test_moco_tile_encoder_layout(tmp_path):
    """The released MoCo ResNet18: module.encoder_q.* (with an MLP head), module.encoder_k.*, the queue."""
    from gigassl_fast.encoders import create_encoder
    from gigassl_fast.encoders.resnet import ResNet18Layer3

    torch.manual_seed(2)
    plain = ResNet18Layer3().eval()
    for t in plain.state_dict().values():
        if t.is_floating_point():
            t.copy_(torch.rand_like(t) * 0.1)
    torch.save(plain.state_dict(), tmp_path / "plain.pth")
    sd = {}
    for k, v in plain.state_dict().items():
        sd[f"module.encoder_q.{k}"] = v
        sd[f"module.encoder_k.{k}"] = torch.zeros_like(v)
    sd.update({"module.encoder_q.layer4.0.conv1.weight": torch.zeros(512, 256, 3, 3),
               "module.encoder_q.fc.0.weight": torch.zeros(512, 512), "module.encoder_q.fc.2.weight": torch.zeros(128, 512),
               "module.queue": torch.zeros(128, 65536), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd, "optimizer": {}}, tmp_path / "moco.pth.tar")
    moco = create_encoder("resnet18-l3", str(tmp_path / "moco.pth.tar"))
    ref = create_encoder("resnet18-l3", str(tmp_path / "plain.pth"))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(moco(x), ref(x))


def test_embed_export_and_init_from_the_cli(fixtures, tmp_path):
    """embed reads an original checkpoint and says so; train --init starts from it; export writes ours in
    the original layout, which reads back to the same weights."""
    from gigassl_fast.synthetic import write_synthetic_slide

    (tmp_path / "slides").mkdir()
    for i in range(4):
        write_synthetic_slide(tmp_path / "slides" / f"s{i}.tif", 1536, 1024, mpp=0.5, seed=70 + i)
    assert cli("encode", tmp_path / "slides", "--out", tmp_path / "out", "--encoder", "resnet18-l3", "--weights",
               "random", "--naug", "2", "--nt", "8", "--tile-size", "112").returncode == 0
    assert cli("pack", tmp_path / "out" / "features", "--out", tmp_path / "store.h5").returncode == 0
    orig = tmp_path / "t5e1000.pth"
    save_original(orig, fixtures)
    r = cli("embed", tmp_path / "store.h5", "--checkpoint", orig, "--out", tmp_path / "e.h5", "--views", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "loaded gigassl checkpoint, sparse-layer4 on 256-d tiles (aggregator and projector)" in r.stderr
    r = cli("train", tmp_path / "store.h5", "--out", tmp_path / "run", "--epochs", "1", "--batch-size", "2",
            "--init", orig, "--lr", "1e-12", "--warmup-epochs", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "starting from gigassl checkpoint" in r.stderr
    trained = torch.load(tmp_path / "run" / "checkpoint_last.pt", weights_only=False)["state_dict"]
    start = from_gigassl(original_state(fixtures))
    for k in ("backbone.block0.conv1", "backbone.block1.conv2", "projector.6.weight"):
        assert torch.allclose(trained[k], start[k], atol=1e-6), k  # lr 1e-12: the starting weights
    r = cli("export", "--checkpoint", tmp_path / "run" / "checkpoint_last.pt", "--out", tmp_path / "orig.pth")
    assert r.returncode == 0, r.stdout + r.stderr
    exported = read_slide_checkpoint(str(tmp_path / "orig.pth"))
    assert exported.format == "gigassl"
    assert all(torch.equal(exported.state[k], trained[k]) for k in exported.state if "num_batches" not in k)
    r = cli("train", tmp_path / "store.h5", "--out", tmp_path / "run2", "--epochs", "1", "--batch-size", "2",
            "--init", orig, "--aggregator", "mlp")
    assert r.returncode == 2 and "a sparse-layer4 model on 256-d tiles" in r.stderr
