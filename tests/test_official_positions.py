"""Official DINOv2 / DINOv3 files give the official model's features at every resolution.

The reference here is written from the published code's behaviour
(facebookresearch/dinov2 ``DinoVisionTransformer`` and its hub builders), straight on the
official state dict and independent of timm and of our loader: patch embedding, cls token,
position table resized per input by ``interpolate_pos_encoding`` (bicubic by
``scale_factor=(new + 0.1) / 37``, no antialias, for the models without registers; the
register models are built with ``interpolate_offset=0, interpolate_antialias=True``:
bicubic to ``size=`` with antialias), registers inserted after the cls token, pre-norm
blocks with layer scale, final norm.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from dinov.config import ModelConfig, load_config
from dinov.models import build_backbone, load_backbone_weights

DIM, HEADS, DEPTH, PATCH, NATIVE = 32, 2, 2, 14, 37  # official files: 518 px = 37x37 patches
SIZES = ((224, 224), (448, 448), (518, 518), (224, 336))  # and one non-square input


def official_state(registers: int, seed: int = 0) -> dict[str, Tensor]:
    """A random DINOv2 state dict in the official key layout (every tensor matters)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.3) -> Tensor:
        return torch.randn(*shape, generator=gen) * scale

    state = {
        "cls_token": rand(1, 1, DIM),
        "pos_embed": rand(1, 1 + NATIVE * NATIVE, DIM),
        "mask_token": rand(1, DIM),
        "patch_embed.proj.weight": rand(DIM, 3, PATCH, PATCH, scale=0.05),
        "patch_embed.proj.bias": rand(DIM),
        "norm.weight": 1 + rand(DIM),
        "norm.bias": rand(DIM),
    }
    if registers:
        state["register_tokens"] = rand(1, registers, DIM)
    for i in range(DEPTH):
        block = {
            "norm1.weight": 1 + rand(DIM), "norm1.bias": rand(DIM),
            "attn.qkv.weight": rand(3 * DIM, DIM), "attn.qkv.bias": rand(3 * DIM),
            "attn.proj.weight": rand(DIM, DIM), "attn.proj.bias": rand(DIM),
            "ls1.gamma": rand(DIM),
            "norm2.weight": 1 + rand(DIM), "norm2.bias": rand(DIM),
            "mlp.fc1.weight": rand(4 * DIM, DIM), "mlp.fc1.bias": rand(4 * DIM),
            "mlp.fc2.weight": rand(DIM, 4 * DIM), "mlp.fc2.bias": rand(DIM),
            "ls2.gamma": rand(DIM),
        }
        state.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return state


def official_positions(pos_embed: Tensor, rows: int, cols: int, registers: int) -> Tensor:
    """``interpolate_pos_encoding`` as the official hub models are built."""
    n = pos_embed.shape[1] - 1
    side = int(math.sqrt(n))
    if rows * cols == n and rows == cols:
        return pos_embed
    antialias, offset = (True, 0.0) if registers else (False, 0.1)
    table = pos_embed[:, 1:].reshape(1, side, side, DIM).permute(0, 3, 1, 2)
    if offset:
        kwargs = {"scale_factor": ((rows + offset) / side, (cols + offset) / side)}
    else:
        kwargs = {"size": (rows, cols)}
    table = F.interpolate(table, mode="bicubic", antialias=antialias, **kwargs)
    assert table.shape[-2:] == (rows, cols)
    table = table.permute(0, 2, 3, 1).reshape(1, -1, DIM)
    return torch.cat([pos_embed[:, :1], table], dim=1)


def official_forward(state: dict[str, Tensor], images: Tensor) -> tuple[Tensor, Tensor]:
    """The official model's ``x_norm_clstoken`` and ``x_norm_patchtokens``."""
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"],
                 stride=PATCH)
    batch, _, rows, cols = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(batch, -1, -1), x], dim=1)
    x = x + official_positions(state["pos_embed"], rows, cols, registers)
    if registers:
        x = torch.cat([x[:, :1], state["register_tokens"].expand(batch, -1, -1), x[:, 1:]], dim=1)
    for i in range(DEPTH):
        p = {k.split(f"blocks.{i}.", 1)[1]: v for k, v in state.items()
             if k.startswith(f"blocks.{i}.")}
        h = F.layer_norm(x, (DIM,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        qkv = F.linear(h, p["attn.qkv.weight"], p["attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, -1, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        attn = ((q * (DIM // HEADS) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(batch, -1, DIM)
        x = x + p["ls1.gamma"] * F.linear(h, p["attn.proj.weight"], p["attn.proj.bias"])
        h = F.layer_norm(x, (DIM,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])),
                     p["mlp.fc2.weight"], p["mlp.fc2.bias"])
        x = x + p["ls2.gamma"] * h
    x = F.layer_norm(x, (DIM,), state["norm.weight"], state["norm.bias"], eps=1e-6)
    return x[:, 0], x[:, 1 + registers:]


def arch_for(registers: int) -> str:
    return "vit_base_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"


def our_backbone(registers: int, img_size: int, path: Path):
    cfg = ModelConfig(arch=arch_for(registers), img_size=img_size, embed_dim=DIM, depth=DEPTH,
                      num_heads=HEADS)
    backbone = build_backbone(cfg).eval()
    report = load_backbone_weights(backbone, path, fmt="dinov2")
    return backbone, report


def images(size: tuple[int, int], seed: int = 1) -> Tensor:
    return torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(seed))


def max_differences(backbone, state: dict[str, Tensor], size: tuple[int, int]) -> tuple[float, float]:
    x = images(size)
    with torch.no_grad():
        ours = backbone(x)
        cls, patch = official_forward(state, x)
    return (ours.cls - cls).abs().max().item(), (ours.patch - patch).abs().max().item()


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("img_size", [224, 518])
def test_official_dinov2_file_matches_the_official_model(tmp_path: Path, registers, img_size):
    state = official_state(registers)
    path = tmp_path / "dinov2_pretrain.pth"
    torch.save(state, path)
    backbone, report = our_backbone(registers, img_size, path)
    # The native table is kept whatever img_size the model was built for.
    assert backbone.position_grid == (NATIVE, NATIVE)
    assert backbone.pos_interp == ("dinov2_reg" if registers else "dinov2")
    assert report.pos_grid == (NATIVE, NATIVE) and "resampled" not in report.summary()
    for size in SIZES:
        cls_diff, patch_diff = max_differences(backbone, state, size)
        assert cls_diff < 1e-5 and patch_diff < 1e-5, (size, cls_diff, patch_diff)


def test_timm_interpolation_would_not_match_the_official_model(tmp_path: Path):
    """The check above can fail: timm's resize (antialiased, size=) is not the official one."""
    state = official_state(registers=0)
    torch.save(state, tmp_path / "w.pth")
    backbone, _ = our_backbone(0, 224, tmp_path / "w.pth")
    backbone.pos_interp = "timm"
    cls_diff, patch_diff = max_differences(backbone, state, (224, 224))
    assert patch_diff > 1e-3 and cls_diff > 1e-4, (cls_diff, patch_diff)
    cls_diff, patch_diff = max_differences(backbone, state, (518, 518))  # native: no resize
    assert patch_diff < 1e-5


def test_eval_backbone_caches_the_resized_table(tmp_path: Path):
    from eval.common import build_eval_backbone

    state = official_state(registers=0)
    torch.save(state, tmp_path / "w.pth")
    backbone = build_eval_backbone(ModelConfig(
        arch=arch_for(0), img_size=224, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
        weights=str(tmp_path / "w.pth"), weights_format="dinov2"))
    first = backbone.position_embedding((16, 16))
    assert backbone.position_embedding((16, 16)) is first  # no resize on the second forward
    with torch.no_grad():
        backbone.model.pos_embed.add_(1.0)  # new weights: the cache must not serve stale rows
    again = backbone.position_embedding((16, 16))
    torch.testing.assert_close(again, first + 1.0, atol=1e-5, rtol=0)
    assert backbone.position_embedding((NATIVE, NATIVE)) is backbone.model.pos_embed


def test_continued_pretraining_checkpoint_keeps_the_native_table(tmp_path: Path):
    """A run at 224 px from an official file writes checkpoints that still give the
    official model's features at 518 px (lr 0: the weights are the file's)."""
    from dinov.checkpoint import latest_checkpoint, load_checkpoint
    from dinov.train.trainer import Trainer
    from eval.common import build_eval_backbone

    state = official_state(registers=0)
    weights = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, weights)
    cfg = load_config("configs/smoke.yaml", [
        f"output_dir={tmp_path / 'run'}", "probe.enabled=false", "train.plots=false",
        "train.progress=none", f"model.arch={arch_for(0)}", "model.img_size=224",
        "model.patch_size=14", f"model.embed_dim={DIM}", f"model.depth={DEPTH}",
        f"model.num_heads={HEADS}", "model.layerscale_init=null", f"model.weights={weights}",
        "model.weights_format=dinov2", "data.image_size=224", "data.batch_size=2",
        "data.num_samples=4", "crops.global_crops_size=224", "crops.local_crops_size=98",
        "crops.local_crops_number=1", "train.steps=2", "train.checkpoint_every=2",
        "optim.lr=0", "optim.min_lr=0", "optim.warmup_steps=0"])
    Trainer(cfg).fit()
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    saved = load_checkpoint(checkpoint)
    assert saved["pos_interp"] == "dinov2"
    for role in ("student", "teacher"):
        assert saved["model"][f"{role}.backbone.model.pos_embed"].shape == (1, 1 + NATIVE**2, DIM)
    backbone = build_eval_backbone(ModelConfig(weights=str(checkpoint)))
    assert backbone.position_grid == (NATIVE, NATIVE) and backbone.pos_interp == "dinov2"
    for size in ((518, 518), (224, 224)):
        cls_diff, patch_diff = max_differences(backbone, state, size)
        assert cls_diff < 1e-5 and patch_diff < 1e-5, (size, cls_diff, patch_diff)


# --------------------------------------------------------------------- DINOv3 (RoPE)
def official_rope(periods: Tensor, rows: int, cols: int) -> tuple[Tensor, Tensor]:
    """facebookresearch/dinov3 ``RopePositionEmbedding`` at eval (``normalize_coords=
    "separate"``, no shift / jitter / rescale): (sin, cos), each (rows*cols, head_dim)."""
    coords_h = torch.arange(0.5, rows) / rows
    coords_w = torch.arange(0.5, cols) / cols
    coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
    coords = 2.0 * coords - 1.0
    angles = (2 * math.pi * coords[:, :, None] / periods[None, None, :]).flatten(1, 2).tile(2)
    return torch.sin(angles), torch.cos(angles)


def test_official_dinov3_file_gives_the_official_rope_at_every_grid(tmp_path: Path):
    """DINOv3 has no position table: the rotary angles follow the grid. What a file can
    change is its periods (official files hold bf16-rounded ones, which the official model
    uses), its patch size (16) and its storage tokens (4): all three are checked here."""
    from official_layouts import dinov3_official, randomise_

    source = randomise_(build_backbone(ModelConfig(
        arch="vit_small_patch16_dinov3", img_size=224, embed_dim=DIM, depth=DEPTH,
        num_heads=HEADS)))
    timm_periods = source.model.rope.periods.clone()
    state = dinov3_official(source)
    periods = state["rope_embed.periods"]
    assert not torch.equal(periods, timm_periods)  # rounded: they differ
    torch.save(state, tmp_path / "dinov3.pth")
    target = build_backbone(ModelConfig(arch="vit_small_patch16_dinov3", img_size=224,
                                        embed_dim=DIM, depth=DEPTH, num_heads=HEADS)).eval()
    report = load_backbone_weights(target, tmp_path / "dinov3.pth", fmt="dinov3")
    assert report.pos_grid is None and target.patch_size == 16
    assert target.num_prefix_tokens == 1 + state["storage_tokens"].shape[1] == 5
    for rows, cols in ((14, 14), (28, 28), (32, 32), (14, 20)):
        rope = target.prepare_tokens(torch.zeros(1, 3, 16 * rows, 16 * cols)).rope
        sin, cos = rope.chunk(2, dim=-1)  # timm: [sin, cos] concatenated
        ref_sin, ref_cos = official_rope(periods, rows, cols)
        torch.testing.assert_close(sin, ref_sin, atol=1e-6, rtol=0)
        torch.testing.assert_close(cos, ref_cos, atol=1e-6, rtol=0)
    # With timm's recomputed periods the angles would be off (the bug this guards).
    timm_sin = official_rope(timm_periods, 14, 14)[0]
    assert (timm_sin - official_rope(periods, 14, 14)[0]).abs().max() > 1e-4
