"""``eval.retrieval``: revisited Oxford/Paris retrieval from every backbone source.

Fixtures are synthetic datasets in the real revisitop layout (``jpg/`` + ``gnd_*.pkl``,
48x48 images); backbones are tiny (D=32, 2 heads, 2 blocks) with randomised weights so
every loaded tensor matters.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from official_layouts import dinov2_official, dinov3_official, randomise_
from PIL import Image

import eval.retrieval as retrieval
from dinov.config import ModelConfig
from dinov.data.datasets import RevisitedRetrievalDataset, load_ground_truth
from dinov.data.synthetic import write_layout
from dinov.metrics import revisited_map, similarity_ranks
from dinov.models import Backbone, build_backbone
from eval.heads import normalize

DINOV2 = "vit_small_patch14_dinov2"
DINOV3 = "vit_small_patch16_dinov3"
TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2"]
# Small, fast settings for every run; configs/eval/retrieval.yaml keeps full-scale defaults.
SMALL = ["data.image_size=48", "data.batch_size=8", "data.num_workers=0", "plot.num_queries=2",
         "plot.topk=3", "plot.thumb_size=32"]
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "eval" / "retrieval.yaml")


@pytest.fixture(scope="module")
def roxford(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("roxford")
    write_layout(root, "roxford", n=36, seed=0, size=48)
    return root


@pytest.fixture(scope="module")
def rparis(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rparis")
    write_layout(root, "rparis", n=36, seed=1, size=48)
    return root


def tiny(arch: str, seed: int = 0) -> Backbone:
    """A tiny backbone with every parameter randomised."""
    patch = 16 if "dinov3" in arch else 14
    cfg = ModelConfig(arch=arch, img_size=2 * patch, embed_dim=32, depth=2, num_heads=2)
    backbone = build_backbone(cfg).eval()
    randomise_(backbone, seed)
    return backbone


def run(out: Path, root: Path, *overrides: str) -> dict:
    return retrieval.main(["--config", CONFIG, f"output_dir={out}", f"data.root={root}",
                           *SMALL, *overrides])


def assert_sane(results: dict, out: Path) -> None:
    for name in ("easy", "medium", "hard"):
        assert 0.0 <= results["map"][name] <= 100.0
        for k in ("1", "5", "10"):
            assert 0.0 <= results["mp_at_k"][name][k] <= 100.0
    assert json.loads((out / "results.json").read_text()) == results
    assert (out / "config.yaml").is_file()
    png = out / "retrieval_topk.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def cached(out: Path, split: str) -> torch.Tensor:
    (path,) = (out / "feature_cache").glob(f"*_{split}_*.pt")
    return torch.load(path, weights_only=True)["features"]


def cls_descriptor(backbone: Backbone, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(backbone(normalize(image[None])).cls, dim=-1)[0]


# --------------------------------------------------------------------------- sources
def test_official_dinov2_file_metrics_match_features_and_cache(roxford, tmp_path, monkeypatch):
    source = tiny(DINOV2)
    weights = tmp_path / "dinov2_vits14.pth"
    torch.save(dinov2_official(source), weights)
    out = tmp_path / "run"
    args = [f"model.arch={DINOV2}", "model.img_size=28", *TINY, f"model.weights={weights}",
            "model.weights_format=dinov2", "features.multiscale=[1.0]"]
    results = run(out, roxford, *args)
    assert_sane(results, out)
    assert results["num_queries"] == 6 and results["num_database"] == 36
    assert results["num_queries_evaluated"] == {"easy": 6, "medium": 6, "hard": 6}

    # The reported numbers are revisited_map on similarity_ranks of the cached features.
    query, database = cached(out, "query"), cached(out, "database")
    ds = RevisitedRetrievalDataset(roxford, "roxford5k")
    expected = revisited_map(similarity_ranks(query, database), ds.gnd)
    assert results["map"] == pytest.approx(expected.map, abs=1e-9)
    assert results["mp_at_k"]["medium"]["5"] == pytest.approx(expected.mp_at_k["medium"][5])
    # ... and those features are the source model's CLS on the (cropped) images.
    torch.testing.assert_close(query[3], cls_descriptor(source, ds.query_image(3)),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(database[7], cls_descriptor(source, ds.database_image(7)),
                               atol=1e-5, rtol=0)

    # Second run: every split comes from the cache, no backbone is built.
    def no_backbone(*_args, **_kwargs):
        raise AssertionError("backbone built although the features are cached")

    monkeypatch.setattr(retrieval, "build_eval_backbone", no_backbone)
    assert run(out, roxford, *args) == results
    # A different descriptor setting is a different cache entry.
    with pytest.raises(AssertionError, match="backbone built"):
        run(out, roxford, *args, "features.pooling=gem")


def test_official_dinov3_file_gem_multiscale(rparis, tmp_path):
    source = tiny(DINOV3, seed=3)
    weights = tmp_path / "dinov3_vits16.pth"
    torch.save(dinov3_official(source), weights)
    out = tmp_path / "run"
    results = run(out, rparis, f"model.arch={DINOV3}", "model.img_size=32", *TINY,
                  f"model.weights={weights}", "model.weights_format=dinov3",
                  "data.dataset=rparis6k",
                  "features.pooling=gem", "features.multiscale=[1.0,0.7071,1.4142]")
    assert_sane(results, out)
    assert results["dataset"] == "rparis6k" and results["feature_dim"] == 32
    # Multi-scale GeM by hand for one database image.
    ds = RevisitedRetrievalDataset(rparis, "rparis6k")
    x = normalize(ds.database_image(5)[None])
    vecs = []
    for s in (1.0, 0.7071, 1.4142):
        scaled = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear",
                                                  align_corners=False, antialias=s < 1)
        with torch.no_grad():
            vecs.append(F.normalize(retrieval.gem(source(scaled).patch, 3.0), dim=-1))
    expected = F.normalize(sum(vecs) / 3, dim=-1)[0]
    torch.testing.assert_close(cached(out, "database")[5], expected, atol=1e-5, rtol=0)


def test_timm_state_dict_batched_features_equal_single_images(roxford, tmp_path):
    source = tiny(DINOV2, seed=5)
    weights = tmp_path / "timm.pth"
    torch.save(source.model.state_dict(), weights)
    out = tmp_path / "run"
    results = run(out, roxford, f"model.arch={DINOV2}", "model.img_size=28", *TINY,
                  f"model.weights={weights}", "model.weights_format=timm",
                  "features.multiscale=[1.0]", "data.image_size=40")
    assert_sane(results, out)
    # Shape buckets (batches of 8 here) give each image the features it gets alone, in
    # dataset order; query crops of different sizes never share a batch.
    ds = RevisitedRetrievalDataset(roxford, "roxford5k")
    for split in ("query", "database"):
        images = retrieval.RetrievalImages(ds, split, image_size=40)
        alone = torch.stack([cls_descriptor(source, images[i][1]) for i in range(len(images))])
        torch.testing.assert_close(cached(out, split), alone, atol=1e-5, rtol=0)


def test_our_trainer_checkpoint(roxford, tmp_path):
    from dinov.config import load_config
    from dinov.train.trainer import Trainer

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "smoke.yaml",
                      [f"output_dir={tmp_path / 'train'}", "train.steps=4", "probe.enabled=false",
                       "data.num_samples=32"])
    Trainer(cfg).fit()
    ckpt = tmp_path / "train" / "checkpoints" / "checkpoint_00000004.pt"
    assert ckpt.is_file()
    out = tmp_path / "run"
    # model.arch stays the yaml's ViT-L: the architecture must come from the checkpoint.
    results = run(out, roxford, f"model.weights={ckpt}", "model.weights_key=student")
    assert_sane(results, out)
    assert results["feature_dim"] == 64  # smoke.yaml's embed_dim


# --------------------------------------------------------------------------- pieces
def test_gem_p1_is_average_pooling_and_p3_is_radenovic_gem():
    tokens = torch.randn(2, 7, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(retrieval.gem(tokens, 1.0), tokens.sum(dim=1) / 7)
    positive = tokens.abs() + 0.1
    by_hand = positive.pow(3).mean(dim=1).pow(1 / 3)
    torch.testing.assert_close(retrieval.gem(positive, 3.0), by_hand)
    # Signed tokens: odd p is the real power mean, cube root keeping the sign.
    m = tokens.pow(3).mean(dim=1)
    torch.testing.assert_close(retrieval.gem(tokens, 3.0), m.sign() * m.abs().pow(1 / 3))


def test_query_is_cropped_to_bbx(roxford, tmp_path):
    root = tmp_path / "crop"
    (root / "jpg").mkdir(parents=True)
    meta = load_ground_truth(roxford / "gnd_roxford5k.pkl")
    for name in meta["imlist"] + meta["qimlist"]:
        (root / "jpg" / f"{name}.jpg").write_bytes((roxford / "jpg" / f"{name}.jpg").read_bytes())
    # Query 0: a black image that is white exactly inside x 10..30, y 6..22.
    pixels = np.zeros((48, 48, 3), dtype=np.uint8)
    pixels[6:22, 10:30] = 255
    Image.fromarray(pixels).save(root / "jpg" / f"{meta['qimlist'][0]}.jpg", quality=95)
    meta["gnd"][0]["bbx"] = [10.2, 5.8, 29.6, 22.4]  # rounds to 10, 6, 30, 22
    (root / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(meta))
    ds = RevisitedRetrievalDataset(root, "roxford5k")

    index, crop = retrieval.RetrievalImages(ds, "query", image_size=48)[0]
    assert index == 0 and crop.shape == (3, 16, 20)
    assert crop.mean() > 0.9  # only the white box, nothing of the black surround
    images = retrieval.RetrievalImages(ds, "query", image_size=10)
    assert images[0][1].shape == (3, 8, 10)  # longer side shrunk to 10, aspect kept
    assert images.estimated_shape(0) == (8, 10)
    db = retrieval.RetrievalImages(ds, "database", image_size=64)
    assert db[0][1].shape == (3, 48, 48)  # smaller images are not enlarged by default


def test_missing_ground_truth_names_the_file(tmp_path, capsys):
    (tmp_path / "jpg").mkdir()
    with pytest.raises(SystemExit) as info:
        run(tmp_path / "out", tmp_path)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "gnd_roxford5k.pkl" in err and str(tmp_path) in err


def test_bad_config_value_exits_with_the_key(roxford, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        run(tmp_path / "out", roxford, "features.pooling=max")
    assert info.value.code == 2
    assert "features.pooling" in capsys.readouterr().err


def test_oracle_features_give_perfect_map(roxford, tmp_path, monkeypatch):
    """Sanity of the whole scoring path: features that encode the landmark score 100."""

    def oracle(cfg, dataset, split, get_backbone, device):
        n_q = len(dataset.qimlist)
        if split == "query":
            return torch.eye(n_q)
        feats = torch.zeros(len(dataset.imlist), n_q)
        for q, g in enumerate(dataset.gnd):  # a database image "is" every query it matches
            feats[list(g["easy"]) + list(g["hard"]), q] = 1.0
        return feats

    monkeypatch.setattr(retrieval, "compute_features", oracle)
    results = run(tmp_path / "out", roxford, f"model.arch={DINOV2}", *TINY)
    for name in ("easy", "medium", "hard"):
        assert results["map"][name] == pytest.approx(100.0)
        assert results["mp_at_k"][name]["1"] == pytest.approx(100.0)
    assert not math.isnan(results["mp_at_k"]["medium"]["10"])
