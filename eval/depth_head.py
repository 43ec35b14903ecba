"""The linear depth head and depth losses on frozen ViT features (DINOv2/DINOv3 protocol).

No CLI and no data loading here: :mod:`eval.depth` (the NYUv2 evaluation) and the
V-pretraining depth feedback head (``designers/feedback.py``, DESIGN.md section 3) share
this one implementation. It owns:

- :func:`layer_indices`: which blocks feed the head (DINOv2's "lin. 4": four blocks at
  even intervals ending at the last one; or the last ``n``);
- :func:`multilayer_features`: those blocks' patch tokens as a ``(B, L*D, h, w)`` map and
  their CLS tokens ``(B, L*D)``, differentiable when called under grad (feedback needs
  ``g_down`` through the backbone);
- :class:`LinearDepthHead`: DINOv2's ``BNHead`` — CLS concatenated to every patch
  feature, a 1x1 convolution, bilinear x4 upsampling, then either 256 uniform depth bins
  (AdaBins "UD" bins, "linear" normalisation) or a softplus regression, and finally a
  bilinear resize to the label resolution (:meth:`LinearDepthHead.predict`);
- :func:`sig_loss` (scale-invariant log loss, DINOv2's ``SigLoss``), :func:`l1_loss`,
  :func:`depth_loss` and :func:`valid_depth_mask`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov.models import Backbone

HEAD_MODES = ("bins", "regression")
BIN_NORMS = ("linear", "softmax")
LAYER_SETS = ("even", "last")
LOSSES = ("sigloss", "l1")
# AdaBins / DINOv2 "linear" bin normalisation: relu(logits) + 0.1, then divide by the sum.
_LINEAR_NORM_EPS = 0.1


# ------------------------------------------------------------------------ features


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
    state = backbone.prepare_tokens(images)
    patches, cls_tokens, start = [], [], 0
    for index in blocks:
        state = backbone.run_blocks(state, start, index + 1)
        start = index + 1
        tokens = backbone.model.norm(state.x) if norm else state.x
        cls_tokens.append(tokens[:, 0])
        patches.append(tokens[:, backbone.num_prefix_tokens :])
    h, w = state.grid
    patch = torch.cat(patches, dim=-1)  # (B, h*w, L*D), row-major patches
    patch_map = patch.transpose(1, 2).reshape(patch.shape[0], patch.shape[2], h, w)
    return patch_map, torch.cat(cls_tokens, dim=-1)


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
