"""DINO/iBOT projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov.config import HeadConfig


class DINOHead(nn.Module):
    """The DINOv2 head. The last layer is weight-normalised with its gain fixed at 1.

    We normalise the prototype rows explicitly instead of using ``weight_norm`` with a
    frozen ``weight_g``: the two are the same function, and a plain parameter keeps
    state dicts, EMA updates and FSDP sharding simple.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, nlayers: int = 3) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"head.nlayers must be >= 1, got {nlayers}")
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(d_in, d_out))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        return F.linear(_unit_rows(x, eps), _unit_rows(self.last_layer.weight, eps))


def _unit_rows(x: Tensor, eps: float) -> Tensor:
    """``F.normalize(x, dim=-1)`` as a multiplication by reciprocal norms: with 65536
    prototypes this matrix is large, and a multiply (and its backward) costs less than a divide."""
    return x * torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps).reciprocal()


def build_head(cfg: HeadConfig, in_dim: int, out_dim: int | None = None) -> DINOHead:
    return DINOHead(in_dim, out_dim or cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.nlayers)
