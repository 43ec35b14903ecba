"""The mmsegmentation adapter (eval/mmseg_backbone.py) and configs/mmseg/*.py.

Needs the [mmseg] extra: run with `make test-mmseg` (its own .venv-mmseg, mmcv compiled
from source). `make test` deselects the marker, and without mmseg the module is skipped.

Tiny models (D=32, 2 heads, 4 blocks, patch 8) on 32-64 px images keep it fast on CPU.
The configs are loaded from the real files and only shrunk (widths, crop size, iters).
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dinov  # noqa: F401  (torchvision shim before mmcv imports torchvision)

pytestmark = pytest.mark.mmseg
pytest.importorskip("mmseg")

from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from mmengine.structures import PixelData  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402
from official_layouts import dinov2_official, randomise_  # noqa: E402

from dinov.checkpoint import latest_checkpoint  # noqa: E402
from dinov.config import ModelConfig, load_config  # noqa: E402
from dinov.data.synthetic import write_layout  # noqa: E402
from dinov.models import build_backbone  # noqa: E402
from dinov.train.trainer import Trainer  # noqa: E402
from eval.common import build_eval_backbone  # noqa: E402
from eval.mmseg_backbone import VPretrainViT  # noqa: E402
from eval.mmseg_backbone import main as mmseg_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LINEAR = ROOT / "configs/mmseg/linear_ade20k.py"
UPERNET = ROOT / "configs/mmseg/upernet_ade20k.py"
DIM, DEPTH, PATCH = 32, 4, 8


@pytest.fixture(scope="module", autouse=True)
def _mmseg_scope() -> None:
    init_default_scope("mmseg")  # what the configs' default_scope does inside a Runner


@pytest.fixture(scope="module")
def ours_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of our trainer: 4 steps of the smoke run on a D=32 ViT."""
    out = tmp_path_factory.mktemp("train")
    cfg = load_config(ROOT / "configs/smoke.yaml", [
        f"output_dir={out}", "train.steps=4", "probe.enabled=false", "train.plots=false",
        "train.progress=none", f"model.embed_dim={DIM}", f"model.depth={DEPTH}",
        "model.num_heads=2", f"model.patch_size={PATCH}",
    ])
    Trainer(cfg).fit()
    path = latest_checkpoint(out / "checkpoints")
    assert path is not None and path.name == "checkpoint_00000004.pt"
    return path


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic scenes in the ADEChallengeData2016 layout (labels 0 = ignore, 1..10)."""
    out = tmp_path_factory.mktemp("ade")
    write_layout(out, "ade20k", n=20, seed=0, size=64)
    return out / "ADEChallengeData2016"


def _images(height: int, width: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(3))


def _as_maps(patch: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return patch.reshape(patch.shape[0], *grid, -1).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------- backbone
def _staged(backbone, x: torch.Tensor, blocks: list[int], norm: bool) -> list:
    """Each block's output through the backbone's stages (prepare, run, finalize): a
    reference independent of the feature tap the adapter uses."""
    from types import SimpleNamespace

    state, start, out = backbone.prepare_tokens(x), 0, []
    for index in blocks:
        state = backbone.run_blocks(state, start, index + 1)
        start = index + 1
        patch = backbone.finalize(state).patch if norm else state.x[:, backbone.num_prefix_tokens:]
        out.append(SimpleNamespace(patch=patch, grid=state.grid))
    return out


def test_ours_checkpoint_maps_equal_intermediate_layers(ours_ckpt: Path) -> None:
    """Built from the registry, the maps are the normed patch tokens of those blocks."""
    model = MODELS.build(dict(type="VPretrainViT", weights=str(ours_ckpt), out_indices=(1, 2, -1)))
    assert isinstance(model, VPretrainViT) and model.out_indices == (1, 2, 3)
    reference = build_eval_backbone(ModelConfig(weights=str(ours_ckpt)))
    x = _images(44, 60)  # not multiples of the patch: padded to a 6x8 grid
    with torch.no_grad():
        maps = model(x)
        expected = _staged(reference, x, [1, 2, 3], norm=True)
    assert [tuple(m.shape) for m in maps] == [(2, DIM, 6, 8)] * 3
    for got, ref in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, _as_maps(ref.patch, ref.grid), atol=1e-6, rtol=0)


def test_official_dinov2_file_and_unnormed_outputs(tmp_path: Path) -> None:
    arch = dict(arch="vit_small_patch14_dinov2", img_size=32, patch_size=PATCH,
                embed_dim=DIM, depth=2, num_heads=2)
    source = randomise_(build_backbone(ModelConfig(**arch)))
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(dinov2_official(source), path)
    for norm in (True, False):
        model = MODELS.build(dict(type="VPretrainViT", weights=str(path), weights_format="dinov2",
                                  out_indices=(0, 1), norm=norm, **arch))
        x = _images(32, 40)
        with torch.no_grad():
            maps = model(x)
            expected = _staged(source, x, [0, 1], norm=norm)
        for got, ref in zip(maps, expected, strict=True):
            torch.testing.assert_close(got, _as_maps(ref.patch, ref.grid), atol=1e-5, rtol=0)


def test_backbone_argument_errors(ours_ckpt: Path) -> None:
    with pytest.raises(TypeError, match="unknown arguments.*embed_dims"):
        VPretrainViT(weights=str(ours_ckpt), embed_dims=32)
    with pytest.raises(ValueError, match="strictly increasing"):
        VPretrainViT(weights=str(ours_ckpt), out_indices=(2, 1))
    with pytest.raises(ValueError, match="out of range"):
        VPretrainViT(weights=str(ours_ckpt), out_indices=(DEPTH,))


# --------------------------------------------------------------------------- heads
def _tiny_linear(ckpt: Path) -> Config:
    cfg = Config.fromfile(LINEAR)
    cfg.model.backbone.weights = str(ckpt)
    cfg.model.decode_head.update(in_channels=[DIM], channels=DIM)
    return cfg


def _tiny_upernet(ckpt: Path) -> Config:
    cfg = Config.fromfile(UPERNET)
    cfg.model.backbone.update(weights=str(ckpt), out_indices=(0, 1, 2, 3))
    cfg.model.neck.update(in_channels=[DIM] * 4, out_channels=DIM)
    cfg.model.decode_head.update(in_channels=[DIM] * 4, channels=16)
    cfg.model.auxiliary_head.update(in_channels=DIM, channels=8)
    return cfg


def _batch(size: int = 32, batch: int = 2) -> tuple[torch.Tensor, list[SegDataSample]]:
    gen = torch.Generator().manual_seed(5)
    inputs = torch.randn(batch, 3, size, size, generator=gen)
    samples = []
    for _ in range(batch):
        sample = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size)))
        labels = torch.randint(0, 150, (1, size, size), generator=gen)
        labels[:, :2] = 255  # some ignored pixels, as reduce_zero_label makes them
        sample.gt_sem_seg = PixelData(data=labels)
        samples.append(sample)
    return inputs, samples


def _head_grads(model: torch.nn.Module, head: str) -> list[torch.Tensor]:
    return [p.grad for n, p in model.named_parameters() if n.startswith(head)]


def test_linear_bn_head_trains_on_frozen_backbone(ours_ckpt: Path) -> None:
    model = MODELS.build(_tiny_linear(ours_ckpt).model)
    model.init_weights()  # what the Runner does: must not re-initialise the loaded backbone
    reference = build_eval_backbone(ModelConfig(weights=str(ours_ckpt)))
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.backbone.backbone.state_dict()[name], value)
    model.train()
    assert not model.backbone.backbone.training  # frozen: eval mode inside a training segmentor
    inputs, samples = _batch()
    losses = model.loss(inputs, samples)
    loss = sum(v for k, v in losses.items() if "loss" in k)
    # Near-uniform start; mmseg's CrossEntropyLoss (avg_non_ignore=False) averages over all
    # pixels, ignored ones included, so the 2 ignored rows of 32 scale it by 30/32.
    assert math.isclose(loss.item(), math.log(150) * 30 / 32, rel_tol=0.02)
    loss.backward()
    grads = _head_grads(model, "decode_head.")
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.decode_head.conv_seg.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())


def test_upernet_head_backpropagates_into_backbone(ours_ckpt: Path) -> None:
    cfg = _tiny_upernet(ours_ckpt)
    assert cfg.model.decode_head.type == "UPerHead" and "input_transform" not in cfg.model.decode_head
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    inputs, samples = _batch()
    with torch.no_grad():
        feats = model.extract_feat(inputs)  # the neck's 4-level pyramid: strides 2, 4, 8, 16
    assert [tuple(f.shape[2:]) for f in feats] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    losses = model.loss(inputs, samples)
    assert {"decode.loss_ce", "aux.loss_ce"} <= set(losses)
    sum(v for k, v in losses.items() if "loss" in k).backward()
    for prefix in ("decode_head.", "auxiliary_head.", "neck.", "backbone."):
        grads = [g for g in _head_grads(model, prefix) if g is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), prefix
    assert model.backbone.backbone.model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- runner
def _tiny_run(cfg: Config, ade_root: Path, work_dir: Path, iters: int, crop: int = 32) -> Config:
    """Shrink a config for CPU: small crops, batch 4, no workers, no checkpoints."""
    cfg = copy.deepcopy(cfg)
    cfg.work_dir = str(work_dir)
    cfg.model.data_preprocessor.size = (crop, crop)
    cfg.model.test_cfg.update(crop_size=(crop, crop), stride=(crop // 2, crop // 2))
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        loader.update(num_workers=0, persistent_workers=False)
        loader.dataset.data_root = str(ade_root)
    cfg.train_dataloader.batch_size = 4
    pipeline = cfg.train_dataloader.dataset.pipeline
    pipeline[2].scale = (4 * crop, crop)  # RandomResize: the ADE20K recipe's 4:1 at our crop
    pipeline[3].crop_size = (crop, crop)
    cfg.val_dataloader.dataset.pipeline[1].scale = (4 * crop, crop)
    cfg.train_cfg.update(max_iters=iters, val_interval=10 * iters)
    cfg.param_scheduler = [dict(type="ConstantLR", factor=1.0, by_epoch=False)]
    cfg.default_hooks.checkpoint = None
    cfg.default_hooks.logger.interval = 1
    cfg.env_cfg.dist_cfg = dict(backend="gloo")
    cfg.randomness = dict(seed=0)
    return cfg


def test_runner_trains_linear_config_on_synthetic_ade20k(
    ours_ckpt: Path, ade_root: Path, tmp_path: Path
) -> None:
    cfg = _tiny_run(_tiny_linear(ours_ckpt), ade_root, tmp_path, iters=10)
    cfg.optim_wrapper.optimizer.lr = 3e-2
    runner = Runner.from_cfg(cfg)
    runner.train()
    losses = [float(v) for v in runner.message_hub.get_scalar("train/loss").data[0]]
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)
    # from ~ln(150) toward the few classes present; raw per-iteration values, so average
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    metrics = runner.val()  # the 4 validation scenes through the slide-window test loop
    assert 0.0 < metrics["mIoU"] <= 100.0


def test_cli_trains_upernet_config_and_resumes(
    ours_ckpt: Path, ade_root: Path, tmp_path: Path
) -> None:
    """`python -m eval.mmseg_backbone`, then main(--resume) in-process: mmengine's own
    checkpoints must load under torch >= 2.6 (weights_only default)."""
    cfg = _tiny_run(_tiny_upernet(ours_ckpt), ade_root, tmp_path / "work", iters=2)
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=2)
    config = tmp_path / "tiny_upernet.py"
    cfg.dump(str(config))
    work = str(tmp_path / "work")
    cli = [sys.executable, "-m", "eval.mmseg_backbone", str(config), "--work-dir", work]
    run = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert mmseg_main([str(config), "--work-dir", work, "--resume",
                       "--cfg-options", "train_cfg.max_iters=4"]) == 0
    from eval.mmseg_backbone import checkpoint_safe_globals

    with torch.serialization.safe_globals(checkpoint_safe_globals()):  # as our loader reads it
        checkpoint = torch.load(tmp_path / "work/iter_4.pth", weights_only=True)
    assert checkpoint["meta"]["iter"] == 4  # resumed at 2, not restarted
    assert sorted(p.name for p in (tmp_path / "work").glob("iter_*.pth")) == ["iter_2.pth",
                                                                              "iter_4.pth"]
