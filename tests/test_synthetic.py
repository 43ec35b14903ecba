"""Tests for dinov.data.synthetic: determinism, scene structure, colour-carries-class, CLI."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from dinov.data.synthetic import (
    FIRST_OBJECT_LABEL,
    FLOOR_LABEL,
    NUM_CLASSES,
    NUM_IMAGE_CLASSES,
    OBJECT_HUES,
    WALL_LABEL,
    View,
    main,
    render_scenes,
    render_views,
)

FIELDS = ("images", "labels", "depth", "image_class")


@pytest.fixture(scope="module")
def scenes():
    return render_scenes(96, 48, seed=0)


def _equal(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


def test_shapes_dtypes_and_ranges(scenes):
    assert scenes.images.shape == (96, 3, 48, 48) and scenes.images.dtype == torch.float32
    assert scenes.labels.shape == (96, 48, 48) and scenes.labels.dtype == torch.int64
    assert scenes.depth.shape == (96, 48, 48) and scenes.depth.dtype == torch.float32
    assert scenes.image_class.shape == (96,) and scenes.image_class.dtype == torch.int64
    assert 0.0 <= scenes.images.min() and scenes.images.max() <= 1.0
    assert scenes.labels.min() >= 1 and scenes.labels.max() <= NUM_CLASSES
    assert 0.5 < scenes.depth.min() and scenes.depth.max() < 10.0
    assert 0 <= scenes.image_class.min() and scenes.image_class.max() < NUM_IMAGE_CLASSES
    # every image class occurs in a modest sample
    assert len(scenes.image_class.unique()) == NUM_IMAGE_CLASSES


@pytest.mark.parametrize("size", [37, 48])  # 37: element counts not a multiple of the SIMD width
def test_rendering_is_chunk_independent(size):
    whole = render_scenes(40, size, seed=5)
    chunks = [render_scenes(k, size, seed=5, start_index=s) for s, k in [(0, 7), (7, 1), (8, 32)]]
    joined = {f: torch.cat([getattr(c, f) for c in chunks]) for f in FIELDS}
    for f in FIELDS:
        assert torch.equal(getattr(whole, f), joined[f]), f
    alone = render_views(5, [33, 2], size)  # any subset, any order
    assert torch.equal(alone.images[0], whole.images[33])
    assert torch.equal(alone.labels[1], whole.labels[2])
    assert _equal(render_scenes(3, size, seed=5), render_scenes(3, size, seed=5))
    assert not torch.equal(render_scenes(3, size, seed=6).images, whole.images[:3])


def test_room_geometry_and_depth(scenes):
    depth, labels = scenes.depth, scenes.labels
    # the floor recedes upward: along each column, floor depth grows toward the top
    floor = labels == FLOOR_LABEL
    assert floor[:, -1].float().mean() > 0.5  # the bottom row is mostly floor
    bottom = depth[:, -1][floor[:, -1]].mean()
    mid_floor = floor[:, 24]
    assert depth[:, 24][mid_floor].mean() > bottom
    # the far wall is the farthest thing in every scene it is visible in
    objects = labels >= FIRST_OBJECT_LABEL
    for i in range(len(depth)):
        wall = labels[i] == WALL_LABEL
        if wall.any() and objects[i].any():
            assert depth[i][objects[i]].max() < depth[i][wall].min()
    # objects carry their own depth: sharp discontinuities at object borders
    step = (depth[:, :, 1:] - depth[:, :, :-1]).abs()
    border = labels[:, :, 1:] != labels[:, :, :-1]
    assert step[border].median() > 10 * step[~border].median()


def test_apparent_size_shrinks_with_depth():
    batch = render_scenes(200, 32, seed=1)
    sizes, depths = [], []
    for labels, depth in zip(batch.labels, batch.depth, strict=True):
        for label in labels.unique():
            if label >= FIRST_OBJECT_LABEL:
                pixels = labels == label
                sizes.append(pixels.sum().float().log())
                depths.append(depth[pixels].median().log())
    corr = torch.corrcoef(torch.stack([torch.stack(sizes), torch.stack(depths)]))[0, 1]
    assert corr < -0.5


def test_image_class_is_a_visible_dominant_object(scenes):
    for labels, image_class in zip(scenes.labels, scenes.image_class, strict=True):
        counts = torch.bincount(labels.flatten(), minlength=NUM_CLASSES + 1)
        assert counts[image_class + FIRST_OBJECT_LABEL] > 0
    # the largest instance's class is almost always the class with most object pixels
    counts = torch.stack(
        [torch.bincount(lab.flatten(), minlength=NUM_CLASSES + 1) for lab in scenes.labels]
    )
    most = counts[:, FIRST_OBJECT_LABEL:].argmax(1)
    assert (most == scenes.image_class).float().mean() > 0.85


def _hue_turns(rgb: torch.Tensor) -> torch.Tensor:
    """HSV hue in [0, 1) of (P, 3) colours."""
    mx, arg = rgb.max(1)
    span = (mx - rgb.min(1).values).clamp_min(1e-6)
    r, g, b = rgb.unbind(1)
    sector = torch.stack([((g - b) / span) % 6, (b - r) / span + 2, (r - g) / span + 4], 1)
    return sector.gather(1, arg[:, None])[:, 0] / 6


def test_colour_carries_class_and_grayscale_removes_it():
    batch = render_scenes(160, 32, seed=2)
    pixels = batch.images.permute(0, 2, 3, 1).reshape(-1, 3)
    labels = batch.labels.flatten()
    keep = labels >= FIRST_OBJECT_LABEL
    rgb, cls = pixels[keep], labels[keep] - FIRST_OBJECT_LABEL
    # circular mean hue per class sits on the class hue, 45 degrees apart
    angle = _hue_turns(rgb) * 2 * math.pi
    unit = torch.stack([angle.cos(), angle.sin()], 1)
    centres = torch.stack([unit[cls == k].mean(0) for k in range(NUM_IMAGE_CLASSES)])
    for k, centre in enumerate(centres):
        mean_turns = math.atan2(centre[1], centre[0]) / (2 * math.pi)
        gap = abs((mean_turns - OBJECT_HUES[k] + 0.5) % 1.0 - 0.5)
        assert gap < 0.02, (k, mean_turns)
    hue_accuracy = ((unit @ centres.T).argmax(1) == cls).float().mean()
    assert hue_accuracy > 0.95
    # luminance is drawn independently of class: grayscale is near chance (1/8)
    gray = rgb @ torch.tensor([0.299, 0.587, 0.114])
    gray_centres = torch.stack([gray[cls == k].mean() for k in range(NUM_IMAGE_CLASSES)])
    gray_accuracy = ((gray[:, None] - gray_centres).abs().argmin(1) == cls).float().mean()
    assert gray_accuracy < 0.25
    assert gray_centres.max() - gray_centres.min() < 0.05


def test_views_rerender_the_same_scene():
    base = render_views(3, [4], 48)
    noisy = render_views(3, [4], 48, noise_keys=[9])
    assert torch.equal(base.labels, noisy.labels)  # only the pixel noise is redrawn
    assert 0 < (base.images - noisy.images).abs().mean() < 0.05
    zoomed = render_views(3, [4], 48, views=[View(zoom=2.0)])
    # zooming 2x about the centre: the central 24x24 block, magnified, is the new image
    centre = base.labels[0, 12:36, 12:36].repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert (zoomed.labels[0] == centre).float().mean() > 0.9
    with pytest.raises(ValueError, match="2 views"):
        render_views(3, [4], 48, views=[View(), View()])


def test_render_argument_errors():
    with pytest.raises(ValueError, match="size"):
        render_scenes(2, 4, seed=0)
    with pytest.raises(ValueError, match="n must be"):
        render_scenes(-1, 32, seed=0)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--layout", "coco", "--n", "4"], "'coco'"),
        (["--layout", "nyu", "--n", "0"], "--n must be an integer >= 1 for layout nyu, got 0"),
        (["--layout", "roxford", "--n", "5"], "--n must be an integer >= 8 for layout roxford"),
        (["--layout", "ade20k", "--n", "4", "--val-fraction", "1.5"], "--val-fraction"),
        (
            ["--layout", "ade20k", "--n", "4", "--size", "3"],
            "--size must be an integer in [8, 4096], got 3",
        ),
    ],
)
def test_writer_rejects_bad_arguments(tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--seed", "0", *args])
    assert needle in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


def test_writer_cli_prints_one_summary_line(tmp_path):
    out = tmp_path / "nyu"
    cmd = [sys.executable, "-m", "dinov.data.synthetic", "--out", str(out), "--layout", "nyu"]
    cmd += ["--n", "5", "--seed", "3", "--size", "16", "--val-fraction", "0.4"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "train 3, test 2" in lines[0]
    assert len(list((out / "images").iterdir())) == 5
