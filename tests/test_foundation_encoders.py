"""Foundation-model presets through a stand-in timm (timm needs torchvision, which does not install beside
the CPU torch here): the constructor arguments each model card gives reach timm.create_model, weights
load strictly by name (Hugging Face layout converted for Phikon), and each output rule holds."""

import sys
import types

import pytest
import torch
from torch import nn

from gigassl_fast.encoders import create_encoder, get_config, list_encoders
from gigassl_fast.errors import GigasslError

# From the model cards (independent of the presets' table).
CARDS = {
    "uni": ("vit_large_patch16_224", {"init_values": 1e-5, "patch_size": 16, "dynamic_img_size": True}, 1024),
    "uni2-h": ("vit_giant_patch14_224", {"depth": 24, "num_heads": 24, "embed_dim": 1536, "reg_tokens": 8,
                                         "no_embed_class": True, "patch_size": 14}, 1536),
    "virchow2": ("vit_huge_patch14_224", {"mlp_ratio": 5.3375, "reg_tokens": 4, "init_values": 1e-5}, 2560),
    "h-optimus-0": ("vit_giant_patch14_reg4_dinov2", {"init_values": 1e-5, "dynamic_img_size": False}, 1536),
    "gigapath": ("vit_giant_patch14_dinov2", {"patch_size": 16, "depth": 40, "embed_dim": 1536, "mlp_ratio": 5.33334},
                 1536),
    "phikon": ("vit_base_patch16_224", {"patch_size": 16}, 768),
    "ctranspath": ("swin_tiny_patch4_window7_224", {"img_size": 224}, 768),
}
SWIGLU = {"uni2-h", "virchow2"}


class SwiGLUPacked(nn.Module):
    pass


class TinyViT(nn.Module):
    """timm VisionTransformer's names and token layout, 8-d, one block."""

    def __init__(self, reg_tokens: int = 0, dim: int = 8, **_):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.reg_token = nn.Parameter(torch.randn(1, reg_tokens, dim)) if reg_tokens else None
        self.pos_embed = nn.Parameter(torch.randn(1, 16, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 16, 16)
        block = nn.Module()
        block.norm1, block.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        block.attn = nn.Module()
        block.attn.qkv, block.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        block.mlp = nn.Module()
        block.mlp.fc1, block.mlp.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.blocks = nn.ModuleList([block])
        self.norm = nn.LayerNorm(dim)
        self.num_prefix_tokens = 1 + reg_tokens
        self.num_features = dim

    def forward_features(self, x):
        p = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        prefix = [self.cls_token.expand(len(x), -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(len(x), -1, -1))
        t = torch.cat([*prefix, p], 1)
        b = self.blocks[0]
        t = t + b.attn.proj(b.attn.qkv(b.norm1(t))[..., : t.shape[-1]])
        t = t + b.mlp.fc2(torch.relu(b.mlp.fc1(b.norm2(t))))
        return self.norm(t)

    def forward(self, x):
        return self.forward_features(x)[:, 0]


class TinySwin(nn.Module):
    """A Swin's patch embedding (from `embed_layer`, NHWC out) and pooled features."""

    def __init__(self, embed_layer):
        super().__init__()
        self.patch_embed = embed_layer(img_size=224, patch_size=4, in_chans=3, embed_dim=16, norm_layer=nn.LayerNorm)
        self.num_features = 16

    def forward(self, x):
        return self.patch_embed(x).mean(dim=(1, 2))


@pytest.fixture
def fake_timm(monkeypatch):
    calls = []
    fake = types.ModuleType("timm")
    fake.__version__ = "stand-in"
    fake.layers = types.SimpleNamespace(SwiGLUPacked=SwiGLUPacked)

    def create_model(name, pretrained, num_classes, **kwargs):
        assert pretrained is False and num_classes == 0
        calls.append((name, kwargs))
        if "embed_layer" in kwargs:  # a Swin: its patch embedding is what the preset gives
            return TinySwin(kwargs["embed_layer"])
        return TinyViT(**kwargs)

    fake.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", fake)
    return calls


@pytest.mark.parametrize("name", sorted(CARDS))
def test_presets_build_with_their_cards_arguments(fake_timm, tmp_path, name):
    timm_name, expected, dim = CARDS[name]
    cfg = get_config(name)
    assert name in list_encoders() and cfg.out_dim == dim and cfg.input_size == 224
    enc = create_encoder(name, "random")
    (called, kwargs), = fake_timm
    assert called == timm_name
    assert {k: kwargs[k] for k in expected} == expected
    if name in SWIGLU:
        assert kwargs["mlp_layer"] is SwiGLUPacked and kwargs["act_layer"] is nn.SiLU
    assert enc(torch.rand(2, 3, 64, 64)).shape[0] == 2
    with pytest.raises(GigasslError, match="needs --weights PATH"):
        create_encoder(name)


def test_h_optimus_normalisation_and_virchow2_output_rule(fake_timm):
    assert get_config("h-optimus-0").mean == (0.707223, 0.578729, 0.703617)
    assert get_config("uni").std == (0.229, 0.224, 0.225)
    enc = create_encoder("virchow2", "random")
    x = torch.rand(2, 3, 64, 64)
    tokens = enc.model.forward_features(x)  # class, 4 registers, 16 patches
    want = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], -1)
    torch.testing.assert_close(enc(x), want)


def test_weights_load_strictly_by_name(fake_timm, tmp_path):
    torch.manual_seed(0)
    src = TinyViT()
    torch.save({"model": {**{f"module.{k}": v for k, v in src.state_dict().items()},
                          "module.head.weight": torch.zeros(3, 8)}}, tmp_path / "uni.pth")
    enc = create_encoder("uni", str(tmp_path / "uni.pth"))
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(enc(x), src(x))
    bad = {k: v for k, v in src.state_dict().items() if k != "norm.bias"}
    bad["blocks.0.ls1.gamma"] = torch.ones(8)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(GigasslError, match=r"missing: norm\.bias.*unexpected: blocks\.0\.ls1\.gamma"):
        create_encoder("uni", str(tmp_path / "bad.pth"))


def test_phikon_hugging_face_layout(fake_timm, tmp_path):
    torch.manual_seed(1)
    src = TinyViT()
    s = src.state_dict()
    hf = {"embeddings.cls_token": s["cls_token"], "embeddings.position_embeddings": s["pos_embed"],
          "embeddings.patch_embeddings.projection.weight": s["patch_embed.proj.weight"],
          "embeddings.patch_embeddings.projection.bias": s["patch_embed.proj.bias"],
          "layernorm.weight": s["norm.weight"], "layernorm.bias": s["norm.bias"],
          "pooler.dense.weight": torch.zeros(8, 8), "pooler.dense.bias": torch.zeros(8)}
    for kind in ("weight", "bias"):
        q, k, v = s[f"blocks.0.attn.qkv.{kind}"].chunk(3)
        hf.update({f"encoder.layer.0.attention.attention.query.{kind}": q,
                   f"encoder.layer.0.attention.attention.key.{kind}": k,
                   f"encoder.layer.0.attention.attention.value.{kind}": v,
                   f"encoder.layer.0.attention.output.dense.{kind}": s[f"blocks.0.attn.proj.{kind}"],
                   f"encoder.layer.0.layernorm_before.{kind}": s[f"blocks.0.norm1.{kind}"],
                   f"encoder.layer.0.layernorm_after.{kind}": s[f"blocks.0.norm2.{kind}"],
                   f"encoder.layer.0.intermediate.dense.{kind}": s[f"blocks.0.mlp.fc1.{kind}"],
                   f"encoder.layer.0.output.dense.{kind}": s[f"blocks.0.mlp.fc2.{kind}"]})
    torch.save(hf, tmp_path / "pytorch_model.bin")
    enc = create_encoder("phikon", str(tmp_path / "pytorch_model.bin"))
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(enc(x), src(x))


def test_ctranspath_conv_stem(fake_timm, tmp_path):
    from gigassl_fast.encoders.foundation import ConvStem

    enc = create_encoder("ctranspath", "random")
    (name, kwargs), = fake_timm
    assert name == "swin_tiny_patch4_window7_224" and kwargs["embed_layer"] is ConvStem
    stem = enc.model.patch_embed
    # TransPath's stem: conv3x3/2 (C/8), BN, ReLU, conv3x3/2 (C/4), BN, ReLU, conv1x1 (C); NHWC out at 1/4 size
    assert [tuple(m.weight.shape) for m in stem.proj if isinstance(m, nn.Conv2d)] == [(2, 3, 3, 3), (4, 2, 3, 3),
                                                                                     (16, 4, 1, 1)]
    assert stem(torch.rand(1, 3, 64, 64)).shape == (1, 16, 16, 16)
    # its checkpoint (timm 0.5.4) carries index and mask buffers that today's timm computes
    state = {**{f"model.{k}": v for k, v in enc.model.state_dict().items()},
             "model.layers.0.blocks.0.attn.relative_position_index": torch.zeros(49, 49, dtype=torch.long),
             "model.layers.0.blocks.1.attn_mask": torch.zeros(4, 49, 49), "model.head.weight": torch.zeros(2, 16)}
    torch.save({"model": state}, tmp_path / "ctranspath.pth")
    create_encoder("ctranspath", str(tmp_path / "ctranspath.pth"))
