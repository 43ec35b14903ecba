"""Schedules and optimizer parameter groups."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from dinov.config import OptimConfig
from dinov.train.optim import apply_schedule, backbone_layer_id, build_optimizer
from dinov.train.schedules import cosine_schedule, linear_warmup_then_constant


def test_cosine_schedule_values():
    s = cosine_schedule(1.0, 0.0, total_steps=7, warmup_steps=2, warmup_start=0.0)
    assert len(s) == 7
    np.testing.assert_allclose(s[:2], [0.0, 0.5])
    # cosine over the remaining 5 steps: t = 0, .25, .5, .75, 1
    expected = [0.5 * (1 + math.cos(math.pi * t)) for t in (0, 0.25, 0.5, 0.75, 1)]
    np.testing.assert_allclose(s[2:], expected)


def test_teacher_temp_warmup():
    s = linear_warmup_then_constant(0.04, 0.07, total_steps=5, warmup_steps=3)
    np.testing.assert_allclose(s, [0.04, 0.05, 0.06, 0.07, 0.07])


def test_layer_ids():
    assert backbone_layer_id("model.cls_token", 12) == 0
    assert backbone_layer_id("model.patch_embed.proj.weight", 12) == 0
    assert backbone_layer_id("model.blocks.0.attn.qkv.weight", 12) == 1
    assert backbone_layer_id("model.blocks.11.mlp.fc2.bias", 12) == 12
    assert backbone_layer_id("model.norm.weight", 12) == 13


class _TinyBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Linear(2, 2)
        self.blocks = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
        self.norm = nn.LayerNorm(2)


def test_layerwise_decay_and_no_weight_decay_groups():
    student = nn.ModuleDict({"backbone": _TinyBackbone(), "dino_head": nn.Linear(2, 2)})
    student["dino_head"].last_layer = nn.Linear(2, 3, bias=False)
    cfg = OptimConfig(layerwise_decay=0.5, patch_embed_lr_mult=0.2)
    opt = build_optimizer(student, num_blocks=2, cfg=cfg)
    apply_schedule(opt, lr=1.0, weight_decay=0.1, last_layer_lr=0.0)
    lr_of = {}
    for group in opt.param_groups:
        for p in group["params"]:
            lr_of[id(p)] = (group["lr"], group["weight_decay"])
    bb = student["backbone"]
    assert lr_of[id(bb.patch_embed.weight)] == (0.5**3 * 0.2, 0.1)
    assert lr_of[id(bb.blocks[0].weight)] == (0.5**2, 0.1)
    assert lr_of[id(bb.blocks[1].bias)] == (0.5, 0.0)  # biases: no weight decay
    assert lr_of[id(bb.norm.weight)] == (1.0, 0.0)
    assert lr_of[id(student["dino_head"].weight)] == (1.0, 0.1)
    assert lr_of[id(student["dino_head"].last_layer.weight)] == (0.0, 0.1)  # frozen last layer
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(student.parameters()))
    assert isinstance(opt, torch.optim.AdamW)
