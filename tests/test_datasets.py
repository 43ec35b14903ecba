"""Tests for dinov.data.datasets on fixtures written by the synthetic writer in real layouts."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import dinov  # noqa: F401  (before torchvision: installs the CPU compatibility shim)
from dinov.data.datasets import (
    ADE20KDataset,
    LabelledImageFolder,
    NYUDepthDataset,
    RevisitedRetrievalDataset,
    UnlabelledImages,
    eigen_crop_mask,
    load_ground_truth,
    load_image,
    resize_center_crop,
)
from dinov.data.synthetic import IMAGE_CLASS_NAMES, render_scenes, write_layout

SEED, SIZE = 11, 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_layout(root / "imagefolder", "imagefolder", 24, SEED, SIZE, 0.25)
    write_layout(root / "ade", "ade20k", 10, SEED, 40, 0.2)
    write_layout(root / "nyu", "nyu", 6, SEED, SIZE, 0.5)
    write_layout(root / "roxford", "roxford", 30, SEED, 48)
    write_layout(root / "rparis", "rparis", 8, SEED, SIZE)
    return root


# --------------------------------------------------------------------------- decoding


def test_load_image_and_resize_center_crop(data):
    path = next((data / "nyu" / "images").iterdir())
    image = load_image(path)
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    wide = torch.full((3, 20, 50), 0.25)
    out = resize_center_crop(wide, 10)
    assert out.shape == (3, 10, 10) and torch.allclose(out, torch.full_like(out, 0.25))
    labels = torch.arange(4).repeat_interleave(10).view(1, 40).expand(20, 40)  # 4 stripes
    small = resize_center_crop(labels, 10, mode="nearest")  # 20x40 -> 10x20 -> crop 10x10
    assert small.dtype == labels.dtype and small[0].tolist() == [1] * 5 + [2] * 5


def test_corrupt_jpeg_is_skipped_with_a_warning_and_counted(tmp_path):
    folder = tmp_path / "flat"
    (folder / "sub").mkdir(parents=True)
    images = render_scenes(3, SIZE, seed=0).images
    for i, pixels in enumerate((images * 255).round().byte().permute(0, 2, 3, 1).numpy()):
        Image.fromarray(pixels).save(folder / ("sub" if i == 2 else "") / f"{i}.jpg", quality=95)
    data = (folder / "1.jpg").read_bytes()
    (folder / "1.jpg").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.warns(UserWarning, match="1.jpg"):
        assert load_image(folder / "1.jpg") is None
    dataset = UnlabelledImages(folder, image_size=16, layout="folder")
    assert len(dataset) == 3  # 0.jpg, 1.jpg, sub/2.jpg, sorted
    with pytest.warns(UserWarning, match="1.jpg"):
        replacement = dataset[1]
    assert dataset.num_skipped == 1
    assert torch.equal(replacement, dataset[2])  # the next valid image
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known bad file warns and counts only once
        dataset[1]
    assert dataset.num_skipped == 1
    with pytest.raises(IndexError):
        dataset[3]


def test_missing_and_empty_roots_name_the_path(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError, match="no_such_dir.*expected an ImageFolder tree"):
        UnlabelledImages(missing, image_size=16)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        LabelledImageFolder(missing, image_size=16)
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images found in .*empty"):
        UnlabelledImages(tmp_path / "empty", image_size=16)
    with pytest.raises(FileNotFoundError, match="no images found"):
        UnlabelledImages(tmp_path / "empty", image_size=16, layout="folder")
    with pytest.raises(ValueError, match="'zip'"):
        UnlabelledImages(tmp_path / "empty", image_size=16, layout="zip")
    with pytest.raises(FileNotFoundError, match="no_such_dir.*ADEChallengeData2016"):
        ADE20KDataset(missing, "training")
    with pytest.raises(FileNotFoundError, match="split.txt"):
        NYUDepthDataset(tmp_path / "split.txt")
    with pytest.raises(FileNotFoundError, match="gnd_roxford5k.pkl"):
        RevisitedRetrievalDataset(missing)


# --------------------------------------------------------------------------- image folders


def test_imagefolder_layout_matches_render_and_torchvision(data):
    root = data / "imagefolder"
    scenes = render_scenes(24, SIZE, SEED)
    train = LabelledImageFolder(root / "train", image_size=SIZE)
    val = LabelledImageFolder(root / "val", image_size=SIZE, classes=train.classes)
    assert len(train) + len(val) == 24 and len(val) >= 1
    assert set(train.classes) <= set(IMAGE_CLASS_NAMES) and train.classes == sorted(train.classes)
    assert set(val.classes) == set(train.classes)  # stratified: classes with >= 2 images in both
    for dataset in (train, val):
        for path, target in zip(dataset.paths, dataset.targets, strict=True):
            scene = int(path.stem)
            assert IMAGE_CLASS_NAMES[int(scenes.image_class[scene])] == dataset.classes[target]
    image, target = train[0]
    assert image.shape == (3, SIZE, SIZE) and isinstance(target, int)
    # PNG is lossless: pixels equal the renderer's uint8 output
    scene = int(train.paths[0].stem)
    assert torch.allclose(image, (scenes.images[scene] * 255).round() / 255, atol=1e-6)
    from torchvision.datasets import ImageFolder

    reference = ImageFolder(str(root / "train"))
    assert reference.classes == train.classes
    assert [(p, t) for p, t in reference.samples] == [
        (str(p), t) for p, t in zip(train.paths, train.targets, strict=True)
    ]
    unlabelled = UnlabelledImages(root / "train", image_size=16)
    assert len(unlabelled) == len(train) and unlabelled[0].shape == (3, 16, 16)


def test_folder_layout_accepts_a_file_list(data, tmp_path):
    root = data / "imagefolder"
    everything = UnlabelledImages(root, image_size=SIZE, layout="folder")
    assert len(everything) == 24  # recursive over train/ and val/
    absolute = everything.paths[5]
    list_file = data / "imagefolder" / "list.txt"
    relative = everything.paths[0].relative_to(root)
    list_file.write_text(f"# comment\n{relative}\n\n{absolute}\n")
    listed = UnlabelledImages(list_file, image_size=SIZE, layout="folder")
    assert listed.paths == [everything.paths[0], absolute]
    assert torch.equal(listed[1], everything[5])
    list_file.unlink()


# --------------------------------------------------------------------------- ADE20K


def test_ade20k_labels_round_trip_exactly(data):
    scenes = render_scenes(10, 40, SEED)
    train = ADE20KDataset(data / "ade", "training")
    val = ADE20KDataset(data / "ade" / "ADEChallengeData2016", "validation")  # either root
    assert (len(train), len(val)) == (8, 2)
    assert train.images[0].name == "ADE_train_00000001.jpg"
    assert val.images[0].name == "ADE_val_00000001.jpg"
    for i, (image, label) in enumerate([train[k] for k in range(8)] + [val[0], val[1]]):
        assert label.dtype == torch.int64 and label.shape == (40, 40)
        assert torch.equal(label, scenes.labels[i] - 1)  # reduce_zero_label shift
        assert (image - scenes.images[i]).abs().mean() < 0.04  # JPEG q95 (pixel noise is lossy)


def test_ade20k_ignore_resize_and_missing_annotation(data, tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    shutil.copytree(data / "ade" / "ADEChallengeData2016", base)
    label_path = base / "annotations" / "training" / "ADE_train_00000001.png"
    png = np.array(Image.open(label_path))
    png[:5] = 0  # "other" pixels
    Image.fromarray(png).save(label_path)
    dataset = ADE20KDataset(tmp_path, "training", image_size=20)
    image, label = dataset[0]
    assert image.shape == (3, 20, 20) and label.shape == (20, 20)
    assert (label[:2] == 255).all() and (label[3:] < 255).all()
    assert set(label.unique().tolist()) <= set(
        (torch.from_numpy(png).long() - 1).unique().tolist()
    ) | {255}
    label_path.unlink()
    with pytest.raises(FileNotFoundError, match="ADE_train_00000001.jpg has no annotation"):
        ADE20KDataset(tmp_path, "training")
    with pytest.raises(ValueError, match="'train'"):
        ADE20KDataset(tmp_path, "train")


# --------------------------------------------------------------------------- NYUv2


def test_nyu_depth_round_trips_to_a_millimetre(data):
    scenes = render_scenes(6, SIZE, SEED)
    train = NYUDepthDataset(data / "nyu" / "nyu_train.txt")
    test = NYUDepthDataset(data / "nyu" / "nyu_test.txt", root=data / "nyu")
    assert (len(train), len(test)) == (3, 3)
    assert Image.open(train.pairs[0][1]).mode == "I;16"
    for i, (image, depth) in enumerate([train[k] for k in range(3)] + [test[k] for k in range(3)]):
        assert depth.dtype == torch.float32 and depth.shape == (SIZE, SIZE)
        assert (depth - scenes.depth[i]).abs().max() <= 0.0005 + 1e-6
        assert torch.allclose(image, (scenes.images[i] * 255).round() / 255, atol=1e-6)
    _, small = NYUDepthDataset(data / "nyu" / "nyu_train.txt", image_size=16)[0]
    assert small.shape == (16, 16)


def test_nyu_invalid_depth_and_bad_lines(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    mm = np.array([[0, 500, 9999, 12000]] * 4, dtype=np.uint16)
    Image.fromarray(mm).save(tmp_path / "depth.png")
    split = tmp_path / "split.txt"
    split.write_text("/rgb.png /depth.png 518.8579\n")  # BTS style: root-relative, focal
    _, depth = NYUDepthDataset(split, max_depth=10.0)[0]
    assert depth[0].tolist() == pytest.approx([0.0, 0.5, 9.999, 0.0])
    split.write_text("rgb.png depth.png\n\nrgb.png\n")
    with pytest.raises(ValueError, match=r"split.txt:3: expected 'rgb_path depth_path'"):
        NYUDepthDataset(split)
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "depth8.png")
    split.write_text("rgb.png depth8.png\n")
    with pytest.raises(ValueError, match="depth8.png is 8-bit"):
        NYUDepthDataset(split)[0]


def test_eigen_crop_mask():
    mask = eigen_crop_mask(480, 640)
    expected = torch.zeros(480, 640, dtype=torch.bool)
    expected[45:471, 41:601] = True
    assert torch.equal(mask, expected)
    half = eigen_crop_mask(240, 320)
    assert half.sum() == (round(471 / 2) - round(45 / 2)) * (round(601 / 2) - round(41 / 2))
    assert not half[0].any() and half[120, 160]


# --------------------------------------------------------------------------- retrieval


def test_roxford_ground_truth_structure(data):
    meta = load_ground_truth(data / "roxford" / "gnd_roxford5k.pkl")
    assert set(meta) == {"imlist", "qimlist", "gnd"}
    assert len(meta["imlist"]) == 30 and len(meta["gnd"]) == len(meta["qimlist"]) == 4
    all_positive: set[int] = set()
    for entry in meta["gnd"]:
        easy, hard, junk = (entry[k] for k in ("easy", "hard", "junk"))
        assert (len(easy), len(hard), len(junk)) == (2, 2, 1)
        groups = [set(easy), set(hard), set(junk)]
        assert sum(map(len, groups)) == len(set().union(*groups))  # disjoint
        assert all(isinstance(i, int) and 0 <= i < 30 for g in groups for i in g)
        all_positive |= set().union(*groups)
        x1, y1, x2, y2 = entry["bbx"]
        assert all(isinstance(v, float) for v in entry["bbx"])
        assert 0 <= x1 < x2 <= 48 and 0 <= y1 < y2 <= 48
    assert len(all_positive) == 10  # 2 landmarks x 5; the other 20 are distractors
    assert {name + ".jpg" for name in meta["imlist"] + meta["qimlist"]} == {
        p.name for p in (data / "roxford" / "jpg").iterdir()
    }


def test_revisited_reader_and_query_crop(data):
    oxford = RevisitedRetrievalDataset(data / "roxford", "roxford5k")
    assert oxford.database_image(0).shape == (3, 48, 48)
    x1, y1, x2, y2 = (round(v) for v in oxford.gnd[0]["bbx"])
    assert oxford.query_image(0).shape == (3, y2 - y1, x2 - x1)
    assert oxford.query_image(0, crop=False).shape == (3, 48, 48)
    # easy positives resemble their query more than distractors do
    query = oxford.query_image(0, crop=False)
    positives = {i for g in oxford.gnd for k in ("easy", "hard", "junk") for i in g[k]}
    distance = [float((oxford.database_image(i) - query).abs().mean()) for i in range(30)]
    easy = [distance[i] for i in oxford.gnd[0]["easy"]]
    distractors = [d for i, d in enumerate(distance) if i not in positives]
    assert max(easy) < np.median(distractors)


def test_revisited_dataset_root_forms(data, tmp_path):
    (tmp_path / "rparis6k").symlink_to(data / "rparis", target_is_directory=True)
    paris = RevisitedRetrievalDataset(tmp_path, "rparis6k", image_size=16)
    assert len(paris.imlist) == 8 and len(paris.qimlist) == 2
    assert paris.database_image(0).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="'oxford'"):
        RevisitedRetrievalDataset(tmp_path, "oxford")
