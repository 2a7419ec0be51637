"""TransUNet shapes and size (paper config), the encoder hand-off, local backbone checkpoints."""

import pytest
import timm
import torch

from common.config import ModelConfig, load_experiment
from common.models import (
    ContrastiveModel,
    EncoderMismatchError,
    SimMIMModel,
    build_transunet,
    count_parameters,
    encoder_schema,
    encoder_state_dict,
    load_encoder,
    simmim_mask,
)
from common.models.checkpoint import CheckpointError, load_backbone_checkpoint

OFFICIAL_TRANSUNET_PARAMS = 105_275_921  # R50-ViT-B/16, C = 1


@pytest.fixture(scope="module")
def tiny():
    return load_experiment("configs/tiny.yaml").model


@pytest.mark.slow
def test_paper_config_size_and_output_shape():
    cfg = load_experiment("configs/paper.yaml").model
    model = build_transunet(cfg).eval()
    with torch.inference_mode():
        out = model(torch.rand(1, 3, 224, 224))
    # within 0.05 % of the official TransUNet; logits of shape (B, 1, 224, 224)
    assert abs(count_parameters(model) / OFFICIAL_TRANSUNET_PARAMS - 1) < 5e-4
    assert out.shape == (1, 1, 224, 224)


@pytest.mark.slow
def test_paper_encoder_is_timms_r50_vit_b16():
    # The hand-off uses timm's own key names and shapes for vit_base_r50_s16_224 (no class token)
    ours = encoder_schema(ModelConfig())
    ref = timm.create_model(
        "vit_base_r50_s16_224", pretrained=False, num_classes=0, global_pool="", class_token=False
    )
    assert ours == {k: (tuple(v.shape), v.dtype) for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_scaled_configs_shapes(name):
    cfg = load_experiment(f"configs/{name}.yaml").model
    x = torch.rand(2, 3, cfg.img_size, cfg.img_size)
    assert build_transunet(cfg)(x).shape == (2, 1, cfg.img_size, cfg.img_size)
    assert build_transunet(cfg, num_classes=3)(x).shape == (2, 3, cfg.img_size, cfg.img_size)
    assert SimMIMModel(cfg)(x).shape == (2, 3, cfg.img_size, cfg.img_size)
    z = ContrastiveModel(cfg)(x)
    assert z.shape == (2, cfg.proj_dim)
    assert torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-5)


def test_encoder_tokens_equal_timm_forward_features(tiny):
    model = build_transunet(tiny).eval()
    x = torch.rand(2, 3, tiny.img_size, tiny.img_size)
    with torch.no_grad():
        tokens, skips = model.encoder(x)
        ref = model.encoder.vit.forward_features(x)
    assert torch.allclose(tokens, ref, atol=1e-6)
    s = tiny.img_size
    w = tiny.resnet_width
    assert [tuple(t.shape[1:]) for t in skips] == [
        (8 * w, s // 8, s // 8),
        (4 * w, s // 4, s // 4),
        (w, s // 2, s // 2),
    ]


def test_encoder_handoff_excludes_decoder_and_heads(tiny):
    keys = set(encoder_state_dict(build_transunet(tiny)))
    assert not any(k.startswith(("decoder", "head", "net.")) for k in keys)
    assert {"pos_embed", "norm.weight", "patch_embed.proj.weight"} <= keys
    assert any(k.startswith("patch_embed.backbone.stem") for k in keys)
    # the same encoder schema from every wrapper
    assert (
        keys
        == set(encoder_state_dict(SimMIMModel(tiny)))
        == set(encoder_state_dict(ContrastiveModel(tiny)))
    )


def test_load_encoder_loads_encoder_only(tiny):
    torch.manual_seed(0)
    src = ContrastiveModel(tiny)
    torch.manual_seed(1)
    dst = build_transunet(tiny)
    decoder_before = {k: v.clone() for k, v in dst.decoder.state_dict().items()}
    head_before = dst.head.weight.clone()
    load_encoder(dst, encoder_state_dict(src))
    # encoder equal to the source, decoder and head untouched
    for k, v in encoder_state_dict(src).items():
        assert torch.equal(dst.encoder.vit.state_dict()[k], v), k
    for k, v in dst.decoder.state_dict().items():
        assert torch.equal(v, decoder_before[k]), k
    assert torch.equal(dst.head.weight, head_before)


def test_load_encoder_refuses_missing_misshaped_unexpected(tiny):
    model = build_transunet(tiny)
    state = dict(encoder_state_dict(build_transunet(tiny)))
    missing = {k: v for k, v in state.items() if k != "norm.weight"}
    with pytest.raises(EncoderMismatchError, match="missing.*norm.weight"):
        load_encoder(model, missing)
    bad = dict(state)
    bad["pos_embed"] = torch.zeros(1, 3, tiny.embed_dim)
    with pytest.raises(EncoderMismatchError, match="mis-shaped.*pos_embed"):
        load_encoder(model, bad)
    extra = dict(state)
    extra["decoder.conv_more.0.weight"] = torch.zeros(1)
    with pytest.raises(EncoderMismatchError, match="unexpected"):
        load_encoder(model, extra)
    with pytest.raises(EncoderMismatchError):  # a demo encoder into a tiny model
        load_encoder(
            model, encoder_state_dict(build_transunet(load_experiment("configs/demo.yaml").model))
        )


def test_simmim_mask_units_and_ratio():
    g = torch.Generator().manual_seed(0)
    m = simmim_mask(5, 224, 32, 0.6, g)
    assert m.shape == (5, 1, 224, 224)
    units = m[:, 0, ::32, ::32]  # 7×7 units
    assert (units.flatten(1).sum(1) == 30).all()  # ceil(0.6 × 49)
    # every unit is all-or-nothing
    assert torch.equal(units.repeat_interleave(32, 1).repeat_interleave(32, 2), m[:, 0])
    # drawn per sample
    assert not torch.equal(m[0], m[1])
    with pytest.raises(ValueError, match="divide"):
        simmim_mask(1, 64, 24)
    with pytest.raises(ValueError, match="mask_ratio"):
        simmim_mask(1, 64, 16, 1.0)


def _timm_style_state(cfg: ModelConfig, img_size: int) -> dict:
    """A checkpoint as published for timm's hybrid: class token, pos_embed with its slot, a head."""
    from functools import partial

    from timm.layers.hybrid_embed import HybridEmbed
    from timm.models.vision_transformer import VisionTransformer

    from common.models.encoder import _build_vit

    other = cfg.model_copy(update={"img_size": img_size})
    vit = VisionTransformer(
        img_size=img_size,
        patch_size=1,
        num_classes=10,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        embed_layer=partial(HybridEmbed, backbone=_build_vit(other).patch_embed.backbone),
    )
    return vit.state_dict()


@pytest.mark.parametrize("fmt", [".pth", ".safetensors"])
def test_backbone_checkpoint_from_local_file(tmp_path, tiny, fmt):
    # a timm-format checkpoint at another resolution (pos_embed must be resampled)
    state = _timm_style_state(tiny, img_size=tiny.img_size * 2)
    path = tmp_path / f"r50_vit{fmt}"
    if fmt == ".pth":
        torch.save({"state_dict": state}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = build_transunet(tiny.model_copy(update={"checkpoint": str(path)}))
    # ResNet and blocks loaded exactly; class token slot dropped; grid resampled
    sd = model.encoder.vit.state_dict()
    assert torch.equal(sd["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    assert torch.equal(
        sd["patch_embed.backbone.stem.conv.weight"], state["patch_embed.backbone.stem.conv.weight"]
    )
    assert sd["pos_embed"].shape == (1, (tiny.img_size // 16) ** 2, tiny.embed_dim)


def test_backbone_checkpoint_errors_name_the_file(tmp_path, tiny):
    with pytest.raises(CheckpointError, match="not found"):
        load_backbone_checkpoint(tmp_path / "nope.pth", tiny)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pth"):
        load_backbone_checkpoint(bad, tiny)


def _export_google_npz(state: dict, cfg: ModelConfig, path) -> None:
    """Write a timm-layout hybrid state (with class token) in Google's R50+ViT .npz naming —
    the inverse of what timm's loader reads, so the test owns the file it checks."""
    import numpy as np

    def hwio(t):  # OIHW -> HWIO
        return t.permute(2, 3, 1, 0).numpy()

    d, h = cfg.embed_dim, cfg.num_heads
    hd = d // h
    w: dict = {}
    w["conv_root/kernel"] = hwio(state["patch_embed.backbone.stem.conv.weight"])
    w["gn_root/scale"] = state["patch_embed.backbone.stem.norm.weight"].numpy()
    w["gn_root/bias"] = state["patch_embed.backbone.stem.norm.bias"].numpy()
    for i, units in enumerate(cfg.resnet_layers):
        for j in range(units):
            sp, bp = f"patch_embed.backbone.stages.{i}.blocks.{j}.", f"block{i + 1}/unit{j + 1}/"
            for r in range(1, 4):
                w[f"{bp}conv{r}/kernel"] = hwio(state[f"{sp}conv{r}.weight"])
                w[f"{bp}gn{r}/scale"] = state[f"{sp}norm{r}.weight"].numpy()
                w[f"{bp}gn{r}/bias"] = state[f"{sp}norm{r}.bias"].numpy()
            if f"{sp}downsample.conv.weight" in state:
                w[f"{bp}conv_proj/kernel"] = hwio(state[f"{sp}downsample.conv.weight"])
                w[f"{bp}gn_proj/scale"] = state[f"{sp}downsample.norm.weight"].numpy()
                w[f"{bp}gn_proj/bias"] = state[f"{sp}downsample.norm.bias"].numpy()
    w["embedding/kernel"] = hwio(state["patch_embed.proj.weight"])
    w["embedding/bias"] = state["patch_embed.proj.bias"].numpy()
    w["cls"] = state["cls_token"].numpy()
    w["Transformer/posembed_input/pos_embedding"] = state["pos_embed"].numpy()
    w["Transformer/encoder_norm/scale"] = state["norm.weight"].numpy()
    w["Transformer/encoder_norm/bias"] = state["norm.bias"].numpy()
    for b in range(cfg.depth):
        sp, bp = f"blocks.{b}.", f"Transformer/encoderblock_{b}/"
        for n, (t_ln) in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[f"{bp}{n}/scale"] = state[f"{sp}{t_ln}.weight"].numpy()
            w[f"{bp}{n}/bias"] = state[f"{sp}{t_ln}.bias"].numpy()
        qkv_w, qkv_b = state[f"{sp}attn.qkv.weight"].chunk(3), state[f"{sp}attn.qkv.bias"].chunk(3)
        for k, name in enumerate(("query", "key", "value")):
            w[f"{bp}MultiHeadDotProductAttention_1/{name}/kernel"] = (
                qkv_w[k].T.reshape(d, h, hd).numpy()
            )
            w[f"{bp}MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[k].reshape(h, hd).numpy()
        w[f"{bp}MultiHeadDotProductAttention_1/out/kernel"] = (
            state[f"{sp}attn.proj.weight"].reshape(d, h, hd).permute(1, 2, 0).numpy()
        )
        w[f"{bp}MultiHeadDotProductAttention_1/out/bias"] = state[f"{sp}attn.proj.bias"].numpy()
        for r in range(2):
            w[f"{bp}MlpBlock_3/Dense_{r}/kernel"] = state[f"{sp}mlp.fc{r + 1}.weight"].T.numpy()
            w[f"{bp}MlpBlock_3/Dense_{r}/bias"] = state[f"{sp}mlp.fc{r + 1}.bias"].numpy()
    np.savez(path, **w)


def test_backbone_checkpoint_from_google_npz(tmp_path, tiny):
    # a Google-format .npz written from a known state (with class token)
    state = {
        k: v for k, v in _timm_style_state(tiny, tiny.img_size).items() if not k.startswith("head.")
    }
    path = tmp_path / "R50+ViT-B_16.npz"
    _export_google_npz(state, tiny, path)
    # read through timm's own npz loader
    loaded = load_backbone_checkpoint(path, tiny)
    # every encoder tensor equals the original; the class-token slot is dropped
    model = build_transunet(tiny.model_copy(update={"checkpoint": str(path)}))
    for k, v in model.encoder.vit.state_dict().items():
        ref = state[k][:, 1:] if k == "pos_embed" else state[k]
        assert torch.allclose(v, ref, atol=1e-6), k
        assert torch.allclose(loaded[k], ref, atol=1e-6), k
