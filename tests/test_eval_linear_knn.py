"""eval.linear / eval.knn and their shared feature extraction (eval.features).

Fixtures are real on-disk layouts: a synthetic ImageFolder train/val tree, official
DINOv2 and DINOv3 checkpoint files and a timm state dict written from tiny randomised
backbones, and a checkpoint of our own trainer (4 steps of a shrunken smoke config).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from official_layouts import dinov2_official, dinov3_official, randomise_

import eval.features as features_mod
from dinov.config import ModelConfig, load_config
from dinov.data.synthetic import write_layout
from dinov.metrics import knn_classify, topk_accuracy
from dinov.models import Backbone, build_backbone
from eval import knn, linear
from eval.features import (
    EvalTransform,
    FeatureConfig,
    ImageFolderDataConfig,
    image_features,
    load_imagefolder_features,
)
from eval.heads import normalize

DIM = 32
DINOV2 = ModelConfig(arch="vit_small_patch14_dinov2", img_size=28, embed_dim=DIM, depth=2,
                     num_heads=2)
DINOV3 = ModelConfig(arch="vit_small_patch16_dinov3", img_size=32, embed_dim=DIM, depth=2,
                     num_heads=2)
# Fast settings for every run: 32 px images -> 28 px centre crops, a short head schedule.
FAST = ["data.resize_size=32", "data.image_size=28", "data.batch_size=16",
        "data.num_workers=0", "device=cpu"]
HEADS = ["linear.epochs=3", "linear.batch_size=16"]


def randomised(cfg: ModelConfig, seed: int = 0) -> Backbone:
    """A tiny backbone with every parameter random, so that all of them matter."""
    backbone = build_backbone(cfg).eval()
    randomise_(backbone, seed)
    return backbone


def model_args(cfg: ModelConfig, weights: Path, fmt: str, key: str = "teacher") -> list[str]:
    args = [f"model.weights={weights}", f"model.weights_format={fmt}", f"model.weights_key={key}"]
    if fmt == "ours":
        return args  # the architecture comes from the checkpoint
    return args + [f"model.{k}={getattr(cfg, k)}"
                   for k in ("arch", "img_size", "embed_dim", "depth", "num_heads")]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imagefolder")
    write_layout(out, "imagefolder", n=40, seed=0, size=32)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, tuple[list[str], Backbone | None]]:
    """name -> (model.* overrides, the source backbone when we built it ourselves)."""
    tmp = tmp_path_factory.mktemp("weights")
    v2, v3 = randomised(DINOV2, seed=1), randomised(DINOV3, seed=2)
    torch.save(dinov2_official(v2), tmp / "dinov2_vits14_pretrain.pth")
    torch.save(dinov3_official(v3), tmp / "dinov3_vits16_pretrain.pth")
    torch.save(v2.model.state_dict(), tmp / "timm_vit.pth")
    ckpt = _train_smoke(tmp / "smoke")
    return {
        "dinov2": (model_args(DINOV2, tmp / "dinov2_vits14_pretrain.pth", "dinov2"), v2),
        "dinov3": (model_args(DINOV3, tmp / "dinov3_vits16_pretrain.pth", "dinov3"), v3),
        "timm": (model_args(DINOV2, tmp / "timm_vit.pth", "timm"), v2),
        "ours_teacher": (model_args(DINOV2, ckpt, "ours", "teacher"), None),
        "ours_student": (model_args(DINOV2, ckpt, "ours", "student"), None),
    }


def _train_smoke(out: Path) -> Path:
    """Four trainer steps of configs/smoke.yaml, shrunk further so this takes seconds."""
    from dinov.train.trainer import Trainer

    cfg = load_config("configs/smoke.yaml", [
        f"output_dir={out}", "train.steps=4", "probe.enabled=false", "train.plots=false",
        "data.num_samples=16", "data.batch_size=8", "model.embed_dim=32", "model.depth=2",
        "model.num_heads=2", "head.out_dim=64", "head.ibot_out_dim=64", "head.hidden_dim=32",
        "head.bottleneck_dim=16",
    ])
    Trainer(cfg).fit()
    path = out / "checkpoints" / "checkpoint_00000004.pt"
    assert path.is_file()
    return path


def features_of(root: Path, model_overrides: list[str], **feature_kw):
    """Features through the same code path as the CLIs (config parsed from overrides)."""
    cfg = load_config("configs/eval/knn.yaml", [f"data.root={root}", *FAST, *model_overrides],
                      schema=knn.KnnEvalConfig)
    return load_imagefolder_features(cfg.model, cfg.data, FeatureConfig(**feature_kw), "cpu")


# ------------------------------------------------------------------ both CLIs, all sources


@pytest.mark.parametrize("source", ["dinov2", "dinov3", "timm", "ours_teacher", "ours_student"])
def test_clis_run_on_every_backbone_source(source, root, sources, tmp_path):
    overrides = sources[source][0]
    for name, module, png in (("linear", linear, "linear_lr.png"), ("knn", knn, "knn_k.png")):
        out = tmp_path / name
        extra = HEADS if module is linear else []
        results = module.main(["--config", f"configs/eval/{name}.yaml", f"data.root={root}",
                               f"output_dir={out}", *FAST, *extra, *overrides])
        assert json.loads((out / "results.json").read_text()) == results
        assert (out / png).stat().st_size > 1000
        # The saved config is the resolved one: it loads back to the same values.
        saved = load_config(out / "config.yaml", schema=type(_schema(module)))
        assert saved.data.root == str(root) and saved.model.weights == overrides[0].split("=")[1]
        accs = [results["top1"], results["top5"]]
        if name == "linear":
            accs += list(results["top1_per_lr"].values())
            assert float(results["best_lr"]) in [float(lr) for lr in results["top1_per_lr"]]
            assert results["feature_dim"] == 2 * results["model"]["embed_dim"]  # cls_avgpool
        else:
            accs += [v[m] for v in results["per_k"].values() for m in ("top1", "top5")]
            assert list(results["per_k"]) == ["10", "20", "100", "200"]
            assert results["feature_dim"] == results["model"]["embed_dim"]  # cls
        assert all(0.0 <= a <= 100.0 for a in accs) and results["top1"] <= results["top5"]
        assert results["num_classes"] == 8 and results["num_train"] + results["num_val"] == 40
    if source.startswith("ours"):
        assert results["model"]["weights_format"] == "ours" and results["model"]["patch_size"] == 8


def _schema(module):
    return linear.LinearEvalConfig() if module is linear else knn.KnnEvalConfig()


def test_loaded_files_give_the_source_backbones_features(root, sources):
    """Each file format reproduces the features of the backbone it was written from."""
    for name in ("dinov2", "dinov3", "timm"):
        overrides, source = sources[name]
        fs = features_of(root, overrides, kind="cls_avgpool")
        train, _ = features_mod.open_splits(ImageFolderDataConfig(
            root=str(root), resize_size=32, image_size=28))
        images = torch.stack([train[i][0] for i in range(4)])
        expected = image_features(source, normalize(images), FeatureConfig(kind="cls_avgpool"))
        torch.testing.assert_close(fs.train.features[:4], expected, atol=1e-5, rtol=1e-5)
        assert fs.train.labels[:4].tolist() == [train[i][1] for i in range(4)]
    teacher = features_of(root, sources["ours_teacher"][0]).val.features
    student = features_of(root, sources["ours_student"][0]).val.features
    assert teacher.shape == student.shape and not torch.allclose(teacher, student)


# ------------------------------------------------------------------------ feature kinds


def test_feature_kinds_dimensions_and_content(root, sources):
    overrides, source = sources["dinov2"]
    kinds = {
        "cls": dict(kind="cls"),
        "cls_avgpool": dict(kind="cls_avgpool"),
        "last2_avg": dict(kind="n_last_blocks", n_last_blocks=2, avgpool=True),
        "last2": dict(kind="n_last_blocks", n_last_blocks=2, avgpool=False),
    }
    feats = {name: features_of(root, overrides, **kw).val.features for name, kw in kinds.items()}
    dims = {name: f.shape[1] for name, f in feats.items()}
    assert dims == {"cls": DIM, "cls_avgpool": 2 * DIM, "last2_avg": 3 * DIM, "last2": 2 * DIM}
    cls, avg = feats["cls"], feats["cls_avgpool"]
    torch.testing.assert_close(avg[:, :DIM], cls, atol=0, rtol=0)
    # n_last_blocks: [CLS of block -2, CLS of the last block (= cls), mean patch (= avgpool)].
    torch.testing.assert_close(feats["last2_avg"][:, DIM:], avg, atol=0, rtol=0)
    torch.testing.assert_close(feats["last2"], feats["last2_avg"][:, : 2 * DIM], atol=0, rtol=0)
    assert not torch.allclose(feats["last2"][:, :DIM], cls)  # block -2 differs from the last
    # The mean patch token is the mean over the last block's normed patch tokens.
    _, val = features_mod.open_splits(ImageFolderDataConfig(root=str(root), resize_size=32,
                                                            image_size=28))
    image = normalize(val[0][0][None])
    with torch.no_grad():
        out = source(image)
    torch.testing.assert_close(avg[0, DIM:], out.patch[0].mean(0), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="features.n_last_blocks=3"):
        image_features(source, image, FeatureConfig(kind="n_last_blocks", n_last_blocks=3))


def test_eval_transform_matches_torchvision_resize_and_center_crop():
    from torchvision.transforms import v2

    # 45x70 -> short side 32: torchvision truncates the long side (49.8 -> 49) and rounds
    # the crop offset ((49 - 28) / 2 = 10.5 -> 10).
    image = torch.rand(3, 45, 70, generator=torch.Generator().manual_seed(0))
    for mode, tv_mode in (("bicubic", v2.InterpolationMode.BICUBIC),
                          ("bilinear", v2.InterpolationMode.BILINEAR)):
        ours = EvalTransform(32, 28, mode)(image)
        resized = v2.functional.resize(image, [32], interpolation=tv_mode, antialias=True)
        assert resized.shape[-2:] == (32, 49)
        expected = v2.functional.center_crop(resized.clamp(0, 1), [28, 28])
        assert ours.shape == (3, 28, 28)
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    assert EvalTransform(32, 28)(torch.rand(3, 32, 32)).shape == (3, 28, 28)


# -------------------------------------------------------------------------------- cache


def test_second_run_loads_cached_features(root, sources, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    args = ["--config", "configs/eval/knn.yaml", f"data.root={root}", *FAST,
            *sources["dinov2"][0], f"features.cache_dir={cache}"]
    first = knn.main([*args, f"output_dir={tmp_path / 'a'}"])
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and files[0].startswith("train_") and files[1].startswith("val_")

    def no_backbone(*a, **k):
        raise AssertionError("features should have come from the cache")

    monkeypatch.setattr(features_mod, "build_eval_backbone", no_backbone)
    second = knn.main([*args, f"output_dir={tmp_path / 'b'}"])
    assert second == first
    # linear on the same features (kind cls) shares the cache files
    linear.main(["--config", "configs/eval/linear.yaml", f"data.root={root}", *FAST, *HEADS,
                 *sources["dinov2"][0], f"features.cache_dir={cache}", "features.kind=cls",
                 f"output_dir={tmp_path / 'c'}"])
    assert sorted(p.name for p in cache.iterdir()) == files
    # anything the features depend on changes the key (and then extraction is needed)
    for change in ("features.kind=cls_avgpool", "data.image_size=24",
                   "model.weights_key=student"):
        with pytest.raises(AssertionError, match="cache"):
            knn.main([*args, change, f"output_dir={tmp_path / 'd'}"])


# ----------------------------------------------------------- metric consistency, seeds


def test_knn_equals_the_metric_and_runs_reproduce(root, sources, tmp_path):
    args = ["--config", "configs/eval/knn.yaml", f"data.root={root}", *FAST,
            *sources["timm"][0], "knn.ks=[1,5,20]", "knn.temperature=0.1"]
    results = knn.main([*args, f"output_dir={tmp_path / 'a'}"])
    again = knn.main([*args, f"output_dir={tmp_path / 'b'}"])
    assert again == results
    fs = features_of(root, sources["timm"][0])
    scores = knn_classify(fs.train.features, fs.train.labels, fs.val.features, 8,
                          ks=(1, 5, 20), temperature=0.1)
    for k in (1, 5, 20):
        acc = topk_accuracy(scores[k], fs.val.labels, ks=(1, 5))
        assert results["per_k"][str(k)] == {"top1": acc[1], "top5": acc[5]}
    best = max((1, 5, 20), key=lambda k: results["per_k"][str(k)]["top1"])
    assert results["best_k"] == best and results["top1"] == results["per_k"][str(best)]["top1"]


def test_linear_runs_reproduce(root, sources, tmp_path):
    args = ["--config", "configs/eval/linear.yaml", f"data.root={root}", *FAST, *HEADS,
            *sources["dinov2"][0], "linear.lrs=[0.001,0.01,0.1]", "seed=3"]
    a = linear.main([*args, f"output_dir={tmp_path / 'a'}"])
    b = linear.main([*args, f"output_dir={tmp_path / 'b'}"])
    assert a == b and list(a["top1_per_lr"]) == ["0.001", "0.01", "0.1"]
    assert a["top1"] == max(a["top1_per_lr"].values())


# ------------------------------------------------------------------------------- errors


def _missing_file_line(capsys, cli, argv) -> str:
    """A missing data or weights file: exit 1 and one ``error:`` line (eval.pipeline.cli_main)."""
    with pytest.raises(SystemExit) as info:
        cli(argv)
    assert info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_missing_data_is_a_clear_error(root, tmp_path, capsys):
    missing = tmp_path / "no_such_imagenet"
    base = ["--config", "configs/eval/knn.yaml", *FAST, f"output_dir={tmp_path / 'o'}"]
    assert f"data.root: {missing} does not exist" in _missing_file_line(
        capsys, knn.main, [*base, f"data.root={missing}"])
    assert "has no 'test' folder" in _missing_file_line(
        capsys, linear.main, [*base[:1], "configs/eval/linear.yaml", *base[2:],
                              f"data.root={root}", "data.val_split=test"])
    assert "model.weights: file not found" in _missing_file_line(
        capsys, knn.main, [*base, f"data.root={root}", f"model.weights={tmp_path / 'w.pth'}"])
    with pytest.raises(FileNotFoundError, match=f"data.root: {missing} does not exist"):
        knn.run(knn.KnnEvalConfig(data=knn.ImageFolderDataConfig(root=str(missing)),
                                  output_dir=str(tmp_path / "o")))  # the typed API raises
    with pytest.raises(SystemExit) as info:
        knn.main(base)  # data.root is null in the YAML
    assert info.value.code == 2 and "'data.root' is required" in capsys.readouterr().err
    for bad, key in (("features.kind=patch", "features.kind"), ("knn.ks=[]", "knn.ks")):
        with pytest.raises(SystemExit):
            knn.main([*base, f"data.root={root}", bad])
        assert key in capsys.readouterr().err


def test_val_class_missing_from_train_is_an_error(tmp_path):
    for split, name in (("train", "a"), ("val", "a"), ("val", "b")):
        (tmp_path / split / name).mkdir(parents=True)
        (tmp_path / split / name / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"classes missing from .*\['b'\]"):
        features_mod.open_splits(ImageFolderDataConfig(root=str(tmp_path)))


def test_yaml_defaults_are_the_standard_protocols():
    lin = load_config("configs/eval/linear.yaml", schema=linear.LinearEvalConfig)
    kn = load_config("configs/eval/knn.yaml", schema=knn.KnnEvalConfig)
    for cfg in (lin, kn):
        assert (cfg.data.resize_size, cfg.data.image_size) == (256, 224)
        assert cfg.data.interpolation == "bicubic" and cfg.data.root is None
    assert lin.features.kind == "cls_avgpool" and kn.features.kind == "cls"
    assert kn.knn.ks == [10, 20, 100, 200] and kn.knn.temperature == 0.07
