"""The linear + BatchNorm segmentation head on frozen ViT patch features, and its loss.

This module owns the dense-prediction head shared by the ADE20K evaluation
(:mod:`eval.segmentation`) and the V-pretraining feedback heads (DESIGN.md section 3:
"ADE20K seg: linear+BN head, pixel cross-entropy"). It holds no CLI or data code.

- :func:`backbone_feature_map`: the patch tokens of the last ``n`` blocks (each through
  the final norm, as DINOv2's linear evaluation takes them), concatenated along channels
  into a ``(B, n*D, h, w)`` map. It does not switch off autograd, so the feedback side
  can differentiate through the backbone's last blocks.
- :class:`LinearBNSegHead`: DINOv2's linear segmentation head (mmseg ``BNHead``):
  ``BatchNorm2d`` over the feature channels, optional dropout, then a 1x1 convolution
  to class logits at patch resolution.
- :func:`upsample_logits`: patch logits -> pixel logits for an image of a given size,
  bilinear (``align_corners=False``). The backbone zero-pads inputs whose side is not a
  multiple of the patch on the right/bottom, so the logits are first upsampled to the
  padded size and then cropped: pixel (y, x) keeps looking at the patch it fell in.
- :func:`seg_loss`: pixel cross-entropy with an ignore index at label resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov.models import Backbone
from eval.common import normalize

__all__ = ["LinearBNSegHead", "backbone_feature_map", "seg_loss", "upsample_logits"]


def backbone_feature_map(backbone: Backbone, images: Tensor, n_last_blocks: int = 1) -> Tensor:
    """(B, 3, H, W) images in [0, 1] -> (B, n*D, h, w) normed patch features of the last n blocks."""
    outputs = backbone.get_intermediate_layers(normalize(images), n=n_last_blocks, norm=True)
    h, w = outputs[-1].grid
    patch = torch.cat([out.patch for out in outputs], dim=-1)  # (B, h*w, n*D), block order
    # Contiguous NCHW: the transposed view has channels-last strides, which BatchNorm handles slower.
    return patch.transpose(1, 2).reshape(patch.shape[0], patch.shape[2], h, w).contiguous()


class LinearBNSegHead(nn.Module):
    """BatchNorm2d over patch features, then a 1x1 conv to ``num_classes`` logits.

    ``forward(features)`` gives patch-resolution logits; pass ``image_size`` (and the
    backbone's ``patch_size``) to get them bilinearly upsampled to pixel resolution.
    Initialisation follows mmseg's ``BaseDecodeHead``: conv weights N(0, 0.01), zero bias.
    """

    def __init__(self, in_dim: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.num_classes = num_classes
        self.bn = nn.BatchNorm2d(in_dim)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv = nn.Conv2d(in_dim, num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(
        self,
        features: Tensor,
        image_size: tuple[int, int] | None = None,
        patch_size: int | None = None,
    ) -> Tensor:
        if features.dim() != 4 or features.shape[1] != self.in_dim:
            raise ValueError(
                f"expected features (B, {self.in_dim}, h, w), got {tuple(features.shape)}"
            )
        logits = self.conv(self.dropout(self.bn(features)))
        if image_size is None:
            return logits
        return upsample_logits(logits, image_size, patch_size)


def upsample_logits(
    logits: Tensor, image_size: tuple[int, int], patch_size: int | None = None
) -> Tensor:
    """(B, K, h, w) patch logits -> (B, K, H, W) pixel logits, bilinear.

    With ``patch_size``, an image padded to ``(h*p, w*p)`` by the backbone is undone by
    upsampling to that size and cropping the top-left ``(H, W)``; without it (or when the
    image was not padded) the logits are simply resized to ``(H, W)``.
    """
    height, width = int(image_size[0]), int(image_size[1])
    h, w = logits.shape[-2:]
    padded = (h * patch_size, w * patch_size) if patch_size else (height, width)
    if padded[0] < height or padded[1] < width:
        raise ValueError(f"a {h}x{w} grid of {patch_size}px patches cannot cover {height}x{width}")
    if (h, w) != padded:
        logits = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)
    return logits[..., :height, :width]


def seg_loss(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int = 255,
    patch_size: int | None = None,
) -> Tensor:
    """Mean pixel cross-entropy over non-ignored pixels, logits upsampled to the labels' size.

    ``logits`` (B, K, h, w) may be at patch or pixel resolution; ``labels`` are (B, H, W).
    A batch whose pixels are all ``ignore_index`` gives a zero loss (not NaN) that still
    has a graph, so a training loop never has to special-case it.
    """
    labels = labels.long()
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = upsample_logits(logits, tuple(labels.shape[-2:]), patch_size)
    if not (labels != ignore_index).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)
