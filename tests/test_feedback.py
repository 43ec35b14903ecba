"""Feedback pools, heads and g_down (designers/vision/feedback.py) on a tiny CPU ViT, and the
random-feedback control's direction (designers/meta.py)."""

from __future__ import annotations

import dataclasses
import math
import pathlib

import pytest
import torch

from designers.meta import MetaCore, random_direction
from designers.vision.config import FeedbackConfig
from designers.vision.feedback import (
    FEEDBACK_INDEX_OFFSET,
    FeedbackHeads,
    FeedbackPools,
    downstream_gradient_and_loss,
    downstream_loss,
    feedback_losses,
)
from designers.vision.value import backbone_aligned_parameters as aligned_parameters
from dinov.config import load_config
from dinov.data.synthetic import render_scenes, write_layout
from dinov.models import Backbone, build_backbone
from eval.heads import backbone_feature_map

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = 32


def downstream_gradient(*args: object) -> list[torch.Tensor]:
    return downstream_gradient_and_loss(*args)[0]  # type: ignore[arg-type]


def tiny_backbone() -> Backbone:
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    return build_backbone(cfg.model)


def tiny_cfg(**overrides: object) -> FeedbackConfig:
    base = dict(
        image_size=SIZE, synthetic_head_pool=32, synthetic_meta_pool=16, head_lr=1e-2,
        head_batch_size=16, meta_batch_size=8, head_steps=5, depth_n_bins=32, seed=3,
    )  # fmt: skip
    base.update(overrides)
    return FeedbackConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return tiny_backbone()


@pytest.fixture(scope="module")
def pools() -> FeedbackPools:
    return FeedbackPools(tiny_cfg())


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()
            if isinstance(v, torch.Tensor)}  # fmt: skip


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def rows(images: torch.Tensor) -> set[bytes]:
    return {img.numpy().tobytes() for img in images}


def test_pools_disjoint_and_deterministic(pools: FeedbackPools) -> None:
    again = FeedbackPools(tiny_cfg())
    for task in ("seg", "depth"):
        for name in ("head", "meta"):
            assert torch.equal(getattr(pools, task)[name].images, getattr(again, task)[name].images)
            assert torch.equal(getattr(pools, task)[name].targets, getattr(again, task)[name].targets)
        assert not rows(getattr(pools, task)["head"].images) & rows(getattr(pools, task)["meta"].images)
    assert len(pools.seg["head"]) == 32 and len(pools.seg["meta"]) == 16
    # Feedback scenes come from the reserved index range, never the pretraining one (0..).
    expected = render_scenes(2, SIZE, 3, FEEDBACK_INDEX_OFFSET).images
    assert torch.equal(pools.seg["head"].images[:2], (expected * 255).round().to(torch.uint8))
    pretrain = (render_scenes(64, SIZE, 3).images * 255).round().to(torch.uint8)
    assert not rows(pretrain) & rows(pools.seg["head"].images)
    # Labels: synthetic 1..10 -> 0..9; batches are deterministic given the generator.
    assert int(pools.seg["head"].targets.max()) <= 9
    b1 = pools.sample("meta", 8, torch.Generator().manual_seed(1))
    b2 = pools.sample("meta", 8, torch.Generator().manual_seed(1))
    assert torch.equal(b1.seg_images, b2.seg_images) and b1.depth_images is b1.seg_images
    assert b1.seg_labels.dtype == torch.long and b1.depth.shape == (8, SIZE, SIZE)


def test_seg_features_match_backbone_feature_map(backbone: Backbone, pools: FeedbackPools) -> None:
    from designers.vision.feedback import _features

    batch = pools.sample("head", 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = _features(backbone, batch, [backbone.num_blocks - 1])["seg"]
        ref = backbone_feature_map(backbone, batch.seg_images, 1)
    torch.testing.assert_close(ours, ref)


def test_fit_lowers_head_losses(backbone: Backbone, pools: FeedbackPools) -> None:
    heads = FeedbackHeads(backbone, tiny_cfg(), pools.num_classes)
    batch = pools.sample("head", 32, torch.Generator().manual_seed(0))
    before = {k: float(v.detach()) for k, v in feedback_losses(backbone, heads, batch).items()}
    params = snapshot(backbone)
    heads.fit(backbone, pools, steps=40)
    after = {k: float(v.detach()) for k, v in feedback_losses(backbone, heads, batch).items()}
    assert after["seg"] < 0.8 * before["seg"], (before, after)
    assert after["depth"] < 0.8 * before["depth"], (before, after)
    assert_bitwise_equal(params, snapshot(backbone))
    assert all(p.grad is None for p in backbone.parameters())
    # The optimizer state is part of the heads' state_dict and restores.
    state = heads.state_dict()
    clone = FeedbackHeads(backbone, tiny_cfg(), pools.num_classes)
    clone.load_state_dict(state)
    assert clone.fit_steps == 40
    opt_a, opt_b = heads.optimizer.state_dict()["state"], clone.optimizer.state_dict()["state"]
    assert opt_a.keys() == opt_b.keys() and len(opt_a) > 0
    for k in opt_a:
        assert torch.equal(opt_a[k]["exp_avg"], opt_b[k]["exp_avg"])


def test_first_fit_takes_the_warmup_steps(backbone: Backbone, pools: FeedbackPools) -> None:
    cfg = tiny_cfg(head_warmup_steps=7, head_steps=2)
    torch.manual_seed(0)  # the heads' initialisation
    heads = FeedbackHeads(backbone, cfg, pools.num_classes)
    heads.fit(backbone, pools)
    assert heads.fit_steps == 7
    heads.fit(backbone, pools)
    assert heads.fit_steps == 9
    # the same steps taken one call at a time land on the same heads: warm-up is only
    # the first call's step count, nothing else changes
    torch.manual_seed(0)
    stepwise = FeedbackHeads(backbone, tiny_cfg(head_steps=1), pools.num_classes)
    for _ in range(9):
        stepwise.fit(backbone, pools)
    for (name, a), b in zip(heads.state_dict().items(), stepwise.state_dict().values(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="head_warmup_steps"):
        tiny_cfg(head_warmup_steps=-1)


@pytest.fixture(scope="module")
def fitted(backbone: Backbone, pools: FeedbackPools) -> FeedbackHeads:
    heads = FeedbackHeads(backbone, tiny_cfg(), pools.num_classes)
    heads.fit(backbone, pools, steps=10)
    return heads


def meta_batch(pools: FeedbackPools):  # noqa: ANN201
    return pools.sample("meta", 8, torch.Generator().manual_seed(5))


def test_g_down_shapes_finite_and_nothing_changes(
    backbone: Backbone, pools: FeedbackPools, fitted: FeedbackHeads
) -> None:
    params = aligned_parameters(backbone, 2)
    n_expected = sum(1 for b in list(backbone.model.blocks)[-2:] for _ in b.parameters()) + 2
    assert len(params) == n_expected
    backbone.train()
    fitted.train()
    before_b, before_h = snapshot(backbone), snapshot(fitted)
    g = downstream_gradient(backbone, fitted, meta_batch(pools), params, tiny_cfg())
    assert [t.shape for t in g] == [p.shape for p in params]
    assert all(torch.isfinite(t).all() for t in g)
    assert sum(float(t.norm()) for t in g) > 0
    assert all(not t.requires_grad for t in g)
    assert_bitwise_equal(before_b, snapshot(backbone))
    assert_bitwise_equal(before_h, snapshot(fitted))  # BN running stats included
    assert all(p.grad is None for p in backbone.parameters())
    assert backbone.training and fitted.training  # modes restored
    # L_down from the same forward is alpha_seg * L_seg + alpha_depth * L_depth
    cfg = tiny_cfg(alpha_seg=2.0)
    _, l_down = downstream_gradient_and_loss(backbone, fitted, meta_batch(pools), params, cfg)
    with torch.no_grad():
        losses = feedback_losses(backbone, fitted, meta_batch(pools))
    expected = 2.0 * float(losses["seg"]) + cfg.alpha_depth * float(losses["depth"])
    assert float(l_down) == pytest.approx(expected, rel=1e-6)


def flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def test_random_mode_same_norm_near_orthogonal(
    backbone: Backbone, pools: FeedbackPools, fitted: FeedbackHeads
) -> None:
    params = aligned_parameters(backbone, 2)
    batch = meta_batch(pools)
    g_down = downstream_gradient(backbone, fitted, batch, params, tiny_cfg())
    real = flat(g_down)
    r1 = flat(random_direction(g_down, torch.Generator().manual_seed(7)))
    r1b = flat(random_direction(g_down, torch.Generator().manual_seed(7)))
    torch.testing.assert_close(r1, r1b)  # seeded
    torch.testing.assert_close(r1.norm(), real.norm(), rtol=1e-5, atol=0)
    assert abs(float(torch.nn.functional.cosine_similarity(r1, real, dim=0))) < 0.05
    # The control's generator advances: a fresh direction every meta step.
    core = MetaCore(torch.nn.Linear(2, 2), every=1, burn_in=0, lr=1e-3, feedback_mode="random")
    r2, r3 = flat(core.direction(g_down)), flat(core.direction(g_down))
    assert abs(float(torch.nn.functional.cosine_similarity(r2, r3, dim=0))) < 0.05
    real_core = MetaCore(torch.nn.Linear(2, 2), every=1, burn_in=0, lr=1e-3)
    assert real_core.direction(g_down) is g_down


def test_alpha_depth_zero_is_seg_only_gradient(
    backbone: Backbone, pools: FeedbackPools, fitted: FeedbackHeads
) -> None:
    params = aligned_parameters(backbone, 2)
    batch = meta_batch(pools)
    g = downstream_gradient(backbone, fitted, batch, params, tiny_cfg(alpha_depth=0.0))
    fitted.eval()
    seg = feedback_losses(backbone, fitted, batch)["seg"]
    ref = torch.autograd.grad(seg, params)
    for a, b in zip(g, ref, strict=True):
        torch.testing.assert_close(a, b)
    both = downstream_gradient(backbone, fitted, batch, params, tiny_cfg(alpha_seg=2.0))
    depth_only = downstream_gradient(backbone, fitted, batch, params, tiny_cfg(alpha_seg=0.0))
    torch.testing.assert_close(flat(both), 2.0 * flat(g) + flat(depth_only), rtol=1e-4, atol=1e-7)


def test_real_source_from_layouts(tmp_path: pathlib.Path, backbone: Backbone) -> None:
    write_layout(tmp_path / "ade", "ade20k", 14, seed=1, size=40)
    write_layout(tmp_path / "nyu", "nyu", 10, seed=2, size=40)
    cfg = dataclasses.replace(
        tiny_cfg(), source="real", ade20k_root=str(tmp_path / "ade"),
        nyu_split_file=str(tmp_path / "nyu" / "nyu_train.txt"),
        seg_head_pool=6, seg_meta_pool=3, depth_head_pool=4, depth_meta_pool=2,
    )  # fmt: skip
    pools = FeedbackPools(cfg)
    assert pools.num_classes == 150
    assert not rows(pools.seg["head"].images) & rows(pools.seg["meta"].images)
    assert not rows(pools.depth["head"].images) & rows(pools.depth["meta"].images)
    again = FeedbackPools(cfg)
    assert torch.equal(pools.depth["meta"].targets, again.depth["meta"].targets)
    heads = FeedbackHeads(backbone, cfg, pools.num_classes)
    heads.fit(backbone, pools, steps=2)
    batch = pools.sample("meta", 2, torch.Generator().manual_seed(0))
    assert batch.depth_images is not batch.seg_images
    g = downstream_gradient(backbone, heads, batch, aligned_parameters(backbone, 2), cfg)
    assert all(torch.isfinite(t).all() for t in g) and float(flat(g).norm()) > 0
    with pytest.raises(ValueError, match="cannot fill"):
        FeedbackPools(dataclasses.replace(cfg, seg_head_pool=100))


def test_shards_cover_the_batch_and_average_to_its_gradient(
        backbone: Backbone, pools: FeedbackPools, fitted: FeedbackHeads) -> None:
    """What each DDP rank does with its share: the shards are the batch's rows in order,
    and with a loss that is a mean over equally many pixels per image (seg, no ignored
    pixels; eval-mode BN is per image) the mean of the shards' g_down is the batch's."""
    batch = meta_batch(pools)
    shards = [batch.shard(r, 2) for r in range(2)]
    assert all(s.depth_images is s.seg_images for s in shards)  # shared trunk kept
    for name in ("seg_images", "seg_labels", "depth"):
        assert torch.equal(torch.cat([getattr(s, name) for s in shards]), getattr(batch, name))
    assert not (batch.seg_labels == 255).any()
    cfg = tiny_cfg(alpha_depth=0.0)
    aligned = aligned_parameters(backbone, 2)
    whole, whole_loss = downstream_gradient_and_loss(backbone, fitted, batch, aligned, cfg)
    parts = [downstream_gradient_and_loss(backbone, fitted, s, aligned, cfg) for s in shards]
    mean = [(a + b) / 2 for a, b in zip(parts[0][0], parts[1][0], strict=True)]
    torch.testing.assert_close(flat(mean), flat(whole), rtol=1e-4, atol=1e-7)
    assert math.isclose(float(parts[0][1] + parts[1][1]) / 2, float(whole_loss), rel_tol=1e-5)
    assert math.isclose(float(downstream_loss(backbone, fitted, batch, cfg)), float(whole_loss),
                        rel_tol=1e-6)
    for world in (3, 9):  # 8 rows: not shared equally
        with pytest.raises(ValueError, match="multiples of"):
            batch.shard(0, world)
