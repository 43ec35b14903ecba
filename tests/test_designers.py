"""Task designers (DESIGN section 3): soft-mask U-Net, token-mask designer, augmentation designer.

CPU-only and small: shapes, value ranges, the regularisers against hand computations,
and that gradients reach every designer parameter through the designed views.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from designers.vision.augment import PARAM_NAMES, AugmentationDesigner, augment
from designers.vision.masks import SoftMaskDesigner, TokenMaskDesigner, total_variation
from dinov.config import CropsConfig


def _images(b: int = 2, size: int = 32, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    # smooth colourful images: a random low-res field upsampled (hue/blur have something to act on)
    low = torch.rand(b, 3, 4, 4, generator=gen)
    return nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def _assert_all_grads(module: nn.Module) -> None:
    for name, p in module.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def _identity_params(b: int, hue: float = 0.0) -> dict[str, Tensor]:
    values = {
        "scale": 1.0, "log_aspect": 0.0, "center_x": 0.5, "center_y": 0.5,
        "brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": hue,
        "blur_sigma": 0.1, "grayscale": 0.0, "solarize": 0.0,
    }
    return {k: torch.full((b,), v) for k, v in values.items()}


# ----------------------------------------------------------------------- soft mask


def test_soft_mask_shapes_range_and_init() -> None:
    torch.manual_seed(0)
    x = _images(3, 30)  # not divisible by 4: the U-Net must still return full size
    designer = SoftMaskDesigner(init_mu=0.9)
    designed, mu = designer(x)
    assert designed.shape == x.shape
    assert mu.shape == (3, 1, 30, 30)
    assert (mu >= 0).all() and (mu <= 1).all()
    assert (mu - 0.9).abs().max() < 0.05  # starts near init_mu
    # the blend lies between the view and its blur
    blurred = designer.blur(x)
    lo, hi = torch.minimum(x, blurred), torch.maximum(x, blurred)
    assert (designed >= lo - 1e-6).all() and (designed <= hi + 1e-6).all()


def test_soft_mask_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    designer = SoftMaskDesigner()
    designed, mu = designer(_images())
    target = torch.randn_like(designed)
    loss = (designed * target).mean() + designer.penalty(mu)
    loss.backward()
    _assert_all_grads(designer)


def test_soft_mask_regulariser_by_hand() -> None:
    mu = torch.tensor([[0.2, 0.8], [0.6, 1.0]]).view(1, 1, 2, 2)
    # mean 0.65; |dx| = 0.6, 0.4 -> 0.5; |dy| = 0.4, 0.2 -> 0.3; TV = 0.8
    assert total_variation(mu).item() == pytest.approx(0.8)
    expected = 0.3 * (0.65 - 0.45) ** 2 + 0.1 * 0.8
    got = SoftMaskDesigner.penalty(mu, kappa=0.45, lambda_sparsity=0.3, lambda_tv=0.1)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # DESIGN defaults: kappa 0.5, lambda_s 0.2, lambda_tv 0.08
    assert SoftMaskDesigner.penalty(mu).item() == pytest.approx(0.2 * 0.15**2 + 0.08 * 0.8)


# ----------------------------------------------------------------------- token mask


def test_token_mask_exact_count_and_straight_through() -> None:
    torch.manual_seed(0)
    x = _images(4, 32)
    designer = TokenMaskDesigner(patch_size=8, temperature=0.5)
    gen = torch.Generator().manual_seed(1)
    masks, soft = designer(x, mask_ratio=0.3, generator=gen)
    n = 16
    k = round(0.3 * n)
    assert masks.masks.shape == (4, n) and masks.masks.dtype == torch.bool
    assert (masks.masks.sum(1) == k).all()
    assert masks.indices.numel() == 4 * k
    assert torch.allclose(masks.weights, torch.full((4 * k,), 1.0 / (k * 4)))
    # forward value is the hard mask
    assert torch.equal(soft.detach(), masks.masks.float())
    # backward: gradient of the relaxed probabilities reaches every parameter
    (soft * torch.randn(soft.shape, generator=gen)).sum().backward()
    _assert_all_grads(designer)


def test_token_mask_per_view_ratio() -> None:
    torch.manual_seed(0)
    designer = TokenMaskDesigner(patch_size=8)
    ratios = torch.tensor([0.0, 0.1, 0.5, 0.25])
    masks, _ = designer(_images(4, 32), mask_ratio=ratios, sample=False)
    assert masks.masks.sum(1).tolist() == [0, 2, 8, 4]


# ----------------------------------------------------------------------- augmentation


def test_augment_identity_and_hue() -> None:
    x = _images(2, 32)
    same = augment(x, _identity_params(2), 32)
    assert torch.allclose(same, x, atol=1e-4)
    flipped = augment(x, _identity_params(2), 32, flip=torch.tensor([True, False]))
    assert torch.allclose(flipped[0], x[0].flip(-1), atol=1e-4)
    assert torch.allclose(flipped[1], x[1], atol=1e-4)
    shifted = augment(x, _identity_params(2, hue=0.1), 32)
    assert (shifted - x).abs().mean() > 1e-2


def test_augment_gradients_reach_every_parameter() -> None:
    x = _images(2, 32)
    interior = {
        "scale": 0.5, "log_aspect": 0.1, "center_x": 0.3, "center_y": 0.6,
        "brightness": 1.1, "contrast": 0.9, "saturation": 1.1, "hue": 0.05,
        "blur_sigma": 1.0, "grayscale": 0.3, "solarize": 0.4,
    }
    params = {k: torch.full((2,), v, requires_grad=True) for k, v in interior.items()}
    out = augment(x, params, 24)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    for name in PARAM_NAMES:
        g = params[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


def _fixed_designer(values: dict[str, float] | None = None) -> AugmentationDesigner:
    """A designer whose means ignore the image (zero head weights) and sit at ``values``."""
    designer = AugmentationDesigner(normalize=False)
    p = len(PARAM_NAMES)
    with torch.no_grad():
        designer.head.weight.zero_()
        if values:
            mean = designer.default.clone()
            for name, v in values.items():
                mean[PARAM_NAMES.index(name)] = v
            designer.head.bias[:p] = designer.raw_of(mean)
    return designer


def test_augmentation_designer_shapes_and_gradients() -> None:
    torch.manual_seed(0)
    x = _images(2, 40)
    designer = AugmentationDesigner(CropsConfig(), view="global2")
    views, params = designer(x, 24, generator=torch.Generator().manual_seed(0))
    assert views.shape == (2, 3, 24, 24)
    for name in PARAM_NAMES:
        assert params[name].shape == (2,)
    assert params["raw_mean"].shape == params["raw_std"].shape == (2, len(PARAM_NAMES))
    loss = (views * torch.randn_like(views)).mean() + designer.penalty(params)
    loss.backward()
    _assert_all_grads(designer)


def test_augmentation_designer_noise_and_parameter_sensitivity() -> None:
    torch.manual_seed(0)
    x = _images(2, 32)
    designer = AugmentationDesigner(normalize=False)
    a, _ = designer(x, 24, generator=torch.Generator().manual_seed(0))
    b, _ = designer(x, 24, generator=torch.Generator().manual_seed(1))
    assert (a - b).abs().mean() > 1e-3  # reparameterised noise: different calls, different views
    base, _ = designer(x, 24, sample=False)
    with torch.no_grad():
        designer.head.bias.add_(0.5)
    moved, _ = designer(x, 24, sample=False)
    assert (base - moved).abs().mean() > 1e-3


def test_augmentation_designer_hue() -> None:
    x = _images(2, 32)
    identity = {"scale": 1.0, "log_aspect": 0.0, "brightness": 1.0, "contrast": 1.0,
                "saturation": 1.0, "blur_sigma": 0.1, "grayscale": 0.0, "solarize": 0.0}
    v0, p0 = _fixed_designer({**identity, "hue": 0.0})(x, 32, sample=False)
    v1, p1 = _fixed_designer({**identity, "hue": 0.1})(x, 32, sample=False)
    assert p0["hue"].abs().max() < 1e-6 and p1["hue"].min() > 0.099
    assert torch.allclose(v0, x, atol=5e-3)  # ≈ identity (bounds are clipped by 1e-3)
    assert (v1 - v0).abs().mean() > 1e-2


def test_augmentation_regulariser_minimal_at_dino_defaults() -> None:
    torch.manual_seed(0)
    x = _images(2, 32)
    designer = _fixed_designer()
    _, params = designer(x, 24)
    at_default = designer.penalty(params, lambda_entropy=0.0)
    assert at_default.item() < 1e-5
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        moved = dict(params)
        moved["raw_mean"] = params["raw_mean"] + 0.5 * torch.randn(
            params["raw_mean"].shape, generator=gen)
        assert designer.penalty(moved, lambda_entropy=0.0) > at_default
    # the entropy term rewards noise in the drawn values: a larger std (same draws)
    # lowers the regulariser ...
    eps = (params["raw"] - params["raw_mean"]) / params["raw_std"]

    def drawn(raw_mean: torch.Tensor, raw_std: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**params, "raw_mean": raw_mean, "raw_std": raw_std, "raw": raw_mean + raw_std * eps}

    base = drawn(torch.zeros_like(eps), torch.full_like(eps, 0.5))
    wider = drawn(torch.zeros_like(eps), torch.full_like(eps, 0.75))
    assert designer.penalty(wider, lambda_prior=0.0) < designer.penalty(base, lambda_prior=0.0)
    # ... and a mean deep in the sigmoid's tail, where the same std moves the drawn value
    # by almost nothing, counts as (much) less entropy: exactly, log std + E log σ'(z)
    tail = drawn(torch.full_like(eps, 6.0), torch.full_like(eps, 0.5))
    reg_base = designer.penalty(base, lambda_prior=0.0)
    reg_tail = designer.penalty(tail, lambda_prior=0.0)
    z = tail["raw"]
    expected = -(math.log(0.5) + (torch.sigmoid(z) * torch.sigmoid(-z)).log()).mean()
    assert torch.allclose(reg_tail, expected * 0.01, rtol=1e-5)
    assert reg_tail - reg_base > 0.01 * 4.0  # ≥ 4 nats less entropy per parameter


def test_augmentation_defaults_follow_crops_config() -> None:
    cfg = CropsConfig()
    d1 = AugmentationDesigner(cfg, view="global1")
    d2 = AugmentationDesigner(cfg, view="global2")
    dl = AugmentationDesigner(cfg, view="local")
    i = PARAM_NAMES.index
    assert d1.default[i("solarize")] == 0.0
    assert d2.default[i("solarize")] == pytest.approx(cfg.solarize_prob_global2)
    assert d1.default[i("grayscale")] == pytest.approx(cfg.grayscale_prob)
    assert d1.default[i("blur_sigma")] == pytest.approx(sum(cfg.blur_sigma) / 2)
    assert dl.lo[i("scale")] == pytest.approx(cfg.local_crops_scale[0])
    assert d1.lo[i("hue")] == pytest.approx(-cfg.hue)
    assert d1.default[i("log_aspect")] == 0.0 and math.isclose(
        float(d1.lo[i("log_aspect")]), math.log(3 / 4), rel_tol=1e-6)
