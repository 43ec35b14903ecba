"""The augmentation designer: per-instance, reparameterised DINO augmentations on kornia.

A small CNN looks at each image and predicts, for every augmentation parameter, the
mean and standard deviation of a Gaussian in an unbounded "raw" space; a sample
``z = mean + std·ε`` (reparameterisation, so designer gradients flow and every call
gives a different view) is squashed into the parameter's DINO range by
``lo + (hi − lo)·sigmoid(z)``. The parameters, with DINO's ranges from
:class:`~dinov.config.CropsConfig`:

=============  ==========================  =============================================
name           range                       default (what the regulariser pulls toward)
=============  ==========================  =============================================
scale          ``*_crops_scale`` (area)    middle of the range (DINO draws it uniformly)
log_aspect     [log 3/4, log 4/3]          0
center_x/y     [0, 1] (of the free room)   0.5 (crop centred)
brightness     [1 − b, 1 + b]              1 (identity)
contrast       [1 − c, 1 + c]              1
saturation     [1 − s, 1 + s]              1
hue            [−h, h] (fraction of turn)  0
blur_sigma     ``blur_sigma``              p_blur·mid(range) + (1 − p_blur)·min(range)
grayscale      [0, 1] (relaxed prob.)      ``grayscale_prob``
solarize       [0, 1] (relaxed prob.)      ``solarize_prob_global2`` on view global2, else 0
=============  ==========================  =============================================

How each one is applied, differentiably in its parameter (DESIGN section 7):

- crop: a box from (scale, aspect, centre) in pixels, resampled with
  ``kornia.geometry.transform.crop_and_resize`` (gradients reach the box corners);
  horizontal flip is *not* learned (a discrete choice with no useful relaxation: a
  continuous x-scale through 0 squashes the image), it is drawn with DINO's p = 0.5 and
  applied by mirroring the box corners;
- colour jitter: torchvision's formulas as kornia's ``ColorJitter`` uses them
  (``adjust_brightness_accumulative``, ``adjust_contrast_with_mean_subtraction``,
  ``adjust_saturation_with_gray_subtraction``, ``adjust_hue`` with the angle 2π·hue), in a
  fixed order; DINO's jitter probability 0.8 is subsumed by the learned strengths
  (identity factors are inside the ranges);
- blur: ``gaussian_blur2d`` with a per-image tensor sigma; its lower bound 0.1 px is
  numerically the identity, so "no blur" is reachable without a separate probability;
- grayscale, relaxed: ``v + p·(gray(v) − v)``;
- solarise, relaxed: ``v + s·(solarize(v) − v)`` with the hard threshold at 0.5.
  Solarisation at 0.5 is continuous in the pixel value (both branches give 0.5), so
  only the probability needs relaxing: blending by ``s`` gives gradients to ``s`` and
  to the image without a sigmoid threshold, and ``s = 1`` is exactly DINO's op.

Regulariser: ``λ_prior · mean(((value(mean) − default)/(hi − lo))²) − λ_entropy · mean(H)``:
the predicted means are pulled toward the default DINO augmentation (in units of each
range, so no parameter dominates) and the entropy H of each drawn parameter (in units
of its range: ``log std`` of the Gaussian plus the log-derivative of the squashing
sigmoid at the draw, up to constants) is rewarded so the designer does not collapse to
deterministic views. The std is bounded, ``std_max·sigmoid(·)``, and a mean in the
sigmoid's flat tail lowers H, so the entropy reward cannot run away.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.enhance import (
    adjust_brightness_accumulative,
    adjust_contrast_with_mean_subtraction,
    adjust_hue,
    adjust_saturation_with_gray_subtraction,
)
from kornia.filters import gaussian_blur2d
from kornia.geometry.transform import crop_and_resize
from torch import Tensor, nn

from designers.registry import Design, register_designer
from designers.vision import VISION
from designers.vision.config import AugmentDesignerConfig
from dinov.config import CropsConfig
from dinov.data.multicrop import blur_kernel_size
from dinov.train.task import Task

PARAM_NAMES: tuple[str, ...] = (
    "scale",
    "log_aspect",
    "center_x",
    "center_y",
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "blur_sigma",
    "grayscale",
    "solarize",
)
VIEW_KINDS: tuple[str, ...] = ("global1", "global2", "local")

# keep defaults off the sigmoid's asymptotes so their raw value (logit) is finite
_EPS = 1e-3


@dataclass(frozen=True)
class ParamSpec:
    lo: float
    hi: float
    default: float

    @property
    def width(self) -> float:
        return max(self.hi - self.lo, 1e-6)  # a zero-width range (strength 0) is a constant


def dino_param_specs(cfg: CropsConfig, view: str = "global1") -> dict[str, ParamSpec]:
    """Ranges and default values of DINO's augmentation for one view kind."""
    if view not in VIEW_KINDS:
        raise ValueError(f"view must be one of {VIEW_KINDS}, got {view!r}")
    scale = cfg.local_crops_scale if view == "local" else cfg.global_crops_scale
    blur_prob = {
        "global1": cfg.blur_prob_global1,
        "global2": cfg.blur_prob_global2,
        "local": cfg.blur_prob_local,
    }[view]
    solarize_prob = cfg.solarize_prob_global2 if view == "global2" else 0.0
    s_lo, s_hi = cfg.blur_sigma
    return {
        "scale": ParamSpec(scale[0], scale[1], 0.5 * (scale[0] + scale[1])),
        "log_aspect": ParamSpec(math.log(3 / 4), math.log(4 / 3), 0.0),
        "center_x": ParamSpec(0.0, 1.0, 0.5),
        "center_y": ParamSpec(0.0, 1.0, 0.5),
        "brightness": ParamSpec(max(0.0, 1 - cfg.brightness), 1 + cfg.brightness, 1.0),
        "contrast": ParamSpec(max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, 1.0),
        "saturation": ParamSpec(max(0.0, 1 - cfg.saturation), 1 + cfg.saturation, 1.0),
        "hue": ParamSpec(-cfg.hue, cfg.hue, 0.0),
        "blur_sigma": ParamSpec(s_lo, s_hi, blur_prob * 0.5 * (s_lo + s_hi) + (1 - blur_prob) * s_lo),
        "grayscale": ParamSpec(0.0, 1.0, cfg.grayscale_prob),
        "solarize": ParamSpec(0.0, 1.0, solarize_prob),
    }


def augment(
    images: Tensor,
    params: dict[str, Tensor],
    out_size: int | tuple[int, int],
    flip: Tensor | None = None,
) -> Tensor:
    """Apply DINO's augmentation with explicit per-image parameters ((B,) tensors each).

    Pure function of ``params`` (physical values, see the module table), differentiable
    in every one of them. Images (B, 3, H, W) in [0, 1]; output (B, 3, S, S) in [0, 1]
    (not normalised).
    """
    b, _, h, w = images.shape
    size = (out_size, out_size) if isinstance(out_size, int) else (out_size[0], out_size[1])
    # crop box in pixels, as torchvision's RandomResizedCrop: area fraction and aspect
    area = params["scale"] * (h * w)
    aspect = params["log_aspect"].exp()
    bw = (area * aspect).sqrt().clamp(max=float(w))
    bh = (area / aspect).sqrt().clamp(max=float(h))
    # the centre moves only within the room the box leaves free, so the box stays inside
    cx = 0.5 * bw + (w - bw) * params["center_x"]
    cy = 0.5 * bh + (h - bh) * params["center_y"]
    # corners on pixel centres (align_corners=True): the full box is [0, W-1] x [0, H-1]
    x0, x1 = cx - 0.5 * bw, cx + 0.5 * bw - 1.0
    y0, y1 = cy - 0.5 * bh, cy + 0.5 * bh - 1.0
    if flip is not None:
        # mirroring the box's x corners flips the crop horizontally
        f = flip.to(torch.bool)
        x0, x1 = torch.where(f, x1, x0), torch.where(f, x0, x1)
    boxes = torch.stack(
        [torch.stack([x0, y0], -1), torch.stack([x1, y0], -1),
         torch.stack([x1, y1], -1), torch.stack([x0, y1], -1)],
        dim=1,
    )
    x = crop_and_resize(images, boxes, size, align_corners=True)
    x = adjust_brightness_accumulative(x, params["brightness"])
    x = adjust_contrast_with_mean_subtraction(x, params["contrast"])
    x = adjust_saturation_with_gray_subtraction(x, params["saturation"])
    x = adjust_hue(x, params["hue"] * (2 * math.pi))
    bcast = (b, 1, 1, 1)
    gray = rgb_to_grayscale(x).expand_as(x)
    x = x + params["grayscale"].view(bcast) * (gray - x)
    kernel = blur_kernel_size(min(size))
    sigma = params["blur_sigma"].view(b, 1).expand(b, 2)
    x = gaussian_blur2d(x, (kernel, kernel), sigma)
    solarized = torch.where(x >= 0.5, 1.0 - x, x)
    x = x + params["solarize"].view(bcast) * (solarized - x)
    return x


class AugmentationDesigner(nn.Module):
    """Per-instance reparameterised DINO augmentation for one view kind.

    ``forward(images, out_size)`` with images (B, 3, H, W) in [0, 1] returns
    ``(views, params)``: views (B, 3, S, S) (normalised with ``cfg.normalize_*`` when
    ``normalize``), params a dict of (B,) sampled physical values per name in
    :data:`PARAM_NAMES` plus ``flip`` (B,), ``raw_mean``, ``raw_std`` and the drawn
    ``raw`` (B, P) for :meth:`regulariser`.

    Initialisation: the head's weights are small and its bias puts the mean at the DINO
    defaults and the std at ``init_std``, so the designer starts as a per-image noisy
    version of the default augmentation.
    """

    def __init__(
        self,
        cfg: CropsConfig | None = None,
        view: str = "global1",
        normalize: bool = True,
        channels: int = 32,
        encoder_size: int = 64,
        init_std: float = 1.0,
        std_max: float = 2.0,
        flip_prob: float | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else CropsConfig()
        self.view = view
        self.specs = dino_param_specs(self.cfg, view)
        self.normalize = normalize
        self.encoder_size = encoder_size
        self.std_max = std_max
        self.flip_prob = self.cfg.horizontal_flip_prob if flip_prob is None else flip_prob
        lo = torch.tensor([self.specs[n].lo for n in PARAM_NAMES])
        width = torch.tensor([self.specs[n].width for n in PARAM_NAMES])
        default = torch.tensor([self.specs[n].default for n in PARAM_NAMES])
        self.register_buffer("lo", lo, persistent=False)
        self.register_buffer("width", width, persistent=False)
        self.register_buffer("default", default, persistent=False)
        self.register_buffer("mean_rgb", torch.tensor(self.cfg.normalize_mean).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std_rgb", torch.tensor(self.cfg.normalize_std).view(1, 3, 1, 1),
                             persistent=False)
        c = channels
        self.encoder = nn.Sequential(
            nn.Conv2d(3, c // 2, 3, stride=2, padding=1),
            nn.GroupNorm(min(8, c // 2), c // 2),
            nn.GELU(),
            nn.Conv2d(c // 2, c, 3, stride=2, padding=1),
            nn.GroupNorm(min(8, c), c),
            nn.GELU(),
            nn.Conv2d(c, c, 3, stride=2, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        p = len(PARAM_NAMES)
        self.head = nn.Linear(c, 2 * p)
        nn.init.normal_(self.head.weight, std=1e-2)
        with torch.no_grad():
            self.head.bias[:p] = self.raw_of(default)
            init = min(max(init_std / std_max, _EPS), 1 - _EPS)
            self.head.bias[p:] = math.log(init / (1 - init))

    def raw_of(self, values: Tensor) -> Tensor:
        """Inverse of :meth:`bounded`: raw logits of physical values (clipped off the bounds)."""
        u = ((values - self.lo) / self.width).clamp(_EPS, 1 - _EPS)
        return u.log() - (-u).log1p()

    def bounded(self, raw: Tensor) -> Tensor:
        return self.lo + self.width * torch.sigmoid(raw)

    def to_dict(self, values: Tensor) -> dict[str, Tensor]:
        return {name: values[:, i] for i, name in enumerate(PARAM_NAMES)}

    def predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Raw means and stds (B, P) from a low-resolution copy of each image."""
        small = F.interpolate(images, size=(self.encoder_size, self.encoder_size),
                              mode="bilinear", antialias=True)
        out = self.head(self.encoder(small))
        p = len(PARAM_NAMES)
        return out[:, :p], self.std_max * torch.sigmoid(out[:, p:])

    def forward(
        self,
        images: Tensor,
        out_size: int | tuple[int, int],
        sample: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        raw_mean, raw_std = self.predict(images)
        raw = raw_mean
        b = images.shape[0]
        if sample:
            eps = torch.randn(raw_mean.shape, generator=generator, device=images.device,
                              dtype=raw_mean.dtype)
            raw = raw_mean + raw_std * eps
            flip = torch.rand(b, generator=generator, device=images.device) < self.flip_prob
        else:
            flip = torch.zeros(b, dtype=torch.bool, device=images.device)
        params = self.to_dict(self.bounded(raw))
        views = augment(images, params, out_size, flip)
        if self.normalize:
            views = (views - self.mean_rgb) / self.std_rgb
        return views, {**params, "flip": flip.float(), "raw_mean": raw_mean, "raw_std": raw_std,
                       "raw": raw}

    def penalty(
        self, params: dict[str, Tensor], lambda_prior: float = 1.0, lambda_entropy: float = 0.01
    ) -> Tensor:
        """Pull the predicted means toward DINO's defaults; reward the entropy of the drawn
        parameters.

        The entropy is the drawn value's, ``y = lo + w·sigmoid(z)``, in units of its range:
        ``H(y) = H(z) + E[log sigmoid'(z)] = log std + E[log σ(z) + log(1 − σ(z))]`` + const,
        the expectation estimated at the drawn ``z``: with ``log std`` alone, a mean pushed
        into the sigmoid's flat tail would keep its reward while ``y`` barely varies
        (docs/results.md has the run where that happened).
        """
        mean_values = self.bounded(params["raw_mean"])
        prior = (((mean_values - self.default) / self.width) ** 2).mean()
        raw = params["raw"]
        log_jacobian = F.logsigmoid(raw) + F.logsigmoid(-raw)
        entropy = (params["raw_std"].clamp_min(1e-12).log() + log_jacobian).mean()
        return lambda_prior * prior - lambda_entropy * entropy


@register_designer("augment", VISION, AugmentDesignerConfig)
class AugmentTaskDesigner(nn.ModuleDict):
    """The augmentation designer on a DINO task: every global view (and, with
    ``local``, every local crop) drawn from the source images, view-major; R = the mean
    penalty of the draws.

    A ``ModuleDict`` of :class:`AugmentationDesigner`: ``global`` (DINO's first global
    view's ranges) and ``local``.
    """

    def __init__(self, cfg: AugmentDesignerConfig, *, crops: CropsConfig, **learner: Any) -> None:
        views = {"global": AugmentationDesigner(crops, view="global1")}
        if cfg.local:
            views["local"] = AugmentationDesigner(crops, view="local")
        super().__init__(views)
        self.cfg, self.crops = cfg, crops

    def design(self, inputs: Tensor, task: Task) -> Design:
        source = inputs.to(task.student_global.device)
        plan = [("global", self.crops.global_crops_size, task.n_global)]
        if "local" in self and task.n_local > 0:
            plan.append(("local", self.crops.local_crops_size, task.n_local))
        views: dict[str, Tensor] = {}
        draws: list[tuple[AugmentationDesigner, dict[str, Tensor]]] = []
        for kind, size, n_views in plan:
            outs = [self[kind](source, size) for _ in range(n_views)]
            views[kind] = torch.cat([v for v, _ in outs])
            draws += [(self[kind], params) for _, params in outs]
        designed = dataclasses.replace(task, student_global=views["global"],
                                       teacher_global=views["global"],
                                       local=views.get("local", task.local))
        return Design(designed, draws)

    def regulariser(self, design: Design) -> Tensor:
        cfg = self.cfg
        return torch.stack([designer.penalty(params, cfg.lambda_prior, cfg.lambda_entropy)
                            for designer, params in design.outputs]).mean()
