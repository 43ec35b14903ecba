"""DINO multicrop augmentation, batched on tensors with kornia.

Two global crops and ``local_crops_number`` local crops per image, with DINOv2's
default photometric pipeline: random resized crop, horizontal flip, colour jitter
(p=0.8), grayscale (p=0.2), Gaussian blur (p=1.0 / 0.1 for the two global views, 0.5
for local views), solarisation (p=0.2, second global view only) and normalisation.
Every random choice is drawn per image; the whole batch goes through each op at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import kornia.augmentation as K
import torch
from torch import Tensor, nn

from dinov.config import CropsConfig


@dataclass
class MultiCrops:
    """Crops of a batch of B images, view-major: rows ``v*B:(v+1)*B`` are view ``v``."""

    global_crops: Tensor  # (n_global*B, 3, G, G)
    local_crops: Tensor  # (n_local*B, 3, L, L)
    n_global: int
    n_local: int


def blur_kernel_size(crop_size: int) -> int:
    """DINOv2 blurs 224-px crops with a 9-px kernel; scale it with the crop, keep it odd."""
    size = max(3, round(9 * crop_size / 224))
    return size if size % 2 == 1 else size + 1


def _pipeline(
    cfg: CropsConfig, size: int, scale: list[float], blur_prob: float, solarize_prob: float
) -> nn.Sequential:
    ops: list[nn.Module] = [
        K.RandomResizedCrop((size, size), scale=tuple(scale), ratio=(3 / 4, 4 / 3)),
        K.RandomHorizontalFlip(p=cfg.horizontal_flip_prob),
        K.ColorJitter(
            cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, p=cfg.color_jitter_prob
        ),
        K.RandomGrayscale(p=cfg.grayscale_prob),
    ]
    if blur_prob > 0:
        kernel = blur_kernel_size(size)
        ops.append(K.RandomGaussianBlur((kernel, kernel), tuple(cfg.blur_sigma), p=blur_prob))
    if solarize_prob > 0:
        # thresholds=0 draws exactly 0.5, like torchvision's RandomSolarize(threshold=128)
        ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=solarize_prob))
    ops.append(
        K.Normalize(mean=torch.tensor(cfg.normalize_mean), std=torch.tensor(cfg.normalize_std))
    )
    return nn.Sequential(*ops)


class MultiCropAugmentation(nn.Module):
    """Images (B, 3, S, S) in [0, 1] -> :class:`MultiCrops`."""

    def __init__(self, cfg: CropsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.global1 = _pipeline(
            cfg, cfg.global_crops_size, cfg.global_crops_scale, cfg.blur_prob_global1, 0.0
        )
        self.global2 = _pipeline(
            cfg,
            cfg.global_crops_size,
            cfg.global_crops_scale,
            cfg.blur_prob_global2,
            cfg.solarize_prob_global2,
        )
        self.local = _pipeline(
            cfg, cfg.local_crops_size, cfg.local_crops_scale, cfg.blur_prob_local, 0.0
        )

    @torch.no_grad()
    def forward(self, images: Tensor) -> MultiCrops:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"multicrop expects images of shape (B, 3, H, W), got {tuple(images.shape)}"
            )
        global_crops = torch.cat([self.global1(images), self.global2(images)])
        n_local = self.cfg.local_crops_number
        if n_local > 0:
            local_crops = self.local(images.repeat(n_local, 1, 1, 1))
        else:
            size = self.cfg.local_crops_size
            local_crops = images.new_zeros((0, 3, size, size))
        return MultiCrops(global_crops.contiguous(), local_crops.contiguous(), 2, n_local)
