"""ADE20K segmentation eval (``eval.segmentation``) and its reusable head (``eval.heads``).

Fixtures are tiny on purpose: synthetic scenes written in the real ADE20K layout at
32 px, backbones with D=32, 2 blocks and 8 px patches (4x4 patch grids). The CLI runs end
to end from an official DINOv2 file, an official DINOv3 file, a timm state dict and our
trainer's checkpoint (teacher and student).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from official_layouts import dinov2_official, dinov3_official

import eval  # noqa: F401  (installs the torchvision shim before timm is imported)
from dinov.config import ModelConfig, load_config
from dinov.data.synthetic import NUM_CLASSES, write_layout
from dinov.models import build_backbone
from eval.heads import LinearBNSegHead, backbone_feature_map, normalize, seg_loss, upsample_logits
from eval.segmentation import (
    AugmentedCrops,
    SegInferenceConfig,
    SegTrainConfig,
    augment_pair,
    main,
    poly_lr,
    predict_probs,
    window_starts,
)

SIZE = 32
TINY = {"img_size": SIZE, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
DINOV2, DINOV3 = "vit_small_patch14_dinov2", "vit_small_patch16_dinov3"
PNGS = ("per_class_iou.png", "predictions.png", "loss.png")


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ade")
    write_layout(root, "ade20k", n=40, seed=0, size=SIZE)  # 32 training, 8 validation
    return root


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_backbone(ModelConfig(arch=arch, **TINY)).eval()


def model_args(arch: str, weights: Path | None, fmt: str = "auto") -> list[str]:
    args = [f"model.arch={arch}", f"model.weights_format={fmt}"]
    args += [f"model.{k}={v}" for k, v in TINY.items()]
    return args + [f"model.weights={weights}" if weights else "model.weights=null"]


def run_cli(out: Path, root: Path, *extra: str) -> dict:
    """The CLI with a small, fast override set (no augmentation: cached features)."""
    argv = [
        "--config", "configs/eval/segmentation.yaml", f"output_dir={out}", f"data.root={root}",
        f"data.image_size={SIZE}", f"data.num_classes={NUM_CLASSES}", "data.num_workers=0",
        "train.iterations=100", "train.warmup_iters=10", "train.augment=false",
        "train.log_every=25", "inference.mode=resize", "inference.batch_size=16",
        f"cache_dir={out.parent / 'cache'}", "num_vis=2", *extra,
    ]  # fmt: skip
    main(argv)
    return json.loads((out / "results.json").read_text())


def assert_sane(out: Path, results: dict, min_miou: float = 0.0) -> None:
    assert results["num_images"] == 8 and results["num_train_images"] == 32
    assert min_miou <= results["miou"] <= 100.0
    assert 0.0 <= results["aacc"] <= 100.0 and 0.0 <= results["macc"] <= 100.0
    assert sorted(results["per_class_iou"], key=int) == [str(k) for k in range(NUM_CLASSES)]
    # The synthetic scenes always contain wall and floor, so those IoUs are defined.
    assert results["per_class_iou"]["0"] is not None and results["per_class_iou"]["1"] is not None
    for name in (*PNGS, "config.yaml", "metrics.jsonl", "head.pt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name


# ----------------------------------------------------------------------------- CLI


def test_official_dinov2_file_matches_timm_file_and_head_learns(ade_root, tmp_path):
    # seed 5: not the weights the CLI itself would initialise (it seeds 0), so a silently
    # skipped load could not pass.
    backbone = tiny_model(DINOV2, seed=5)
    torch.save(dinov2_official(backbone), tmp_path / "dinov2.pth")
    torch.save(backbone.model.state_dict(), tmp_path / "timm.pth")
    official = run_cli(tmp_path / "a", ade_root, *model_args(DINOV2, tmp_path / "dinov2.pth", "dinov2"))
    assert_sane(tmp_path / "a", official)
    # The same weights through the timm loader give the very same numbers.
    timm = run_cli(tmp_path / "b", ade_root, *model_args(DINOV2, tmp_path / "timm.pth", "timm"))
    assert timm["miou"] == official["miou"] and timm["aacc"] == official["aacc"]
    # An untrained head on the same backbone is near chance; measured 21.2 vs 1.8 mIoU.
    untrained = run_cli(tmp_path / "c", ade_root, "train.iterations=0",
                        *model_args(DINOV2, tmp_path / "dinov2.pth", "dinov2"))
    assert official["miou"] > 14.0 and official["aacc"] > 50.0
    assert untrained["miou"] < 6.0
    assert official["miou"] > untrained["miou"] + 10.0


def test_feature_cache_is_written_and_reused(ade_root, tmp_path):
    first = run_cli(tmp_path / "a", ade_root, *model_args(DINOV2, None))
    cached = list((tmp_path / "cache").glob("seg_train_*.pt"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    second = run_cli(tmp_path / "b", ade_root, *model_args(DINOV2, None))
    assert cached[0].stat().st_mtime_ns == stamp  # loaded, not rewritten
    assert second["miou"] == first["miou"]


def test_official_dinov3_file(ade_root, tmp_path):
    torch.save(dinov3_official(tiny_model(DINOV3, seed=5)), tmp_path / "dinov3.pth")
    out = tmp_path / "run"
    results = run_cli(out, ade_root, *model_args(DINOV3, tmp_path / "dinov3.pth", "dinov3"))
    assert_sane(out, results, min_miou=10.0)


@pytest.fixture(scope="module")
def trainer_checkpoint(tmp_path_factory) -> Path:
    from dinov.train.trainer import Trainer

    out = tmp_path_factory.mktemp("trainer")
    cfg = load_config("configs/smoke.yaml", [
        f"output_dir={out}", "train.steps=4", "probe.enabled=false", "train.plots=false",
        "data.num_samples=32", "data.batch_size=8",
    ])  # fmt: skip
    Trainer(cfg).fit()
    return out / "checkpoints" / "checkpoint_00000004.pt"


@pytest.mark.parametrize("key", ["teacher", "student"])
def test_our_trainer_checkpoint(ade_root, trainer_checkpoint, tmp_path, key):
    # The architecture (D=64, 4 blocks, 8 px patches) comes from the checkpoint's config.
    out = tmp_path / key
    results = run_cli(out, ade_root, f"model.weights={trainer_checkpoint}",
                      f"model.weights_key={key}", "head.n_last_blocks=2")
    assert_sane(out, results, min_miou=10.0)
    head = torch.load(out / "head.pt", weights_only=True)
    assert head["in_dim"] == 2 * 64 and head["n_last_blocks"] == 2


def test_augmented_training_runs_the_backbone_per_batch(ade_root, tmp_path):
    out = tmp_path / "aug"
    results = run_cli(out, ade_root, *model_args(DINOV2, None), "train.augment=true",
                      "train.iterations=4", "train.batch_size=4", "train.log_every=2",
                      "inference.mode=slide", "inference.stride=16")
    assert_sane(out, results)
    assert not (tmp_path / "cache").exists()  # nothing cached with augmentation
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]


def test_missing_root_names_the_path(tmp_path, capsys):
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(SystemExit) as exc:
        main([f"output_dir={tmp_path / 'out'}", f"data.root={missing}"])
    assert exc.value.code == 1  # a missing file (a config error exits 2)
    assert str(missing) in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([f"output_dir={tmp_path / 'out'}"])  # no data.root at all
    assert "data.root" in capsys.readouterr().err


def test_bad_inference_mode_is_a_config_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([f"data.root={tmp_path}", "inference.mode=sliding"])
    assert "inference.mode" in capsys.readouterr().err


# ----------------------------------------------------------------------------- inference


def backbone_fn(backbone):
    return lambda images: backbone_feature_map(backbone, images, 1)


def test_slide_on_a_crop_sized_input_equals_resize():
    backbone = tiny_model(DINOV2)
    torch.manual_seed(1)
    head = LinearBNSegHead(32, NUM_CLASSES).eval()
    images = torch.rand(3, 3, SIZE, SIZE)
    args = (images, (SIZE, SIZE), backbone_fn(backbone), head, 8, SIZE)
    whole = predict_probs(*args, SegInferenceConfig(mode="resize"))
    slide = predict_probs(*args, SegInferenceConfig(mode="slide", crop_size=SIZE, stride=20))
    torch.testing.assert_close(slide, whole, rtol=0, atol=1e-6)
    # Overlapping windows on a larger input do change the result (the test has teeth).
    overlap = predict_probs(*args, SegInferenceConfig(mode="slide", crop_size=24, stride=8))
    assert (overlap - whole).abs().max() > 1e-3
    torch.testing.assert_close(overlap.sum(1), torch.ones(3, SIZE, SIZE))


def test_window_starts_cover_the_image_like_mmseg():
    assert window_starts(100, 32, 21) == [0, 21, 42, 63, 68]
    assert window_starts(20, 32, 21) == [0]  # smaller than the crop: one window
    assert window_starts(32, 32, 21) == [0]


def test_flip_tta():
    torch.manual_seed(2)
    head = LinearBNSegHead(3, 4).eval()
    with torch.no_grad():
        head.bn.running_mean.uniform_(0, 1)
        head.conv.weight.normal_()
    images = torch.rand(2, 3, 16, 24)
    # Per-patch mean colour is flip-equivariant (24 is a multiple of the patch 8), and so
    # are BN, the 1x1 conv and the bilinear upsampling: flip TTA cannot change anything.
    def pooled(x):
        return F.avg_pool2d(x, 8)

    plain = predict_probs(images, (16, 24), pooled, head, 8, 16, SegInferenceConfig(mode="resize"))
    flipped = predict_probs(images, (16, 24), pooled, head, 8, 16,
                            SegInferenceConfig(mode="resize", flip=True))
    torch.testing.assert_close(flipped, plain, rtol=0, atol=1e-6)
    # A backbone is not equivariant: flip TTA is the mean of both views' probabilities.
    fn = backbone_fn(tiny_model(DINOV2))
    head = LinearBNSegHead(32, 4).eval()
    inf = SegInferenceConfig(mode="resize", flip=True)
    tta = predict_probs(images, (16, 24), fn, head, 8, 16, inf)
    direct = head(fn(images), (16, 24), 8).softmax(1)
    mirrored = head(fn(images.flip(-1)), (16, 24), 8).flip(-1).softmax(1)
    torch.testing.assert_close(tta, (direct + mirrored) / 2, rtol=0, atol=1e-6)
    assert (direct - mirrored).abs().max() > 1e-3


def test_multiscale_probabilities_are_resized_to_the_label_size():
    torch.manual_seed(3)
    head = LinearBNSegHead(3, 5).eval()
    inf = SegInferenceConfig(mode="resize", scales=[0.5, 1.0, 1.5])
    probs = predict_probs(torch.rand(1, 3, 40, 56), (40, 56), lambda x: F.avg_pool2d(x, 8, ceil_mode=True),
                          head, 8, 32, inf)
    assert probs.shape == (1, 5, 40, 56)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 40, 56))


# ----------------------------------------------------------------------------- training pieces


def test_poly_schedule_with_warmup():
    cfg = SegTrainConfig(iterations=100, lr=1e-3, warmup_iters=10, warmup_ratio=1e-6)
    assert poly_lr(0, cfg) == pytest.approx(1e-9)
    assert poly_lr(10, cfg) == pytest.approx(1e-3 * 0.9)  # warm-up over: plain poly
    assert poly_lr(5, cfg) == pytest.approx(1e-3 * 0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert poly_lr(100, cfg) == pytest.approx(0.0)


def test_augment_pair_pads_small_crops_and_is_deterministic():
    image, label = torch.rand(3, 20, 24), torch.randint(0, 5, (20, 24))
    gen = torch.Generator().manual_seed(0)
    out_img, out_lab = augment_pair(image, label, 32, [0.5, 0.5], 0.75, 255, gen)
    assert out_img.shape == (3, 32, 32) and out_lab.shape == (32, 32)
    # Rescaled to 16x19 (shorter side 16), so rows 16.. and columns 19.. are padding: ignore label, mean colour.
    assert (out_lab[16:] == 255).all() and (out_lab[:, 19:] == 255).all()
    assert (out_lab[:16, :19] != 255).all()
    torch.testing.assert_close(out_img[:, 20, 5], torch.tensor([0.485, 0.456, 0.406]))
    crops = AugmentedCrops([(image, label)] * 3, 6, 16, [0.5, 2.0], 0.75, 255, seed=0)
    again = AugmentedCrops([(image, label)] * 3, 6, 16, [0.5, 2.0], 0.75, 255, seed=0)
    for i in range(6):
        assert torch.equal(crops[i][0], again[i][0]) and torch.equal(crops[i][1], again[i][1])
        assert crops[i][0].shape == (3, 16, 16)
    assert not torch.equal(crops[0][0], crops[1][0])


# ----------------------------------------------------------------------------- head module


def test_upsample_logits_undoes_the_backbone_padding():
    # A 20x20 image becomes a 3x3 grid of 8 px patches (zero-padded to 24x24 on the
    # right/bottom): the logits belong to the padded canvas, so upsample to it and crop.
    grid = torch.arange(9.0).view(1, 1, 3, 3)
    up = upsample_logits(grid, (20, 20), patch_size=8)
    padded = F.interpolate(grid, size=(24, 24), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up, padded[..., :20, :20], rtol=0, atol=0)
    naive = F.interpolate(grid, size=(20, 20), mode="bilinear", align_corners=False)
    assert (up - naive).abs().max() > 0.5  # stretching the grid over 20 px misplaces it
    # Without padding (24 = 3 x 8) it is the plain bilinear resize.
    torch.testing.assert_close(upsample_logits(grid, (24, 24), 8), padded, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot cover"):
        upsample_logits(grid, (30, 30), patch_size=8)


def test_seg_loss_ignores_pixels_and_survives_all_ignored():
    torch.manual_seed(4)
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    labels = torch.randint(0, 4, (2, 24, 24))
    labels[:, :5] = 255
    up = upsample_logits(logits, (24, 24), 8)
    expected = F.cross_entropy(up[:, :, 5:].permute(0, 2, 3, 1).reshape(-1, 4),
                               labels[:, 5:].reshape(-1))
    torch.testing.assert_close(seg_loss(logits, labels, 255, patch_size=8), expected)
    empty = seg_loss(logits, torch.full((2, 24, 24), 255), 255, patch_size=8)
    empty.backward()
    assert empty.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_backbone_feature_map_concatenates_the_last_blocks():
    backbone = tiny_model(DINOV2)
    images = torch.rand(2, 3, 20, SIZE)  # 20 rows: padded to a 3x4 grid of 8 px patches
    with torch.no_grad():
        fmap = backbone_feature_map(backbone, images, n_last_blocks=2)
        last = backbone(normalize(images)).patch  # the final block, after the final norm
    assert fmap.shape == (2, 64, 3, 4) and fmap.is_contiguous()
    torch.testing.assert_close(fmap[:, 32:].flatten(2).transpose(1, 2), last)
    head = LinearBNSegHead(64, 7)
    assert head(fmap).shape == (2, 7, 3, 4)
    assert head(fmap, (20, SIZE), 8).shape == (2, 7, 20, SIZE)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
