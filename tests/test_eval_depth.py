"""NYUv2 depth evaluation: head and losses against hand-computed values, and the CLI end to end.

The CLI runs on a synthetic NYUv2 layout (``write_layout(..., "nyu")``, 32x32 images) with
tiny backbones (D=32, 2 blocks, 2 heads) from each source a user has: an official DINOv2
file, an official DINOv3 file and a checkpoint of our trainer. Thresholds for "the head
learns" were measured (trained ~1.85 m RMSE, untrained ~2.85 m, train-mean ~2.55 m) and
carry a margin.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from official_layouts import dinov2_official, dinov3_official, randomise_

from dinov.config import ModelConfig, load_config
from dinov.data.synthetic import write_layout
from dinov.metrics import DEPTH_METRIC_NAMES
from dinov.models import build_backbone
from eval.common import build_eval_backbone
from eval.depth import DepthEvalConfig, main, score
from eval.heads import (
    LinearDepthHead,
    bin_centers,
    decode_bins,
    l1_loss,
    layer_indices,
    multilayer_features,
    sig_loss,
)

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}
SMALL_RUN = [
    "data.num_workers=0", "data.batch_size=16", "train.precompute=true",
    "train.iterations=120", "train.batch_size=8", "train.lr=1e-2", "train.warmup_iters=10",
    "train.log_every=40", "eval.num_plot=2", "head.n_layers=2",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def nyu(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nyu")
    write_layout(root, "nyu", n=40, seed=0, size=32)  # 32 train, 8 test
    return root


def tiny_source(arch: str, img_size: int, seed: int = 0):
    """A tiny backbone with every parameter randomised (so all of them matter)."""
    cfg = ModelConfig(arch=arch, img_size=img_size, **TINY)
    backbone = build_backbone(cfg).eval()
    randomise_(backbone, seed)
    return backbone


def model_args(arch: str, img_size: int) -> list[str]:
    return [f"model.arch={arch}", f"model.img_size={img_size}"] + [
        f"model.{k}={v}" for k, v in TINY.items()
    ]


def check_run(out: Path, results: dict) -> None:
    """The run's files exist and hold finite metrics that beat the train-mean predictor."""
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    for name in DEPTH_METRIC_NAMES:
        assert math.isfinite(results[name]), name
    assert results["num_images"] == 8 and results["num_images_scored"] == 8
    assert results["rmse"] < 0.9 * results["baseline_train_mean"]["rmse"]
    for name in ("config.yaml", "predictions.png", "loss.png", "metrics.jsonl", "head.pt"):
        assert (out / name).is_file(), name


# ------------------------------------------------------------------------ losses


def test_sig_loss_matches_hand_computed_value():
    pred, target = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 1.0, 1.0])
    g = [0.0, math.log(2), math.log(4)]
    mean, mean_sq = sum(g) / 3, sum(x * x for x in g) / 3
    expected = math.sqrt(mean_sq - 0.85 * mean**2)
    assert sig_loss(pred, target, eps=0.0).item() == pytest.approx(expected, rel=1e-6)
    # DINOv2's form: unbiased var + 0.15 mean^2, equal up to the N/(N-1) factor of var.
    var_unbiased = sum((x - mean) ** 2 for x in g) / 2
    dinov2 = math.sqrt(var_unbiased * 2 / 3 + 0.15 * mean**2)
    assert sig_loss(pred, target, eps=0.0).item() == pytest.approx(dinov2, rel=1e-6)
    # Warm-up keeps only the global-scale term.
    warm = math.sqrt(0.15) * abs(mean)
    assert sig_loss(pred, target, eps=0.0, warm_up=True).item() == pytest.approx(warm, rel=1e-6)


def test_sig_loss_zero_at_target_and_scale_invariance():
    target = torch.linspace(0.5, 9.0, 50).reshape(5, 10)
    pred = target.clone().requires_grad_(True)
    loss = sig_loss(pred, target)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().max() == 0
    scaled = 2.5 * target
    # lambda = 1: fully scale-invariant; lambda = 0.85: sqrt(0.15) |log c| remains.
    invariant = sig_loss(scaled, target, eps=0.0, variance_focus=1.0)
    assert invariant.item() == pytest.approx(0, abs=1e-5)
    expected = math.sqrt(0.15) * math.log(2.5)
    assert sig_loss(scaled, target, eps=0.0).item() == pytest.approx(expected, rel=1e-5)


def test_losses_respect_the_valid_mask_and_stay_finite():
    target = torch.tensor([[1.0, 2.0, 0.0, 3.0]])
    pred = torch.tensor([[1.5, 2.0, 7.0, 1.0]], requires_grad=True)
    assert l1_loss(pred, target).item() == pytest.approx((0.5 + 0.0 + 2.0) / 3)  # 0 = missing
    valid = torch.tensor([[True, True, False, False]])
    assert l1_loss(pred, target, valid).item() == pytest.approx(0.25)
    none = torch.zeros_like(valid)
    for loss in (sig_loss(pred, target, none), l1_loss(pred, target, none)):
        assert loss.item() == 0.0
        loss.backward()  # still part of the graph
    near_zero = torch.full((4,), 1e-3, requires_grad=True)
    sig_loss(near_zero, torch.full((4,), 5.0) + torch.arange(4.0)).backward()
    assert torch.isfinite(near_zero.grad).all()


# ------------------------------------------------------------------------ head


def test_decode_bins_hand_computed():
    centers = bin_centers(3, 1.0, 3.0)
    assert centers.tolist() == [1.0, 2.0, 3.0]
    logits = torch.tensor([1.9, 0.0, -5.0]).view(1, 3, 1, 1)
    # linear: relu + 0.1 -> [2.0, 0.1, 0.1] / 2.2
    assert decode_bins(logits, centers).item() == pytest.approx((2.0 + 0.2 + 0.3) / 2.2, rel=1e-6)
    logits = torch.tensor([0.0, math.log(2.0), math.log(5.0)]).view(1, 3, 1, 1)
    # softmax: [1, 2, 5] / 8
    assert decode_bins(logits, centers, "softmax").item() == pytest.approx(20 / 8, rel=1e-6)
    # The default head spans DINOv2's 256 uniform bins over [1e-3, 10] m.
    head = LinearDepthHead(8)
    assert head.centers.shape == (256,) and head.centers[0] == pytest.approx(1e-3)
    assert head.centers[-1] == pytest.approx(10.0)


def test_head_conv_before_upsampling_equals_dinov2_order():
    torch.manual_seed(0)
    head = LinearDepthHead(12, n_bins=16, upsample=4).eval()
    feats, cls = torch.randn(2, 8, 3, 5), torch.randn(2, 4)
    full = torch.cat([feats, cls[:, :, None, None].expand(-1, -1, 3, 5)], dim=1)
    # DINOv2 upsamples the features, then applies the 1x1 conv and decodes.
    up = F.interpolate(full, scale_factor=4, mode="bilinear", align_corners=False)
    reference = decode_bins(head.conv(up), head.centers)
    torch.testing.assert_close(head(feats, cls), reference, atol=1e-5, rtol=1e-5)
    depth = head.predict(feats, cls, patch_size=4, image_size=(10, 18), out_size=(20, 36))
    assert depth.shape == (2, 20, 36)
    assert (depth >= 1e-3).all() and (depth <= 10.0).all()
    regression = LinearDepthHead(12, mode="regression")
    assert (regression(feats, cls) >= 1e-3).all()


def test_layer_indices_follow_dinov2():
    assert layer_indices(12, 4) == [2, 5, 8, 11]
    assert layer_indices(24, 4) == [4, 11, 17, 23]
    assert layer_indices(40, 4) == [9, 19, 29, 39]
    assert layer_indices(12, 1) == [11]
    assert layer_indices(12, 4, "last") == [8, 9, 10, 11]
    with pytest.raises(ValueError, match="3 layers from a backbone with 2 blocks"):
        layer_indices(2, 3)


def test_multilayer_features_match_the_backbone():
    backbone = tiny_source("vit_small_patch14_dinov2", 28)
    x = torch.randn(2, 3, 30, 44)
    with torch.no_grad():
        feats, cls = multilayer_features(backbone, x, [0, 1])
        out = backbone(x)
    h, w = out.grid
    assert feats.shape == (2, 64, h, w) and cls.shape == (2, 64)
    last = out.patch.transpose(1, 2).reshape(2, 32, h, w)
    torch.testing.assert_close(feats[:, 32:], last)
    torch.testing.assert_close(cls[:, 32:], out.cls)


# ------------------------------------------------------------------------ evaluation


def test_eigen_crop_ignores_pixels_outside_it():
    gen = torch.Generator().manual_seed(0)
    depth = 0.5 + 9 * torch.rand(3, 48, 64, generator=gen)
    pred = 0.5 + 9 * torch.rand(3, 48, 64, generator=gen)
    changed = pred.clone()
    changed[:, :4] = 9.9  # rows above the crop (45/480 of the height)
    changed[:, :, :3] = 0.1  # columns left of it (41/640 of the width)
    cfg = DepthEvalConfig()
    before, after = score(pred, depth, cfg), score(changed, depth, cfg)
    for name in DEPTH_METRIC_NAMES:
        torch.testing.assert_close(before[name], after[name])
    cfg.eval.eigen_crop = False
    assert not torch.allclose(score(pred, depth, cfg)["rmse"], score(changed, depth, cfg)["rmse"])


def test_missing_split_file_names_the_path(nyu, tmp_path, capsys):
    args = [f"data.root={nyu}", "data.test_split=missing.txt", f"output_dir={tmp_path}"]
    with pytest.raises(SystemExit) as exit_info:
        main(args + SMALL_RUN)
    assert exit_info.value.code == 1
    assert re.search(r"data\.test_split.*missing\.txt", capsys.readouterr().err)
    with pytest.raises(SystemExit) as exit_info:
        main([f"data.root={nyu}", "head.mode=classes"])
    assert exit_info.value.code == 2


def test_head_learns_depth(nyu, tmp_path):
    cache = tmp_path / "cache"
    args = [f"data.root={nyu}", f"data.cache_dir={cache}",
            *model_args("vit_small_patch14_dinov2", 28), *SMALL_RUN]
    untrained = main(args + [f"output_dir={tmp_path / 'untrained'}", "train.iterations=0"])
    (cache_file,) = cache.glob("nyu_train_*.pt")  # the second run reads the train features
    stamp = cache_file.stat().st_mtime_ns
    trained = main(args + [f"output_dir={tmp_path / 'trained'}"])
    assert cache_file.stat().st_mtime_ns == stamp and len(list(cache.iterdir())) == 1
    baseline = trained["baseline_train_mean"]["rmse"]
    assert trained["rmse"] < 0.75 * untrained["rmse"]
    assert trained["rmse"] < 0.85 * baseline
    assert trained["d1"] > untrained["d1"] + 10
    losses = [json.loads(line)["loss"] for line in (tmp_path / "trained/metrics.jsonl").open()]
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------ backbone sources


def test_official_dinov2_checkpoint(nyu, tmp_path):
    source = tiny_source("vit_small_patch14_dinov2", 28, seed=1)
    path = tmp_path / "dinov2_tiny.pth"
    torch.save(dinov2_official(source), path)
    model = model_args("vit_small_patch14_dinov2", 28) + [
        f"model.weights={path}", "model.weights_format=dinov2"]
    out = tmp_path / "run"
    results = main([f"data.root={nyu}", f"output_dir={out}", *model, *SMALL_RUN])
    check_run(out, results)
    cfg = load_config(out / "config.yaml", schema=DepthEvalConfig)
    assert cfg.model.weights == str(path) and cfg.train.iterations == 120
    # The evaluated backbone is the source one.
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        loaded = build_eval_backbone(cfg.model)(x).patch
        torch.testing.assert_close(loaded, source(x).patch, atol=1e-5, rtol=0)


def test_official_dinov3_checkpoint_regression_l1(nyu, tmp_path):
    source = tiny_source("vit_small_patch16_dinov3", 32, seed=2)
    path = tmp_path / "dinov3_tiny.pth"
    torch.save(dinov3_official(source), path)
    model = model_args("vit_small_patch16_dinov3", 32) + [
        f"model.weights={path}", "model.weights_format=dinov3"]
    out = tmp_path / "run"
    results = main([f"data.root={nyu}", f"output_dir={out}", *model, *SMALL_RUN,
                    "head.mode=regression", "loss.name=l1", "eval.flip_tta=false"])
    check_run(out, results)
    assert results["flip_tta"] is False


def test_our_trainer_checkpoint_teacher_and_student(nyu, tmp_path):
    from dinov.train.trainer import Trainer

    run_dir = tmp_path / "pretrain"
    cfg = load_config("configs/smoke.yaml", [
        f"output_dir={run_dir}", "train.steps=4", "probe.enabled=false", "train.plots=false",
        "data.num_samples=16", "data.batch_size=8"])
    Trainer(cfg).fit()
    ckpt = run_dir / "checkpoints" / "checkpoint_00000004.pt"
    assert ckpt.is_file()
    out = tmp_path / "teacher"
    teacher = main([f"data.root={nyu}", f"output_dir={out}", f"model.weights={ckpt}",
                    *SMALL_RUN, "head.n_layers=4"])
    check_run(out, teacher)
    assert teacher["blocks"] == [0, 1, 2, 3]  # smoke.yaml's 4-block ViT, read from the file
    assert teacher["backbone"]["embed_dim"] == 64 and teacher["backbone"]["patch_size"] == 8
    assert teacher["feature_dim"] == 4 * 64 * 2
    # The student, with the backbone run on every batch instead of precomputed features.
    student = main([f"data.root={nyu}", f"output_dir={tmp_path / 'student'}",
                    f"model.weights={ckpt}", "model.weights_key=student", *SMALL_RUN,
                    "train.precompute=false", "train.iterations=30", "eval.num_plot=0"])
    assert math.isfinite(student["rmse"]) and student["rmse"] != teacher["rmse"]
