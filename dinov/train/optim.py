"""AdamW parameter groups with layer-wise lr decay and no decay on norms, biases and tokens."""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import nn

from dinov.config import OptimConfig

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_TOKEN_NAMES = ("cls_token", "pos_embed", "reg_token", "mask_token", "register_tokens",
                "storage_tokens")
_EMBEDDING_NAMES = (*_TOKEN_NAMES, "patch_embed")


def backbone_layer_id(name: str, num_blocks: int) -> int:
    """0 for embeddings and tokens, i+1 for block i, num_blocks+1 for the final norm."""
    match = _BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    if any(token in name for token in _EMBEDDING_NAMES):
        return 0
    return num_blocks + 1


def _no_weight_decay(name: str, param: nn.Parameter) -> bool:
    # as DINOv2: norms, biases, LayerScale gammas and learned tokens are not decayed
    return param.ndim <= 1 or name.endswith(".bias") or any(t in name for t in _TOKEN_NAMES)


def param_groups(student: nn.ModuleDict, num_blocks: int, cfg: OptimConfig) -> list[dict]:
    """Groups keyed by (lr multiplier, weight-decay multiplier, is last layer).

    The schedules set ``lr = base * lr_multiplier`` and ``weight_decay = base * wd_multiplier``
    in every group at every step.
    """
    groups: dict[tuple[float, float, bool], list[nn.Parameter]] = defaultdict(list)
    for module_name, module in student.items():
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            lr_mult = 1.0
            if module_name == "backbone":
                layer = backbone_layer_id(name, num_blocks)
                lr_mult = cfg.layerwise_decay ** (num_blocks + 1 - layer)
                if "patch_embed" in name:
                    lr_mult *= cfg.patch_embed_lr_mult
            wd_mult = 0.0 if _no_weight_decay(name, param) else 1.0
            is_last_layer = "last_layer" in name
            groups[(lr_mult, wd_mult, is_last_layer)].append(param)
    return [
        {"params": params, "lr_multiplier": lr_mult, "wd_multiplier": wd_mult,
         "is_last_layer": last, "lr": 0.0, "weight_decay": 0.0}
        for (lr_mult, wd_mult, last), params in sorted(groups.items(), key=lambda kv: kv[0])
    ]


def _fused_supported(student: nn.ModuleDict) -> bool:
    """The fused AdamW kernel (one pass over each tensor) takes plain CPU/CUDA float tensors;
    FSDP's sharded DTensor parameters keep the multi-tensor (foreach) implementation."""
    from torch.distributed.tensor import DTensor

    return all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16)
               and not isinstance(p, DTensor) for p in student.parameters())


def build_optimizer(student: nn.ModuleDict, num_blocks: int, cfg: OptimConfig) -> torch.optim.AdamW:
    # fused AdamW is about 5x faster than foreach on a ViT-L's 300M parameters (CPU, measured)
    fused = _fused_supported(student)
    return torch.optim.AdamW(param_groups(student, num_blocks, cfg), betas=(cfg.beta1, cfg.beta2),
                             fused=fused, foreach=None if fused else True)


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float,
                   last_layer_lr: float) -> None:
    for group in optimizer.param_groups:
        base_lr = last_layer_lr if group["is_last_layer"] else lr
        group["lr"] = base_lr * group["lr_multiplier"]
        group["weight_decay"] = weight_decay * group["wd_multiplier"]
