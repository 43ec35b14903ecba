"""Mask designers: the published soft-mask U-Net and an iBOT token-mask designer, as
networks (:class:`SoftMaskDesigner`, :class:`TokenMaskDesigner`) and as the registered
task designers that apply them to a DINO task (``designer.kind=mask`` / ``token_mask``).

:class:`SoftMaskDesigner` (DESIGN section 3, "the mask designer") predicts a soft mask
μ ∈ [0, 1]^{H×W} per view with a small U-Net and returns the designed view
``μ⊙v + (1−μ)⊙blur(v)``; its regulariser is
``λ_sparsity·(mean μ − κ)² + λ_tv·TV(μ)``.

:class:`TokenMaskDesigner` predicts per-patch logits and draws the iBOT mask with a
relaxed Bernoulli (Gumbel-sigmoid) and a straight-through top-k: the forward pass is a
hard mask with exactly ``round(mask_ratio·N)`` masked patches per view, the backward
pass is the gradient of the relaxed probabilities.

Both networks use GroupNorm rather than BatchNorm: they have no running buffers, so a
value evaluation (DESIGN section 3) can never change designer state, and per-instance
outputs do not depend on the rest of the meta batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d
from torch import Tensor, nn

from designers.registry import Design, register_designer
from designers.vision import VISION
from designers.vision.config import MaskDesignerConfig, TokenMaskDesignerConfig
from dinov.data.masking import PatchMasks
from dinov.train.task import Task


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 convs with GroupNorm + GELU (GroupNorm: no buffers, batch-independent)."""
    groups = min(8, c_out)
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.GroupNorm(groups, c_out),
        nn.GELU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.GroupNorm(groups, c_out),
        nn.GELU(),
    )


def blur_kernel_for_sigma(sigma: float) -> int:
    """Odd kernel covering ±3σ, so the truncated Gaussian loses < 0.3% of its mass."""
    return 2 * math.ceil(3 * sigma) + 1


def total_variation(mu: Tensor) -> Tensor:
    """Anisotropic TV per mask: mean |Δx| + mean |Δy| over pixels, averaged over the batch."""
    dx = (mu[..., :, 1:] - mu[..., :, :-1]).abs().mean()
    dy = (mu[..., 1:, :] - mu[..., :-1, :]).abs().mean()
    return dx + dy


class SoftMaskDesigner(nn.Module):
    """Small U-Net (2 down / 2 up levels) predicting a soft mask per view.

    ``forward(views)`` with views (B, 3, H, W) (any H, W; normalised or not, the blend
    is linear so it commutes with per-channel normalisation) returns
    ``(designed_views, mu)`` with mu (B, 1, H, W) in [0, 1].

    Initialisation: the output conv has small weights and its bias is ``logit(init_mu)``,
    so μ starts close to ``init_mu`` everywhere. The default 0.95 makes the designed
    views start almost equal to the default views (the learner is not disrupted at the
    end of burn-in); the sparsity term then pulls mean μ toward κ. Pass
    ``init_mu=kappa`` to start at the regulariser's target instead. The weights are
    small but not zero so every layer gets a gradient from the first step.
    """

    def __init__(
        self,
        channels: tuple[int, int] = (16, 32),
        blur_sigma: float = 3.0,
        init_mu: float = 0.95,
    ) -> None:
        super().__init__()
        if not 0.0 < init_mu < 1.0:
            raise ValueError(f"init_mu must lie in (0, 1), got {init_mu}")
        c1, c2 = channels
        self.blur_sigma = float(blur_sigma)
        self.enc1 = _conv_block(3, c1)  # H
        self.enc2 = _conv_block(c1, c2)  # H/2
        self.bottleneck = _conv_block(c2, c2)  # H/4
        self.dec2 = _conv_block(c2 + c2, c1)  # H/2, skip from enc2
        self.dec1 = _conv_block(c1 + c1, c1)  # H, skip from enc1
        self.head = nn.Conv2d(c1, 1, 1)
        nn.init.normal_(self.head.weight, std=1e-2)
        nn.init.constant_(self.head.bias, math.log(init_mu / (1.0 - init_mu)))
        # NHWC: the oneDNN (CPU) and cuDNN convolutions run these few-channel convs faster
        # in it (docs/results.md); .to(device) and
        # load_state_dict keep the weights' layout
        self.to(memory_format=torch.channels_last)

    def blur(self, views: Tensor) -> Tensor:
        k = blur_kernel_for_sigma(self.blur_sigma)
        return gaussian_blur2d(views, (k, k), (self.blur_sigma, self.blur_sigma))

    def mask(self, views: Tensor) -> Tensor:
        """μ (B, 1, H, W) in [0, 1]."""
        e1 = self.enc1(views.contiguous(memory_format=torch.channels_last))
        e2 = self.enc2(F.avg_pool2d(e1, 2))
        b = self.bottleneck(F.avg_pool2d(e2, 2))
        # upsample to the skip's exact size so odd H, W work (floor pooling loses a row)
        d2 = self.dec2(torch.cat([F.interpolate(b, size=e2.shape[-2:], mode="bilinear"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:], mode="bilinear"), e1], 1))
        return torch.sigmoid(self.head(d1))

    def forward(self, views: Tensor) -> tuple[Tensor, Tensor]:
        if views.ndim != 4 or views.shape[1] != 3:
            raise ValueError(f"expected views (B, 3, H, W), got {tuple(views.shape)}")
        mu = self.mask(views)
        blurred = self.blur(views)
        return mu * views + (1.0 - mu) * blurred, mu

    @staticmethod
    def penalty(
        mu: Tensor, kappa: float = 0.5, lambda_sparsity: float = 0.2, lambda_tv: float = 0.08
    ) -> Tensor:
        """λ_s·(mean μ − κ)² + λ_tv·TV(μ); mean μ over the whole meta batch (DESIGN defaults)."""
        return lambda_sparsity * (mu.mean() - kappa) ** 2 + lambda_tv * total_variation(mu)


def gumbel_sigmoid_noise(shape: torch.Size, like: Tensor, gen: torch.Generator | None) -> Tensor:
    """Logistic noise log u − log(1 − u): the difference of two Gumbels."""
    u = torch.rand(shape, generator=gen, device=like.device, dtype=like.dtype)
    u = u.clamp(1e-6, 1.0 - 1e-6)
    return u.log() - (-u).log1p()


class TokenMaskDesigner(nn.Module):
    """Per-patch mask logits → straight-through top-k iBOT masks.

    Network: a patch-embedding conv (kernel = stride = patch size, the view at patch
    resolution), a 3x3 conv for neighbourhood context, a 1x1 conv to one logit per
    patch. ``forward(views, mask_ratio)`` returns ``(PatchMasks, soft)``:

    - ``PatchMasks`` (bool, from :meth:`PatchMasks.from_masks`) with exactly
      ``round(mask_ratio·N)`` masked patches per view (``mask_ratio`` a float or a
      per-view (B,) tensor; 0 leaves a view unmasked, as DINOv2 does for half the crops);
    - ``soft`` (B, N) float: equal to the hard 0/1 mask in the forward pass, with the
      gradient of the relaxed probabilities ``sigmoid((logits + L)/τ)`` (L logistic
      noise) in the backward pass. Multiply the iBOT mask token blend or the per-patch
      loss weights by it to let the designer gradient through.

    The top-k is taken on the perturbed logits ``logits + L`` (the Gumbel-top-k trick),
    so hard masks are samples, not a deterministic argmax; ``sample=False`` drops the
    noise.
    """

    def __init__(
        self,
        patch_size: int,
        channels: int = 32,
        temperature: float = 0.5,
        mask_ratio: float = 0.3,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.temperature = temperature
        self.mask_ratio = mask_ratio
        self.embed = nn.Conv2d(3, channels, patch_size, stride=patch_size)
        self.context = nn.Sequential(
            nn.GroupNorm(min(8, channels), channels),
            nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GELU(),
        )
        self.head = nn.Conv2d(channels, 1, 1)

    def logits(self, views: Tensor) -> Tensor:
        """(B, N) per-patch logits, N = (H // p) * (W // p) row-major like the ViT tokens."""
        x = self.embed(views)
        x = x + self.context(x)  # residual: the patch's own content always reaches the head
        return self.head(x).flatten(1)

    def forward(
        self,
        views: Tensor,
        mask_ratio: float | Tensor | None = None,
        sample: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[PatchMasks, Tensor]:
        logits = self.logits(views)
        b, n = logits.shape
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        ratio_t = torch.as_tensor(ratio, dtype=torch.float32, device=logits.device).expand(b)
        k = (ratio_t * n).round().long().clamp(0, n)
        noisy = logits
        if sample:
            noisy = logits + gumbel_sigmoid_noise(logits.shape, logits, generator)
        soft = torch.sigmoid(noisy / self.temperature)
        # rank by perturbed logit; a per-view k needs ranks rather than topk(k)
        ranks = noisy.detach().argsort(dim=1, descending=True).argsort(dim=1)
        hard = ranks < k[:, None]
        # parenthesised: (soft - soft.detach()) is exactly 0, so the forward value is exactly hard
        straight_through = hard.to(soft.dtype) + (soft - soft.detach())
        return PatchMasks.from_masks(hard), straight_through


# ----------------------------------------------------------------- task designers
@register_designer("mask", VISION, MaskDesignerConfig)
class SoftMaskTaskDesigner(SoftMaskDesigner):
    """The soft-mask U-Net on the student's global views (and the teacher's with
    ``apply_to_teacher``); R = the penalty of each mask it drew."""

    def __init__(self, cfg: MaskDesignerConfig, **learner: Any) -> None:
        super().__init__()
        self.cfg = cfg

    def design(self, inputs: Tensor, task: Task) -> Design:
        views, mu = self(task.student_global)
        teacher, masks = task.teacher_global, [mu]
        if self.cfg.apply_to_teacher:
            teacher, teacher_mu = self(task.teacher_global)
            masks.append(teacher_mu)
        return Design(dataclasses.replace(task, student_global=views, teacher_global=teacher),
                      masks)

    def regulariser(self, design: Design) -> Tensor:
        cfg = self.cfg
        terms = [self.penalty(mu, cfg.kappa, cfg.lambda_sparsity, cfg.lambda_tv)
                 for mu in design.outputs]
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return total


@register_designer("token_mask", VISION, TokenMaskDesignerConfig)
class TokenMaskTaskDesigner(TokenMaskDesigner):
    """Which patches iBOT masks (at the default task's per-crop counts); no regulariser:
    the straight-through top-k keeps the mask ratio by construction."""

    def __init__(self, cfg: TokenMaskDesignerConfig, *, patch_size: int, **learner: Any) -> None:
        super().__init__(patch_size, temperature=cfg.temperature)

    def design(self, inputs: Tensor, task: Task) -> Design:
        counts = task.masks.masks.sum(1).float()
        masks, soft = self(task.student_global, counts / task.masks.masks.shape[1])
        return Design(dataclasses.replace(task, masks=masks, soft_masks=soft), soft)

    def regulariser(self, design: Design) -> Tensor:
        return design.outputs.new_zeros(())
