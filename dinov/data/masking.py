"""iBOT block masking for the student's global crops, vectorised over the batch.

As in DINOv2, a fraction ``mask_sample_probability`` of the global crops is masked,
with target ratios spread evenly over ``mask_ratio_min_max``; the masks are unions of
random rectangles (BEiT-style blockwise masking). Instead of DINOv2's per-image retry
loop we draw a fixed number of candidate rectangles per image at once and keep the
longest prefix whose union does not exceed the target count, then top the mask up with
single random patches so every masked crop has exactly its target number of patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dinov.config import MaskConfig

_CANDIDATE_BLOCKS = 16


@dataclass
class PatchMasks:
    """Masks for n crops on an (h, w) patch grid plus what the iBOT loss needs."""

    masks: Tensor  # (n, h*w) bool
    indices: Tensor  # (M,) flat indices into (n*h*w) of the masked patches
    weights: Tensor  # (M,) 1 / (masked patches of its crop * all crops), as DINOv2 weights iBOT

    @classmethod
    def from_masks(cls, masks: Tensor) -> PatchMasks:
        flat = masks.flatten()
        indices = flat.nonzero().squeeze(1)
        per_crop = masks.sum(1)
        crop_of_patch = indices // masks.shape[1]
        weights = 1.0 / (per_crop[crop_of_patch].float() * masks.shape[0])
        return cls(masks, indices, weights)


def _target_counts(
    n: int, num_patches: int, cfg: MaskConfig, gen: torch.Generator | None
) -> Tensor:
    n_masked = int(n * cfg.mask_sample_probability)
    low, high = cfg.mask_ratio_min_max
    ratios = torch.zeros(n)
    if n_masked > 0:
        # evenly spread ratios (as DINOv2), assigned to random crops
        spread = (
            torch.linspace(low, high, n_masked + 1)[:-1] if n_masked > 1 else torch.tensor([low])
        )
        chosen = torch.randperm(n, generator=gen)[:n_masked]
        ratios[chosen] = spread + (high - low) / max(n_masked, 1) * torch.rand(
            n_masked, generator=gen
        )
    return (ratios * num_patches).floor().long()


def _random_blocks(
    n: int, h: int, w: int, cfg: MaskConfig, targets: Tensor, gen: torch.Generator | None
) -> Tensor:
    """Union masks (n, C, h, w) of the first c candidate rectangles, c = 1..C."""
    c = _CANDIDATE_BLOCKS
    # blocks of up to half the target, so several overlap into an irregular mask
    max_area = (0.5 * targets.float()).clamp(min=cfg.min_num_patches).unsqueeze(1).expand(n, c)
    area = cfg.min_num_patches + (max_area - cfg.min_num_patches) * torch.rand(n, c, generator=gen)
    log_ratio = math.log(cfg.max_aspect_ratio) * (2 * torch.rand(n, c, generator=gen) - 1)
    aspect = log_ratio.exp()
    bh = (area * aspect).sqrt().round().clamp(1, h).long()
    bw = (area / aspect).sqrt().round().clamp(1, w).long()
    top = (torch.rand(n, c, generator=gen) * (h - bh + 1)).floor().long()
    left = (torch.rand(n, c, generator=gen) * (w - bw + 1)).floor().long()
    rows = torch.arange(h).view(1, 1, h, 1)
    cols = torch.arange(w).view(1, 1, 1, w)
    inside = (
        (rows >= top[..., None, None])
        & (rows < (top + bh)[..., None, None])
        & (cols >= left[..., None, None])
        & (cols < (left + bw)[..., None, None])
    )
    return inside.cummax(dim=1).values


def sample_block_masks(
    n: int, grid: tuple[int, int], cfg: MaskConfig, gen: torch.Generator | None = None
) -> PatchMasks:
    """Block masks for ``n`` crops on a ``grid`` of patches (exact target count per crop)."""
    h, w = grid
    num_patches = h * w
    targets = _target_counts(n, num_patches, cfg, gen)
    unions = _random_blocks(n, h, w, cfg, targets, gen).flatten(2)  # (n, C, h*w)
    counts = unions.sum(-1)  # (n, C), non-decreasing in C
    fits = counts <= targets[:, None]
    n_fit = fits.sum(1)  # prefix length: cumulative unions only grow
    pick = (n_fit - 1).clamp(min=0)
    chosen = unions[torch.arange(n), pick] & (n_fit > 0)[:, None]
    # top up with random free patches: rank free patches by a random key
    missing = (targets - chosen.sum(1)).clamp(min=0)
    keys = torch.rand(n, num_patches, generator=gen).masked_fill(chosen, 2.0)
    order = keys.argsort(dim=1).argsort(dim=1)
    masks = chosen | (order < missing[:, None])
    return PatchMasks.from_masks(masks)
