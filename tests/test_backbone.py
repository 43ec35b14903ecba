"""Backbone (timm ViT / Eva wrapper) and checkpoint loading in the official layouts.

Tiny models (D=32, 2 heads, 3 blocks) keep the file fast on CPU. Official DINOv2 and
DINOv3 files are written here by inverting timm's converters, from a randomised source
model, so a loaded backbone must reproduce the source's outputs exactly.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from official_layouts import dinov2_official, dinov3_official, randomise_

import dinov.models.backbone as backbone_mod
from dinov.config import ModelConfig
from dinov.models import Backbone, build_backbone, load_backbone_weights

DINOV2 = "vit_small_patch14_dinov2"
DINOV2_REG = "vit_base_patch14_reg4_dinov2"
DINOV3 = "vit_small_patch16_dinov3"
DINOV3_QKVB = "vit_small_patch16_dinov3_qkvb"
DEPTH = 3


def tiny(arch: str, img_size: int | None = None, seed: int = 0, **overrides) -> Backbone:
    """A tiny backbone with every parameter randomised (so all of them matter)."""
    patch = 16 if "dinov3" in arch else 14
    cfg = ModelConfig(
        arch=arch,
        img_size=img_size or 2 * patch,
        embed_dim=32,
        depth=DEPTH,
        num_heads=2,
        **overrides,
    )
    backbone = build_backbone(cfg).eval()
    randomise_(backbone, seed)
    return backbone


def images(height: int, width: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def assert_same_output(a: Backbone, b: Backbone, x: torch.Tensor, atol: float = 1e-6) -> None:
    with torch.no_grad():
        out_a, out_b = a(x), b(x)
    torch.testing.assert_close(out_a.cls, out_b.cls, atol=atol, rtol=0)
    torch.testing.assert_close(out_a.patch, out_b.patch, atol=atol, rtol=0)


FAMILIES = [
    # arch, (square, non-square, not divisible by the patch)
    (DINOV2, [(28, 28), (28, 42), (30, 45)]),
    (DINOV2_REG, [(28, 28), (28, 42), (30, 45)]),
    (DINOV3, [(32, 32), (32, 48), (35, 50)]),
]


# ----------------------------------------------------------------- forward pass
@pytest.mark.parametrize("arch,sizes", FAMILIES)
def test_forward_equals_timm_forward_features(arch, sizes):
    backbone = tiny(arch)
    npt = backbone.num_prefix_tokens
    for height, width in sizes:
        x = images(height, width)
        with torch.no_grad():
            out, ref = backbone(x), backbone.model.forward_features(x)
        grid = backbone.patch_grid(height, width)
        assert out.grid == grid
        assert out.patch.shape == (2, grid[0] * grid[1], 32)
        torch.testing.assert_close(out.cls, ref[:, 0], atol=1e-6, rtol=0)
        torch.testing.assert_close(out.patch, ref[:, npt:], atol=1e-6, rtol=0)


def test_prefix_tokens_and_grid():
    assert tiny(DINOV2).num_prefix_tokens == 1
    assert tiny(DINOV2_REG).num_prefix_tokens == 5
    assert tiny(DINOV3).num_prefix_tokens == 5
    backbone = tiny(DINOV2)
    assert backbone.patch_grid(28, 29) == (2, 3)  # ceil: the image is padded
    assert backbone.patch_size == 14 and backbone.num_blocks == DEPTH


@pytest.mark.parametrize("arch", [DINOV2, DINOV3])
def test_staged_run_equals_forward(arch):
    backbone = tiny(arch)
    x = images(32, 48)
    grid = backbone.patch_grid(32, 48)
    masks = torch.rand(2, *grid, generator=torch.Generator().manual_seed(3)) < 0.5
    with torch.no_grad():
        full = backbone(x, masks)
        for k in range(DEPTH + 1):
            state = backbone.prepare_tokens(x, masks)
            state = backbone.run_blocks(backbone.run_blocks(state, 0, k), k, None)
            out = backbone.finalize(state)
            torch.testing.assert_close(out.cls, full.cls, atol=0, rtol=0)
            torch.testing.assert_close(out.patch, full.patch, atol=0, rtol=0)
    with pytest.raises(ValueError, match="block range"):
        backbone.run_blocks(state, 2, 1)


def test_grad_checkpointing_gives_the_same_gradients():
    backbone = tiny(DINOV3).train()
    x = images(32, 32)
    backbone(x).patch.square().sum().backward()
    ref = {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}
    backbone.zero_grad(set_to_none=True)
    backbone.set_grad_checkpointing(True)
    backbone(x).patch.square().sum().backward()
    grads = {n: p.grad for n, p in backbone.named_parameters() if p.grad is not None}
    assert grads.keys() == ref.keys() and "model.blocks.2.attn.qkv.weight" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref[name], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- masking
@pytest.mark.parametrize("arch", [DINOV2, DINOV3])
def test_masked_patches_become_the_mask_token(arch):
    backbone = tiny(arch)
    npt, (h, w) = backbone.num_prefix_tokens, backbone.patch_grid(28, 42)
    masks = torch.zeros(2, h * w, dtype=torch.bool)
    masks[0, [0, 4]] = True
    masks[1, 2] = True
    a, b = images(28, 42, seed=1), images(28, 42, seed=2)
    with torch.no_grad():
        ta, tb = backbone.prepare_tokens(a, masks), backbone.prepare_tokens(b, masks)
        plain = backbone.prepare_tokens(a)
    patches_a, patches_b = ta.x[:, npt:], tb.x[:, npt:]
    # Masked inputs do not depend on the image; unmasked ones do.
    torch.testing.assert_close(patches_a[masks], patches_b[masks], atol=0, rtol=0)
    assert (patches_a[~masks] - patches_b[~masks]).abs().amin(-1).gt(0).all()
    torch.testing.assert_close(patches_a[~masks], plain.x[:, npt:][~masks], atol=0, rtol=0)
    # Replaced *before* positions are added: masked = mask_token + that patch's position.
    if backbone.is_eva:
        expected = backbone.mask_token.expand(int(masks.sum()), -1)  # RoPE acts in attention
    else:
        # Zero patch embeddings through timm's own position step give the grid's positions.
        with torch.no_grad():
            pos = backbone.model._pos_embed(torch.zeros(1, h, w, 32))[0, npt:]
        expected = backbone.mask_token + pos[masks.nonzero()[:, 1]]
    torch.testing.assert_close(patches_a[masks], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", [DINOV2, DINOV3])
def test_masking_every_patch_makes_output_image_independent(arch):
    backbone = tiny(arch)
    a, b = images(28, 42, seed=1), images(28, 42, seed=2)
    h, w = backbone.patch_grid(28, 42)
    all_masked = torch.ones(2, h, w, dtype=torch.bool)
    with torch.no_grad():
        out_a, out_b = backbone(a, all_masked), backbone(b, all_masked)
        free_a, free_b = backbone(a), backbone(b)
    torch.testing.assert_close(out_a.cls, out_b.cls, atol=1e-6, rtol=0)
    torch.testing.assert_close(out_a.patch, out_b.patch, atol=1e-6, rtol=0)
    assert (free_a.cls - free_b.cls).abs().max() > 1e-3
    # (B, h, w) and (B, h*w) masks mean the same; an all-False mask is no mask.
    flat = backbone(a, all_masked.flatten(1))
    torch.testing.assert_close(flat.patch, out_a.patch, atol=0, rtol=0)
    none = backbone(a, torch.zeros(2, h * w, dtype=torch.bool))
    torch.testing.assert_close(none.patch, free_a.patch, atol=0, rtol=0)


def test_mask_token_gets_gradient_only_when_used_and_bad_masks_fail():
    backbone = tiny(DINOV2)
    x = images(28, 28)
    backbone(x).cls.sum().backward()
    assert backbone.mask_token.grad is None or backbone.mask_token.grad.abs().max() == 0
    masks = torch.tensor([[True, False, False, True]] * 2)
    backbone(x, masks).cls.sum().backward()
    assert backbone.mask_token.grad.abs().max() > 0
    with pytest.raises(ValueError, match="masks must have shape"):
        backbone(x, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool or float"):
        backbone(x, torch.ones(2, 4, dtype=torch.long))


# --------------------------------------------------------- intermediate layers
@pytest.mark.parametrize("arch", [DINOV2_REG, DINOV3])
def test_forward_intermediates(arch):
    backbone = tiny(arch)
    x = images(32, 45)
    with torch.no_grad():
        outs = backbone.forward_intermediates(x, 2)
        raw = backbone.forward_intermediates(x, 2, norm=False)
        full = backbone(x)
        ref = backbone.model.forward_intermediates(
            x,
            indices=2,
            norm=True,
            output_fmt="NLC",
            intermediates_only=True,
            return_prefix_tokens=True,
        )
        picked = backbone.forward_intermediates(x, [0, -1], output_fmt="NCHW")
    assert len(outs) == 2 and len(raw) == 2
    torch.testing.assert_close(outs[-1].cls, full.cls, atol=0, rtol=0)
    torch.testing.assert_close(outs[-1].patch, full.patch, atol=0, rtol=0)
    for out, (patch, prefix) in zip(outs, ref, strict=True):
        torch.testing.assert_close(out.patch, patch, atol=1e-6, rtol=0)
        torch.testing.assert_close(out.cls, prefix[:, 0], atol=1e-6, rtol=0)
    normed = backbone.model.norm(torch.cat([raw[0].cls[:, None], raw[0].patch], 1))
    torch.testing.assert_close(normed[:, 0], outs[0].cls, atol=1e-6, rtol=0)
    assert not torch.allclose(raw[0].patch, outs[0].patch)
    # block 0 and the last one; NCHW maps are the NLC tokens reshaped, row-major
    h, w = picked[1].grid
    assert picked[1].patch.shape == (2, 32, h, w) and picked[1].patch.is_contiguous()
    torch.testing.assert_close(picked[1].patch.flatten(2).transpose(1, 2), full.patch,
                               atol=0, rtol=0)
    assert backbone.block_indices([0, -1]) == [0, DEPTH - 1]
    with pytest.raises(ValueError):
        backbone.forward_intermediates(x, DEPTH + 1)
    with pytest.raises(ValueError, match="out of range"):
        backbone.forward_intermediates(x, [DEPTH])
    with pytest.raises(ValueError, match="output_fmt"):
        backbone.forward_intermediates(x, 1, output_fmt="NHWC")


# ---------------------------------------------------------------------- building
def test_build_overrides_and_unknown_arch():
    backbone = build_backbone(
        ModelConfig(
            arch=DINOV3,
            img_size=32,
            embed_dim=48,
            depth=2,
            num_heads=3,
            num_register_tokens=2,
            layerscale_init=0.5,
            patch_size=8,
            drop_path_rate=0.1,
        )
    )
    model = backbone.model
    assert (backbone.embed_dim, backbone.num_blocks, backbone.patch_size) == (48, 2, 8)
    assert model.reg_token.shape == (1, 2, 48) and backbone.num_prefix_tokens == 3
    assert torch.all(model.blocks[0].gamma_1 == 0.5) and model.blocks[1].drop_path1.drop_prob > 0
    vit = build_backbone(
        ModelConfig(
            arch=DINOV2, img_size=28, embed_dim=32, depth=1, num_heads=2, num_register_tokens=3
        )
    )
    assert vit.model.reg_token.shape == (1, 3, 32)
    assert torch.all(vit.mask_token == 0)  # iBOT: zeros init
    with pytest.raises(ValueError, match="vit_small_patch14_dinov2"):
        build_backbone(ModelConfig(arch="vit_small_patch14_dinov"))


# ---------------------------------------------------------------------- xformers
def test_xformers_missing_or_cpu_is_a_clear_error(monkeypatch):
    cfg = ModelConfig(
        arch=DINOV2, img_size=28, embed_dim=32, depth=1, num_heads=2, attention="xformers"
    )
    monkeypatch.setitem(sys.modules, "xformers", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'vpretrain\[xformers\]'"):
        build_backbone(cfg)
    fake = types.ModuleType("xformers")
    fake.ops = types.ModuleType("xformers.ops")
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake.ops)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CPU kernels"):
        build_backbone(cfg)
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(RuntimeError, match="no CPU kernels"):
        backbone_mod._xformers_attention(q, q, q, 0.0)
    with pytest.raises(ValueError, match="attention"):
        build_backbone(ModelConfig(arch=DINOV2, attention="flash"))


@pytest.mark.parametrize("arch", [DINOV2, DINOV3_QKVB])
def test_xformers_forwards_match_sdpa(arch, monkeypatch):
    """The rewritten attention forwards (kernel swapped for SDPA in xformers' layout) are exact."""

    def kernel(q, k, v, dropout_p):
        return F.scaled_dot_product_attention(q, k, v)

    backbone = tiny(arch)
    x = images(32, 48)
    with torch.no_grad():
        ref = backbone(x)
        monkeypatch.setattr(backbone_mod, "_xformers_attention", kernel)
        backbone_mod.use_xformers_attention(backbone.model)
        out = backbone(x)
    torch.testing.assert_close(out.patch, ref.patch, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.cls, ref.cls, atol=1e-6, rtol=0)
    backbone_mod._restore_attention(backbone.model)
    assert "forward" not in backbone.model.blocks[0].attn.__dict__


# ------------------------------------------------------- official DINOv2 layout
@pytest.mark.parametrize("arch", [DINOV2, DINOV2_REG])
def test_load_official_dinov2(arch, tmp_path: Path):
    source = tiny(arch, seed=0)
    path = tmp_path / "dinov2_pretrain.pth"
    torch.save(dinov2_official(source), path)
    target = tiny(arch, seed=5)
    report = load_backbone_weights(target, path)
    assert report.format == "dinov2" and report.mask_token_loaded and report.prefix == ""
    assert_same_output(source, target, images(28, 42))
    torch.testing.assert_close(target.mask_token, source.mask_token, atol=0, rtol=0)
    assert "mask_token" in report.loaded and "model.blocks.2.ls2.gamma" in report.loaded


def test_load_official_dinov2_keeps_the_37x37_pos_embed(tmp_path: Path):
    source = tiny(DINOV2, img_size=518)  # the official grid: 1 + 37*37 positions
    state = dinov2_official(source)
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 32)
    torch.save(state, tmp_path / "w.pth")
    target = tiny(DINOV2, img_size=28, seed=5)
    report = load_backbone_weights(target, tmp_path / "w.pth", fmt="dinov2")
    torch.testing.assert_close(target.model.pos_embed, state["pos_embed"], atol=0, rtol=0)
    assert target.position_grid == report.pos_grid == (37, 37)
    assert target.pos_interp == report.pos_interp == "dinov2"
    assert "resampled" not in report.summary() and "positions 37x37, dinov2" in report.summary()
    torch.testing.assert_close(
        target.model.blocks[0].attn.qkv.weight,
        source.model.blocks[0].attn.qkv.weight,
        atol=0,
        rtol=0,
    )


def test_register_file_report_names_the_cls_fold_not_a_resample(tmp_path: Path):
    torch.save(dinov2_official(tiny(DINOV2_REG, img_size=518)), tmp_path / "w.pth")
    report = load_backbone_weights(tiny(DINOV2_REG, img_size=224), tmp_path / "w.pth")
    assert report.pos_interp == "dinov2_reg" and report.pos_grid == (37, 37)
    assert "cls_token += pos_embed[:, 0]" in report.summary()
    assert "resampled" not in report.summary()


def test_explicit_pos_interp_overrides_the_file_family(tmp_path: Path):
    torch.save(dinov2_official(tiny(DINOV2, img_size=518)), tmp_path / "w.pth")
    target = tiny(DINOV2, img_size=224)
    assert load_backbone_weights(target, tmp_path / "w.pth", pos_interp="timm").pos_interp == "timm"
    assert target.pos_interp == "timm"
    with pytest.raises(ValueError, match="pos_interp"):
        load_backbone_weights(target, tmp_path / "w.pth", pos_interp="bilinear")


def test_load_dinov2_training_checkpoint_with_chunked_blocks(tmp_path: Path):
    teacher, student = tiny(DINOV2_REG, seed=0), tiny(DINOV2_REG, seed=1)
    model_state: dict[str, torch.Tensor] = {}
    for role, source in (("teacher", teacher), ("student", student)):
        for k, v in dinov2_official(source).items():
            k = k.replace("blocks.", "blocks.0.", 1) if k.startswith("blocks.") else k  # FSDP chunk
            model_state[f"{role}.backbone.{k}"] = v
        model_state[f"{role}.dino_head.last_layer.weight"] = torch.zeros(8, 4)
    path = tmp_path / "model_0001249.rank_0.pth"
    torch.save({"model": model_state, "iteration": 1249}, path)
    for key, source in (("teacher", teacher), ("student", student)):
        target = tiny(DINOV2_REG, seed=9)
        report = load_backbone_weights(target, path, key=key)
        assert report.format == "dinov2" and report.prefix == f"{key}.backbone."
        assert any("chunked" in note for note in report.converted)
        assert f"{key}.dino_head.last_layer.weight" in report.ignored
        assert_same_output(source, target, images(28, 28))


# ------------------------------------------------------- official DINOv3 layout
@pytest.mark.parametrize("arch", [DINOV3, DINOV3_QKVB])
def test_load_official_dinov3(arch, tmp_path: Path):
    source = tiny(arch, seed=0)
    path = tmp_path / "dinov3_vits16_pretrain.pth"
    state = dinov3_official(source)  # rounds the source's periods as official files are
    torch.save(state, path)
    target = tiny(arch, seed=5)
    report = load_backbone_weights(target, path)
    assert report.format == "dinov3" and report.mask_token_loaded
    assert "blocks.0.attn.qkv.bias_mask" in report.ignored
    assert any("rope_embed.periods -> rope.periods" in note for note in report.converted)
    torch.testing.assert_close(target.model.rope.periods, state["rope_embed.periods"],
                               atol=0, rtol=0)
    assert not torch.equal(target.model.rope.periods, tiny(arch).model.rope.periods)  # not timm's
    assert "model.rope.periods" in target.state_dict()  # our checkpoints carry them
    assert_same_output(source, target, images(32, 48))
    assert_same_output(source, target, images(35, 50))
    torch.testing.assert_close(target.mask_token, source.mask_token, atol=0, rtol=0)


def test_dinov3_rejects_wrong_rope_and_lost_biases(tmp_path: Path):
    state = dinov3_official(tiny(DINOV3))
    torch.save(
        dict(state, **{"rope_embed.periods": state["rope_embed.periods"] * 2}),
        tmp_path / "rope.pth",
    )
    with pytest.raises(ValueError, match="rope_embed.periods"):
        load_backbone_weights(tiny(DINOV3), tmp_path / "rope.pth")
    state["blocks.1.attn.qkv.bias"] = torch.ones(96)
    torch.save(state, tmp_path / "bias.pth")
    with pytest.raises(ValueError, match="qkvb"):
        load_backbone_weights(tiny(DINOV3), tmp_path / "bias.pth")
    with pytest.raises(ValueError, match="need an Eva"):  # a dinov3 file into a dinov2 arch
        load_backbone_weights(tiny(DINOV2), tmp_path / "rope.pth")


# ------------------------------------------------------------ timm and ours
@pytest.mark.parametrize("arch", [DINOV2_REG, DINOV3])
def test_load_timm_and_ours(arch, tmp_path: Path):
    source = tiny(arch, seed=0)
    torch.save(source.model.state_dict(), tmp_path / "timm.pth")
    target = tiny(arch, seed=5)
    report = load_backbone_weights(target, tmp_path / "timm.pth")
    assert report.format == "timm" and not report.mask_token_loaded
    assert_same_output(source, target, images(32, 45))
    assert not torch.equal(target.mask_token, source.mask_token)  # kept, not from the file

    state = {f"teacher.backbone.{k}": v for k, v in source.state_dict().items()}
    state["teacher.dino_head.w"] = torch.zeros(3)
    torch.save({"model": state, "step": 3}, tmp_path / "ours.pth")
    target = tiny(arch, seed=6)
    report = load_backbone_weights(target, tmp_path / "ours.pth")
    assert report.format == "ours" and report.mask_token_loaded
    assert_same_output(source, target, images(32, 45))
    torch.testing.assert_close(target.mask_token, source.mask_token, atol=0, rtol=0)
    with pytest.raises(ValueError, match="student"):
        load_backbone_weights(target, tmp_path / "ours.pth", key="student")


def test_ours_keeps_the_file_grid_and_its_recorded_interpolation(tmp_path: Path):
    source = tiny(DINOV2, img_size=56)  # a 4x4 table
    source.pos_interp = "dinov2"
    model = {f"teacher.backbone.{k}": v for k, v in source.state_dict().items()}
    torch.save({"model": model, "pos_interp": "dinov2"}, tmp_path / "ours.pth")  # as Trainer
    target = tiny(DINOV2, img_size=28, seed=3)  # built for 2x2
    report = load_backbone_weights(target, tmp_path / "ours.pth", fmt="ours")
    assert target.model.pos_embed.shape == (1, 17, 32) and target.position_grid == (4, 4)
    assert report.pos_interp == target.pos_interp == "dinov2"
    assert "resampled" not in report.summary()
    assert_same_output(source, target, images(28, 42))  # a grid neither was built for
    # Older checkpoints (no recorded value, table resampled by timm at load): timm.
    torch.save({"model": model}, tmp_path / "old.pth")
    assert load_backbone_weights(tiny(DINOV2), tmp_path / "old.pth").pos_interp == "timm"


# ---------------------------------------------------------------------- errors
def test_strict_loading_lists_missing_unexpected_and_shapes(tmp_path: Path):
    state = dinov2_official(tiny(DINOV2))
    del state["blocks.1.norm1.weight"]
    state["blocks.0.attn.extra"] = torch.zeros(2)
    state["norm.bias"] = torch.zeros(7)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        load_backbone_weights(tiny(DINOV2), path)
    message = str(info.value)
    assert str(path) in message
    assert "missing keys: ['model.blocks.1.norm1.weight']" in message
    assert "unexpected keys: ['model.blocks.0.attn.extra']" in message
    assert "model.norm.bias: file (7,) vs model (32,)" in message


def test_missing_file_and_bad_arguments(tmp_path: Path):
    backbone = tiny(DINOV2)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_backbone_weights(backbone, tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="format"):
        load_backbone_weights(backbone, tmp_path / "nope.pth", fmt="dinov1")
    with pytest.raises(ValueError, match="key"):
        load_backbone_weights(backbone, tmp_path / "nope.pth", key="ema")
