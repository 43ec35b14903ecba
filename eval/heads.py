"""Dense prediction heads on frozen ViT features, their losses and the input
normalisation: what the evaluations (:mod:`eval.segmentation`, :mod:`eval.depth`) and the
V-pretraining feedback heads (:mod:`designers.vision.feedback`, DESIGN.md section 3) share.
No CLI, config or data code here. Features come from the backbone's one feature tap,
:meth:`dinov.models.Backbone.forward_intermediates`.

Input: :func:`normalize` (ImageNet statistics, as the backbones were trained).

Segmentation (DINOv2's linear protocol, mmseg ``BNHead``):

- :func:`backbone_feature_map`: the normed patch tokens of the last ``n`` blocks,
  concatenated along channels into a ``(B, n*D, h, w)`` map;
- :class:`LinearBNSegHead`: ``BatchNorm2d`` over the feature channels, optional dropout,
  a 1x1 convolution to class logits at patch resolution;
- :func:`upsample_logits`: patch logits -> pixel logits for an image of a given size,
  bilinear (``align_corners=False``). The backbone zero-pads inputs whose side is not a
  multiple of the patch on the right/bottom, so the logits are first upsampled to the
  padded size and then cropped: pixel (y, x) keeps looking at the patch it fell in;
- :func:`seg_loss`: pixel cross-entropy with an ignore index at label resolution.

Depth (DINOv2/DINOv3 linear protocol):

- :func:`layer_indices`: which blocks feed the head (DINOv2's "lin. 4": four blocks at
  even intervals ending at the last one; or the last ``n``);
- :func:`multilayer_features`: those blocks' patch tokens as a ``(B, L*D, h, w)`` map and
  their CLS tokens ``(B, L*D)``;
- :class:`LinearDepthHead`: DINOv2's ``BNHead`` — CLS concatenated to every patch
  feature, a 1x1 convolution, bilinear x4 upsampling, then either 256 uniform depth bins
  (AdaBins "UD" bins, "linear" normalisation) or a softplus regression, and finally a
  bilinear resize to the label resolution (:meth:`LinearDepthHead.predict`);
- :func:`sig_loss` (scale-invariant log loss, DINOv2's ``SigLoss``), :func:`l1_loss`,
  :func:`depth_loss` and :func:`valid_depth_mask`.

The feature functions do not switch off autograd: the feedback side differentiates
through the backbone's last blocks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov.models import Backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_MODES = ("bins", "regression")
BIN_NORMS = ("linear", "softmax")
LAYER_SETS = ("even", "last")
LOSSES = ("sigloss", "l1")
# AdaBins / DINOv2 "linear" bin normalisation: relu(logits) + 0.1, then divide by the sum.
_LINEAR_NORM_EPS = 0.1


# ------------------------------------------------------------------------ input


def normalize(images: Tensor, mean: Iterable[float] = IMAGENET_MEAN,
              std: Iterable[float] = IMAGENET_STD) -> Tensor:
    """(B, 3, H, W) in [0, 1] -> ImageNet-normalised, as the backbones were trained."""
    mean_t = images.new_tensor(tuple(mean)).view(1, 3, 1, 1)
    std_t = images.new_tensor(tuple(std)).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


# ------------------------------------------------------------------------ segmentation


def backbone_feature_map(backbone: Backbone, images: Tensor, n_last_blocks: int = 1) -> Tensor:
    """(B, 3, H, W) images in [0, 1] -> (B, n*D, h, w) normed patch features of the last n blocks."""
    outputs = backbone.forward_intermediates(normalize(images), n_last_blocks, output_fmt="NCHW")
    return torch.cat([out.patch for out in outputs], dim=1)  # block order


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


# ------------------------------------------------------------------------ depth features


def layer_indices(num_blocks: int, n: int, layer_set: str = "even") -> list[int]:
    """0-based blocks whose outputs feed the head.

    ``even``: ``n`` blocks ``num_blocks // n`` apart ending at the last block — DINOv2's
    "lin. 4" (blocks 2, 5, 8, 11 of ViT-S/B; 9, 19, 29, 39 of ViT-g), with the paper's
    4, 11, 17, 23 for 24-block models (ViT-L). ``last``: the last ``n`` blocks.
    """
    if layer_set not in LAYER_SETS:
        raise ValueError(f"layer_set must be one of {LAYER_SETS}, got {layer_set!r}")
    if not 1 <= n <= num_blocks:
        raise ValueError(f"cannot take {n} layers from a backbone with {num_blocks} blocks")
    if layer_set == "last":
        return list(range(num_blocks - n, num_blocks))
    if n == 4 and num_blocks == 24:
        return [4, 11, 17, 23]  # the ViT-L indices of the DINOv2/DINOv3 papers
    step = num_blocks // n
    return [num_blocks - 1 - step * (n - 1 - i) for i in range(n)]


def multilayer_features(
    backbone: Backbone, images: Tensor, blocks: list[int], norm: bool = True
) -> tuple[Tensor, Tensor]:
    """Patch maps ``(B, L*D, h, w)`` and CLS tokens ``(B, L*D)`` of the given blocks.

    Layers are concatenated in ``blocks`` order along channels. ``norm`` passes each
    block's tokens through the backbone's final norm (DINOv3's depth default; DINOv2's
    depther used raw block outputs). Register tokens are dropped. The trunk runs once.
    """
    if not blocks or sorted(set(blocks)) != list(blocks):
        raise ValueError(f"blocks must be strictly increasing, got {blocks}")
    outputs = backbone.forward_intermediates(images, blocks, norm=norm)
    h, w = outputs[-1].grid
    patch = torch.cat([o.patch for o in outputs], dim=-1)  # (B, h*w, L*D), row-major patches
    # A (B, L*D, h, w) view with channels-last strides, not a contiguous copy: the depth
    # head's results (and every number reported with it) were computed on this layout.
    patch_map = patch.transpose(1, 2).reshape(patch.shape[0], patch.shape[2], h, w)
    return patch_map, torch.cat([o.cls for o in outputs], dim=-1)


# ------------------------------------------------------------------------ head


def bin_centers(n_bins: int, min_depth: float, max_depth: float) -> Tensor:
    """AdaBins "UD" bins: ``n_bins`` depths spaced uniformly in ``[min_depth, max_depth]``."""
    return torch.linspace(min_depth, max_depth, n_bins)


def decode_bins(logits: Tensor, centers: Tensor, norm: str = "linear") -> Tensor:
    """Depth ``(B, H, W)`` as the probability-weighted mean of bin centres.

    ``logits`` is ``(B, n_bins, H, W)``. ``linear`` (DINOv2/AdaBins default):
    ``p = (relu(x) + 0.1) / sum(relu(x) + 0.1)``; ``softmax``: ``p = softmax(x)``.
    The result always lies in ``[centers.min(), centers.max()]``.
    """
    if norm == "linear":
        weights = torch.relu(logits) + _LINEAR_NORM_EPS
        probs = weights / weights.sum(dim=1, keepdim=True)
    elif norm == "softmax":
        probs = torch.softmax(logits, dim=1)
    else:
        raise ValueError(f"bin norm must be one of {BIN_NORMS}, got {norm!r}")
    return torch.einsum("bkhw,k->bhw", probs, centers.to(probs.dtype))


class LinearDepthHead(nn.Module):
    """DINOv2's linear depth head (``BNHead``) on a feature map.

    ``forward(feats (B, C, h, w), cls (B, C_cls) | None)``: the CLS tokens, when given, are
    appended to every position's feature (``in_dim`` counts both), an optional BatchNorm
    (DINOv3's ``use_batchnorm``; DINOv2 left it out) and a 1x1 convolution give per-patch
    logits, which are bilinearly upsampled by ``upsample`` and decoded:

    - ``mode="bins"``: ``n_bins`` outputs, :func:`decode_bins` over uniform bins in
      ``[min_depth, max_depth]`` (DINOv2: 256 bins, "UD", "linear" normalisation);
    - ``mode="regression"``: one output, ``softplus(x) + min_depth``. DINOv2/DINOv3 use
      ``relu(x) + min_depth``, but a single ReLU output can die: one large step that
      drives it negative everywhere leaves no gradient (measured here: L1 at lr 1e-2 on a
      tiny DINOv3 stuck at ``min_depth``). Softplus equals ReLU away from 0 and never
      loses its gradient.

    The convolution runs *before* the upsampling, unlike DINOv2 which upsamples the
    features: a 1x1 convolution and bilinear interpolation (whose weights sum to one) are
    both linear and commute, so the output is the same at ``n_bins / C`` of the cost.
    Returns depth ``(B, h * upsample, w * upsample)`` in metres.
    """

    def __init__(
        self,
        in_dim: int,
        mode: str = "bins",
        n_bins: int = 256,
        min_depth: float = 1e-3,
        max_depth: float = 10.0,
        upsample: int = 4,
        batch_norm: bool = False,
        bin_norm: str = "linear",
    ) -> None:
        super().__init__()
        if mode not in HEAD_MODES:
            raise ValueError(f"mode must be one of {HEAD_MODES}, got {mode!r}")
        if bin_norm not in BIN_NORMS:
            raise ValueError(f"bin_norm must be one of {BIN_NORMS}, got {bin_norm!r}")
        if not 0 < min_depth < max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")
        if mode == "bins" and n_bins < 2:
            raise ValueError(f"n_bins must be >= 2, got {n_bins}")
        self.in_dim, self.mode, self.bin_norm = in_dim, mode, bin_norm
        self.min_depth, self.max_depth, self.upsample = min_depth, max_depth, upsample
        self.bn = nn.BatchNorm2d(in_dim) if batch_norm else nn.Identity()
        self.conv = nn.Conv2d(in_dim, n_bins if mode == "bins" else 1, kernel_size=1)
        # Not persistent: the bins follow from the constructor arguments.
        self.register_buffer("centers", bin_centers(n_bins, min_depth, max_depth), persistent=False)

    def _with_cls(self, feats: Tensor, cls: Tensor | None) -> Tensor:
        if cls is not None:
            cls_map = cls[:, :, None, None].expand(-1, -1, *feats.shape[-2:])
            feats = torch.cat([feats, cls_map.to(feats.dtype)], dim=1)
        if feats.shape[1] != self.in_dim:
            raise ValueError(f"head expects {self.in_dim} channels, got {feats.shape[1]}")
        return feats

    def forward(self, feats: Tensor, cls: Tensor | None = None) -> Tensor:
        logits = self.conv(self.bn(self._with_cls(feats, cls)))
        if self.upsample > 1:
            logits = F.interpolate(
                logits, scale_factor=self.upsample, mode="bilinear", align_corners=False
            )
        if self.mode == "bins":
            return decode_bins(logits, self.centers, self.bin_norm)
        return F.softplus(logits[:, 0]) + self.min_depth

    def predict(
        self,
        feats: Tensor,
        cls: Tensor | None,
        patch_size: int,
        image_size: tuple[int, int],
        out_size: tuple[int, int] | None = None,
    ) -> Tensor:
        """Depth ``(B, *out_size)`` aligned with an ``image_size`` input.

        The backbone zero-pads inputs on the right/bottom to whole patches, so the patch
        grid covers ``(h * patch, w * patch)`` pixels of which the image is the top-left
        ``image_size``: the prediction is resized to the padded extent, cropped to the
        image, then resized to ``out_size`` (the label resolution; default the image's).
        """
        h, w = feats.shape[-2:]
        depth = self(feats, cls)[:, None]
        depth = F.interpolate(
            depth, size=(h * patch_size, w * patch_size), mode="bilinear", align_corners=False
        )
        depth = depth[..., : image_size[0], : image_size[1]]
        out_size = tuple(out_size or image_size)
        if tuple(depth.shape[-2:]) != out_size:
            depth = F.interpolate(depth, size=out_size, mode="bilinear", align_corners=False)
        return depth[:, 0]


# ------------------------------------------------------------------------ losses


def valid_depth_mask(target: Tensor, min_depth: float = 1e-3, max_depth: float = 10.0) -> Tensor:
    """Pixels with a usable label: ``min_depth < target < max_depth`` (0 marks missing)."""
    return (target > min_depth) & (target < max_depth)


def _select(pred: Tensor, target: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if valid is None:
        valid = target > 0  # DINOv2's SigLoss valid_mask: 0 = no measurement
    valid = valid.to(device=pred.device, dtype=torch.bool).expand_as(pred)
    return pred[valid], target[valid].to(pred.dtype)


def sig_loss(
    pred: Tensor,
    target: Tensor,
    valid: Tensor | None = None,
    variance_focus: float = 0.85,
    eps: float = 1e-3,
    warm_up: bool = False,
) -> Tensor:
    """Scale-invariant log loss (Eigen et al., 2014), DINOv2's / AdaBins' ``SigLoss``.

    With ``g = log(pred + eps) - log(target + eps)`` over the valid pixels of the whole
    batch (pooled, as DINOv2 does) and ``lambda = variance_focus``::

        loss = sqrt( mean(g^2) - lambda * mean(g)^2 )
             = sqrt( Var(g) + (1 - lambda) * mean(g)^2 )

    DINOv2 writes ``sqrt(torch.var(g) + 0.15 * mean(g)^2)``: the same with ``lambda =
    0.85`` up to ``torch.var``'s unbiased ``N / (N - 1)`` factor (negligible over ~1e5
    pixels). ``lambda = 1`` is fully scale-invariant: ``pred = c * target`` costs nothing
    (with ``eps = 0``). ``warm_up`` keeps only ``sqrt((1 - lambda) * mean(g)^2)`` — DINOv2's
    first iterations, which fit the global scale before the structure.

    ``eps`` (DINOv2: 1e-3) bounds ``d log / d pred`` by ``1 / eps``. The square root's
    slope is infinite at 0, so a loss at or below 1e-12 is returned as an exact 0 with zero
    gradient. ``valid`` defaults to ``target > 0``; no valid pixel gives a zero loss that
    still depends on ``pred`` (so ``backward`` works).
    """
    p, t = _select(pred, target, valid)
    if p.numel() == 0:
        return pred.sum() * 0.0
    g = torch.log(p + eps) - torch.log(t + eps)
    mean = g.mean()
    if warm_up:
        dg = (1.0 - variance_focus) * mean.square()
    else:
        dg = g.square().mean() - variance_focus * mean.square()
    tiny = 1e-12
    return torch.where(dg > tiny, dg.clamp_min(tiny).sqrt(), torch.zeros_like(dg))


def l1_loss(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean absolute error in metres over the valid pixels (``target > 0`` by default)."""
    p, t = _select(pred, target, valid)
    if p.numel() == 0:
        return pred.sum() * 0.0
    return (p - t).abs().mean()


def depth_loss(
    name: str,
    pred: Tensor,
    target: Tensor,
    valid: Tensor | None = None,
    warm_up: bool = False,
    variance_focus: float = 0.85,
) -> Tensor:
    """``sigloss`` (:func:`sig_loss`) or ``l1`` (:func:`l1_loss`) by name."""
    if name == "sigloss":
        return sig_loss(pred, target, valid, variance_focus=variance_focus, warm_up=warm_up)
    if name == "l1":
        return l1_loss(pred, target, valid)
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
