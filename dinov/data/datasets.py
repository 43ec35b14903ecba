"""Readers for the on-disk dataset layouts users already have (DESIGN.md section 4).

This module owns image decoding (PIL only: ``torchvision.io`` decoding does not work on
the CPU builds used here), the resize/crop helpers shared by the readers, and one
dataset class per layout:

- ``UnlabelledImages``: ImageFolder tree (labels ignored), a folder tree, or a file list;
- ``LabelledImageFolder``: ImageFolder tree with class indices (linear / kNN probes);
- ``ADE20KDataset``: ``ADEChallengeData2016/{images,annotations}/{training,validation}``;
- ``NYUDepthDataset``: a split file of ``rgb_path depth_path`` lines, 16-bit mm PNGs;
- ``RevisitedRetrievalDataset``: ``jpg/`` + ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl``.

Nothing here downloads data. Images come back as float32 tensors in [0, 1], (3, H, W).

Unreadable files: the pretraining reader (``UnlabelledImages``) skips a corrupt image with
a warning and returns the next readable one, counting skips in ``num_skipped`` (per
process: each DataLoader worker keeps its own count). The evaluation readers
(``LabelledImageFolder``, ADE20K, NYUv2, retrieval) raise instead, naming the file,
because a replaced or dropped evaluation image would change the reported metric.

The dense-task readers check what they can when they are opened, so that a bad file
fails before any feature is extracted or head trained: every file a split lists exists,
and ADE20K annotation values lie in 0..num_classes. Ground-truth pickles of the
retrieval datasets are read with an unpickler that admits only plain data and numpy
arrays (:func:`load_ground_truth`): a crafted file cannot run code.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
ADE_IGNORE_INDEX = 255
# Eigen et al. crop of NYUv2 evaluation, in 480x640 pixel coordinates (rows, cols).
EIGEN_CROP_480x640 = (45, 471, 41, 601)


# --------------------------------------------------------------------------- decoding


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _decode_rgb(path: str | Path) -> Tensor:
    """RGB image as float32 (3, H, W) in [0, 1]; raises one of ``_DECODE_ERRORS``."""
    with Image.open(path) as img:
        img.load()  # decode now, so truncated files fail here rather than later
        rgb = img.convert("RGB")
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float().div_(255.0)


def load_image(path: str | Path) -> Tensor | None:
    """RGB image as float32 (3, H, W) in [0, 1]; None (with a warning) if unreadable."""
    try:
        return _decode_rgb(path)
    except _DECODE_ERRORS as e:
        warnings.warn(f"skipping unreadable image {path}: {e}", stacklevel=2)
        return None


def _load_image_or_raise(path: Path) -> Tensor:
    try:
        return _decode_rgb(path)
    except _DECODE_ERRORS as e:
        raise RuntimeError(f"cannot read evaluation image {path} (missing or corrupt): {e}") from e


_ONE_CHANNEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")
# Threads for the checks run when a split is opened: decoding releases the GIL, and file
# reads on network storage overlap, so a few more threads than cores still help.
_CHECK_THREADS = 8


def _load_array(path: Path, what: str) -> np.ndarray:
    """Single-channel PNG (label or depth map) as a numpy array, keeping its bit depth."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in _ONE_CHANNEL_MODES:
                raise ValueError(f"{what} {path} has mode {img.mode}; expected a 1-channel PNG")
            return np.array(img)
    except OSError as e:
        raise RuntimeError(f"cannot read {what} {path}: {e}") from e


def _resized_shape(h: int, w: int, size: int, side: str = "short") -> tuple[int, int]:
    """Shape with the shorter (or longer) side equal to ``size``, aspect kept."""
    ref = min(h, w) if side == "short" else max(h, w)
    return max(1, round(h * size / ref)), max(1, round(w * size / ref))


def _resize(x: Tensor, shape: tuple[int, int], mode: str) -> Tensor:
    """Resize (C, H, W): antialiased bilinear for images, nearest for labels/depth."""
    if tuple(x.shape[-2:]) == shape:
        return x
    if mode == "bilinear":
        return F.interpolate(
            x[None], size=shape, mode="bilinear", align_corners=False, antialias=True
        )[0]
    # nearest-exact samples pixel centres, so labels stay aligned with the bilinear image.
    return F.interpolate(x[None].float(), size=shape, mode="nearest-exact")[0].to(x.dtype)


def _center_crop(x: Tensor, size: int) -> Tensor:
    h, w = x.shape[-2:]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return x[..., top : top + size, left : left + size]


def resize_center_crop(img: Tensor, size: int, mode: str = "bilinear") -> Tensor:
    """Shorter side to ``size`` then a centred ``size`` x ``size`` crop; (C, H, W) in/out.

    ``mode="nearest"`` resizes label or depth maps (given as (1, H, W) or (H, W)).
    """
    squeeze = img.dim() == 2
    x = img[None] if squeeze else img
    x = _center_crop(_resize(x, _resized_shape(*x.shape[-2:], size), mode), size)
    return x[0] if squeeze else x


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS


# --------------------------------------------------------------------------- listing


def _require_dir(root: Path, expected: str) -> None:
    if not root.exists():
        raise FileNotFoundError(f"dataset root {root} does not exist; expected {expected}")
    if not root.is_dir():
        raise NotADirectoryError(f"dataset root {root} is not a directory; expected {expected}")


def _walk_images(folder: Path) -> list[Path]:
    found = []
    for dirpath, _, files in os.walk(folder, followlinks=True):
        found.extend(Path(dirpath) / f for f in files if _is_image(Path(f)))
    return sorted(found)


def _class_folders(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir())


def _image_folder_samples(
    root: Path, classes: Sequence[str] | None = None
) -> tuple[list[str], list[tuple[Path, int]]]:
    """torchvision ImageFolder listing: sorted class folders, images found recursively."""
    expected = "an ImageFolder tree root/<class>/<image>.{jpg,png,...}"
    _require_dir(root, expected)
    classes = list(classes) if classes is not None else _class_folders(root)
    samples = []
    for index, name in enumerate(classes):
        if (root / name).is_dir():
            samples.extend((p, index) for p in _walk_images(root / name))
    if not samples:
        raise FileNotFoundError(f"no images found in {root}; expected {expected}")
    return classes, samples


def _file_list(list_file: Path) -> list[Path]:
    """Image paths from a text file, one per line, relative to the file's directory."""
    paths = []
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            path = Path(line)
            paths.append(path if path.is_absolute() else list_file.parent / path)
    return paths


# --------------------------------------------------------------------------- pretraining


def _prepare(image: Tensor, image_size: int | None, transform: Callable | None) -> Tensor:
    """The optional centre crop to ``image_size``, then the optional transform."""
    if image_size is not None:
        image = resize_center_crop(image, image_size)
    return transform(image) if transform else image


class _SkippingImages(Dataset):
    """Base for readers that skip unreadable images (see the module docstring)."""

    def __init__(self, paths: list[Path], image_size: int | None, transform: Callable | None):
        self.paths = paths
        self.image_size = image_size
        self.transform = transform
        self.num_skipped = 0
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def _load_valid(self, index: int) -> tuple[int, Tensor]:
        """The first readable image at ``index`` or after it (wrapping around)."""
        n = len(self.paths)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            image = load_image(self.paths[i])
            if image is not None:
                return i, _prepare(image, self.image_size, self.transform)
            self._bad.add(i)  # warn and count each bad file once
            self.num_skipped += 1
        raise RuntimeError(f"none of the {n} images (first: {self.paths[0]}) could be read")


class UnlabelledImages(_SkippingImages):
    """Images without labels, as (3, S, S) float tensors.

    ``layout="imagefolder"``: ``root/<class>/<image>`` (class folders ignored).
    ``layout="folder"``: every image below ``root`` recursively, or, when ``root`` is a
    text file, the image paths listed in it (relative to its directory, or absolute).
    Order is sorted and deterministic. ``image_size=None`` keeps the original size.
    """

    LAYOUTS = ("imagefolder", "folder")

    def __init__(
        self,
        root: str | Path,
        image_size: int | None,
        layout: str = "imagefolder",
        transform: Callable[[Tensor], Tensor] | None = None,
    ):
        root = Path(root)
        if layout == "imagefolder":
            _, samples = _image_folder_samples(root)
            paths = [p for p, _ in samples]
        elif layout == "folder":
            paths = self._folder_paths(root)
        else:
            raise ValueError(f"unknown layout {layout!r}; choose one of {self.LAYOUTS}")
        super().__init__(paths, image_size, transform)

    @staticmethod
    def _folder_paths(root: Path) -> list[Path]:
        expected = "a folder of images (searched recursively) or a text file of image paths"
        if root.is_file():
            paths = _file_list(root)
        else:
            _require_dir(root, expected)
            paths = _walk_images(root)
        if not paths:
            raise FileNotFoundError(f"no images found in {root}; expected {expected}")
        return paths

    def __getitem__(self, index: int) -> Tensor:
        return self._load_valid(index)[1]


class LabelledImageFolder(Dataset):
    """ImageFolder tree ``root/<class>/<image>`` -> (image (3, S, S), class index).

    Classes are the sorted folder names, as in torchvision; pass ``classes`` (e.g. the
    train split's ``.classes``) to index another split the same way even when it lacks
    some classes. An unreadable image is an error naming the file: these are the
    linear / kNN evaluation splits, where a substitute would change the metric.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int | None,
        classes: Sequence[str] | None = None,
        transform: Callable[[Tensor], Tensor] | None = None,
    ):
        self.root = Path(root)
        self.classes, samples = _image_folder_samples(self.root, classes)
        self.paths = [path for path, _ in samples]
        self.targets = [label for _, label in samples]
        self.image_size = image_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = _load_image_or_raise(self.paths[index])
        return _prepare(image, self.image_size, self.transform), self.targets[index]


# --------------------------------------------------------------------------- dense tasks

_ADE_SPLITS = ("training", "validation")
_ADE_EXPECTED = "ADEChallengeData2016/{images,annotations}/{training,validation}"


def _ade_base(root: Path) -> Path:
    """Accept the folder containing ADEChallengeData2016, or that folder itself."""
    if (root / "ADEChallengeData2016").is_dir():
        return root / "ADEChallengeData2016"
    if (root / "images").is_dir() and (root / "annotations").is_dir():
        return root
    raise FileNotFoundError(f"no ADE20K dataset at {root}; expected {_ADE_EXPECTED}")


def _ade_label(png: np.ndarray) -> Tensor:
    """mmseg's reduce_zero_label: 0 (other) -> 255 ignore, k -> k - 1."""
    label = torch.from_numpy(png.astype(np.int64)) - 1
    label[label < 0] = ADE_IGNORE_INDEX
    return label


def _annotation_max(path: Path) -> int:
    """Largest value in an ADE20K annotation PNG (decodes it, no copy kept)."""
    try:
        with Image.open(path) as img:
            if img.mode not in _ONE_CHANNEL_MODES:
                raise ValueError(
                    f"ADE20K annotation {path} has mode {img.mode}; expected a 1-channel PNG"
                )
            return int(np.asarray(img).max())
    except OSError as e:
        raise RuntimeError(f"cannot read ADE20K annotation {path}: {e}") from e


def check_ade_labels(labels: Sequence[Path], num_classes: int) -> None:
    """Every annotation holds only 0 (ignore) .. ``num_classes``; else an error naming it.

    A value above ``num_classes`` would otherwise surface mid-training as an index error
    inside the loss. Cost (2 CPU cores, files in the page cache): about 0.5 s per 1,000
    ADE-sized (512x683) annotations, so some 10 s for the 20,210 of the training split.
    """
    with ThreadPoolExecutor(_CHECK_THREADS) as pool:
        for path, value in zip(labels, pool.map(_annotation_max, labels), strict=True):
            if value > num_classes:
                raise ValueError(
                    f"ADE20K annotation {path} has value {value}; allowed are 0 (ignore) and "
                    f"1..{num_classes} (the classes)"
                )


class ADE20KDataset(Dataset):
    """ADE20K scene parsing: (image (3, H, W), label int64 (H, W) in 0..num_classes-1 or 255).

    Opening a split checks every annotation (see :func:`check_ade_labels`); ``max_images``
    keeps the first images only (sorted), and only those are checked.
    """

    def __init__(self, root: str | Path, split: str, image_size: int | None = None,
                 num_classes: int = 150, max_images: int | None = None):
        if split not in _ADE_SPLITS:
            raise ValueError(f"ADE20K split must be one of {_ADE_SPLITS}, got {split!r}")
        base = _ade_base(Path(root))
        image_dir, label_dir = base / "images" / split, base / "annotations" / split
        _require_dir(image_dir, _ADE_EXPECTED)
        self.root = base
        self.images = sorted(p for p in image_dir.iterdir() if _is_image(p))[:max_images]
        if not self.images:
            raise FileNotFoundError(f"no images in {image_dir}; expected {_ADE_EXPECTED}")
        self.labels = [label_dir / f"{p.stem}.png" for p in self.images]
        for image, label in zip(self.images, self.labels, strict=True):
            if not label.is_file():
                raise FileNotFoundError(f"ADE20K image {image} has no annotation {label}")
        check_ade_labels(self.labels, num_classes)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = _load_image_or_raise(self.images[index])
        label = _ade_label(_load_array(self.labels[index], "ADE20K annotation"))
        if label.shape != image.shape[-2:]:
            raise ValueError(
                f"{self.labels[index]} is {tuple(label.shape)} but its image is "
                f"{tuple(image.shape[-2:])}"
            )
        if self.image_size is not None:
            image = resize_center_crop(image, self.image_size)
            label = resize_center_crop(label, self.image_size, mode="nearest")
        return image, label


def _resolve(path_text: str, root: Path) -> Path:
    """Split-file path: relative to ``root``; BTS-style "/scene/x.png" is root-relative too."""
    path = Path(path_text)
    if path.is_absolute() and not path.exists():
        return root / path_text.lstrip("/")
    return path if path.is_absolute() else root / path


def _parse_split_file(split_file: Path, root: Path) -> list[tuple[Path, Path]]:
    """Lines ``rgb_path depth_path [focal]``; blank lines and ``#`` comments are skipped.

    Every listed file must exist, so that a missing test file fails when the split is
    opened rather than after the head has trained.
    """
    if not split_file.is_file():
        raise FileNotFoundError(
            f"NYUv2 split file {split_file} does not exist; expected lines 'rgb_path depth_path'"
        )
    pairs = []
    for number, line in enumerate(split_file.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) < 2:
            raise ValueError(
                f"{split_file}:{number}: expected 'rgb_path depth_path', got {line.strip()!r}"
            )
        pair = (_resolve(fields[0], root), _resolve(fields[1], root))
        for what, path in zip(("rgb image", "depth map"), pair, strict=True):
            if not path.is_file():
                raise FileNotFoundError(f"{split_file}:{number}: {what} {path} does not exist")
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"{split_file} lists no 'rgb_path depth_path' pairs")
    return pairs


def _depth_metres(path: Path, max_depth: float) -> Tensor:
    """16-bit PNG in millimetres -> float32 metres; 0 and > max_depth become 0 (invalid)."""
    raw = _load_array(path, "NYUv2 depth map")
    if raw.dtype == np.uint8:
        raise ValueError(f"depth map {path} is 8-bit; expected a 16-bit PNG in millimetres")
    depth = torch.from_numpy(raw.astype(np.float32) / 1000.0)
    return torch.where(depth > max_depth, torch.zeros_like(depth), depth)


class NYUDepthDataset(Dataset):
    """NYUv2 depth: (image (3, H, W), depth float32 (H, W) metres, 0 = invalid)."""

    def __init__(
        self,
        split_file: str | Path,
        root: str | Path | None = None,
        image_size: int | None = None,
        max_depth: float = 10.0,
    ):
        split_file = Path(split_file)
        self.root = Path(root) if root is not None else split_file.parent
        self.pairs = _parse_split_file(split_file, self.root)
        self.image_size = image_size
        self.max_depth = max_depth

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        rgb_path, depth_path = self.pairs[index]
        image = _load_image_or_raise(rgb_path)
        depth = _depth_metres(depth_path, self.max_depth)
        if depth.shape != image.shape[-2:]:
            raise ValueError(
                f"{depth_path} is {tuple(depth.shape)} but {rgb_path} is {tuple(image.shape[-2:])}"
            )
        if self.image_size is not None:
            image = resize_center_crop(image, self.image_size)
            # nearest: averaging across a depth edge or an invalid 0 would invent depths
            depth = resize_center_crop(depth, self.image_size, mode="nearest")
        return image, depth


def eigen_crop_mask(h: int, w: int) -> Tensor:
    """Boolean (h, w) mask of the Eigen crop, scaled from rows 45:471, cols 41:601 of 480x640."""
    r0, r1, c0, c1 = EIGEN_CROP_480x640
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[round(r0 * h / 480) : round(r1 * h / 480), round(c0 * w / 640) : round(c1 * w / 640)] = (
        True
    )
    return mask


# --------------------------------------------------------------------------- retrieval

_RETRIEVAL_DATASETS = ("roxford5k", "rparis6k")


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """What ``_codecs.encode`` does for bytes in protocol-2 pickles, and nothing else."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def numpy_pickle_globals() -> dict[str, Any]:
    """``module.name`` -> object for every global a pickle of plain data needs besides
    builtin containers: numpy arrays, dtypes and scalars (protocols 2 to 5) and protocol-2
    bytes. Both numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``) names resolve to
    the installed numpy's own functions.
    """
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric
    allowed: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype,
                               "_codecs.encode": _latin1_bytes}
    for package in ("numpy.core", "numpy._core"):
        allowed[f"{package}.multiarray._reconstruct"] = multiarray._reconstruct
        allowed[f"{package}.multiarray.scalar"] = multiarray.scalar
        allowed[f"{package}.numeric._frombuffer"] = numeric._frombuffer
    return allowed


class _GroundTruthUnpickler(pickle.Unpickler):
    """Admits plain data (dicts, lists, tuples, numbers, strings, bytes) and numpy arrays.

    A pickle can name any importable callable and call it while loading; these files are
    data, so every global but :func:`numpy_pickle_globals` (``os.system``,
    ``builtins.exec``, ...) is refused and the payload never runs.
    """

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self.path = path
        self.allowed = numpy_pickle_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get(f"{module}.{name}")
        if found is None:
            raise pickle.UnpicklingError(
                f"{self.path}: refusing to load global {module}.{name}; a ground-truth file "
                "holds only dicts, lists, numbers, strings and numpy arrays"
            )
        return found


def load_ground_truth(path: str | Path) -> Any:
    """Unpickle a revisited ``gnd_*.pkl`` without running code (see the unpickler above)."""
    path = Path(path)
    with open(path, "rb") as f:
        return _GroundTruthUnpickler(f, path).load()


def _check_gnd(meta: Any, path: Path) -> None:
    if not isinstance(meta, dict):
        raise ValueError(f"{path} holds a {type(meta).__name__}; expected a dict with "
                         "imlist, qimlist, gnd")
    for key in ("imlist", "qimlist", "gnd"):
        if key not in meta:
            raise ValueError(f"{path} has no {key!r} entry; expected imlist, qimlist, gnd")
    if len(meta["gnd"]) != len(meta["qimlist"]):
        raise ValueError(
            f"{path}: {len(meta['gnd'])} gnd entries for {len(meta['qimlist'])} queries"
        )
    n = len(meta["imlist"])
    for q, entry in enumerate(meta["gnd"]):
        query = f"query {q} ({meta['qimlist'][q]})"
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: {query} gnd entry is a {type(entry).__name__}, not a dict")
        for key in ("easy", "hard", "junk"):
            # An absent list is not an empty one: taking it as empty would change the mAP.
            if key not in entry:
                raise ValueError(f"{path}: {query} has no {key!r} list; expected "
                                 "'easy', 'hard', 'junk' (each may be empty) and 'bbx'")
            bad = [i for i in entry[key] if not 0 <= int(i) < n]
            if bad:
                raise ValueError(f"{path}: {query} {key} indices {bad} outside 0..{n - 1}")
        if "bbx" not in entry or len(entry["bbx"]) != 4:
            raise ValueError(f"{path}: {query} has no [x1, y1, x2, y2] 'bbx'")


class RevisitedRetrievalDataset:
    """Revisited Oxford / Paris: ``root/jpg/<name>.jpg`` and ``root/gnd_<dataset>.pkl``.

    ``root`` may also be the parent holding ``<dataset>/`` (the cirtorch layout).
    ``image_size`` resizes the *longer* side, as retrieval pipelines do. Opening checks the
    ground truth (every query has ``easy``, ``hard``, ``junk`` and ``bbx``) and that every
    listed image exists.
    """

    def __init__(self, root: str | Path, dataset: str = "roxford5k", image_size: int | None = None):
        if dataset not in _RETRIEVAL_DATASETS:
            raise ValueError(f"dataset must be one of {_RETRIEVAL_DATASETS}, got {dataset!r}")
        root = Path(root)
        if not (root / f"gnd_{dataset}.pkl").is_file() and (root / dataset).is_dir():
            root = root / dataset
        gnd_path = root / f"gnd_{dataset}.pkl"
        if not gnd_path.is_file():
            raise FileNotFoundError(
                f"no {gnd_path}; expected {root}/jpg/<name>.jpg and {root}/gnd_{dataset}.pkl"
            )
        meta = load_ground_truth(gnd_path)
        _check_gnd(meta, gnd_path)
        self.root, self.dataset, self.image_size = root, dataset, image_size
        self.imlist: list[str] = list(meta["imlist"])
        self.qimlist: list[str] = list(meta["qimlist"])
        self.gnd: list[dict] = list(meta["gnd"])
        missing = [str(p) for p in map(self.image_path, self.imlist + self.qimlist)
                   if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{gnd_path} lists {len(missing)} images that do not exist: {missing[:5]}"
            )

    def image_path(self, name: str) -> Path:
        """``root/jpg/<name>.jpg`` for a name of ``imlist`` or ``qimlist``."""
        return self.root / "jpg" / f"{name}.jpg"

    def _finish(self, image: Tensor) -> Tensor:
        if self.image_size is None:
            return image
        return _resize(
            image, _resized_shape(*image.shape[-2:], self.image_size, "long"), "bilinear"
        )

    def database_image(self, i: int) -> Tensor:
        return self._finish(_load_image_or_raise(self.image_path(self.imlist[i])))

    def query_image(self, i: int, crop: bool = True) -> Tensor:
        """Query ``i``, cropped to its ``bbx`` as the revisited protocol does (PIL rounding)."""
        image = _load_image_or_raise(self.image_path(self.qimlist[i]))
        if crop:
            h, w = image.shape[-2:]
            x1, y1, x2, y2 = (round(float(v)) for v in self.gnd[i]["bbx"])
            x1, x2 = min(max(x1, 0), w), min(max(x2, 0), w)
            y1, y2 = min(max(y1, 0), h), min(max(y2, 0), h)
            if x2 <= x1 or y2 <= y1:
                raise ValueError(f"query {self.qimlist[i]} has an empty bbx {self.gnd[i]['bbx']}")
            image = image[:, y1:y2, x1:x2]
        return self._finish(image)
