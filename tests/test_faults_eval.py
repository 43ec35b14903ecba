"""Bad input and faults on the evaluation side: no wrong numbers, no code execution.

Each test writes a tiny fixture in the real on-disk layout (synthetic scenes through
``write_layout``), breaks one thing the way it breaks in practice (a truncated image, a
replaced file, a killed cache write, a crafted pickle, an out-of-range label, a missing
file, an unwritable output directory) and checks the one clear error, or the miss and
recomputation, that follows.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval.depth as depth
import eval.features as features_mod
import eval.retrieval as retrieval
import eval.segmentation as segmentation
from dinov.config import ConfigError, ModelConfig, load_config
from dinov.data.datasets import (
    ADE20KDataset,
    LabelledImageFolder,
    NYUDepthDataset,
    RevisitedRetrievalDataset,
    UnlabelledImages,
    load_ground_truth,
)
from dinov.data.synthetic import NUM_CLASSES, write_layout
from dinov.models import build_backbone
from eval import knn, linear
from eval.common import extract
from eval.features import FeatureConfig, ImageFolderDataConfig, load_imagefolder_features
from eval.pipeline import prepare_output_dir

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py

TINY = ModelConfig(arch="vit_small_patch14_dinov2", img_size=28, embed_dim=32, depth=2,
                   num_heads=2)
TINY_ARGS = [f"model.{k}={getattr(TINY, k)}"
             for k in ("arch", "img_size", "embed_dim", "depth", "num_heads")]
FAST = ["data.resize_size=32", "data.image_size=28", "data.batch_size=16",
        "data.num_workers=0", "device=cpu", "model.weights=null", *TINY_ARGS]


class Killed(BaseException):
    """Stands in for SIGKILL in the middle of a write."""


def copy_of(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / source.name))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def replace_in_place(path: Path) -> None:
    """New pixels under the same name, with a different size and a later mtime."""
    with Image.open(path) as img:
        pixels = 255 - np.asarray(img.convert("RGB"))
    Image.fromarray(pixels).save(path, format=img.format, quality=70)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def never(name: str):
    def fail(*_args, **_kwargs):
        raise AssertionError(f"{name} was called")

    return fail


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    write_layout(root / "imagefolder", "imagefolder", n=24, seed=0, size=32)
    write_layout(root / "ade", "ade20k", n=10, seed=0, size=32)
    write_layout(root / "nyu", "nyu", n=10, seed=0, size=32)
    write_layout(root / "roxford", "roxford", n=12, seed=0, size=32)
    return {name: root / name for name in ("imagefolder", "ade", "nyu", "roxford")}


def tiny_backbone(seed: int = 0):
    torch.manual_seed(seed)
    return build_backbone(TINY).eval()


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> ModelConfig:
    """TINY loaded from a timm state dict: the same backbone on every build."""
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    torch.save(tiny_backbone().model.state_dict(), path)
    return dataclasses.replace(TINY, weights=str(path), weights_format="timm")


# ------------------------------------------------- 1. unreadable linear / kNN images


@pytest.mark.parametrize("split", ["train", "val"])
def test_unreadable_linear_knn_image_is_an_error_naming_it(layouts, tmp_path, split):
    root = copy_of(layouts["imagefolder"], tmp_path)
    folder = LabelledImageFolder(root / split, image_size=None)
    bad = folder.paths[1]
    truncate(bad)
    with pytest.raises(RuntimeError, match=f"cannot read evaluation image {re.escape(str(bad))}"):
        folder[1]
    assert folder[2][1] == folder.targets[2]  # the others still load, with their own labels
    for name, cli, extra in (("knn", knn, []), ("linear", linear, ["linear.epochs=1"])):
        with pytest.raises(RuntimeError, match=re.escape(str(bad))):
            cli.main(["--config", f"configs/eval/{name}.yaml", f"data.root={root}",
                      f"output_dir={tmp_path / name}", *FAST, *extra])
    # Pretraining still skips: the same file is replaced by the next one, and the number
    # of files skipped for a sample is (i - index) % len.
    images = UnlabelledImages(root / split, image_size=None)
    with pytest.warns(UserWarning, match=re.escape(bad.name)):
        i, _ = images._load_valid(1)
    assert (i - 1) % len(images) == 1 and images.num_skipped == 1


# ------------------------------------------------- 2. incomplete retrieval ground truth


@pytest.mark.parametrize("key", ["easy", "hard", "junk"])
def test_gnd_query_without_a_list_names_file_query_and_key(layouts, tmp_path, key):
    root = copy_of(layouts["roxford"], tmp_path)
    path = root / "gnd_roxford5k.pkl"
    meta = load_ground_truth(path)
    del meta["gnd"][1][key]
    path.write_bytes(pickle.dumps(meta))
    name = meta["qimlist"][1]
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: query 1 \({name}\) has no "
                                         rf"'{key}' list"):
        RevisitedRetrievalDataset(root, "roxford5k")


# ------------------------------------------------- 3. caches keyed on the files


def test_imagefolder_cache_misses_when_an_image_is_replaced(layouts, tiny_weights, tmp_path):
    root = copy_of(layouts["imagefolder"], tmp_path)
    cache = tmp_path / "cache"
    data = ImageFolderDataConfig(root=str(root), resize_size=32, image_size=28, batch_size=16,
                                 num_workers=0)
    features = FeatureConfig(kind="cls", cache_dir=str(cache))
    before = load_imagefolder_features(tiny_weights, data, features)
    first = set(cache.iterdir())
    assert len(first) == 2
    replaced = LabelledImageFolder(root / "val", image_size=None).paths[0]
    replace_in_place(replaced)
    after = load_imagefolder_features(tiny_weights, data, features)
    added = set(cache.iterdir()) - first
    assert [p.name[:4] for p in added] == ["val_"]  # train is still a hit
    assert not torch.equal(after.val.features[0], before.val.features[0])
    fresh = load_imagefolder_features(tiny_weights, data, FeatureConfig(kind="cls"))  # no cache
    torch.testing.assert_close(after.val.features, fresh.val.features, atol=0, rtol=0)
    torch.testing.assert_close(after.train.features, fresh.train.features, atol=0, rtol=0)


def test_segmentation_cache_misses_when_an_image_is_replaced(layouts, tmp_path):
    root = copy_of(layouts["ade"], tmp_path)
    cfg = segmentation.SegmentationEvalConfig(output_dir=str(tmp_path / "out"),
                                              cache_dir=str(tmp_path / "cache"))
    cfg.data.root, cfg.data.num_workers, cfg.inference.batch_size = str(root), 0, 4

    def pooled(images: torch.Tensor) -> torch.Tensor:  # a stand-in backbone: 8 px cells
        return F.avg_pool2d(images, 8)

    def features() -> torch.Tensor:
        train = ADE20KDataset(root, "training", image_size=32)
        return segmentation.cached_train_features(train, pooled, cfg, torch.device("cpu"))

    before = features()["features"]
    replace_in_place(ADE20KDataset(root, "training").images[0])
    after = features()["features"]
    assert len(list((tmp_path / "cache").glob("seg_train_*.pt"))) == 2
    assert not torch.equal(after[0], before[0]) and torch.equal(after[1:], before[1:])


def test_depth_cache_misses_when_an_image_is_replaced(layouts, tmp_path):
    root = copy_of(layouts["nyu"], tmp_path)
    cfg = depth.DepthEvalConfig()
    cfg.data.root, cfg.data.cache_dir, cfg.data.num_workers = str(root), str(tmp_path / "c"), 0
    cfg.head.n_layers, cfg.train.flip = 2, False
    extractor = depth.FeatureExtractor(tiny_backbone(), cfg, torch.device("cpu"))

    def features() -> torch.Tensor:
        train = depth.open_split(cfg.data, "train_split")
        return depth.precompute_train(extractor, train, cfg)["feats"]

    before = features()
    replace_in_place(depth.open_split(cfg.data, "train_split").pairs[0][0])
    after = features()
    assert len(list((tmp_path / "c").glob("nyu_train_*.pt"))) == 2
    assert not torch.equal(after[0], before[0]) and torch.equal(after[1:], before[1:])


def test_retrieval_cache_misses_when_an_image_is_replaced(layouts, tmp_path):
    root = copy_of(layouts["roxford"], tmp_path)
    cfg = retrieval.RetrievalConfig(output_dir=str(tmp_path / "out"))
    cfg.data.image_size, cfg.data.num_workers, cfg.features.multiscale = 32, 0, [1.0]
    backbone = tiny_backbone()

    def features(split: str) -> torch.Tensor:
        dataset = RevisitedRetrievalDataset(root, "roxford5k")
        return retrieval.compute_features(cfg, dataset, split, lambda: backbone,
                                          torch.device("cpu"))

    before = {split: features(split) for split in ("query", "database")}
    dataset = RevisitedRetrievalDataset(root, "roxford5k")
    replace_in_place(dataset.image_path(dataset.imlist[3]))
    after = {split: features(split) for split in ("query", "database")}
    cached = sorted(p.name.split("_")[1] for p in (tmp_path / "out/feature_cache").iterdir())
    assert cached == ["database", "database", "query"]
    assert torch.equal(after["query"], before["query"])
    assert not torch.equal(after["database"][3], before["database"][3])


# ------------------------------------------------- 4. atomic, self-healing caches


def _batches() -> list[torch.Tensor]:
    return [torch.arange(6.0).view(3, 2), torch.arange(6.0, 10.0).view(2, 2)]


def _double(batch: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"features": 2 * batch}


@pytest.mark.parametrize("damage", ["empty", "half", "tail", "garbage"])
def test_unreadable_cache_is_a_miss_with_a_warning_and_is_overwritten(tmp_path, damage):
    cache = tmp_path / "cache" / "train_0123.pt"
    expected = extract(_batches(), _double, "x", cache_file=cache)["features"]
    data = cache.read_bytes()
    cut = {"empty": b"", "half": data[: len(data) // 2], "tail": data[:-10],
           "garbage": b"not a torch file"}
    cache.write_bytes(cut[damage])  # "tail" is the partial write that gave OSError Errno 22
    with pytest.warns(UserWarning, match=rf"feature cache {re.escape(str(cache))} cannot be read"):
        again = extract(_batches(), _double, "x", cache_file=cache)["features"]
    assert torch.equal(again, expected)
    assert torch.equal(torch.load(cache, weights_only=True)["features"], expected)  # rewritten


def test_killed_cache_write_leaves_no_partial_file(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "val_0123.pt"
    real_save = torch.save

    def killed_save(obj, f, *args, **kwargs):
        handle = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f  # noqa: SIM115
        handle.write(b"PK\x03\x04 the first bytes of a zip")
        handle.flush()
        raise Killed

    monkeypatch.setattr(torch, "save", killed_save)
    with pytest.raises(Killed):
        extract(_batches(), _double, "x", cache_file=cache)
    assert not cache.exists()
    assert list(cache.parent.iterdir()) == []  # nor a stray temporary file
    monkeypatch.setattr(torch, "save", real_save)
    out = extract(_batches(), _double, "x", cache_file=cache)["features"]
    assert torch.equal(torch.load(cache, weights_only=True)["features"], out)


def test_unreadable_imagefolder_cache_is_recomputed(layouts, tiny_weights, tmp_path):
    cache = tmp_path / "cache"
    data = ImageFolderDataConfig(root=str(layouts["imagefolder"]), resize_size=32,
                                 image_size=28, batch_size=16, num_workers=0)
    features = FeatureConfig(kind="cls", cache_dir=str(cache))
    first = load_imagefolder_features(tiny_weights, data, features)
    (val_file,) = cache.glob("val_*.pt")
    val_file.write_bytes(val_file.read_bytes()[:-10])
    with pytest.warns(UserWarning, match=re.escape(str(val_file))):
        second = load_imagefolder_features(tiny_weights, data, features)
    torch.testing.assert_close(second.val.features, first.val.features, atol=0, rtol=0)
    assert torch.load(val_file, weights_only=True)["features"].shape[0] == len(first.val.labels)


# ------------------------------------------------- 5. no code from a ground-truth pickle


class _SystemPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _ExecPayload(_SystemPayload):
    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize(("payload", "refused"), [(_SystemPayload, f"{os.system.__module__}.system"),
                                                  (_ExecPayload, "builtins.exec")])
def test_crafted_ground_truth_pickle_is_refused_and_never_runs(layouts, tmp_path, payload,
                                                               refused):
    root = copy_of(layouts["roxford"], tmp_path)
    path = root / "gnd_roxford5k.pkl"
    meta = load_ground_truth(path)
    marker = tmp_path / "payload_ran"
    meta["gnd"][0]["bbx"] = payload(marker)
    path.write_bytes(pickle.dumps(meta))
    with pytest.raises(pickle.UnpicklingError,
                       match=rf"{re.escape(str(path))}: refusing to load global {refused}"):
        RevisitedRetrievalDataset(root, "roxford5k")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_ground_truth_with_numpy_arrays_loads(layouts, tmp_path, protocol):
    root = copy_of(layouts["roxford"], tmp_path)
    path = root / "gnd_roxford5k.pkl"
    meta = load_ground_truth(path)
    plain = [dict(entry) for entry in meta["gnd"]]
    for entry in meta["gnd"]:  # the official files' numpy flavour
        entry["bbx"] = np.array(entry["bbx"], dtype=np.float64)
        for key in ("easy", "hard", "junk"):
            entry[key] = np.array(entry[key], dtype=np.int64)
        entry["score"], entry["raw"] = np.float32(0.5), b"\x00\xff"
    path.write_bytes(pickle.dumps(meta, protocol=protocol))
    dataset = RevisitedRetrievalDataset(root, "roxford5k")
    for entry, original in zip(dataset.gnd, plain, strict=True):
        np.testing.assert_array_equal(entry["bbx"], original["bbx"])
        assert entry["easy"].tolist() == original["easy"] and entry["raw"] == b"\x00\xff"
    x1, y1, x2, y2 = (round(v) for v in plain[0]["bbx"])
    assert dataset.query_image(0).shape == (3, y2 - y1, x2 - x1)


# ------------------------------------------------- 6. labels and listed files at open


def test_out_of_range_ade20k_label_is_an_error_at_open(layouts, tmp_path, monkeypatch):
    root = copy_of(layouts["ade"], tmp_path)
    label = root / "ADEChallengeData2016/annotations/training/ADE_train_00000003.png"
    png = np.array(Image.open(label))
    png[2, 5] = 200
    Image.fromarray(png).save(label)
    with pytest.raises(ValueError, match=rf"{re.escape(str(label))} has value 200; allowed are "
                                         r"0 \(ignore\) and 1\.\.150"):
        ADE20KDataset(root, "training")
    png[2, 5] = 150
    Image.fromarray(png).save(label)
    assert len(ADE20KDataset(root, "training")) == 8  # 150 is the last class: fine
    # The CLI checks against data.num_classes, before any backbone is built.
    monkeypatch.setattr(segmentation, "build_eval_backbone", never("build_eval_backbone"))
    with pytest.raises(ValueError, match=rf"has value {NUM_CLASSES}; .* 1\.\.{NUM_CLASSES - 1}"):
        segmentation.main([f"output_dir={tmp_path / 'out'}", f"data.root={root}",
                           f"data.num_classes={NUM_CLASSES - 1}", "data.num_workers=0"])


def test_missing_nyu_test_file_is_an_error_before_training(layouts, tmp_path, monkeypatch):
    root = copy_of(layouts["nyu"], tmp_path)
    lines = (root / "nyu_test.txt").read_text().splitlines()
    missing = root / lines[1].split()[1]
    missing.unlink()
    monkeypatch.setattr(depth, "build_eval_backbone", never("build_eval_backbone"))
    cfg = load_config(None, [f"data.root={root}", f"output_dir={tmp_path / 'out'}",
                             "data.num_workers=0"], schema=depth.DepthEvalConfig)
    with pytest.raises(FileNotFoundError,
                       match=rf"nyu_test\.txt:2: depth map {re.escape(str(missing))} does not exist"):
        depth.run(cfg)
    rgb = root / lines[0].split()[0]
    rgb.unlink()
    with pytest.raises(FileNotFoundError, match=rf":1: rgb image {re.escape(str(rgb))} does not"):
        NYUDepthDataset(root / "nyu_test.txt")


def test_missing_retrieval_image_is_an_error_at_open(layouts, tmp_path):
    root = copy_of(layouts["roxford"], tmp_path)
    missing = RevisitedRetrievalDataset(root, "roxford5k").image_path("roxford5k_000004")
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=rf"lists 1 images that do not exist: "
                                                rf"\['{re.escape(str(missing))}'\]"):
        RevisitedRetrievalDataset(root, "roxford5k")


# ------------------------------------------------- 7. unwritable output_dir, checked first


def test_prepare_output_dir_creates_and_probes(tmp_path):
    out = prepare_output_dir(tmp_path / "a" / "b")
    assert out.is_dir() and list(out.iterdir()) == []  # the probe file is gone again
    (tmp_path / "afile").write_text("")
    for bad in (tmp_path / "afile", tmp_path / "afile" / "out"):
        with pytest.raises(ConfigError, match=rf"'output_dir': cannot write to {re.escape(str(bad))}"):
            prepare_output_dir(bad)


def _cli_args(name: str, layouts: dict[str, Path]) -> list[str]:
    if name in ("linear", "knn"):
        return ["--config", f"configs/eval/{name}.yaml", f"data.root={layouts['imagefolder']}",
                *FAST]
    if name == "segmentation":
        return [f"data.root={layouts['ade']}", f"data.num_classes={NUM_CLASSES}",
                "data.num_workers=0", "train.augment=false", "train.iterations=1"]
    if name == "depth":
        return [f"data.root={layouts['nyu']}", "data.num_workers=0", "train.precompute=true"]
    return ["--config", "configs/eval/retrieval.yaml", f"data.root={layouts['roxford']}",
            "data.num_workers=0"]


@pytest.mark.parametrize("name", ["linear", "knn", "segmentation", "depth", "retrieval"])
def test_unwritable_output_dir_fails_before_any_work(layouts, tmp_path, monkeypatch, capsys,
                                                     name):
    modules = {"linear": (linear, features_mod), "knn": (knn, features_mod),
               "segmentation": (segmentation, segmentation), "depth": (depth, depth),
               "retrieval": (retrieval, retrieval)}
    cli, worker = modules[name]
    for attr in ("build_eval_backbone", "extract"):
        monkeypatch.setattr(worker, attr, never(attr))
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "out"  # under a file: unwritable even for root
    with pytest.raises(SystemExit) as info:
        cli.main([*_cli_args(name, layouts), f"output_dir={out}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: config key 'output_dir': cannot write to {out}" in err


# ------------------------------------------------- 5 and 7 for the mmseg adapter


class _GetattrPayload:
    def __reduce__(self):
        return getattr, (np.ndarray, "tofile")


@pytest.mark.mmseg
def test_mmengine_checkpoint_loader_is_weights_only(tmp_path):
    pytest.importorskip("mmseg")
    from mmengine.logging import HistoryBuffer
    from mmengine.runner.checkpoint import CheckpointLoader

    import eval.mmseg_backbone  # noqa: F401  (registers the local-file loader)

    buffer = HistoryBuffer()
    buffer.update(0.5)
    good = tmp_path / "iter_2.pth"
    torch.save({"state_dict": {"w": torch.ones(2)},
                "meta": {"message_hub": {"log_scalars": {"loss": buffer}}, "iter": 2,
                         "seed": np.int64(7), "hist": np.arange(3.0)}}, good)
    loaded = CheckpointLoader.load_checkpoint(str(good))
    assert loaded["meta"]["message_hub"]["log_scalars"]["loss"].mean() == 0.5
    assert loaded["meta"]["hist"].tolist() == [0.0, 1.0, 2.0]
    marker = tmp_path / "payload_ran"
    for payload, refused in ((_SystemPayload(marker), "posix"),
                             (_ExecPayload(marker), "GLOBAL exec"),
                             (_GetattrPayload(), "getattr")):
        bad = tmp_path / "crafted.pth"
        torch.save({"state_dict": {}, "meta": payload}, bad)
        with pytest.raises(pickle.UnpicklingError,
                           match=rf"(?s)checkpoint {re.escape(str(bad))} refused: .*{refused}"):
            CheckpointLoader.load_checkpoint(str(bad))
        assert not marker.exists()


@pytest.mark.mmseg
def test_mmseg_cli_unwritable_work_dir_fails_first(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mmseg")
    import eval.mmseg_backbone as mmseg_backbone

    monkeypatch.setattr(mmseg_backbone, "build_eval_backbone", never("build_eval_backbone"))
    (tmp_path / "afile").write_text("")
    work = tmp_path / "afile" / "work"
    assert mmseg_backbone.main(["configs/mmseg/linear_ade20k.py", "--work-dir", str(work)]) == 2
    assert f"error: --work-dir: cannot write to {work}" in capsys.readouterr().err
