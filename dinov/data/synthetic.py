"""Deterministic procedural scenes with exact labels and depth, and their on-disk writers.

This module owns the embedded default data of the project (DESIGN.md section 4): images
rendered from a seed, with per-pixel semantic labels, metric depth and an image-level
class, plus a writer that materialises them in the real layouts the loaders of
``dinov.data.datasets`` read (ImageFolder, ADE20K, NYUv2, revisited Oxford/Paris).

Scene design (what a model can learn from it, and why):

- **Room.** A floor plane recedes toward a horizon and meets a far wall. Floor depth
  follows the pinhole ground-plane law ``d = near * (1 - horizon) / (y - horizon)``
  (``y`` the image row in [0, 1], top = 0); the wall stands at 5-9 m, slightly slanted.
  Floor and wall are the two "stuff" classes, low-saturation, mildly textured (floor tiles
  drawn in ground-plane coordinates, so they shrink with distance; faint wall panels).
- **Objects.** 2-4 per scene: ellipse, rectangle, triangle, ring or diamond (the shape is
  drawn independently of the class). Each stands on the floor at a depth in 1.4-6.75 m;
  its apparent size is ``world size / depth`` and its base sits on the floor row of that
  depth. Objects are painted far to near, so occlusion is consistent, and each object
  pixel gets the object's depth (plus a slight tilt), giving sharp depth discontinuities.
- **Colour carries class identity.** Object class ``k`` has HSV hue ``k/8`` (45 degrees
  apart around the circle) with a small per-instance jitter (+-7 degrees). The colour is
  built as ``Y + c * chroma(hue)`` with ``chroma`` a zero-luminance direction, so every
  object's luminance ``Y`` is drawn independently of its class: a grayscale image holds
  no class information at all, and hue shifts comparable to the class spacing confuse
  neighbouring classes. DINO's default colour augmentation (hue jitter 0.1 = +-36
  degrees, grayscale with p = 0.2) therefore teaches invariances that hurt segmentation
  here -- on purpose, so that a learned augmentation designer has something real to
  discover (weaker colour jitter).
- **Nuisances.** Per-instance texture (stripes, checker or concentric rings at a random
  frequency and orientation), a vertical shading, depth-dependent light falloff, a
  horizontal light gradient and Gaussian pixel noise keep the tasks from being trivial.
- ``image_class`` is the class of the largest visible object (pixel count after
  occlusion), in ``0..NUM_IMAGE_CLASSES-1``; label ids are ``1 = wall``, ``2 = floor``,
  ``3 + k`` = object class ``k``; 0 stays free for "ignore" as in ADE20K.

Determinism: scene ``i`` depends only on ``(seed, i)``: its parameters come from a numpy
generator seeded with ``(seed, i, 0)`` and its pixel noise from ``(seed, i, 1 + key)``,
so any subset of scenes, in any chunking, renders bitwise identically. The per-pixel
maths uses only IEEE-exact elementwise operations (add, multiply, divide, sqrt, floor,
comparisons); transcendental functions are evaluated per scene in Python. That matters:
torch's vectorised and scalar tail paths of ``sin``/``exp`` can differ in the last bit,
and where the tail falls depends on the batch size and thread split.

``render_views`` re-renders a scene through a camera change (``View``: zoom, shift,
rotation, lighting) with fresh pixel noise; the retrieval writer builds its landmarks
from it.

Writer: ``python -m dinov.data.synthetic --out DIR --layout LAYOUT --n N --seed S
[--size 64] [--val-fraction 0.2]`` with LAYOUT one of

- ``imagefolder``: ``DIR/{train,val}/c03_green/00000012.png``, split stratified by
  ``image_class`` (every class with >= 2 images lands in both splits);
- ``ade20k``: ``DIR/ADEChallengeData2016/{images,annotations}/{training,validation}/``
  ``ADE_{train,val}_%08d.{jpg,png}`` (JPEG q95; uint8 labels, ids 1..NUM_CLASSES);
- ``nyu``: ``DIR/{images,depth}/%06d.png`` (depth uint16 millimetres) and
  ``DIR/nyu_{train,test}.txt`` with ``rgb_relpath depth_relpath`` lines;
- ``roxford`` / ``rparis``: ``DIR/jpg/*.jpg`` and ``DIR/gnd_roxford5k.pkl`` /
  ``gnd_rparis6k.pkl``. ``N`` is the database size: ``min(11, N // 12)`` landmark scenes
  (at least 1), each with 2 easy (small shift/zoom/brightness), 2 hard (strong zoom,
  rotation, lighting) and 1 junk (heavy crop or a large occluder) re-renderings, the rest
  distractor scenes, shuffled; 2 queries per landmark with ``bbx`` around the objects.
"""

from __future__ import annotations

import argparse
import math
import pickle
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

STUFF_NAMES = ("wall", "floor")
OBJECT_NAMES = ("red", "orange", "lime", "green", "cyan", "blue", "violet", "magenta")
OBJECT_HUES = tuple(k / len(OBJECT_NAMES) for k in range(len(OBJECT_NAMES)))  # HSV turns
NUM_IMAGE_CLASSES = len(OBJECT_NAMES)
NUM_CLASSES = len(STUFF_NAMES) + NUM_IMAGE_CLASSES
WALL_LABEL, FLOOR_LABEL, FIRST_OBJECT_LABEL = 1, 2, 3
CLASS_NAMES = (*STUFF_NAMES, *OBJECT_NAMES)  # label id k has name CLASS_NAMES[k - 1]
IMAGE_CLASS_NAMES = tuple(f"c{k:02d}_{name}" for k, name in enumerate(OBJECT_NAMES))
MAX_OBJECTS = 4
HUE_JITTER = 0.02  # turns (+-7.2 degrees); classes are 0.125 turns apart
SHAPES = ("ellipse", "rectangle", "triangle", "ring", "diamond")
TEXTURES = ("stripes", "checker", "rings")
MIN_DEPTH, MAX_DEPTH = 0.55, 9.9  # inside the documented (0.5, 10) metres

# ITU-R 601 luma weights, the ones torchvision's rgb_to_grayscale uses.
_LUMA = (0.299, 0.587, 0.114)
_SCENE_FIELDS = (
    "horizon", "near", "wall_depth", "wall_tilt", "wall_hue", "wall_luma", "wall_chroma",
    "floor_hue", "floor_luma", "floor_chroma", "tile_freq", "tile_amp", "wall_freq",
    "wall_amp", "light_slope", "brightness", "falloff", "noise", "n_objects",
)  # fmt: skip
_OBJECT_FIELDS = (
    "cls", "hue_jitter", "luma", "chroma", "depth", "size", "aspect", "x", "shape",
    "angle", "inner", "tex_kind", "tex_freq", "tex_angle", "tex_phase", "tex_amp",
    "depth_slope", "shade",
)  # fmt: skip
_NUM_UNIFORMS = len(_SCENE_FIELDS) + MAX_OBJECTS * len(_OBJECT_FIELDS)


@dataclass
class SceneBatch:
    """A batch of rendered scenes."""

    images: Tensor  # (N, 3, H, W) float32 in [0, 1]
    labels: Tensor  # (N, H, W) int64 in 1..NUM_CLASSES
    depth: Tensor  # (N, H, W) float32 metres in (0.5, 10)
    image_class: Tensor  # (N,) int64 in 0..NUM_IMAGE_CLASSES-1


@dataclass(frozen=True)
class View:
    """A camera change applied to a scene: output pixel -> scene coordinates.

    ``zoom > 1`` magnifies about the image centre moved by ``shift`` (in image units),
    ``angle`` rotates (radians) and ``brightness`` scales the lighting.
    """

    zoom: float = 1.0
    shift_x: float = 0.0
    shift_y: float = 0.0
    angle: float = 0.0
    brightness: float = 1.0


# --------------------------------------------------------------------------- parameters


def _scene_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    # SeedSequence hashes the whole tuple, so scenes are independent streams.
    return np.random.default_rng([seed % 2**63, index, stream])


def _uniforms(seed: int, indices: Sequence[int]) -> np.ndarray:
    rows = [_scene_rng(seed, int(i), 0).random(_NUM_UNIFORMS) for i in indices]
    return np.stack(rows) if rows else np.zeros((0, _NUM_UNIFORMS))


def _lerp(u: np.ndarray, lo: float | np.ndarray, hi: float | np.ndarray) -> np.ndarray:
    return lo + (hi - lo) * u


def _luma(rgb: np.ndarray) -> np.ndarray:
    # Explicit sum (no BLAS dot) so the result cannot depend on the batch shape.
    return rgb[..., 0] * _LUMA[0] + rgb[..., 1] * _LUMA[1] + rgb[..., 2] * _LUMA[2]


def chroma_colour(hue: np.ndarray, luma: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """RGB colours (..., 3) with luminance exactly ``luma`` and HSV hue ``hue`` (turns).

    ``chroma`` in [0, 1] is the fraction of the largest in-gamut saturation for that hue
    and luminance. Adding grey to a colour keeps its HSV hue, so ``luma + c * (p - Y(p))``
    with ``p`` the pure hue has the hue of ``p`` and luminance ``luma``.
    """
    k = np.remainder(np.array([5.0, 3.0, 1.0]) + hue[..., None] * 6.0, 6.0)
    pure = 1.0 - np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)  # HSV (hue, 1, 1)
    direction = pure - _luma(pure)[..., None]
    lum = luma[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        room = np.where(direction > 0, (1.0 - lum) / direction, lum / -direction)
    room = np.where(direction == 0, np.inf, room).min(-1)
    return lum + (chroma * room)[..., None] * direction


def _derive_scene(u: np.ndarray) -> dict[str, np.ndarray]:
    s = {name: u[:, i] for i, name in enumerate(_SCENE_FIELDS)}
    return {
        "horizon": _lerp(s["horizon"], 0.25, 0.48),
        "near": _lerp(s["near"], 0.8, 1.4),
        "wall_depth": _lerp(s["wall_depth"], 5.0, 9.0),
        "wall_tilt": _lerp(s["wall_tilt"], -0.15, 0.15),
        "wall_rgb": chroma_colour(
            s["wall_hue"], _lerp(s["wall_luma"], 0.5, 0.8), _lerp(s["wall_chroma"], 0.0, 0.18)
        ),
        "floor_rgb": chroma_colour(
            s["floor_hue"], _lerp(s["floor_luma"], 0.25, 0.5), _lerp(s["floor_chroma"], 0.0, 0.22)
        ),
        "tile_freq": _lerp(s["tile_freq"], 0.8, 2.5),  # tiles per metre
        "tile_amp": _lerp(s["tile_amp"], 0.04, 0.18),
        "wall_freq": _lerp(s["wall_freq"], 3.0, 12.0),  # panels per image width
        "wall_amp": _lerp(s["wall_amp"], 0.02, 0.1),
        "light_slope": _lerp(s["light_slope"], -0.3, 0.3),
        "brightness": _lerp(s["brightness"], 0.8, 1.05),
        "falloff": _lerp(s["falloff"], 10.0, 25.0),  # metres
        "noise": _lerp(s["noise"], 0.005, 0.03),
        "n_objects": 2 + np.minimum(np.floor(s["n_objects"] * 3), 2),
    }


def _cos_sin(angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Python's math per element: numpy's SIMD cos may differ by batch shape.
    flat = angle.ravel().tolist()
    cos = np.array([math.cos(a) for a in flat]).reshape(angle.shape)
    sin = np.array([math.sin(a) for a in flat]).reshape(angle.shape)
    return cos, sin


def _derive_objects(u: np.ndarray, scene: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n_scene = len(_SCENE_FIELDS)
    block = u[:, n_scene:].reshape(len(u), MAX_OBJECTS, len(_OBJECT_FIELDS))
    o = {name: block[:, :, i] for i, name in enumerate(_OBJECT_FIELDS)}
    main = np.arange(MAX_OBJECTS) == 0  # slot 0 is a near, central "main" object
    cls = np.minimum(np.floor(o["cls"] * NUM_IMAGE_CLASSES), NUM_IMAGE_CLASSES - 1)
    hue = np.array(OBJECT_HUES)[cls.astype(np.int64)] + _lerp(
        o["hue_jitter"], -HUE_JITTER, HUE_JITTER
    )
    far = 0.75 * scene["wall_depth"][:, None]
    depth = np.where(main, _lerp(o["depth"], 1.4, 2.6), _lerp(o["depth"], 1.6, far))
    height = np.where(main, _lerp(o["size"], 0.6, 1.0), _lerp(o["size"], 0.4, 1.0)) / depth
    half_h = height / 2
    half_w = half_h * _lerp(o["aspect"], 0.6, 1.6)
    horizon, near = scene["horizon"][:, None], scene["near"][:, None]
    base = horizon + near * (1.0 - horizon) / depth  # floor row at this depth
    cos, sin = _cos_sin(_lerp(o["angle"], -0.44, 0.44))
    tex_cos, tex_sin = _cos_sin(_lerp(o["tex_angle"], 0.0, math.pi))
    return {
        "active": np.arange(MAX_OBJECTS)[None, :] < scene["n_objects"][:, None],
        "cls": cls,
        "rgb": chroma_colour(hue, _lerp(o["luma"], 0.32, 0.62), _lerp(o["chroma"], 0.55, 0.9)),
        "depth": depth,
        "cx": np.where(main, _lerp(o["x"], 0.3, 0.7), _lerp(o["x"], 0.08, 0.92)),
        "cy": base - half_h,
        "half_w": half_w,
        "half_h": half_h,
        "cos": cos,
        "sin": sin,
        "shape": np.minimum(np.floor(o["shape"] * len(SHAPES)), len(SHAPES) - 1),
        "inner": _lerp(o["inner"], 0.45, 0.7),
        "tex_kind": np.minimum(np.floor(o["tex_kind"] * len(TEXTURES)), len(TEXTURES) - 1),
        "tex_freq": _lerp(o["tex_freq"], 1.0, 3.5),
        "tex_cos": tex_cos,
        "tex_sin": tex_sin,
        "tex_phase": o["tex_phase"],
        "tex_amp": _lerp(o["tex_amp"], 0.08, 0.3),
        "depth_slope": _lerp(o["depth_slope"], -0.04, 0.04),
        "shade": _lerp(o["shade"], 0.0, 0.25),
    }


def _sort_far_to_near(objects: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Inactive slots go first (key +inf) and are masked out anyway.
    key = np.where(objects["active"], objects["depth"], np.inf)
    order = np.argsort(-key, axis=1, kind="stable")
    out = {}
    for name, value in objects.items():
        idx = order if value.ndim == 2 else order[..., None]
        out[name] = np.take_along_axis(value, idx, axis=1)
    return out


# --------------------------------------------------------------------------- pixels


def _t(x: np.ndarray) -> Tensor:
    """(N,) parameters -> float32 (N, 1, 1) for broadcasting over pixels."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).view(-1, 1, 1)


def _frac(x: Tensor) -> Tensor:
    return x - torch.floor(x)


def _tri(x: Tensor) -> Tensor:
    """Triangle wave with period 1, values in [0, 1]."""
    return (2.0 * _frac(x) - 1.0).abs()


def _parity(x: Tensor) -> Tensor:
    """1 where floor-valued ``x`` is odd, else 0 (float)."""
    return x - 2.0 * torch.floor(x * 0.5)


def _scene_grid(size: int, views: Sequence[View]) -> tuple[Tensor, Tensor, np.ndarray]:
    """Scene coordinates (N, S, S) of every output pixel, and the per-view brightness."""
    ramp = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    gy, gx = torch.meshgrid(ramp, ramp, indexing="ij")
    zoom = np.array([v.zoom for v in views], dtype=np.float64)
    cos, sin = _cos_sin(np.array([v.angle for v in views], dtype=np.float64))
    x0 = np.array([0.5 + v.shift_x for v in views])
    y0 = np.array([0.5 + v.shift_y for v in views])
    x = _t(cos / zoom) * gx - _t(sin / zoom) * gy + _t(x0)
    y = _t(sin / zoom) * gx + _t(cos / zoom) * gy + _t(y0)
    return x, y, np.array([v.brightness for v in views])


def _render_room(scene: dict[str, np.ndarray], x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
    """Floor and wall: (rgb (N,3,S,S), depth, labels)."""
    horizon, near = _t(scene["horizon"]), _t(scene["near"])
    below = y - horizon
    floor_d = near * (1.0 - horizon) / below.clamp_min(1e-6)
    floor_d = torch.where(below > 0, floor_d, torch.full_like(floor_d, math.inf))
    wall_d = _t(scene["wall_depth"]) * (1.0 + _t(scene["wall_tilt"]) * (x - 0.5))
    is_floor = floor_d < wall_d
    depth = torch.where(is_floor, floor_d, wall_d).clamp(MIN_DEPTH, MAX_DEPTH)
    # Tiles live on the ground plane (X = lateral metres, Z = depth), so they foreshorten;
    # their contrast fades with distance, as a mip-mapped texture would.
    freq = _t(scene["tile_freq"])
    tiles = _parity(torch.floor(freq * (x - 0.5) * depth) + torch.floor(freq * depth))
    floor_f = 1.0 - _t(scene["tile_amp"]) * tiles / (1.0 + depth * 0.25)
    wall_f = 1.0 - _t(scene["wall_amp"]) * _tri(_t(scene["wall_freq"]) * x)
    floor_rgb = _rgb(scene["floor_rgb"]) * floor_f[:, None]
    wall_rgb = _rgb(scene["wall_rgb"]) * wall_f[:, None]
    rgb = torch.where(is_floor[:, None], floor_rgb, wall_rgb)
    labels = torch.where(is_floor, FLOOR_LABEL, WALL_LABEL).to(torch.int64)
    return rgb, depth, labels


def _rgb(colour: np.ndarray) -> Tensor:
    """(N, 3) colours -> (N, 3, 1, 1)."""
    return torch.from_numpy(np.ascontiguousarray(colour, dtype=np.float32)).view(-1, 3, 1, 1)


def _shape_mask(o: dict[str, np.ndarray], lx: Tensor, ly: Tensor) -> Tensor:
    r2 = lx * lx + ly * ly
    ax, ay = lx.abs(), ly.abs()
    inner = _t(o["inner"])
    masks = torch.stack(
        [
            r2 <= 1.0,  # ellipse
            (ax <= 1.0) & (ay <= 1.0),  # rectangle
            (ly <= 1.0) & (2.0 * ax <= ly + 1.0),  # triangle, apex up
            (r2 <= 1.0) & (r2 >= inner * inner),  # ring
            ax + ay <= 1.0,  # diamond
        ]
    )
    shape = torch.from_numpy(o["shape"].astype(np.int64)).view(1, -1, 1, 1)
    return masks.gather(0, shape.expand(1, *lx.shape))[0]


def _texture(o: dict[str, np.ndarray], lx: Tensor, ly: Tensor) -> Tensor:
    """Per-instance pattern in [0, 1], in object coordinates so it scales with depth."""
    freq, phase = _t(o["tex_freq"]), _t(o["tex_phase"])
    stripes = _tri(freq * (lx * _t(o["tex_cos"]) + ly * _t(o["tex_sin"])) + phase)
    checker = _parity(torch.floor(freq * lx + phase) + torch.floor(freq * ly))
    rings = _tri(freq * torch.sqrt(lx * lx + ly * ly) + phase)
    kind = _t(o["tex_kind"])
    return torch.where(kind == 0, stripes, torch.where(kind == 1, checker, rings))


def _paint_object(
    o: dict[str, np.ndarray], x: Tensor, y: Tensor, canvas: dict[str, Tensor], slot: int
) -> None:
    """Paint one object slot of every scene over ``canvas`` (in place)."""
    dx, dy = x - _t(o["cx"]), y - _t(o["cy"])
    cos, sin = _t(o["cos"]), _t(o["sin"])
    lx = (dx * cos + dy * sin) / _t(o["half_w"])
    ly = (dy * cos - dx * sin) / _t(o["half_h"])
    mask = _shape_mask(o, lx, ly) & torch.from_numpy(o["active"]).view(-1, 1, 1)
    factor = (1.0 - _t(o["tex_amp"]) * _texture(o, lx, ly)) * (
        1.0 - _t(o["shade"]) * 0.5 * (ly + 1.0)
    )
    colour = _rgb(o["rgb"]) * factor[:, None]
    depth = _t(o["depth"]) * (1.0 + _t(o["depth_slope"]) * ly)
    label = torch.from_numpy(o["cls"].astype(np.int64) + FIRST_OBJECT_LABEL).view(-1, 1, 1)
    canvas["rgb"] = torch.where(mask[:, None], colour, canvas["rgb"])
    canvas["depth"] = torch.where(mask, depth, canvas["depth"])
    canvas["labels"] = torch.where(mask, label, canvas["labels"])
    canvas["slot"] = torch.where(mask, slot, canvas["slot"])


def _noise(seed: int, indices: Sequence[int], keys: Sequence[int], size: int) -> Tensor:
    fields = [
        _scene_rng(seed, int(i), 1 + int(k)).standard_normal((3, size, size), dtype=np.float32)
        for i, k in zip(indices, keys, strict=True)
    ]
    if not fields:
        return torch.zeros(0, 3, size, size)
    return torch.from_numpy(np.stack(fields))


def _largest_object_class(slot: Tensor, cls: np.ndarray) -> Tensor:
    counts = torch.stack([(slot == j).sum((1, 2)) for j in range(MAX_OBJECTS)], 1)
    largest = counts.argmax(1)  # first maximum on ties
    return torch.from_numpy(cls.astype(np.int64)).gather(1, largest[:, None])[:, 0]


def render_views(
    seed: int,
    indices: Sequence[int],
    size: int,
    views: Sequence[View] | None = None,
    noise_keys: Sequence[int] | None = None,
) -> SceneBatch:
    """Render scenes ``indices`` of ``seed`` through per-scene ``views``.

    The same index with different views gives re-renderings of the same scene (used for
    retrieval layouts); ``noise_keys`` picks an independent pixel-noise draw per item.
    """
    _check_render_args(size, indices)
    n = len(indices)
    views = list(views) if views is not None else [View()] * n
    keys = list(noise_keys) if noise_keys is not None else [0] * n
    if len(views) != n or len(keys) != n:
        raise ValueError(f"got {len(views)} views and {len(keys)} noise keys for {n} scenes")
    u = _uniforms(seed, indices)
    scene = _derive_scene(u)
    objects = _sort_far_to_near(_derive_objects(u, scene))
    x, y, view_brightness = _scene_grid(size, views)
    rgb, depth, labels = _render_room(scene, x, y)
    canvas = {"rgb": rgb, "depth": depth, "labels": labels, "slot": torch.full_like(labels, -1)}
    for j in range(MAX_OBJECTS):
        _paint_object({k: v[:, j] for k, v in objects.items()}, x, y, canvas, j)
    depth = canvas["depth"].clamp(MIN_DEPTH, MAX_DEPTH)
    # Light: global level, a horizontal gradient and a falloff with distance.
    light = _t(scene["brightness"] * view_brightness) * (1.0 + _t(scene["light_slope"]) * (x - 0.5))
    light = light / (1.0 + depth / _t(scene["falloff"]))
    images = canvas["rgb"] * light[:, None] + _t(scene["noise"])[:, None] * _noise(
        seed, indices, keys, size
    )
    return SceneBatch(
        images=images.clamp(0.0, 1.0),
        labels=canvas["labels"],
        depth=depth,
        image_class=_largest_object_class(canvas["slot"], objects["cls"]),
    )


def _check_render_args(size: int, indices: Sequence[int]) -> None:
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}")
    if any(int(i) < 0 for i in indices):
        raise ValueError(f"scene indices must be >= 0, got {min(indices)}")


def render_scenes(n: int, size: int, seed: int, start_index: int = 0) -> SceneBatch:
    """Render scenes ``start_index .. start_index + n - 1`` of ``seed`` at ``size``x``size``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return render_views(seed, range(start_index, start_index + n), size)


# --------------------------------------------------------------------------- writers

LAYOUTS = ("imagefolder", "ade20k", "nyu", "roxford", "rparis")
_CHUNK = 256  # scenes rendered at once by the writers (bounds memory at large sizes)
_REVISITED_PER_LANDMARK = {"easy": 2, "hard": 2, "junk": 1}
_QUERIES_PER_LANDMARK = 2
_MIN_REVISITED_N = sum(_REVISITED_PER_LANDMARK.values()) + 3


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, 3, H, W) floats in [0, 1] -> (N, H, W, 3) uint8."""
    return (images * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _chunks(n: int, size: int, seed: int) -> Iterator[tuple[int, SceneBatch]]:
    for start in range(0, n, _CHUNK):
        yield start, render_scenes(min(_CHUNK, n - start), size, seed, start)


def _split_count(n: int, val_fraction: float) -> int:
    """Number of validation items: a rounded fraction, at least 1 when asked for any."""
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    return n_val


def _imagefolder_split(image_class: np.ndarray, val_fraction: float) -> np.ndarray:
    """Per-class (stratified) split, True = val: every class with >= 2 images is in both."""
    is_val = np.zeros(len(image_class), dtype=bool)
    for c in np.unique(image_class):
        members = np.flatnonzero(image_class == c)
        n_val = _split_count(len(members), val_fraction)
        if n_val:
            is_val[members[-n_val:]] = True
    return is_val


def write_imagefolder(out: Path, n: int, seed: int, size: int, val_fraction: float) -> str:
    # The class of a scene is only known once rendered at the output size, and the
    # split is stratified by class: write everything to train/, then move val images.
    classes = np.zeros(n, dtype=np.int64)
    for start, batch in _chunks(n, size, seed):
        classes[start : start + len(batch.image_class)] = batch.image_class.numpy()
        for k, pixels in enumerate(to_uint8(batch.images)):
            folder = out / "train" / IMAGE_CLASS_NAMES[classes[start + k]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{start + k:08d}.png")
    is_val = _imagefolder_split(classes, val_fraction)
    for i in np.flatnonzero(is_val):
        name = IMAGE_CLASS_NAMES[classes[i]]
        (out / "val" / name).mkdir(parents=True, exist_ok=True)
        (out / "train" / name / f"{i:08d}.png").replace(out / "val" / name / f"{i:08d}.png")
    present = len(np.unique(classes))
    return f"train {int((~is_val).sum())}, val {int(is_val.sum())}, {present} classes"


def write_ade20k(out: Path, n: int, seed: int, size: int, val_fraction: float) -> str:
    n_val = _split_count(n, val_fraction)
    base = out / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (base / "images" / split).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
    for start, batch in _chunks(n, size, seed):
        labels = batch.labels.to(torch.uint8).numpy()
        for k, pixels in enumerate(to_uint8(batch.images)):
            i = start + k
            split, tag, number = (
                ("training", "train", i + 1)
                if i < n - n_val
                else ("validation", "val", i - (n - n_val) + 1)
            )
            stem = f"ADE_{tag}_{number:08d}"
            Image.fromarray(pixels).save(base / "images" / split / f"{stem}.jpg", quality=95)
            Image.fromarray(labels[k]).save(base / "annotations" / split / f"{stem}.png")
    return f"training {n - n_val}, validation {n_val}"


def write_nyu(out: Path, n: int, seed: int, size: int, val_fraction: float) -> str:
    n_test = _split_count(n, val_fraction)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "depth").mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    for start, batch in _chunks(n, size, seed):
        millimetres = (batch.depth * 1000.0).round().to(torch.int32).numpy().astype(np.uint16)
        for k, pixels in enumerate(to_uint8(batch.images)):
            i = start + k
            rgb, dep = f"images/{i:06d}.png", f"depth/{i:06d}.png"
            Image.fromarray(pixels).save(out / rgb)
            Image.fromarray(millimetres[k]).save(out / dep)  # uint16 -> mode "I;16"
            lines.append(f"{rgb} {dep}\n")
    (out / "nyu_train.txt").write_text("".join(lines[: n - n_test]))
    (out / "nyu_test.txt").write_text("".join(lines[n - n_test :]))
    return f"train {n - n_test}, test {n_test}"


def _sample_view(kind: str, rng: np.random.Generator) -> View:
    """A camera change of the given retrieval difficulty."""
    deg = math.pi / 180.0
    if kind in ("easy", "query"):
        spread = 0.05 if kind == "easy" else 0.03
        return View(
            zoom=rng.uniform(0.9, 1.1) if kind == "easy" else rng.uniform(0.95, 1.05),
            shift_x=rng.uniform(-spread, spread),
            shift_y=rng.uniform(-spread, spread),
            angle=rng.uniform(-3, 3) * deg,
            brightness=rng.uniform(0.9, 1.1),
        )
    if kind == "hard":  # strong zoom in or out, rotation and lighting change
        zoom_in = rng.random() < 0.5
        return View(
            zoom=rng.uniform(1.4, 1.8) if zoom_in else rng.uniform(0.65, 0.75),
            shift_x=rng.uniform(-0.15, 0.15),
            shift_y=rng.uniform(-0.15, 0.15),
            angle=rng.uniform(-12, 12) * deg,
            brightness=rng.uniform(0.55, 0.7) if rng.random() < 0.5 else rng.uniform(1.25, 1.4),
        )
    if kind == "junk":  # a heavily cropped corner of the landmark
        return View(
            zoom=rng.uniform(3.0, 4.0),
            shift_x=rng.choice([-1, 1]) * rng.uniform(0.2, 0.3),
            shift_y=rng.uniform(0.0, 0.25),
        )
    raise ValueError(f"unknown view kind {kind!r}")


@dataclass
class _Rendering:
    scene: int
    view: View
    role: str  # "easy" | "hard" | "junk" | "occluded_junk" | "distractor" | "query"
    landmark: int  # -1 for distractors


def _revisited_plan(n: int, seed: int) -> tuple[list[_Rendering], list[_Rendering]]:
    """Database and query renderings: landmarks are scenes 0..L-1, distractors follow."""
    rng = np.random.default_rng([seed % 2**63, 2**32, 7])
    per_landmark = sum(_REVISITED_PER_LANDMARK.values())
    landmarks = max(1, min(11, n // 12))
    database: list[_Rendering] = []
    queries: list[_Rendering] = []
    for lm in range(landmarks):
        for kind, count in _REVISITED_PER_LANDMARK.items():
            for _ in range(count):
                role = "occluded_junk" if kind == "junk" and lm % 2 else kind
                view = _sample_view("easy" if role == "occluded_junk" else kind, rng)
                database.append(_Rendering(lm, view, role, lm))
        for _ in range(_QUERIES_PER_LANDMARK):
            queries.append(_Rendering(lm, _sample_view("query", rng), "query", lm))
    for d in range(n - landmarks * per_landmark):
        database.append(_Rendering(landmarks + d, View(), "distractor", -1))
    order = rng.permutation(len(database))  # interleave positives and distractors
    return [database[i] for i in order], queries


def _render_plan(plan: list[_Rendering], seed: int, size: int, salt: int) -> Iterator[SceneBatch]:
    for start in range(0, len(plan), _CHUNK):
        part = plan[start : start + _CHUNK]
        keys = [salt + start + k for k in range(len(part))]  # fresh noise per rendering
        yield render_views(seed, [r.scene for r in part], size, [r.view for r in part], keys)


def _occlude(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Cover 60-75% of the image with a flat grey board (a junk-level occlusion)."""
    h, w = pixels.shape[:2]
    cover_w, cover_h = int(w * rng.uniform(0.75, 0.9)), int(h * rng.uniform(0.8, 0.85))
    x0, y0 = int(rng.integers(0, w - cover_w + 1)), int(rng.integers(0, h - cover_h + 1))
    out = pixels.copy()
    out[y0 : y0 + cover_h, x0 : x0 + cover_w] = int(rng.integers(60, 200))
    return out


def _content_box(labels: Tensor) -> list[float]:
    """[x1, y1, x2, y2] around the object pixels (exclusive ends), else the whole image."""
    ys, xs = torch.nonzero(labels >= FIRST_OBJECT_LABEL, as_tuple=True)
    h, w = labels.shape
    if len(xs) == 0:
        return [0.0, 0.0, float(w), float(h)]
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def write_revisited(out: Path, n: int, seed: int, size: int, dataset: str) -> str:
    """Revisited Oxford/Paris layout: ``jpg/`` + ``gnd_<dataset>.pkl``."""
    database, queries = _revisited_plan(n, seed)
    (out / "jpg").mkdir(parents=True, exist_ok=True)
    occluder_rng = np.random.default_rng([seed % 2**63, 2**32, 8])
    imlist = [f"{dataset}_{i:06d}" for i in range(len(database))]
    qimlist = [f"{dataset}_query_{q:03d}" for q in range(len(queries))]
    position = 0
    for batch in _render_plan(database, seed, size, salt=0):
        for pixels in to_uint8(batch.images):
            if database[position].role == "occluded_junk":
                pixels = _occlude(pixels, occluder_rng)
            Image.fromarray(pixels).save(out / "jpg" / f"{imlist[position]}.jpg", quality=95)
            position += 1
    gnd: list[dict] = []
    q = 0
    for batch in _render_plan(queries, seed, size, salt=len(database)):
        for pixels, labels in zip(to_uint8(batch.images), batch.labels, strict=True):
            Image.fromarray(pixels).save(out / "jpg" / f"{qimlist[q]}.jpg", quality=95)
            lm = queries[q].landmark
            members = {"easy": [], "hard": [], "junk": []}
            for i, r in enumerate(database):
                if r.landmark == lm:
                    members["junk" if r.role.endswith("junk") else r.role].append(i)
            gnd.append({"bbx": _content_box(labels), **members})
            q += 1
    with open(out / f"gnd_{dataset}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)
    landmarks = len({r.landmark for r in queries})
    plural = "s" if landmarks != 1 else ""
    return f"{len(imlist)} database images ({landmarks} landmark{plural}), {len(qimlist)} queries"


def validate_writer_args(layout: str, n: int, seed: int, size: int, val_fraction: float) -> None:
    """Raise ValueError naming the first bad argument."""
    if layout not in LAYOUTS:
        raise ValueError(f"--layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    min_n = _MIN_REVISITED_N if layout in ("roxford", "rparis") else 1
    if not isinstance(n, int) or n < min_n:
        raise ValueError(f"--n must be an integer >= {min_n} for layout {layout}, got {n!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed!r}")
    if not isinstance(size, int) or not 8 <= size <= 4096:
        raise ValueError(f"--size must be an integer in [8, 4096], got {size!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction!r}")


def write_layout(
    out: str | Path, layout: str, n: int, seed: int, size: int = 64, val_fraction: float = 0.2
) -> str:
    """Materialise ``n`` synthetic scenes under ``out`` in ``layout``; returns a summary line."""
    validate_writer_args(layout, n, seed, size, val_fraction)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if layout == "imagefolder":
        detail = write_imagefolder(out, n, seed, size, val_fraction)
    elif layout == "ade20k":
        detail = write_ade20k(out, n, seed, size, val_fraction)
    elif layout == "nyu":
        detail = write_nyu(out, n, seed, size, val_fraction)
    else:
        detail = write_revisited(
            out, n, seed, size, "roxford5k" if layout == "roxford" else "rparis6k"
        )
    return f"synthetic {layout} (seed {seed}, {size}x{size}) -> {out}: {detail}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dinov.data.synthetic",
        description="Write synthetic scenes in a real dataset layout.",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--layout", required=True, help=f"one of: {', '.join(LAYOUTS)}")
    parser.add_argument(
        "--n", type=int, required=True, help="number of scenes (database size for roxford/rparis)"
    )
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument(
        "--val-fraction", type=float, default=0.2, help="share held out for val/test (default 0.2)"
    )
    args = parser.parse_args(argv)
    try:
        summary = write_layout(
            args.out, args.layout, args.n, args.seed, args.size, args.val_fraction
        )
    except ValueError as e:
        parser.error(str(e))
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
