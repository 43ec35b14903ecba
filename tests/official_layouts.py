"""Test support: randomised tiny backbones, and state dicts in the official
facebookresearch/dinov2 and dinov3 key layouts.

Tests use these to check that official checkpoint files load through the backbone loader
and every eval CLI: each function inverts timm's converter for its family, so a backbone
loaded from the written file must reproduce the source backbone's outputs exactly.
"""

from __future__ import annotations

import torch

from dinov.models import Backbone


def randomise_(backbone: Backbone, seed: int = 0, scale: float = 0.3) -> Backbone:
    """Overwrite every parameter with seeded noise, so that a loader that skipped any tensor
    would change the outputs. Returns the backbone in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in backbone.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return backbone.eval()


def dinov2_official(backbone: Backbone) -> dict[str, torch.Tensor]:
    """Inverse of timm's _convert_dinov2: timm state -> facebookresearch/dinov2 keys.

    The source ``backbone`` is switched to the official family's position resize
    (``dinov2`` / ``dinov2_reg``), so that it stands for the official model the file
    comes from: a backbone loaded from the file then reproduces it at every input size.
    """
    backbone.pos_interp = "dinov2_reg" if "reg_token" in backbone.model.state_dict() else "dinov2"
    state = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    state["mask_token"] = backbone.mask_token.detach().clone()  # official shape (1, D)
    if "reg_token" in state:
        # timm folds the cls position into cls_token (no_embed_class); official keeps it in pos_embed.
        cls_pos = torch.randn(1, 1, backbone.embed_dim, generator=torch.Generator().manual_seed(7))
        state["register_tokens"] = state.pop("reg_token")
        state["cls_token"] = state["cls_token"] - cls_pos
        state["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], 1)
    return state


def dinov3_official(backbone: Backbone) -> dict[str, torch.Tensor]:
    """Inverse of timm's eva checkpoint_filter_fn for dinov3: timm state -> official keys.

    Official files keep the rope periods as a bf16-rounded buffer, which the official
    model uses: the file gets rounded periods, and so does the source ``backbone``.
    """
    gen = torch.Generator().manual_seed(11)
    out: dict[str, torch.Tensor] = {"mask_token": backbone.mask_token.detach().clone()}
    periods = backbone.model.rope.periods
    out["rope_embed.periods"] = periods.to(torch.bfloat16).float()
    with torch.no_grad():
        periods.copy_(out["rope_embed.periods"])
    for k, v in backbone.model.state_dict().items():
        if k == "rope.periods":
            continue  # written as rope_embed.periods above
        k = k.replace("reg_token", "storage_tokens")
        k = k.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        if k.endswith("attn.q_bias") or k.endswith("attn.v_bias"):
            continue  # folded into attn.qkv.bias below
        out[k] = v.clone()
    for i, block in enumerate(backbone.model.blocks):
        attn, dim = block.attn, backbone.embed_dim
        if attn.q_bias is not None:
            # The k part is arbitrary in the file: bias_mask zeroes it upstream, timm drops it.
            k_bias = torch.randn(dim, generator=gen)
            bias = torch.cat([attn.q_bias.detach(), k_bias, attn.v_bias.detach()])
        else:
            bias = torch.zeros(3 * dim)  # distilled S/B/L: qkv bias present but all zero
        out[f"blocks.{i}.attn.qkv.bias"] = bias
        out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat(
            [torch.ones(dim), torch.zeros(dim), torch.ones(dim)]
        )
    return out
